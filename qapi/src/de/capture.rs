//! The capture protocol: how a hand-written `Deserialize` (a QAPI flat
//! union, `BlockdevRef`) gets hold of the raw [`Value`] subtree and its path.
//!
//! A `Deserialize` impl only ever sees a generic `Deserializer`, and serde's
//! data model has no "keyval string" leaf. So, like `serde_json::RawValue`,
//! we use a private newtype name, [`CAPTURE`]:
//!
//! - our [`ValueDeserializer`](super::value_de::ValueDeserializer) answers it
//!   with an enum whose variant name is the node's dotted path and whose
//!   content is the subtree, keyval leaves encoded as a private enum
//!   variant, so they come back as [`Value::Keyval`], still lenient;
//! - any other deserializer (serde_json, serde's own buffers) just visits a
//!   newtype, and we rebuild a JSON-typed [`Value`] from what it yields.
//!
//! The impl then parses the subtree itself, at its true path, with the
//! usual derived structs. Its error has to leave through `D::Error`, whose
//! only constructors take text; to keep it structured, it is carried as
//! JSON in an `unknown_field` with a private marker list, which
//! `DeError::unknown_field` recognises and decodes. With a foreign
//! deserializer the error becomes that deserializer's custom message.

use std::fmt;

use serde::de::value::{MapDeserializer, SeqDeserializer, StrDeserializer};
use serde::de::{
    self, Deserialize, DeserializeSeed, Deserializer, EnumAccess, IntoDeserializer, MapAccess,
    SeqAccess, VariantAccess, Visitor,
};
use serde::forward_to_deserialize_any;

use super::value_de::visit_number;
use super::DeError;
use crate::error::QapiError;
use crate::value::Value;

/// The private newtype name that asks for the raw subtree.
pub(super) const CAPTURE: &str = "$qapi::private::Captured";
/// The private enum variant that carries a keyval leaf.
const KEYVAL: &str = "$qapi::private::keyval";
/// The private `expected` list that marks a structured error in transit.
const ERROR_TRANSPORT: &[&str] = &["$qapi::private::error"];

/// Deserializes `T` by capturing the subtree and handing it to `parse`
/// together with its dotted path.
pub(crate) fn deserialize_with<'de, D, T>(
    deserializer: D,
    parse: fn(&Value, &str) -> Result<T, DeError>,
) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
{
    let captured = deserializer.deserialize_newtype_struct(CAPTURE, CaptureVisitor)?;
    match captured.path {
        Some(path) => parse(&captured.value, &path).map_err(|e| encode_error(e.error)),
        None => parse(&captured.value, "").map_err(|e| de::Error::custom(e.error)),
    }
}

fn encode_error<E: de::Error>(error: QapiError) -> E {
    match serde_json::to_string(&error) {
        Ok(json) => E::unknown_field(&json, ERROR_TRANSPORT),
        Err(_) => E::custom(error),
    }
}

/// The error carried by `encode_error`, if this `unknown_field` is one.
pub(super) fn decode_error(field: &str, expected: &[&str]) -> Option<QapiError> {
    if expected != ERROR_TRANSPORT {
        return None;
    }
    serde_json::from_str(field).ok()
}

/// How `ValueDeserializer` answers a [`CAPTURE`] request.
pub(super) fn visit_captured<'de, V: Visitor<'de>>(
    value: &Value,
    path: &str,
    visitor: V,
) -> Result<V::Value, DeError> {
    visitor.visit_enum(Located { value, path })
}

/// The captured subtree; `path` is `None` from a foreign deserializer.
struct Captured {
    value: Value,
    path: Option<String>,
}

struct CaptureVisitor;

impl<'de> Visitor<'de> for CaptureVisitor {
    type Value = Captured;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an option value")
    }

    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<Captured, A::Error> {
        let (path, variant): (String, _) = data.variant()?;
        let value = variant.newtype_variant_seed(TreeSeed)?;
        let path = Some(path);
        Ok(Captured { value, path })
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<Captured, D::Error> {
        let value = TreeSeed.deserialize(d)?;
        Ok(Captured { value, path: None })
    }
}

impl<'de> Deserialize<'de> for Value {
    /// Keyval leaves stay [`Value::Keyval`] when read through this crate's
    /// deserializer; from any other, the tree is JSON-typed.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_newtype_struct(CAPTURE, CaptureVisitor)
            .map(|c| c.value)
    }
}

/// The subtree and its path, as an enum: variant name = path.
struct Located<'a> {
    value: &'a Value,
    path: &'a str,
}

impl<'de, 'a> EnumAccess<'de> for Located<'a> {
    type Error = DeError;
    type Variant = Raw<'a>;

    fn variant_seed<S: DeserializeSeed<'de>>(
        self,
        seed: S,
    ) -> Result<(S::Value, Raw<'a>), DeError> {
        let path: StrDeserializer<'_, DeError> = self.path.into_deserializer();
        Ok((seed.deserialize(path)?, Raw(self.value)))
    }
}

