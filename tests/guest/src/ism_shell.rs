// SPDX-License-Identifier: Apache-2.0
//! `ism.test=ism`: open the virtio-ism device and run commands that drive the driver, from
//! the command line (`ism.script=cmd;cmd;...`, words separated by `,`) and then from COM1
//! input lines, until `poweroff`.
//!
//! With `ism.draft=1` the driver negotiates no feature bit and never sends GRANT (a driver
//! written only against the draft; `grant` then fails with `DRIVER`), and `pingpong` treats
//! every interrupt on the kick vector as a peer's kick, as such a driver does.
//!
//! Every command prints exactly one line `ISM-TEST seq=<n> cmd=<name> status=<ok|error> ...`,
//! so a host test can send a command and wait for its numbered answer. Region bytes are
//! compared against a pattern derived from a seed (`fill` / `check`), so no region contents
//! travel over the serial line.

use core::cell::UnsafeCell;

use ism_guest_driver::Platform as _;
use ism_guest_driver::ism::{
    Access, IsmDriver, IsmError, IsmEvent, IsmOptions, PERM_ATTACH, PERM_CLEAN_DEFAULT,
    PERM_MANAGE, PERM_READ, PERM_WRITE, Perm, Region, find_ism,
};
use ism_guest_driver::pci::{self, MSIX_CAP_ID, MsixCapability, PciAddress, x86_msi_address};
use ism_guest_driver::platform::Width;

use crate::cases::{self, Context};
use crate::platform::GuestPlatform;
use crate::{apic, boot, serial};

/// Interrupt vector peer kicks are delivered on.
pub const KICK_VECTOR: u8 = 0x42;
/// Polls a control command may take (about a microsecond each): generous, because on a
/// loaded two-core host the VMM's worker may wait its turn for a while, and a timeout leaves
/// the control path broken for the rest of the run.
const COMMAND_MAX_WAITS: u32 = 30_000_000;
/// Regions one guest can hold at a time.
const MAX_REGIONS: usize = 1100;
/// Longest input line (an `attach-many` line carries a few hundred tokens).
const MAX_LINE: usize = 8192;
/// LAPIC timer ticks (about 1 ms each) a `wait-kick` waits at most.
const KICK_WAIT_TICKS: u64 = 10_000;
/// LAPIC timer ticks a poll-mode `wait-kick` spins on the pending bit at most.
const KICK_POLL_TICKS: u64 = 2_000;
/// LAPIC timer ticks one `pingpong` round waits for the peer's kick at most.
const PINGPONG_WAIT_TICKS: u64 = 2_000;
/// Polls of the interrupt counter in ring 3 before a `pingpong` wait halts.
const PINGPONG_SPINS: u32 = 20_000;
/// `pingpong` region layout: the counter of kicks the ping side sent, and the pong side's.
const PING_COUNTER: u64 = 0;
const PONG_COUNTER: u64 = 64;

/// The held regions, keyed by token. Static because each `Region` is about 1 KiB.
struct RegionTable(UnsafeCell<[Option<Region>; MAX_REGIONS]>);

// SAFETY: one CPU, ring 3 only; the shell is the only user.
unsafe impl Sync for RegionTable {}

static REGIONS: RegionTable = RegionTable(UnsafeCell::new([const { None }; MAX_REGIONS]));

struct LineBuffer(UnsafeCell<[u8; MAX_LINE]>);

// SAFETY: as RegionTable.
unsafe impl Sync for LineBuffer {}

static LINE: LineBuffer = LineBuffer(UnsafeCell::new([0; MAX_LINE]));

/// Where the kick vector's MSI-X entry and pending bit are.
#[derive(Clone, Copy)]
struct KickEntry {
    entry: u16,
    table_addr: u64,
    pba_addr: u64,
}

struct Shell<'p> {
    ism: IsmDriver<'p, GuestPlatform>,
    platform: &'p GuestPlatform,
    regions: &'static mut [Option<Region>; MAX_REGIONS],
    kick: Option<KickEntry>,
    apic_id: u8,
    /// `wait-kick` polls the pending bit with the entry masked instead of taking interrupts.
    poll_kicks: bool,
    /// Kick-vector interrupts `pingpong` has taken as kicks so far (a draft driver's view:
    /// every interrupt on a region's vector since boot is a kick).
    kicks_consumed: u64,
    seq: u64,
    malformed: u64,
}

