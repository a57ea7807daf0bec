//! [`Size`]: a byte count written as QEMU writes sizes (`4k`, `1.5G`,
//! `0x1000`), parsed as QEMU's `qemu_strtosz` parses them.
//!
//! Suffixes are binary (`k` = 1024) and case-insensitive: `B`, `K`, `M`,
//! `G`, `T`, `P`, `E`. A fraction needs a suffix other than `B` and is
//! rounded to the nearest byte, half up; hexadecimal takes neither. QEMU's
//! JSON input wants a number for a size; we also take the string form
//! there, since a string can never be mistaken for anything else.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, Unexpected, Visitor};
use serde::Serialize;
use thiserror::Error;

/// What a size must look like, as QEMU says it.
const SIZE_EXPECTED: &str = "a non-negative number below 2^64 (optional suffix k, M, G, T, P or E)";

/// A size in bytes. Serializes as a plain number.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Size(pub u64);

impl From<u64> for Size {
    fn from(bytes: u64) -> Self {
        Self(bytes)
    }
}

impl From<Size> for u64 {
    fn from(size: Size) -> Self {
        size.0
    }
}

/// A string that is not a size.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[error("'{input}' is not {SIZE_EXPECTED}")]
pub struct SizeError {
    input: String,
}

/// Parses a size with an optional suffix, as QEMU's `qemu_strtosz`.
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    strtosz(s).ok_or_else(|| SizeError { input: s.into() })
}

fn strtosz(s: &str) -> Option<u64> {
    if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        if hex.is_empty() || !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        return u64::from_str_radix(hex, 16).ok();
    }
    let int_len = s.bytes().take_while(u8::is_ascii_digit).count();
    let (int, rest) = s.split_at(int_len);
    let (frac, rest) = match rest.strip_prefix('.') {
        Some(r) => r.split_at(r.bytes().take_while(u8::is_ascii_digit).count()),
        None => ("", rest),
    };
    if int.is_empty() && frac.is_empty() {
        return None;
    }
    let mul: u128 = match rest.as_bytes() {
        [] => 1,
        [c] => 1 << (10 * "BKMGTPE".find(char::from(*c).to_ascii_uppercase())?),
        _ => return None,
    };
    // Only the first 19 fractional digits count: the product below then
    // stays well inside u128.
    let frac = &frac[..frac.len().min(19)];
    let frac_num: u128 = if frac.is_empty() {
        0
    } else {
        frac.parse().ok()?
    };
    if mul == 1 && frac_num != 0 {
        return None; // "When a fraction is present, a scale is required."
    }
    let int: u128 = if int.is_empty() { 0 } else { int.parse().ok()? };
    let scale = 10u128.pow(frac.len() as u32);
    let bytes = int
        .checked_mul(mul)?
        .checked_add((frac_num * mul + scale / 2) / scale)?;
    u64::try_from(bytes).ok()
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(SizeVisitor)
    }
}

struct SizeVisitor;

impl Visitor<'_> for SizeVisitor {
    type Value = Size;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("size")
    }

    fn visit_u64<E: de::Error>(self, n: u64) -> Result<Size, E> {
        Ok(Size(n))
    }

    fn visit_i64<E: de::Error>(self, n: i64) -> Result<Size, E> {
        u64::try_from(n)
            .map(Size)
            .map_err(|_| E::invalid_value(Unexpected::Signed(n), &SIZE_EXPECTED))
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Size, E> {
        parse_size(s)
            .map(Size)
            .map_err(|_| E::invalid_value(Unexpected::Str(s), &SIZE_EXPECTED))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_numbers_are_bytes() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("18446744073709551615"), Ok(u64::MAX));
    }

    #[test]
    fn suffixes_are_powers_of_1024_in_either_case() {
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        assert_eq!(parse_size("1P"), Ok(1 << 50));
        assert_eq!(parse_size("15E"), Ok(15 << 60));
        assert_eq!(parse_size("7B"), Ok(7));
    }

    #[test]
    fn fractions_need_a_scale_and_round_half_up() {
        assert_eq!(parse_size("1.5k"), Ok(1536));
        assert_eq!(parse_size(".5K"), Ok(512));
        assert_eq!(parse_size("1.k"), Ok(1024));
        assert_eq!(parse_size("1.0"), Ok(1));
        assert_eq!(parse_size("0.0005k"), Ok(1)); // 0.512 rounds up
        assert!(parse_size("1.5").is_err());
        assert!(parse_size("1.5B").is_err());
    }

    #[test]
    fn hex_takes_no_suffix_or_fraction() {
        assert_eq!(parse_size("0x1000"), Ok(4096));
        assert_eq!(parse_size("0x1E"), Ok(30));
        assert!(parse_size("0x").is_err());
        assert!(parse_size("0x1.5").is_err());
        assert!(parse_size("0x10k").is_err());
    }

    #[test]
    fn junk_and_overflow_are_refused() {
        for s in [
            "",
            "k",
            ".",
            "-1",
            " 1",
            "1 ",
            "1kk",
            "1Z",
            "16E",
            "18446744073709551616",
        ] {
            assert!(parse_size(s).is_err(), "{s:?}");
        }
    }

    #[test]
    fn error_names_the_input() {
        let msg = parse_size("big").unwrap_err().to_string();
        assert_eq!(
            msg,
            "'big' is not a non-negative number below 2^64 (optional suffix k, M, G, T, P or E)"
        );
    }

    #[test]
    fn serializes_as_a_number() {
        assert_eq!(serde_json::to_string(&Size(4096)).unwrap(), "4096");
    }
}
