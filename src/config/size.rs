//! Byte sizes written the way people write them (`1GiB`, `512MiB`, `300MB`).
//!
//! A size is checked when it is read, so a bad one is reported under its own key before anything
//! else runs, and code that uses it gets a byte count without a fallback for "could not parse".

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Parses sizes such as `1GiB`, `512MiB`, `300MB` or a plain byte count.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("`{text}` is not a size such as 512MiB or 2GiB"))?;
    let factor: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "kib" => 1024.0,
        "m" | "mb" => 1e6,
        "mib" => 1024.0 * 1024.0,
        "g" | "gb" => 1e9,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        other => {
            return Err(format!(
                "unknown size unit `{other}` (use B, KiB, MiB or GiB)"
            ));
        }
    };
    Ok((value * factor) as u64)
}

/// A size in bytes that remembers how it was written.
///
/// The text is kept because settings are layered by serializing the built-in defaults and
/// reading them back: a size must come out as the same text it went in as. Two sizes are equal
/// when they are the same number of bytes, however they were written.
#[derive(Debug, Clone)]
pub struct ByteSize {
    text: String,
    bytes: u64,
}

impl ByteSize {
    /// Reads a size the way [`parse_size`] does.
    pub fn parse(text: &str) -> Result<Self, String> {
        Ok(Self {
            bytes: parse_size(text)?,
            text: text.to_string(),
        })
    }

    /// `n` gibibytes, for defaults that need no parsing to be right.
    pub fn gib(n: u64) -> Self {
        Self {
            text: format!("{n}GiB"),
            bytes: n.saturating_mul(1 << 30),
        }
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The size as it was written.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl PartialEq for ByteSize {
    fn eq(&self, other: &Self) -> bool {
        self.bytes == other.bytes
    }
}

impl Eq for ByteSize {}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        Self::parse(text)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ByteSizeVisitor)
    }
}

/// Takes any scalar as its text, as the `config` crate does for a string field, so a number
/// (`kv_cache_budget = 1000`, or an environment variable parsed as one) means bytes and anything
/// else gets the same "not a size" message as a bad string.
struct ByteSizeVisitor;

impl ByteSizeVisitor {
    fn from_text<E: de::Error>(text: &str) -> Result<ByteSize, E> {
        ByteSize::parse(text).map_err(E::custom)
    }
}

impl Visitor<'_> for ByteSizeVisitor {
    type Value = ByteSize;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a size such as 512MiB or 2GiB, or a number of bytes")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
        Self::from_text(v)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
        Self::from_text(&v.to_string())
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
        Self::from_text(&v.to_string())
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<ByteSize, E> {
        Self::from_text(&v.to_string())
    }

    fn visit_i128<E: de::Error>(self, v: i128) -> Result<ByteSize, E> {
        Self::from_text(&v.to_string())
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<ByteSize, E> {
        Self::from_text(&v.to_string())
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<ByteSize, E> {
        Self::from_text(&v.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        for (text, want) in [
            ("1GiB", 1u64 << 30),
            ("512MiB", 512 << 20),
            ("1000", 1000),
            ("2 GB", 2_000_000_000),
        ] {
            assert_eq!(parse_size(text).unwrap(), want, "{text}");
        }
        assert!(parse_size("12 parsecs").is_err());
    }

    #[derive(Debug, Deserialize, Serialize)]
    struct Holder {
        size: ByteSize,
    }

    fn from_toml(text: &str) -> Result<ByteSize, String> {
        toml::from_str::<Holder>(text)
            .map(|h| h.size)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn byte_size_parses_text_and_plain_numbers() {
        for (text, want) in [
            ("size = \"1GiB\"", 1u64 << 30),
            ("size = \"512MiB\"", 512 << 20),
            ("size = \"300MB\"", 300_000_000),
            ("size = \" 4 KiB \"", 4096),
            ("size = 1000", 1000),
        ] {
            assert_eq!(from_toml(text).unwrap().bytes(), want, "{text}");
        }
        assert_eq!(ByteSize::gib(1), ByteSize::parse("1024MiB").unwrap());
        assert_eq!(ByteSize::gib(1).as_str(), "1GiB");
        assert_eq!("2GiB".parse::<ByteSize>().unwrap().bytes(), 2 << 30);
    }

    #[test]
    fn byte_size_writes_back_what_was_read() {
        for text in ["1GiB", "512MiB", "300MB", "2 GB", "1000"] {
            let size = ByteSize::parse(text).unwrap();
            assert_eq!(size.to_string(), text);
            let written = toml::to_string(&Holder { size }).unwrap();
            assert_eq!(written.trim(), format!("size = \"{text}\""));
            let again = from_toml(&written).unwrap();
            assert_eq!(again.as_str(), text);
            assert_eq!(again.bytes(), parse_size(text).unwrap());
        }
        let number = from_toml("size = 1000").unwrap();
        assert_eq!(number.as_str(), "1000");
    }

    #[test]
    fn byte_size_rejects_what_is_not_a_size() {
        for (text, needle) in [
            (
                "size = \"lots\"",
                "`lots` is not a size such as 512MiB or 2GiB",
            ),
            ("size = \"\"", "not a size"),
            ("size = -5", "`-5` is not a size"),
            ("size = true", "`true` is not a size"),
            ("size = \"12 parsecs\"", "unknown size unit `parsecs`"),
        ] {
            let err = from_toml(text).unwrap_err();
            assert!(err.contains(needle), "{text} -> {err}");
        }
        assert!(from_toml("size = [1]").is_err());
        assert!(ByteSize::parse("lots").is_err());
    }
}