/// What a command did: `Ok(details)` or a driver error; `Err(Bad)` for a malformed command.
enum Outcome {
    Done,
    Failed(IsmError),
    Bad(&'static str),
    PowerOff,
}

/// Run the shell; returns whether no command was malformed.
pub fn run(ctx: &Context<'_>, script: Option<&str>) -> bool {
    let (config, start, end) = cases::config(ctx);
    let Some(addr) = find_ism(&config, start, end) else {
        report!("error=no_virtio_ism");
        return false;
    };
    let kick = kick_entry(ctx.platform, &config, addr);
    let options = IsmOptions {
        max_waits: COMMAND_MAX_WAITS,
        ..if ctx.draft {
            IsmOptions::draft()
        } else {
            IsmOptions::default()
        }
    };
    // SAFETY: this program owns the function and its BARs; the platform reaches the PCI
    // windows the VMM places BARs in.
    let ism = match unsafe { IsmDriver::open(ctx.platform, &config, addr, options) } {
        Ok(ism) => ism,
        Err(e) => {
            report!("error=ism_open status={} detail=\"{e}\"", status_name(&e));
            return false;
        }
    };
    let info = *ism.info();
    let geometry = *ism.window().geometry();
    report!(
        "ism=ready device={addr} gid={:#x} devid={} chunk_size={} chunks={} notify_size={} features={:#x} window={:#x} kick_entry={} draft={}",
        info.gid,
        info.devid,
        info.chunk_size,
        info.chunks,
        info.notify_size,
        info.features,
        geometry.regions_addr,
        kick.map_or(-1, |k| i32::from(k.entry)),
        ctx.draft
    );
    let mut shell = Shell {
        ism,
        platform: ctx.platform,
        // SAFETY: the only reference ever made to the table.
        regions: unsafe { &mut *REGIONS.0.get() },
        kick,
        apic_id: ctx.apic_id,
        poll_kicks: false,
        kicks_consumed: 0,
        seq: 0,
        malformed: 0,
    };
    for command in script.unwrap_or("").split(';') {
        let mut words = command.split(',').filter(|w| !w.is_empty());
        if shell.execute(&mut words) {
            return shell.malformed == 0;
        }
    }
    // SAFETY: the only reference ever made to the line buffer.
    let line = unsafe { &mut *LINE.0.get() };
    loop {
        let len = read_line(line);
        let Ok(text) = core::str::from_utf8(&line[..len]) else {
            shell.malformed += 1;
            report!("error=input_not_utf8");
            continue;
        };
        let mut words = text.split_ascii_whitespace();
        if shell.execute(&mut words) {
            return shell.malformed == 0;
        }
    }
}

/// The MSI-X entry kicks use (entry 2, after the control and event queues' places, or the last
/// one of a smaller table), with its table slot and pending bit addresses (the driver maps the
/// table; the pending-bit qword is mapped here).
fn kick_entry(
    platform: &GuestPlatform,
    config: &impl pci::ConfigAccess,
    addr: PciAddress,
) -> Option<KickEntry> {
    let cap = pci::CapabilityIter::new(config, addr).find(|c| c.id == MSIX_CAP_ID)?;
    let msix = MsixCapability::parse(config, addr, cap)?;
    let bars = pci::read_bars(config, addr).ok()?;
    let pba = config.read_u32(addr, cap.offset + MsixCapability::PBA_REGISTER);
    let bar_base = |index: u32| bars.get(index as usize).copied().flatten().map(|b| b.base);
    let entry = msix.table_size.saturating_sub(1).min(2);
    let kick = KickEntry {
        entry,
        table_addr: bar_base(msix.table_bar.into())? + u64::from(msix.table_offset),
        pba_addr: bar_base(pba & 7)? + u64::from(pba & !7),
    };
    platform
        .map_mmio(kick.pba_addr + u64::from(entry / 64) * 8, 8)
        .then_some(kick)
}

/// Read one line from COM1 (without the end of line), halting on the LAPIC timer between
/// polls so a waiting guest costs little host CPU.
fn read_line(buf: &mut [u8]) -> usize {
    let mut len = 0;
    apic::start_periodic_timer(1_000_000);
    loop {
        let Some(byte) = serial::read_byte() else {
            boot::idle();
            continue;
        };
        match byte {
            b'\n' | b'\r' if len > 0 => break,
            b'\n' | b'\r' => {}
            _ if len < buf.len() => {
                buf[len] = byte;
                len += 1;
            }
            _ => {}
        }
    }
    apic::stop_timer();
    len
}

impl Shell<'_> {
    /// Run one command; true when the guest should power off.
    fn execute<'a>(&mut self, words: &mut impl Iterator<Item = &'a str>) -> bool {
        let Some(name) = words.next() else {
            return false;
        };
        self.seq += 1;
        let seq = self.seq;
        // Each command prints its own `seq= cmd= status=` prefix and details.
        let outcome = match name {
            "alloc" => self.alloc(words, seq),
            "attach" => self.attach(words, seq),
            "detach" => self.detach(words, seq),
            "grant" => self.grant(words, seq),
            "fill" => self.fill(words, seq),
            "check" => self.check(words, seq),
            "write" => self.write(words, seq),
            "read" => self.read(words, seq),
            "rawwrite" => self.raw_write(words, seq),
            "bind" => self.bind(words, seq),
            "kick" => self.kick(words, seq),
            "kick-mode" => self.kick_mode(words, seq),
            "wait-kick" => self.wait_kick(words, seq),
            "pingpong" => self.pingpong(words, seq),
            "events" => self.events(seq),
            "alloc-many" => self.alloc_many(words, seq),
            "alloc-free" => self.alloc_free(words, seq),
            "attach-many" => self.attach_many(words, seq),
            "bench" => self.bench(words, seq),
            "poweroff" => Outcome::PowerOff,
            _ => Outcome::Bad("unknown_command"),
        };
        match outcome {
            Outcome::Done => false,
            Outcome::Failed(e) => {
                report!(
                    "seq={seq} cmd={name} status={} detail=\"{e}\"",
                    status_name(&e)
                );
                false
            }
            Outcome::Bad(why) => {
                self.malformed += 1;
                report!("seq={seq} cmd={name} status=bad_command detail={why}");
                false
            }
            Outcome::PowerOff => {
                report!(
                    "seq={seq} cmd=poweroff status=ok malformed={}",
                    self.malformed
                );
                true
            }
        }
    }

    fn slot_of(&self, token: u64) -> Option<usize> {
        self.regions
            .iter()
            .position(|r| r.as_ref().is_some_and(|r| r.token() == token))
    }

    fn region(&self, token: u64) -> Option<&Region> {
        self.slot_of(token).and_then(|i| self.regions[i].as_ref())
    }

    /// [`Self::keep`] `region`, as a command's outcome.
    fn kept(&mut self, region: Region) -> Outcome {
        if self.keep(region) {
            Outcome::Done
        } else {
            Outcome::Bad("region_table_full")
        }
    }

    fn keep(&mut self, region: Region) -> bool {
        match self.regions.iter_mut().find(|r| r.is_none()) {
            Some(slot) => {
                *slot = Some(region);
                true
            }
            None => false,
        }
    }

    fn alloc<'a>(&mut self, mut words: impl Iterator<Item = &'a str>, seq: u64) -> Outcome {
        let Some(size) = words.next().and_then(parse_size) else {
            return Outcome::Bad("size");
        };
        match self.ism.alloc(size) {
            Ok(region) => {
                report!(
                    "seq={seq} cmd=alloc status=ok token={:#x} size={} areas={} offset={:#x}",
                    region.token(),
                    region.size(),
                    region.areas().len(),
                    region.first_offset()
                );
                self.kept(region)
            }
            Err(e) => Outcome::Failed(e),
        }
    }

    fn attach<'a>(&mut self, mut words: impl Iterator<Item = &'a str>, seq: u64) -> Outcome {
        let Some(token) = words.next().and_then(parse_number) else {
            return Outcome::Bad("token");
        };
        let access = match words.next().unwrap_or("rw") {
            "rw" => Access::ReadWrite,
            "ro" => Access::Read,
            "as-granted" => Access::AsGranted,
            _ => return Outcome::Bad("access"),
        };
        match self.ism.attach(token, access) {
            Ok(region) => {
                report!(
                    "seq={seq} cmd=attach status=ok token={token:#x} size={} areas={} writable={} offset={:#x}",
                    region.size(),
                    region.areas().len(),
                    region.writable(),
                    region.first_offset()
                );
                self.kept(region)
            }
            Err(e) => Outcome::Failed(e),
        }
    }

    fn detach<'a>(&mut self, mut words: impl Iterator<Item = &'a str>, seq: u64) -> Outcome {
        let Some(token) = words.next().and_then(parse_number) else {
            return Outcome::Bad("token");
        };
        match self.ism.detach(token) {
            Ok(()) => {
                if let Some(i) = self.slot_of(token) {
                    self.regions[i] = None;
                }
                report!("seq={seq} cmd=detach status=ok token={token:#x}");
                Outcome::Done
            }
            Err(e) => Outcome::Failed(e),
        }
    }

    /// `grant TOKEN default|DEVID PERMS` with PERMS letters r w a m c or a number.
    fn grant<'a>(&mut self, mut words: impl Iterator<Item = &'a str>, seq: u64) -> Outcome {
        let (Some(token), Some(who), Some(perms)) = (
            words.next().and_then(parse_number),
            words.next(),
            words.next().and_then(parse_perms),
        ) else {
            return Outcome::Bad("grant_args");
        };
        let result = if who == "default" {
            self.ism.grant_default(token, perms)
        } else {
            let Some(devid) = parse_number(who) else {
                return Outcome::Bad("devid");
            };
            self.ism.grant_for_device(token, perms, devid)
        };
        match result {
            Ok(()) => {
                report!("seq={seq} cmd=grant status=ok token={token:#x} to={who} perms={perms}");
                Outcome::Done
            }
            Err(e) => Outcome::Failed(e),
        }
    }

    fn token_region<'a>(
        &self,
        words: &mut impl Iterator<Item = &'a str>,
    ) -> Result<(u64, Region), Outcome> {
        let token = words
            .next()
            .and_then(parse_number)
            .ok_or(Outcome::Bad("token"))?;
        let region = self
            .region(token)
            .cloned()
            .ok_or(Outcome::Failed(IsmError::NoEntry))?;
        Ok((token, region))
    }

    /// `fill TOKEN SEED`: the whole region gets the seed's pattern.
    fn fill<'a>(&mut self, mut words: impl Iterator<Item = &'a str>, seq: u64) -> Outcome {
        let (token, region) = match self.token_region(&mut words) {
            Ok(found) => found,
            Err(outcome) => return outcome,
        };
        let Some(seed) = words.next().and_then(parse_number) else {
            return Outcome::Bad("seed");
        };
        match fill_pattern(&self.ism, &region, seed) {
            Ok(()) => {
                report!(
                    "seq={seq} cmd=fill status=ok token={token:#x} seed={seed:#x} bytes={}",
                    region.size()
                );
                Outcome::Done
            }
            Err(e) => Outcome::Failed(e),
        }
    }

    /// `check TOKEN SEED`: whether every word of the region holds the seed's pattern.
    fn check<'a>(&mut self, mut words: impl Iterator<Item = &'a str>, seq: u64) -> Outcome {
        let (token, region) = match self.token_region(&mut words) {
            Ok(found) => found,
            Err(outcome) => return outcome,
        };
        let Some(seed) = words.next().and_then(parse_number) else {
            return Outcome::Bad("seed");
        };
        match check_pattern(&self.ism, &region, seed) {
            Ok(None) => {
                report!("seq={seq} cmd=check status=ok token={token:#x} match=true");
                Outcome::Done
            }
            Ok(Some((offset, got))) => {
                report!(
                    "seq={seq} cmd=check status=ok token={token:#x} match=false bad_offset={offset:#x} got={got:#x}"
                );
                Outcome::Done
            }
            Err(e) => Outcome::Failed(e),
        }
    }

    /// `write TOKEN OFFSET TEXT`: TEXT's bytes at OFFSET through the driver.
    fn write<'a>(&mut self, mut words: impl Iterator<Item = &'a str>, seq: u64) -> Outcome {
        let (token, region) = match self.token_region(&mut words) {
            Ok(found) => found,
            Err(outcome) => return outcome,
        };
        let (Some(offset), Some(text)) = (words.next().and_then(parse_number), words.next()) else {
            return Outcome::Bad("write_args");
        };
        match self.ism.write(&region, offset, text.as_bytes()) {
            Ok(()) => {
                report!(
                    "seq={seq} cmd=write status=ok token={token:#x} offset={offset} len={}",
                    text.len()
                );
                Outcome::Done
            }
            Err(e) => Outcome::Failed(e),
        }
    }

    /// `read TOKEN OFFSET LEN` (LEN <= 64): the bytes as hex and as text.
    fn read<'a>(&mut self, mut words: impl Iterator<Item = &'a str>, seq: u64) -> Outcome {
        let (token, region) = match self.token_region(&mut words) {
            Ok(found) => found,
            Err(outcome) => return outcome,
        };
        let (Some(offset), Some(len)) = (
            words.next().and_then(parse_number),
            words.next().and_then(parse_number),
        ) else {
            return Outcome::Bad("read_args");
        };
        let mut buf = [0u8; 64];
        let Some(bytes) = buf.get_mut(..len as usize) else {
            return Outcome::Bad("read_len");
        };
        if let Err(e) = self.ism.read(&region, offset, bytes) {
            return Outcome::Failed(e);
        }
        let mut hex = [0u8; 128];
        for (i, b) in bytes.iter().enumerate() {
            hex[2 * i] = HEX[usize::from(b >> 4)];
            hex[2 * i + 1] = HEX[usize::from(b & 15)];
        }
        let text_len = bytes
            .iter()
            .position(|b| !b.is_ascii_graphic())
            .unwrap_or(bytes.len());
        report!(
            "seq={seq} cmd=read status=ok token={token:#x} offset={offset} read={} text={}",
            core::str::from_utf8(&hex[..2 * bytes.len()]).unwrap_or(""),
            core::str::from_utf8(&bytes[..text_len]).unwrap_or("")
        );
        Outcome::Done
    }

    /// `rawwrite TOKEN OFFSET VALUE`: one 8-byte store straight into the window, bypassing the
    /// driver's read-only check, to see what the VMM does with a write to a read-only mapping.
    fn raw_write<'a>(&mut self, mut words: impl Iterator<Item = &'a str>, seq: u64) -> Outcome {
        let (token, region) = match self.token_region(&mut words) {
            Ok(found) => found,
            Err(outcome) => return outcome,
        };
        let (Some(offset), Some(value)) = (
            words.next().and_then(parse_number),
            words.next().and_then(parse_number),
        ) else {
            return Outcome::Bad("rawwrite_args");
        };
        let area = region.areas()[0];
        if !offset.is_multiple_of(8) || offset + 8 > area.size {
            return Outcome::Bad("rawwrite_offset");
        }
        let addr = self.ism.window().geometry().regions_addr + area.offset + offset;
        // SAFETY: addr is inside the first area of a region the device mapped into its
        // window (checked against the area above); a store to a read-only mapping is exactly
        // what this command tests, and the VMM handles it as an MMIO exit.
        unsafe { self.platform.mmio_write(addr, Width::U64, value) };
        report!("seq={seq} cmd=rawwrite status=ok token={token:#x} offset={offset}");
        Outcome::Done
    }

    /// `bind TOKEN`: program the kick entry to raise KICK_VECTOR here and bind it.
    fn bind<'a>(&mut self, mut words: impl Iterator<Item = &'a str>, seq: u64) -> Outcome {
        let Some(token) = words.next().and_then(parse_number) else {
            return Outcome::Bad("token");
        };
        let Some(kick) = self.kick else {
            return Outcome::Failed(IsmError::NoMsix);
        };
        let address = x86_msi_address(self.apic_id);
        match self
            .ism
            .bind_event_vector(token, kick.entry, address, KICK_VECTOR.into())
        {
            Ok(()) => {
                if self.poll_kicks {
                    self.mask_kick_entry(true);
                }
                report!(
                    "seq={seq} cmd=bind status=ok token={token:#x} entry={} vector={KICK_VECTOR:#x}",
                    kick.entry
                );
                Outcome::Done
            }
            Err(e) => Outcome::Failed(e),
        }
    }

    fn kick<'a>(&mut self, mut words: impl Iterator<Item = &'a str>, seq: u64) -> Outcome {
        let (token, region) = match self.token_region(&mut words) {
            Ok(found) => found,
            Err(outcome) => return outcome,
        };
        match self.ism.kick(&region) {
            Ok(()) => {
                report!("seq={seq} cmd=kick status=ok token={token:#x}");
                Outcome::Done
            }
            Err(e) => Outcome::Failed(e),
        }
    }

    /// `kick-mode irq|poll`: take kicks as interrupts, or mask the entry and poll its
    /// pending bit.
    fn kick_mode<'a>(&mut self, mut words: impl Iterator<Item = &'a str>, seq: u64) -> Outcome {
        let poll = match words.next() {
            Some("irq") => false,
            Some("poll") => true,
            _ => return Outcome::Bad("mode"),
        };
        if self.kick.is_none() {
            return Outcome::Failed(IsmError::NoMsix);
        }
        self.poll_kicks = poll;
        self.mask_kick_entry(poll);
        report!(
            "seq={seq} cmd=kick-mode status=ok mode={} kicks={}",
            if poll { "poll" } else { "irq" },
            boot::irq_count(KICK_VECTOR)
        );
        Outcome::Done
    }

    fn mask_kick_entry(&self, masked: bool) {
        if let Some(kick) = self.kick {
            let control = kick.table_addr + u64::from(kick.entry) * 16 + 12;
            // SAFETY: the vector-control dword of an entry of the function's MSI-X table,
            // inside its BAR (the driver checked the table fits when it mapped it).
            unsafe {
                self.platform
                    .mmio_write(control, Width::U32, u64::from(masked))
            };
        }
    }

    fn kick_pending(&self, kick: KickEntry) -> bool {
        let word = kick.pba_addr + u64::from(kick.entry / 64) * 8;
        // SAFETY: a qword of the function's pending-bit array, inside its BAR.
        let bits = unsafe { self.platform.mmio_read(word, Width::U64) };
        bits & (1 << (kick.entry % 64)) != 0
    }

    /// `wait-kick COUNT`: wait until COUNT kick interrupts have arrived in total (irq mode).
    /// In poll mode (entry masked): spin on the entry's pending bit for up to about 2 s,
    /// then unmask, which must deliver a kick latched while masked, and mask again.
    fn wait_kick<'a>(&mut self, mut words: impl Iterator<Item = &'a str>, seq: u64) -> Outcome {
        let Some(kick) = self.kick else {
            return Outcome::Failed(IsmError::NoMsix);
        };
        if self.poll_kicks {
            let start = boot::irq_count(apic::TIMER_VECTOR);
            apic::start_periodic_timer(1_000_000);
            let mut polls = 0u64;
            let mut pending = false;
            while boot::irq_count(apic::TIMER_VECTOR) - start < KICK_POLL_TICKS {
                polls += 1;
                if self.kick_pending(kick) {
                    pending = true;
                    break;
                }
                core::hint::spin_loop();
            }
            apic::stop_timer();
            let masked_kicks = boot::irq_count(KICK_VECTOR);
            self.mask_kick_entry(false);
            let delivered = cases::wait_for_irq(KICK_VECTOR, masked_kicks + 1, 1000);
            self.mask_kick_entry(true);
            report!(
                "seq={seq} cmd=wait-kick status=ok mode=poll pending={pending} polls={polls} kicks_masked={masked_kicks} delivered={delivered} pending_after={} kicks={}",
                self.kick_pending(kick),
                boot::irq_count(KICK_VECTOR)
            );
            return Outcome::Done;
        }
        let Some(count) = words.next().and_then(parse_number) else {
            return Outcome::Bad("count");
        };
        let seen = cases::wait_for_irq(KICK_VECTOR, count, KICK_WAIT_TICKS);
        report!(
            "seq={seq} cmd=wait-kick status=ok mode=irq seen={seen} kicks={}",
            boot::irq_count(KICK_VECTOR)
        );
        Outcome::Done
    }

    /// `pingpong TOKEN ping|pong ROUNDS`: a kick ping-pong driven the way a draft driver
    /// does it: every interrupt on the kick vector counts as one kick from the peer. Before
    /// each kick a side stores how many kicks it has sent in the region (ping at offset 0,
    /// pong at 64), so a side that took an interrupt for a kick it never got sees the peer's
    /// counter behind (`out_of_step`). The ping side kicks first; both sides run at once.
    /// Reports `irqs` (kick-vector interrupts since boot), `peer_kicks` (the peer's counter at
    /// the end: the kicks it really sent), `kicks_sent`, `out_of_step` and `timeouts` (a
    /// round that waited in vain ends the loop).
    fn pingpong<'a>(&mut self, mut words: impl Iterator<Item = &'a str>, seq: u64) -> Outcome {
        let (token, region) = match self.token_region(&mut words) {
            Ok(found) => found,
            Err(outcome) => return outcome,
        };
        let ping = match words.next() {
            Some("ping") => true,
            Some("pong") => false,
            _ => return Outcome::Bad("role"),
        };
        let Some(rounds) = words.next().and_then(parse_number) else {
            return Outcome::Bad("rounds");
        };
        let (mine, theirs) = if ping {
            (PING_COUNTER, PONG_COUNTER)
        } else {
            (PONG_COUNTER, PING_COUNTER)
        };
        let (mut sent, mut out_of_step, mut timeouts) = (0u64, 0u64, 0u64);
        for round in 1..=rounds {
            if ping && let Err(e) = self.send_kick(&region, mine, round, &mut sent) {
                return Outcome::Failed(e);
            }
            if !wait_for_kick_irq(self.kicks_consumed + 1) {
                timeouts += 1;
                break;
            }
            // A draft driver: this interrupt is the peer's kick.
            self.kicks_consumed += 1;
            match self.ism.window().read_u64(&region, theirs) {
                Ok(peer) if peer == round => {}
                Ok(_) => out_of_step += 1,
                Err(e) => return Outcome::Failed(e),
            }
            if !ping && let Err(e) = self.send_kick(&region, mine, round, &mut sent) {
                return Outcome::Failed(e);
            }
        }
        let peer_kicks = match self.ism.window().read_u64(&region, theirs) {
            Ok(value) => value,
            Err(e) => return Outcome::Failed(e),
        };
        report!(
            "seq={seq} cmd=pingpong status=ok token={token:#x} role={} rounds={rounds} kicks_sent={sent} irqs={} peer_kicks={peer_kicks} out_of_step={out_of_step} timeouts={timeouts}",
            if ping { "ping" } else { "pong" },
            boot::irq_count(KICK_VECTOR)
        );
        Outcome::Done
    }

    /// Publish `count` at `offset` of the region, then kick it.
    fn send_kick(
        &self,
        region: &Region,
        offset: u64,
        count: u64,
        sent: &mut u64,
    ) -> Result<(), IsmError> {
        self.ism.window().write_u64(region, offset, count)?;
        self.ism.kick(region)?;
        *sent += 1;
        Ok(())
    }

    /// `bench KIND [TOKEN ROLE] COUNT`: one side of a benchmark (bench.rs).
    fn bench<'a>(&mut self, mut words: impl Iterator<Item = &'a str>, seq: u64) -> Outcome {
        let kind = words.next().unwrap_or("");
        let region = if matches!(kind, "ctl" | "ring0" | "hotadd") {
            None
        } else {
            match words.next().and_then(parse_number) {
                Some(token) => self.region(token).cloned(),
                None => return Outcome::Bad("token"),
            }
        };
        let args = core::iter::once(kind).chain(words);
        match crate::bench::run(&mut self.ism, region.as_ref(), args, seq) {
            Ok(()) => Outcome::Done,
            Err(why) => {
                report!("seq={seq} cmd=bench status=error detail={why}");
                Outcome::Done
            }
        }
    }

    /// `events`: drain the event queue; counts per kind.
    fn events(&mut self, seq: u64) -> Outcome {
        let mut counts = [0u32; 6];
        loop {
            match self.ism.poll_event() {
                Ok(Some(event)) => {
                    let kind = match event {
                        IsmEvent::Update { .. } => 0,
                        IsmEvent::Attach { .. } => 1,
                        IsmEvent::Detach { .. } => 2,
                        IsmEvent::Revoke { .. } => 3,
                        IsmEvent::RegionAdded { .. } => 4,
                        IsmEvent::Overflow => 5,
                    };
                    counts[kind] += 1;
                }
                Ok(None) => break,
                Err(e) => return Outcome::Failed(e),
            }
        }
        let [update, attach, detach, revoke, added, overflow] = counts;
        report!(
            "seq={seq} cmd=events status=ok update={update} attach={attach} detach={detach} revoke={revoke} region_added={added} overflow={overflow}"
        );
        Outcome::Done
    }

    /// `alloc-many N SIZE SEED PERMS`: allocate N regions, fill region i with SEED + i and
    /// grant PERMS to everyone; the tokens are listed comma-separated in order.
    /// `alloc-free COUNT SIZE`: COUNT times, allocate a region of SIZE and detach it again
    /// (leak checks); reports how many cycles completed.
    fn alloc_free<'a>(&mut self, mut words: impl Iterator<Item = &'a str>, seq: u64) -> Outcome {
        let (Some(count), Some(size)) = (
            words.next().and_then(parse_number),
            words.next().and_then(parse_size),
        ) else {
            return Outcome::Bad("alloc_free_args");
        };
        let mut done = 0u64;
        let mut failure = None;
        for _ in 0..count {
            let result = self
                .ism
                .alloc(size)
                .and_then(|region| self.ism.detach(region.token()));
            match result {
                Ok(()) => done += 1,
                Err(e) => {
                    failure = Some(status_name(&e));
                    break;
                }
            }
        }
        report!(
            "seq={seq} cmd=alloc-free status={} done={done}",
            failure.unwrap_or("ok")
        );
        Outcome::Done
    }

    fn alloc_many<'a>(&mut self, mut words: impl Iterator<Item = &'a str>, seq: u64) -> Outcome {
        let (Some(count), Some(size), Some(seed), Some(perms)) = (
            words.next().and_then(parse_number),
            words.next().and_then(parse_size),
            words.next().and_then(parse_number),
            words.next().and_then(parse_perms),
        ) else {
            return Outcome::Bad("alloc_many_args");
        };
        let _ = write_fmt(format_args!("ISM-TEST seq={seq} cmd=alloc-many tokens="));
        let mut made = 0u64;
        let mut failure = None;
        for i in 0..count {
            let result = self.ism.alloc(size).and_then(|region| {
                fill_pattern(&self.ism, &region, seed.wrapping_add(i))?;
                self.ism.grant_default(region.token(), perms)?;
                Ok(region)
            });
            match result {
                Ok(region) => {
                    let sep = if made == 0 { "" } else { "," };
                    let _ = write_fmt(format_args!("{sep}{:#x}", region.token()));
                    made += 1;
                    if !self.keep(region) {
                        failure = Some("region_table_full");
                        break;
                    }
                }
                Err(e) => {
                    failure = Some(status_name(&e));
                    break;
                }
            }
        }
        let _ = write_fmt(format_args!(
            " status={} made={made}\n",
            failure.unwrap_or("ok")
        ));
        Outcome::Done
    }

    /// `attach-many SEED T1,T2,...`: attach each read-only and check region i holds SEED + i.
    fn attach_many<'a>(&mut self, mut words: impl Iterator<Item = &'a str>, seq: u64) -> Outcome {
        let (Some(seed), Some(list)) = (words.next().and_then(parse_number), words.next()) else {
            return Outcome::Bad("attach_many_args");
        };
        let (mut attached, mut matched, mut failure) = (0u64, 0u64, None);
        for (i, word) in list.split(',').enumerate() {
            let Some(token) = parse_number(word) else {
                return Outcome::Bad("token");
            };
            let region = match self.ism.attach(token, Access::Read) {
                Ok(region) => region,
                Err(e) => {
                    failure = Some(status_name(&e));
                    break;
                }
            };
            attached += 1;
            match check_pattern(&self.ism, &region, seed.wrapping_add(i as u64)) {
                Ok(None) => matched += 1,
                Ok(Some(_)) => {}
                Err(e) => {
                    failure = Some(status_name(&e));
                    break;
                }
            }
            if !self.keep(region) {
                failure = Some("region_table_full");
                break;
            }
        }
        let held = self.regions.iter().filter(|r| r.is_some()).count();
        report!(
            "seq={seq} cmd=attach-many status={} attached={attached} matched={matched} held={held}",
            failure.unwrap_or("ok")
        );
        Outcome::Done
    }
}

