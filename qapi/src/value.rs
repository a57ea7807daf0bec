//! [`Value`]: the one tree both option syntaxes parse into.
//!
//! QEMU reduces keyval to JSON whose every leaf is a string, and then reads
//! it with a visitor that converts those strings to whatever type it wants
//! (`qobject_input_visitor_new_keyval`), while JSON input is read strictly.
//! We keep the same split in the leaves: [`Value::Keyval`] is a string whose
//! type is decided by the reader, the other scalars are JSON's own and must
//! already have the right type. One deserializer ([`crate::de`]) then serves
//! both forms, so `--blockdev file,read-only=on` and
//! `{"driver": "file", "read-only": true}` reach the same typed struct by the
//! same code.

use std::collections::BTreeMap;

/// The members of an object.
pub type Map = BTreeMap<String, Value>;

/// An option value from either syntax.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    /// A keyval leaf: text, typed on demand (`on` is a bool, `4k` a size).
    Keyval(String),
    /// JSON `null`.
    Null,
    /// JSON `true`/`false`.
    Bool(bool),
    /// A JSON number.
    Number(serde_json::Number),
    /// A JSON string (only ever a string, as in QEMU's JSON input).
    String(String),
    /// A list (JSON array, or keyval `a.0=x,a.1=y`).
    List(Vec<Value>),
    /// An object (JSON object, or keyval `a.b=x`).
    Map(Map),
}

impl From<serde_json::Value> for Value {
    fn from(value: serde_json::Value) -> Self {
        match value {
            serde_json::Value::Null => Self::Null,
            serde_json::Value::Bool(b) => Self::Bool(b),
            serde_json::Value::Number(n) => Self::Number(n),
            serde_json::Value::String(s) => Self::String(s),
            serde_json::Value::Array(a) => Self::List(a.into_iter().map(Self::from).collect()),
            serde_json::Value::Object(o) => {
                Self::Map(o.into_iter().map(|(k, v)| (k, Self::from(v))).collect())
            }
        }
    }
}

impl From<&serde_json::Value> for Value {
    fn from(value: &serde_json::Value) -> Self {
        match value {
            serde_json::Value::Null => Self::Null,
            serde_json::Value::Bool(b) => Self::Bool(*b),
            serde_json::Value::Number(n) => Self::Number(n.clone()),
            serde_json::Value::String(s) => Self::String(s.clone()),
            serde_json::Value::Array(a) => Self::List(a.iter().map(Self::from).collect()),
            serde_json::Value::Object(o) => {
                Self::Map(o.iter().map(|(k, v)| (k.clone(), Self::from(v))).collect())
            }
        }
    }
}

impl From<Map> for Value {
    fn from(map: Map) -> Self {
        Self::Map(map)
    }
}
