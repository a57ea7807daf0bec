//! [`QapiError`]: every way an option string or QMP argument can be wrong.
//!
//! The texts follow QEMU's (`qapi/qmp/qerror.h`, `util/keyval.c`) so that a
//! user who knows QEMU's messages recognises ours, and every variant that is
//! about one member names it by its full dotted path (`file.filename`), which
//! is also what the user typed on the command line.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// An option string, JSON value or QMP argument that does not fit its type.
///
/// Each `key` is the full dotted path of the member, e.g. `cache.direct`.
/// (The type is `Serialize`/`Deserialize` so that it can travel through
/// serde unchanged; see `de::capture`.)
#[derive(Clone, Debug, PartialEq, Eq, Error, Serialize, Deserialize)]
pub enum QapiError {
    /// A required member is absent.
    #[error("Parameter '{}' is missing", shown(.key))]
    Missing {
        /// Path of the member.
        key: String,
    },
    /// A member the type does not have, or a keyval key that is not valid.
    #[error("Invalid parameter '{key}'")]
    InvalidParameter {
        /// The key as written.
        key: String,
    },
    /// A value outside an enumeration.
    #[error("Parameter '{}' does not accept value '{value}'", shown(.key))]
    BadValue {
        /// Path of the member.
        key: String,
        /// The value given.
        value: String,
    },
    /// A value of the right type whose text or range is wrong.
    #[error("Parameter '{}' expects {expected}", shown(.key))]
    InvalidValue {
        /// Path of the member.
        key: String,
        /// What would have been accepted.
        expected: String,
    },
    /// A JSON value of the wrong type (`"read-only": "on"`).
    #[error("Invalid parameter type for '{}', expected: {expected}", shown(.key))]
    InvalidType {
        /// Path of the member.
        key: String,
        /// The expected type (`boolean`, `integer`, `string`, `object`...).
        expected: String,
    },
    /// Keyval: a key without `=value` (and no implied key to take it).
    #[error("Expected '=' after parameter '{key}'")]
    ExpectedEquals {
        /// The key as written.
        key: String,
    },
    /// Keyval: a key used both as a scalar and as an object or list.
    #[error("Parameters '{key}.*' used inconsistently")]
    Inconsistent {
        /// The key used both ways.
        key: String,
    },
    /// Keyval: a key given twice (QEMU keeps the last; we refuse).
    #[error("Parameter '{key}' is set more than once")]
    Repeated {
        /// The repeated key.
        key: String,
    },
    /// Keyval: a key of one fragment longer than 127 characters.
    #[error("Parameter '{key}' is too long")]
    TooLong {
        /// The key.
        key: String,
    },
    /// Keyval: a fragment of a dotted key longer than 127 characters.
    #[error("Parameter fragment '{key}' is too long")]
    FragmentTooLong {
        /// The fragment.
        key: String,
    },
    /// Keyval: a key with more fragments than we nest.
    #[error("Parameter '{key}' is nested too deeply")]
    TooDeep {
        /// The key.
        key: String,
    },
    /// Keyval: list indexes with a gap (`a.1=x` without `a.0`).
    #[error("Parameter '{key}' missing")]
    MissingListElement {
        /// The missing element, e.g. `a.0`.
        key: String,
    },
    /// Keyval: `help` or `?`, which no option of ours answers.
    #[error("Help is not available for this option")]
    HelpNotAvailable,
    /// The argument started with `{` but is not valid JSON.
    #[error("Invalid JSON: {0}")]
    Json(String),
    /// Anything else a type's own deserializer reports.
    #[error("{}", custom(.key, .message))]
    Custom {
        /// Path of the member (empty for the whole value).
        key: String,
        /// The message.
        message: String,
    },
}

impl QapiError {
    /// The dotted path of the member the error is about, if it names one.
    pub fn key(&self) -> Option<&str> {
        match self {
            Self::Missing { key }
            | Self::InvalidParameter { key }
            | Self::BadValue { key, .. }
            | Self::InvalidValue { key, .. }
            | Self::InvalidType { key, .. }
            | Self::ExpectedEquals { key }
            | Self::Inconsistent { key }
            | Self::Repeated { key }
            | Self::TooLong { key }
            | Self::FragmentTooLong { key }
            | Self::TooDeep { key }
            | Self::MissingListElement { key }
            | Self::Custom { key, .. } => Some(key),
            Self::HelpNotAvailable | Self::Json(_) => None,
        }
    }

    /// Puts `prefix` in front of the member path (deserializer errors only:
    /// keyval syntax errors already carry the key as written).
    pub(crate) fn prefix_key(&mut self, prefix: &str) {
        if let Self::Missing { key }
        | Self::InvalidParameter { key }
        | Self::BadValue { key, .. }
        | Self::InvalidValue { key, .. }
        | Self::InvalidType { key, .. }
        | Self::Repeated { key }
        | Self::Custom { key, .. } = self
        {
            *key = join(prefix, key);
        }
    }
}

/// `prefix.key`, or whichever of the two is not empty.
pub(crate) fn join(prefix: &str, key: &str) -> String {
    match (prefix.is_empty(), key.is_empty()) {
        (true, _) => key.to_owned(),
        (_, true) => prefix.to_owned(),
        _ => format!("{prefix}.{key}"),
    }
}

/// QEMU names the root of a value `<anonymous>` in messages.
fn shown(key: &str) -> &str {
    if key.is_empty() {
        "<anonymous>"
    } else {
        key
    }
}

fn custom(key: &str, message: &str) -> String {
    if key.is_empty() {
        message.to_owned()
    } else {
        format!("Parameter '{key}': {message}")
    }
}
