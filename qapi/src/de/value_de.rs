//! [`ValueDeserializer`]: the `serde::Deserializer` over one [`Value`] node.
//!
//! Each `deserialize_*` method decides how its leaf is read (keyval text
//! parsed leniently, JSON checked strictly) and, on the way out, places
//! not yet placed errors at its own path (see the parent module).

use std::collections::btree_map;
use std::slice;

use serde::de::{self, DeserializeSeed, IntoDeserializer, MapAccess, SeqAccess, Visitor};

use super::{capture, DeError};
use crate::error::{join, QapiError};
use crate::value::Value;

/// Which members of a map a deserializer sees (see `FlatUnion`).
#[derive(Clone, Copy)]
pub(super) enum KeyFilter {
    /// All of them.
    All,
    /// Only these.
    Only(&'static [&'static str]),
    /// All but the first and the rest.
    Except(&'static str, &'static [&'static str]),
}

impl KeyFilter {
    fn allows(self, key: &str) -> bool {
        match self {
            Self::All => true,
            Self::Only(keys) => keys.contains(&key),
            Self::Except(tag, keys) => key != tag && !keys.contains(&key),
        }
    }
}

/// Deserializes the node `value` found at the dotted `path`.
pub(super) struct ValueDeserializer<'a> {
    value: &'a Value,
    path: String,
    filter: KeyFilter,
}

impl<'a> ValueDeserializer<'a> {
    pub(super) fn new(value: &'a Value, path: String, filter: KeyFilter) -> Self {
        Self {
            value,
            path,
            filter,
        }
    }

    fn invalid_type<T>(&self, expected: &str) -> Result<T, DeError> {
        Err(DeError::placed(QapiError::InvalidType {
            key: self.path.clone(),
            expected: expected.into(),
        }))
    }

    fn invalid_value<T>(&self, expected: &str) -> Result<T, DeError> {
        Err(DeError::placed(QapiError::InvalidValue {
            key: self.path.clone(),
            expected: expected.into(),
        }))
    }

    fn unsigned<'de, V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let r = match self.value {
            Value::Keyval(s) => match parse_u64(s) {
                Some(n) => visitor.visit_u64(n),
                None => return self.invalid_value("a number"),
            },
            Value::Number(n) => visit_integer(n, visitor),
            _ => return self.invalid_type("integer"),
        };
        placed(r, &self.path)
    }

    fn signed<'de, V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let r = match self.value {
            Value::Keyval(s) => {
                let n = match s.strip_prefix('-') {
                    Some(abs) => parse_u64(abs).and_then(|n| 0i64.checked_sub_unsigned(n)),
                    None => parse_u64(s).and_then(|n| i64::try_from(n).ok()),
                };
                match n {
                    Some(n) => visitor.visit_i64(n),
                    None => return self.invalid_value("a number"),
                }
            }
            Value::Number(n) => visit_integer(n, visitor),
            _ => return self.invalid_type("integer"),
        };
        placed(r, &self.path)
    }

    fn float<'de, V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let r = match self.value {
            Value::Keyval(s) => match s.parse::<f64>() {
                Ok(f) if f.is_finite() => visitor.visit_f64(f),
                _ => return self.invalid_value("a number"),
            },
            Value::Number(n) => visit_number(n, visitor),
            _ => return self.invalid_type("number"),
        };
        placed(r, &self.path)
    }

    fn string<'de, V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.value {
            Value::Keyval(s) | Value::String(s) => placed(visitor.visit_str(s), &self.path),
            _ => self.invalid_type("string"),
        }
    }

    fn seq<'de, V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.value {
            Value::List(list) => visit_list(list, &self.path, visitor),
            _ => self.invalid_type("array"),
        }
    }

    fn map<'de, V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.value {
            Value::Map(map) => {
                let access = MapDe {
                    iter: map.iter(),
                    filter: self.filter,
                    path: &self.path,
                    pending: None,
                };
                placed(visitor.visit_map(access), &self.path)
            }
            _ => self.invalid_type("object"),
        }
    }
}

fn visit_list<'de, V: Visitor<'de>>(
    list: &[Value],
    path: &str,
    visitor: V,
) -> Result<V::Value, DeError> {
    let access = SeqDe {
        iter: list.iter().enumerate(),
        path,
    };
    placed(visitor.visit_seq(access), path)
}

/// Places a not yet placed error at `path`.
fn placed<T>(r: Result<T, DeError>, path: &str) -> Result<T, DeError> {
    r.map_err(|e| e.place(path))
}

/// QEMU's keyval integers: decimal, or hexadecimal after `0x`.
fn parse_u64(s: &str) -> Option<u64> {
    let (digits, radix) = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => (hex, 16),
        None => (s, 10),
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    u64::from_str_radix(digits, radix).ok()
}

/// A JSON number where an integer is wanted.
fn visit_integer<'de, V: Visitor<'de>>(
    n: &serde_json::Number,
    visitor: V,
) -> Result<V::Value, DeError> {
    if n.is_f64() {
        return Err(DeError::unplaced(QapiError::InvalidType {
            key: String::new(),
            expected: "integer".into(),
        }));
    }
    visit_number(n, visitor)
}

