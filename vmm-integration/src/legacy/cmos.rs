// SPDX-License-Identifier: Apache-2.0
//! A minimal MC146818 CMOS RTC at ports 0x70/0x71: the time of day (host UTC, BCD, 24-hour)
//! and status registers saying no update is in progress, so a guest reading the wall clock
//! never spins on UIP. Other CMOS bytes read as written (zero at start).

use vm_device::MutDevicePio;
use vm_device::bus::{PioAddress, PioAddressOffset};

const INDEX_MASK: u8 = 0x7f;
const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_STATUS_A: u8 = 0x0a;
const REG_STATUS_B: u8 = 0x0b;
const REG_STATUS_C: u8 = 0x0c;
const REG_STATUS_D: u8 = 0x0d;
const REG_CENTURY: u8 = 0x32;
/// Status A: 32.768 kHz time base, 1024 Hz rate, UIP clear.
const STATUS_A_DEFAULT: u8 = 0x26;
/// Status B: 24-hour mode, BCD.
const STATUS_B_24H: u8 = 0x02;
/// Status D: valid RAM and time.
const STATUS_D_VRT: u8 = 0x80;

/// A UTC calendar time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RtcTime {
    pub year: u32,
    pub month: u8,
    pub day: u8,
    pub weekday: u8,
    pub hour: u8,
    pub minute: u8,
    pub second: u8,
}

/// The host's current UTC time of day.
///
/// Computed here rather than with gmtime_r: glibc's first gmtime_r in a thread reads
/// /etc/localtime (openat, read, lseek, close), and this runs on a vCPU thread, whose seccomp
/// filter rightly has no file access. A Linux guest reading the RTC at boot was killed with
/// SIGSYS (lseek) under the default `--seccomp true`.
fn host_utc_now() -> RtcTime {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    utc_from_unix(i64::try_from(secs).unwrap_or(i64::MAX))
}

/// Seconds since the Unix epoch as a UTC calendar time (proleptic Gregorian; days to a date
/// with Howard Hinnant's `civil_from_days`).
pub fn utc_from_unix(secs: i64) -> RtcTime {
    const DAY: i64 = 86_400;
    let days = secs.div_euclid(DAY);
    let of_day = secs.rem_euclid(DAY);
    // Shift the epoch to 0000-03-01, so a leap day is the last day of its year.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    RtcTime {
        year: u32::try_from(year).unwrap_or(0),
        month: month as u8,
        day: day as u8,
        // 1970-01-01 was a Thursday; the RTC counts Sunday as 1.
        weekday: ((days + 4).rem_euclid(7) + 1) as u8,
        hour: (of_day / 3600) as u8,
        minute: (of_day % 3600 / 60) as u8,
        second: (of_day % 60) as u8,
    }
}

fn bcd(v: u32) -> u8 {
    (((v / 10) % 10) << 4 | (v % 10)) as u8
}

/// The RTC register `index` at time `t`; `None` for plain CMOS RAM.
pub fn rtc_register(index: u8, t: &RtcTime) -> Option<u8> {
    Some(match index {
        REG_SECONDS => bcd(t.second.into()),
        REG_MINUTES => bcd(t.minute.into()),
        REG_HOURS => bcd(t.hour.into()),
        REG_WEEKDAY => bcd(t.weekday.into()),
        REG_DAY => bcd(t.day.into()),
        REG_MONTH => bcd(t.month.into()),
        REG_YEAR => bcd(t.year % 100),
        REG_CENTURY => bcd(t.year / 100),
        REG_STATUS_A => STATUS_A_DEFAULT,
        REG_STATUS_B => STATUS_B_24H,
        REG_STATUS_C => 0,
        REG_STATUS_D => STATUS_D_VRT,
        _ => return None,
    })
}

pub struct Cmos {
    index: u8,
    ram: [u8; 128],
}

impl Default for Cmos {
    fn default() -> Self {
        Self {
            index: 0,
            ram: [0; 128],
        }
    }
}

