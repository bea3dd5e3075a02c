// SPDX-License-Identifier: Apache-2.0
//! `key=value,key2=value2` option strings, parsed the way cloud-hypervisor's OptionParser does:
//! keys must be registered first (unknown keys are an error), double quotes protect commas and
//! `[..]` groups a list. Values are converted with `FromStr`, plus the `Toggle` and `ByteSized`
//! helpers for on/off switches and sizes with a K/M/G suffix.

use std::collections::HashMap;
use std::str::FromStr;

/// Why an option string could not be parsed.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum OptionParserError {
    #[error("Unknown option: {0}")]
    UnknownOption(String),
    #[error("Invalid syntax: {0}")]
    InvalidSyntax(String),
    #[error("Unable to convert {1} for {0}: {2}")]
    Conversion(String, String, String),
    #[error("Option {0} given more than once")]
    Duplicate(String),
}

#[derive(Default)]
struct OptionValue {
    value: Option<String>,
    requires_value: bool,
}

/// A set of registered keys and, after [`OptionParser::parse`], their values.
#[derive(Default)]
pub struct OptionParser {
    options: HashMap<String, OptionValue>,
}

/// Split on commas that are neither inside double quotes nor inside square brackets.
fn split_top_level(input: &str) -> Result<Vec<&str>, OptionParserError> {
    let mut parts = Vec::new();
    let mut in_quotes = false;
    let mut depth = 0u32;
    let mut start = 0;
    for (i, c) in input.char_indices() {
        match c {
            '"' => in_quotes = !in_quotes,
            '[' if !in_quotes => depth += 1,
            ']' if !in_quotes => {
                depth = depth
                    .checked_sub(1)
                    .ok_or_else(|| OptionParserError::InvalidSyntax(input.to_owned()))?;
            }
            ',' if !in_quotes && depth == 0 => {
                parts.push(&input[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if in_quotes || depth != 0 {
        return Err(OptionParserError::InvalidSyntax(input.to_owned()));
    }
    parts.push(&input[start..]);
    Ok(parts)
}

impl OptionParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Register a key that takes a value (`key=value`).
    pub fn add(&mut self, option: &str) -> &mut Self {
        self.options.insert(
            option.to_owned(),
            OptionValue {
                value: None,
                requires_value: true,
            },
        );
        self
    }

    pub fn add_all(&mut self, options: &[&str]) -> &mut Self {
        for option in options {
            self.add(option);
        }
        self
    }

    /// Register a key that stands alone (`tty`, `off`).
    pub fn add_valueless(&mut self, option: &str) -> &mut Self {
        self.options.insert(
            option.to_owned(),
            OptionValue {
                value: None,
                requires_value: false,
            },
        );
        self
    }

    /// Parse `input`, rejecting unknown keys, missing values and keys given twice.
    pub fn parse(&mut self, input: &str) -> Result<(), OptionParserError> {
        if input.trim().is_empty() {
            return Ok(());
        }
        for part in split_top_level(input)? {
            let (key, value) = match part.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (part, None),
            };
            let option = self
                .options
                .get_mut(key)
                .ok_or_else(|| OptionParserError::UnknownOption(key.to_owned()))?;
            if option.value.is_some() {
                return Err(OptionParserError::Duplicate(key.to_owned()));
            }
            option.value = match (value, option.requires_value) {
                (Some(v), true) => Some(strip_quotes(v).to_owned()),
                (None, false) => Some(String::new()),
                _ => return Err(OptionParserError::InvalidSyntax(part.to_owned())),
            };
        }
        Ok(())
    }

    /// The raw value of `option`, if it was given.
    pub fn get(&self, option: &str) -> Option<String> {
        self.options.get(option).and_then(|o| o.value.clone())
    }

    pub fn is_set(&self, option: &str) -> bool {
        self.options.get(option).is_some_and(|o| o.value.is_some())
    }

    /// The value of `option` converted to `T`; `Ok(None)` if it was not given.
    pub fn convert<T: FromStr>(&self, option: &str) -> Result<Option<T>, OptionParserError>
    where
        T::Err: std::fmt::Display,
    {
        match self.get(option) {
            None => Ok(None),
            Some(v) => v.parse::<T>().map(Some).map_err(|e| {
                OptionParserError::Conversion(option.to_owned(), v.clone(), e.to_string())
            }),
        }
    }
}

fn strip_quotes(value: &str) -> &str {
    value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(value)
}

/// An on/off switch: `on`, `off`, `true`, `false` (any case).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Toggle(pub bool);

#[derive(Debug, thiserror::Error)]
#[error("expected on, off, true or false")]
pub struct ToggleParseError;

impl FromStr for Toggle {
    type Err = ToggleParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "on" | "true" => Ok(Toggle(true)),
            "off" | "false" => Ok(Toggle(false)),
            _ => Err(ToggleParseError),
        }
    }
}

/// A size in bytes, with an optional binary K, M or G suffix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteSized(pub u64);

#[derive(Debug, thiserror::Error)]
pub enum ByteSizedParseError {
    #[error("expected a number with an optional K, M or G suffix")]
    Invalid,
    #[error("size overflows 64 bits")]
    Overflow,
}

impl FromStr for ByteSized {
    type Err = ByteSizedParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (digits, shift) = match s.as_bytes().last() {
            Some(b'K' | b'k') => (&s[..s.len() - 1], 10),
            Some(b'M' | b'm') => (&s[..s.len() - 1], 20),
            Some(b'G' | b'g') => (&s[..s.len() - 1], 30),
            _ => (s, 0),
        };
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ByteSizedParseError::Invalid);
        }
        let n: u64 = digits.parse().map_err(|_| ByteSizedParseError::Overflow)?;
        n.checked_mul(1u64 << shift)
            .map(ByteSized)
            .ok_or(ByteSizedParseError::Overflow)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_rejects_unknown_and_duplicate_keys() {
        let mut p = OptionParser::new();
        p.add("size").add_valueless("off");
        assert_eq!(
            p.parse("size=1,bogus=2"),
            Err(OptionParserError::UnknownOption("bogus".into()))
        );
        let mut p = OptionParser::new();
        p.add("size");
        assert_eq!(
            p.parse("size=1,size=2"),
            Err(OptionParserError::Duplicate("size".into()))
        );
    }

    #[test]
    fn test_parse_quotes_protect_commas_and_brackets_group() {
        let mut p = OptionParser::new();
        p.add_all(&["path", "list", "x"]);
        p.parse("path=\"a,b\",list=[1,2-3],x=4").unwrap();
        assert_eq!(p.get("path").as_deref(), Some("a,b"));
        assert_eq!(p.get("list").as_deref(), Some("[1,2-3]"));
        assert_eq!(p.convert::<u32>("x").unwrap(), Some(4));
        assert!(p.parse("x=\"unterminated").is_err());
    }

    #[test]
    fn test_valueless_and_valued_keys_must_be_used_as_registered() {
        let mut p = OptionParser::new();
        p.add("file").add_valueless("tty");
        assert!(p.parse("tty=1").is_err());
        let mut p = OptionParser::new();
        p.add("file").add_valueless("tty");
        assert!(p.parse("file").is_err());
        let mut p = OptionParser::new();
        p.add("file").add_valueless("tty");
        p.parse("tty").unwrap();
        assert!(p.is_set("tty"));
        assert!(!p.is_set("file"));
    }

    #[test]
    fn test_toggle_and_bytesized_conversions() {
        assert_eq!("On".parse::<Toggle>().unwrap(), Toggle(true));
        assert_eq!("false".parse::<Toggle>().unwrap(), Toggle(false));
        assert!("yes".parse::<Toggle>().is_err());
        assert_eq!("512M".parse::<ByteSized>().unwrap().0, 512 << 20);
        assert_eq!("2G".parse::<ByteSized>().unwrap().0, 2 << 30);
        assert_eq!("4k".parse::<ByteSized>().unwrap().0, 4096);
        assert_eq!("123".parse::<ByteSized>().unwrap().0, 123);
        assert!("M".parse::<ByteSized>().is_err());
        assert!("1T".parse::<ByteSized>().is_err());
        assert!("-1".parse::<ByteSized>().is_err());
        assert!("99999999999999999G".parse::<ByteSized>().is_err());
    }
}