/// A subtree as serde data, keyval leaves as the private [`KEYVAL`] variant.
struct Raw<'a>(&'a Value);

impl<'de> Deserializer<'de> for Raw<'_> {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.0 {
            Value::Keyval(s) => visitor.visit_enum(KeyvalLeaf(s)),
            Value::Null => visitor.visit_unit(),
            Value::Bool(b) => visitor.visit_bool(*b),
            Value::Number(n) => visit_number(n, visitor),
            Value::String(s) => visitor.visit_str(s),
            Value::List(list) => {
                SeqDeserializer::new(list.iter().map(Raw)).deserialize_any(visitor)
            }
            Value::Map(map) => {
                let entries = map.iter().map(|(k, v)| (k.as_str(), Raw(v)));
                MapDeserializer::new(entries).deserialize_any(visitor)
            }
        }
    }

    forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map struct enum identifier ignored_any
    }
}

impl<'de> IntoDeserializer<'de, DeError> for Raw<'_> {
    type Deserializer = Self;

    fn into_deserializer(self) -> Self {
        self
    }
}

impl<'de> VariantAccess<'de> for Raw<'_> {
    type Error = DeError;

    fn unit_variant(self) -> Result<(), DeError> {
        Err(de::Error::custom("captured value read as a unit variant"))
    }

    fn newtype_variant_seed<S: DeserializeSeed<'de>>(self, seed: S) -> Result<S::Value, DeError> {
        seed.deserialize(self)
    }

    fn tuple_variant<V: Visitor<'de>>(self, _: usize, _: V) -> Result<V::Value, DeError> {
        Err(de::Error::custom("captured value read as a tuple variant"))
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        _: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, DeError> {
        Err(de::Error::custom("captured value read as a struct variant"))
    }
}

/// A keyval leaf as the newtype variant `KEYVAL(text)`.
struct KeyvalLeaf<'a>(&'a str);

impl<'de> EnumAccess<'de> for KeyvalLeaf<'_> {
    type Error = DeError;
    type Variant = Self;

    fn variant_seed<S: DeserializeSeed<'de>>(self, seed: S) -> Result<(S::Value, Self), DeError> {
        let tag: StrDeserializer<'_, DeError> = KEYVAL.into_deserializer();
        Ok((seed.deserialize(tag)?, self))
    }
}

impl<'de> VariantAccess<'de> for KeyvalLeaf<'_> {
    type Error = DeError;

    fn unit_variant(self) -> Result<(), DeError> {
        Err(de::Error::custom("keyval leaf read as a unit variant"))
    }

    fn newtype_variant_seed<S: DeserializeSeed<'de>>(self, seed: S) -> Result<S::Value, DeError> {
        let text: StrDeserializer<'_, DeError> = self.0.into_deserializer();
        seed.deserialize(text)
    }

    fn tuple_variant<V: Visitor<'de>>(self, _: usize, _: V) -> Result<V::Value, DeError> {
        Err(de::Error::custom("keyval leaf read as a tuple variant"))
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        _: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, DeError> {
        Err(de::Error::custom("keyval leaf read as a struct variant"))
    }
}

/// Rebuilds a [`Value`] from serde data (the inverse of [`Raw`]).
struct TreeSeed;

impl<'de> DeserializeSeed<'de> for TreeSeed {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(TreeSeed)
    }
}

impl<'de> Visitor<'de> for TreeSeed {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E: de::Error>(self, b: bool) -> Result<Value, E> {
        Ok(Value::Bool(b))
    }

    fn visit_i64<E: de::Error>(self, n: i64) -> Result<Value, E> {
        Ok(Value::Number(n.into()))
    }

    fn visit_u64<E: de::Error>(self, n: u64) -> Result<Value, E> {
        Ok(Value::Number(n.into()))
    }

    fn visit_f64<E: de::Error>(self, f: f64) -> Result<Value, E> {
        serde_json::Number::from_f64(f)
            .map(Value::Number)
            .ok_or_else(|| E::custom(format!("{f} is not a JSON number")))
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Value, E> {
        Ok(Value::String(s.to_owned()))
    }

    fn visit_string<E: de::Error>(self, s: String) -> Result<Value, E> {
        Ok(Value::String(s))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        TreeSeed.deserialize(d)
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        TreeSeed.deserialize(d)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut list = Vec::new();
        while let Some(element) = seq.next_element_seed(TreeSeed)? {
            list.push(element);
        }
        Ok(Value::List(list))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut members = crate::value::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let value = map.next_value_seed(TreeSeed)?;
            members.insert(key, value);
        }
        Ok(Value::Map(members))
    }

    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<Value, A::Error> {
        let (tag, variant): (String, _) = data.variant()?;
        if tag != KEYVAL {
            return Err(de::Error::unknown_variant(&tag, &[KEYVAL]));
        }
        variant.newtype_variant().map(Value::Keyval)
    }
}
