// SPDX-License-Identifier: Apache-2.0
//! Parsing the guest's report lines: `ISM-TEST key=value key="quoted value" ...`.

/// Prefix of every report line.
pub const PREFIX: &str = "ISM-TEST ";

/// All `key=value` pairs the guest reported, in order.
#[derive(Debug, Default, Clone)]
pub struct GuestReport {
    pairs: Vec<(String, String)>,
    lines: usize,
}

impl GuestReport {
    /// Collect the report from serial output. Partial lines (the VM stopped mid-line) and
    /// other output are ignored.
    pub fn parse(serial: &str) -> Self {
        let mut report = GuestReport::default();
        for line in serial.split('\n') {
            let line = line.trim_end_matches('\r');
            let Some(body) = line.find(PREFIX).map(|at| &line[at + PREFIX.len()..]) else {
                continue;
            };
            report.lines += 1;
            for token in tokens(body) {
                if let Some((key, value)) = token.split_once('=') {
                    let value = value
                        .strip_prefix('"')
                        .and_then(|v| v.strip_suffix('"'))
                        .unwrap_or(value);
                    report.pairs.push((key.to_string(), value.to_string()));
                }
            }
        }
        report
    }

    /// Number of report lines.
    pub fn lines(&self) -> usize {
        self.lines
    }

    /// First value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// First value of `key` as a number (decimal or 0x-hex).
    pub fn number(&self, key: &str) -> Option<u64> {
        let value = self.get(key)?;
        match value.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16).ok(),
            None => value.parse().ok(),
        }
    }

    /// Every value of `key`.
    pub fn all(&self, key: &str) -> Vec<&str> {
        self.pairs
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// True when the guest reported `result=pass`.
    pub fn passed(&self) -> bool {
        self.get("result") == Some("pass")
    }
}

/// Split on spaces, keeping `"..."` together.
fn tokens(body: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = None;
    let mut quoted = false;
    for (i, c) in body.char_indices() {
        match (c, start) {
            ('"', Some(_)) => quoted = !quoted,
            (' ', Some(s)) if !quoted => {
                out.push(&body[s..i]);
                start = None;
            }
            (' ', None) => {}
            (_, None) => {
                start = Some(i);
                quoted = c == '"';
            }
            _ => {}
        }
    }
    if let Some(s) = start {
        out.push(&body[s..]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_reads_pairs_and_quoted_values() {
        let serial = "noise\r\nISM-TEST hello=1 start_info=0x6000\r\n\
                      ISM-TEST panic=\"requested by x\" at=src/a.rs:3\r\n\
                      ISM-TEST result=fail\r\nISM-TEST trunc";
        let r = GuestReport::parse(serial);
        assert_eq!(r.lines(), 4);
        assert_eq!(r.get("hello"), Some("1"));
        assert_eq!(r.number("start_info"), Some(0x6000));
        assert_eq!(r.get("panic"), Some("requested by x"));
        assert_eq!(r.get("at"), Some("src/a.rs:3"));
        assert!(!r.passed());
        assert_eq!(r.get("trunc"), None);
    }

    #[test]
    fn test_all_collects_repeated_keys() {
        let r = GuestReport::parse("ISM-TEST pci=00:00.0\nISM-TEST pci=00:01.0 result=pass\n");
        assert_eq!(r.all("pci"), vec!["00:00.0", "00:01.0"]);
        assert!(r.passed());
    }
}