/// Wait until `count` kick-vector interrupts have arrived since boot: spin in ring 3 for a
/// while (a ping-pong peer answers within microseconds), then halt between timer ticks.
fn wait_for_kick_irq(count: u64) -> bool {
    for _ in 0..PINGPONG_SPINS {
        if boot::irq_count(KICK_VECTOR) >= count {
            return true;
        }
        core::hint::spin_loop();
    }
    cases::wait_for_irq(KICK_VECTOR, count, PINGPONG_WAIT_TICKS)
}

fn write_fmt(args: core::fmt::Arguments<'_>) -> core::fmt::Result {
    core::fmt::Write::write_fmt(&mut serial::Serial, args)
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Word `index` of the pattern for `seed` (splitmix64 of both): every word differs, so a
/// shifted, stale or foreign copy does not match.
fn pattern_word(seed: u64, index: u64) -> u64 {
    let mut z = seed
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(index.wrapping_add(1).wrapping_mul(0xbf58_476d_1ce4_e5b9));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn fill_pattern(
    ism: &IsmDriver<'_, GuestPlatform>,
    region: &Region,
    seed: u64,
) -> Result<(), IsmError> {
    for i in 0..region.size() / 8 {
        ism.window()
            .write_u64(region, i * 8, pattern_word(seed, i))?;
    }
    Ok(())
}

/// `None` when the region holds the pattern, else the first differing offset and its value.
fn check_pattern(
    ism: &IsmDriver<'_, GuestPlatform>,
    region: &Region,
    seed: u64,
) -> Result<Option<(u64, u64)>, IsmError> {
    for i in 0..region.size() / 8 {
        let got = ism.window().read_u64(region, i * 8)?;
        if got != pattern_word(seed, i) {
            return Ok(Some((i * 8, got)));
        }
    }
    Ok(None)
}

/// The draft's status names for device refusals; driver-side failures by kind.
fn status_name(e: &IsmError) -> &'static str {
    match e {
        IsmError::Perm(Perm::Attach) => "PERM_EATTACH",
        IsmError::Perm(Perm::Read) => "PERM_EREAD",
        IsmError::Perm(Perm::Write) => "PERM_EWRITE",
        IsmError::NoEntry => "ENOENT",
        IsmError::NoSpace => "ENOSPC",
        IsmError::NoMem => "ENOMEM",
        IsmError::Again => "EAGAIN",
        IsmError::TooBig(_) => "E2BIG",
        IsmError::DeviceError(_) => "ERR",
        IsmError::ReadOnly => "READONLY",
        IsmError::OutOfBounds { .. } => "OUT_OF_BOUNDS",
        IsmError::Timeout => "TIMEOUT",
        IsmError::Broken => "BROKEN",
        IsmError::NoMsix => "NO_MSIX",
        IsmError::Protocol(_) => "PROTOCOL",
        _ => "DRIVER",
    }
}

/// Decimal or 0x-hex.
fn parse_number(text: &str) -> Option<u64> {
    match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

/// A number with an optional K / M / G suffix (binary).
fn parse_size(text: &str) -> Option<u64> {
    let (digits, shift) = match text.as_bytes().last()? {
        b'K' | b'k' => (&text[..text.len() - 1], 10),
        b'M' | b'm' => (&text[..text.len() - 1], 20),
        b'G' | b'g' => (&text[..text.len() - 1], 30),
        _ => (text, 0),
    };
    parse_number(digits)?.checked_mul(1 << shift)
}

/// Permission letters (r w a m c) or a number; "none" is 0.
fn parse_perms(text: &str) -> Option<u64> {
    if text == "none" {
        return Some(0);
    }
    if let Some(n) = parse_number(text) {
        return Some(n);
    }
    text.bytes().try_fold(0, |acc, c| {
        let bit = match c {
            b'r' => PERM_READ,
            b'w' => PERM_WRITE,
            b'a' => PERM_ATTACH,
            b'm' => PERM_MANAGE,
            b'c' => PERM_CLEAN_DEFAULT,
            _ => return None,
        };
        Some(acc | bit)
    })
}
