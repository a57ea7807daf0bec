//! A serde deserializer over [`Value`], so typed option structs are plain
//! `#[derive(Deserialize)]` and both option syntaxes reach them alike.
//!
//! Leaves are read as QEMU's two input visitors read them:
//! - a [`Value::Keyval`] leaf is text typed on demand: `deserialize_bool`
//!   takes `on`/`off` (and `true`/`false`), integers are decimal or `0x`
//!   hex, enums and strings take the text, `deserialize_any` sees a string;
//! - a JSON leaf must already be of the type asked for (a bool is a JSON
//!   bool, an integer a JSON integer), or the error is QEMU's
//!   `Invalid parameter type for 'x', expected: boolean`.
//!
//! Errors name the member by its full dotted path. Errors made here carry
//! it already; errors made by serde's derived visitors (`missing_field`,
//! `unknown_field`, `unknown_variant`...) know only a field name or nothing,
//! so every `deserialize_*` method, on the way out, puts its own path in
//! front of an error that has not been placed yet (`DeError::place`).
//!
//! Serde's buffering for `#[serde(flatten)]` and internally tagged enums
//! would turn keyval leaves into plain strings and lose the on-demand
//! typing. QAPI flat unions (`BlockdevOptions`, `ObjectOptions`) therefore
//! have hand-written `Deserialize` impls built on `FlatUnion` and on the
//! capture protocol of `capture`, which hands them the raw subtree.

mod capture;
mod value_de;

use std::fmt;

use serde::de::{self, DeserializeOwned, Expected, Unexpected};

pub(crate) use capture::deserialize_with;
use value_de::{KeyFilter, ValueDeserializer};

use crate::error::{join, QapiError};
use crate::value::Value;

/// Deserializes `T` from `value`, which may mix keyval and JSON leaves.
pub fn from_value<T: DeserializeOwned>(value: &Value) -> Result<T, QapiError> {
    from_value_at(value, "", KeyFilter::All).map_err(|e| e.error)
}

/// Deserializes `T` from `value`, found at the dotted `path`, seeing only the
/// members of a map that `filter` lets through.
fn from_value_at<T: DeserializeOwned>(
    value: &Value,
    path: &str,
    filter: KeyFilter,
) -> Result<T, DeError> {
    T::deserialize(ValueDeserializer::new(value, path.to_owned(), filter))
}

/// The deserializer's error: a [`QapiError`] and whether its path is final.
#[derive(Debug)]
pub(crate) struct DeError {
    pub(crate) error: QapiError,
    placed: bool,
}

impl DeError {
    /// An error whose key is already the full path.
    pub(crate) fn placed(error: QapiError) -> Self {
        Self {
            error,
            placed: true,
        }
    }

    /// Makes the key of a not yet placed error relative to `path`.
    fn place(mut self, path: &str) -> Self {
        if !self.placed {
            self.error.prefix_key(path);
            self.placed = true;
        }
        self
    }

    fn unplaced(error: QapiError) -> Self {
        Self {
            error,
            placed: false,
        }
    }
}

impl fmt::Display for DeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.error.fmt(f)
    }
}

impl std::error::Error for DeError {}

impl de::Error for DeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Self::unplaced(QapiError::Custom {
            key: String::new(),
            message: msg.to_string(),
        })
    }

    fn invalid_type(_: Unexpected<'_>, expected: &dyn Expected) -> Self {
        Self::unplaced(QapiError::InvalidType {
            key: String::new(),
            expected: expected.to_string(),
        })
    }

    fn invalid_value(_: Unexpected<'_>, expected: &dyn Expected) -> Self {
        Self::unplaced(QapiError::InvalidValue {
            key: String::new(),
            expected: expected.to_string(),
        })
    }

    fn unknown_variant(variant: &str, _: &'static [&'static str]) -> Self {
        Self::unplaced(QapiError::BadValue {
            key: String::new(),
            value: variant.into(),
        })
    }

    fn unknown_field(field: &str, expected: &'static [&'static str]) -> Self {
        if let Some(error) = capture::decode_error(field, expected) {
            return Self::placed(error);
        }
        Self::unplaced(QapiError::InvalidParameter { key: field.into() })
    }

    fn missing_field(field: &'static str) -> Self {
        Self::unplaced(QapiError::Missing { key: field.into() })
    }

    fn duplicate_field(field: &'static str) -> Self {
        Self::unplaced(QapiError::Repeated { key: field.into() })
    }
}

/// A QAPI flat union (`BlockdevOptions`, `ObjectOptions`) at `path`: an
/// object whose `tag` member selects the variant, whose `base` members are
/// common to all variants, and whose other members belong to the variant.
pub(crate) struct FlatUnion<'a> {
    map: &'a Value,
    path: &'a str,
    tag: &'static str,
    base: &'static [&'static str],
}

impl<'a> FlatUnion<'a> {
    /// Checks that `value` is an object.
    pub(crate) fn new(
        value: &'a Value,
        path: &'a str,
        tag: &'static str,
        base: &'static [&'static str],
    ) -> Result<Self, DeError> {
        match value {
            Value::Map(_) => Ok(Self {
                map: value,
                path,
                tag,
                base,
            }),
            _ => Err(DeError::placed(QapiError::InvalidType {
                key: path.into(),
                expected: "object".into(),
            })),
        }
    }

    /// The tag, typically a `#[serde(rename_all = "kebab-case")]` enum.
    pub(crate) fn tag<T: DeserializeOwned>(&self) -> Result<T, DeError> {
        let key = join(self.path, self.tag);
        match self.map {
            Value::Map(map) => match map.get(self.tag) {
                Some(value) => from_value_at(value, &key, KeyFilter::All),
                None => Err(DeError::placed(QapiError::Missing { key })),
            },
            _ => Err(DeError::placed(QapiError::Missing { key })),
        }
    }

    /// The base members (the tag excluded).
    pub(crate) fn base<T: DeserializeOwned>(&self) -> Result<T, DeError> {
        from_value_at(self.map, self.path, KeyFilter::Only(self.base))
    }

    /// The variant's members: all but the tag and the base members.
    pub(crate) fn variant<T: DeserializeOwned>(&self) -> Result<T, DeError> {
        let filter = KeyFilter::Except(self.tag, self.base);
        from_value_at(self.map, self.path, filter)
    }
}

#[cfg(test)]
mod tests;