/// A JSON number, as what it is.
pub(super) fn visit_number<'de, V: Visitor<'de>, E: de::Error>(
    n: &serde_json::Number,
    visitor: V,
) -> Result<V::Value, E> {
    if let Some(u) = n.as_u64() {
        visitor.visit_u64(u)
    } else if let Some(i) = n.as_i64() {
        visitor.visit_i64(i)
    } else {
        match n.as_f64() {
            Some(f) => visitor.visit_f64(f),
            None => Err(E::custom(format!("number {n} out of range"))),
        }
    }
}

macro_rules! forward {
    ($($method:ident => $how:ident,)*) => {
        $(fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
            self.$how(visitor)
        })*
    };
}

impl<'de> de::Deserializer<'de> for ValueDeserializer<'_> {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let r = match self.value {
            Value::Keyval(s) | Value::String(s) => visitor.visit_str(s),
            Value::Null => visitor.visit_unit(),
            Value::Bool(b) => visitor.visit_bool(*b),
            Value::Number(n) => visit_number(n, visitor),
            Value::List(_) => return self.seq(visitor),
            Value::Map(_) => return self.map(visitor),
        };
        placed(r, &self.path)
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let b = match self.value {
            Value::Keyval(s) => match s.as_str() {
                "on" | "true" => true,
                "off" | "false" => false,
                _ => return self.invalid_value("'on' or 'off'"),
            },
            Value::Bool(b) => *b,
            _ => return self.invalid_type("boolean"),
        };
        placed(visitor.visit_bool(b), &self.path)
    }

    forward! {
        deserialize_u8 => unsigned, deserialize_u16 => unsigned,
        deserialize_u32 => unsigned, deserialize_u64 => unsigned,
        deserialize_i8 => signed, deserialize_i16 => signed,
        deserialize_i32 => signed, deserialize_i64 => signed,
        deserialize_f32 => float, deserialize_f64 => float,
        deserialize_char => string, deserialize_str => string,
        deserialize_string => string, deserialize_bytes => string,
        deserialize_byte_buf => string, deserialize_identifier => string,
        deserialize_seq => seq, deserialize_map => map,
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        if let Value::Null = self.value {
            return placed(visitor.visit_none(), &self.path);
        }
        let path = self.path.clone();
        visitor.visit_some(self).map_err(|e| e.place(&path))
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.value {
            Value::Null => placed(visitor.visit_unit(), &self.path),
            _ => self.invalid_type("null"),
        }
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_unit(visitor)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        if name == capture::CAPTURE {
            return capture::visit_captured(self.value, &self.path, visitor);
        }
        let path = self.path.clone();
        visitor
            .visit_newtype_struct(self)
            .map_err(|e| e.place(&path))
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, _: usize, visitor: V) -> Result<V::Value, DeError> {
        self.seq(visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: usize,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.seq(visitor)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.map(visitor)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        match self.value {
            Value::Keyval(s) | Value::String(s) => {
                let variant: de::value::StrDeserializer<'_, DeError> =
                    s.as_str().into_deserializer();
                placed(visitor.visit_enum(variant), &self.path)
            }
            _ => self.invalid_type("string"),
        }
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_unit()
    }
}

/// The members of a map; values get the member's path.
struct MapDe<'a> {
    iter: btree_map::Iter<'a, String, Value>,
    filter: KeyFilter,
    path: &'a str,
    pending: Option<(&'a str, &'a Value)>,
}

impl<'de> MapAccess<'de> for MapDe<'_> {
    type Error = DeError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, DeError> {
        let filter = self.filter;
        let Some((key, value)) = self.iter.by_ref().find(|(k, _)| filter.allows(k)) else {
            return Ok(None);
        };
        self.pending = Some((key.as_str(), value));
        let key: de::value::StrDeserializer<'_, DeError> = key.as_str().into_deserializer();
        seed.deserialize(key).map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, DeError> {
        let Some((key, value)) = self.pending.take() else {
            return Err(de::Error::custom("map value requested before its key"));
        };
        // Placed here too, for a type that fails without asking us anything.
        let path = join(self.path, key);
        let r = seed.deserialize(ValueDeserializer::new(value, path.clone(), KeyFilter::All));
        placed(r, &path)
    }
}

/// The elements of a list; each gets the path `list.N`.
struct SeqDe<'a> {
    iter: std::iter::Enumerate<slice::Iter<'a, Value>>,
    path: &'a str,
}

impl<'de> SeqAccess<'de> for SeqDe<'_> {
    type Error = DeError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, DeError> {
        let Some((i, value)) = self.iter.next() else {
            return Ok(None);
        };
        let path = join(self.path, &i.to_string());
        let r = seed.deserialize(ValueDeserializer::new(value, path.clone(), KeyFilter::All));
        placed(r, &path).map(Some)
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.iter.len())
    }
}