impl MutDevicePio for Cmos {
    fn pio_read(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        data.fill(0);
        let Some(first) = data.first_mut() else {
            return;
        };
        *first = match offset {
            0 => self.index,
            _ => rtc_register(self.index, &host_utc_now())
                .unwrap_or(self.ram[usize::from(self.index)]),
        };
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            // Bit 7 of the index port is the NMI mask on PCs; it is not part of the index.
            0 => self.index = value & INDEX_MASK,
            // Time and status writes (setting the clock) are dropped; RAM bytes are kept.
            _ if rtc_register(self.index, &host_utc_now()).is_none() => {
                self.ram[usize::from(self.index)] = value;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_rtc_registers_are_bcd_and_never_updating() {
        let t = RtcTime {
            year: 2026,
            month: 11,
            day: 22,
            weekday: 1,
            hour: 23,
            minute: 59,
            second: 7,
        };
        assert_eq!(rtc_register(REG_SECONDS, &t), Some(0x07));
        assert_eq!(rtc_register(REG_MINUTES, &t), Some(0x59));
        assert_eq!(rtc_register(REG_HOURS, &t), Some(0x23));
        assert_eq!(rtc_register(REG_YEAR, &t), Some(0x26));
        assert_eq!(rtc_register(REG_CENTURY, &t), Some(0x20));
        assert_eq!(rtc_register(REG_MONTH, &t), Some(0x11));
        assert_eq!(
            rtc_register(REG_STATUS_A, &t).unwrap() & 0x80,
            0,
            "UIP clear"
        );
        assert_eq!(rtc_register(REG_STATUS_D, &t), Some(STATUS_D_VRT));
        assert_eq!(rtc_register(0x40, &t), None);
    }

    #[test]
    fn test_utc_from_unix_matches_gmtime() {
        let t = utc_from_unix(0);
        assert_eq!(
            (
                t.year, t.month, t.day, t.weekday, t.hour, t.minute, t.second
            ),
            (1970, 1, 1, 5, 0, 0, 0)
        );
        // 2000-02-29 (a leap day in a century year), 2100-03-01 (2100 is not leap), the
        // end of 2026, and steps through several years.
        let samples = [951_782_400, 951_868_799, 4_107_542_400, 1_798_761_599]
            .into_iter()
            .chain((0..4000).map(|i| 86_399 + i * 997_331));
        for secs in samples {
            let t = utc_from_unix(secs);
            // SAFETY: tm is plain data, filled by gmtime_r from a valid time_t; both
            // pointers are valid for the call.
            let tm = unsafe {
                let mut tm: libc::tm = std::mem::zeroed();
                libc::gmtime_r(&secs, &mut tm);
                tm
            };
            assert_eq!(
                (
                    t.year, t.month, t.day, t.weekday, t.hour, t.minute, t.second
                ),
                (
                    (tm.tm_year + 1900) as u32,
                    (tm.tm_mon + 1) as u8,
                    tm.tm_mday as u8,
                    (tm.tm_wday + 1) as u8,
                    tm.tm_hour as u8,
                    tm.tm_min as u8,
                    tm.tm_sec as u8
                ),
                "at {secs}"
            );
        }
    }

    #[test]
    fn test_index_masks_nmi_bit_and_ram_round_trips() {
        let mut cmos = Cmos::default();
        let base = PioAddress(0x70);
        cmos.pio_write(base, 0, &[0x80 | 0x40]);
        cmos.pio_write(base, 1, &[0xab]);
        let mut b = [0u8; 1];
        cmos.pio_read(base, 1, &mut b);
        assert_eq!(b[0], 0xab);
        cmos.pio_read(base, 0, &mut b);
        assert_eq!(b[0], 0x40);
        // Writing the seconds register does not stick into RAM.
        cmos.pio_write(base, 0, &[REG_STATUS_D]);
        cmos.pio_write(base, 1, &[0]);
        cmos.pio_read(base, 1, &mut b);
        assert_eq!(b[0], STATUS_D_VRT);
    }
}
