//! blkvm's option and QMP types, and the parsers that fill them.
//!
//! Pure data: no fds, no threads. Everything the command line or QMP says
//! about block nodes and objects is parsed here into typed structs, so the
//! rest of the project never sees an untyped option, and every wrong key or
//! value is reported here, in QEMU's words, naming the key.
//!
//! Two syntaxes, as in QEMU: a JSON object when the argument starts with
//! `{`, else [`keyval`] (`file,filename=x,cache.direct=on`). Both become a
//! [`Value`] tree whose leaves remember where they came from (keyval text is
//! typed when read, JSON scalars must already have the right type), and one
//! serde deserializer ([`de`]) turns that tree into the typed structs, so
//! the two forms cannot drift apart.
//!
//! The entry points: [`parse_blockdev`], [`blockdev_from_json`],
//! [`parse_keyval_as`], [`parse_option_as`], [`object::parse_object`] and
//! [`device::parse_device`].

#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod block;
pub mod de;
pub mod device;
mod error;
pub mod export;
pub mod keyval;
pub mod object;
pub mod qcow2;
pub mod qmp;
pub mod rbd;
mod size;
pub mod throttle;
pub mod value;

use serde::de::DeserializeOwned;

pub use block::*;
pub use error::QapiError;
pub use qcow2::{BlockdevOptionsQcow2, Qcow2Backing};
pub use rbd::{BlockdevOptionsRbd, RbdAuthMode, SecretFormat, SecretProperties};
pub use size::{parse_size, Size, SizeError};
pub use value::Value;

/// Parses a `--blockdev` argument: JSON if it starts with `{`, else keyval
/// with `driver` implied (`file,filename=x`).
pub fn parse_blockdev(arg: &str) -> Result<BlockdevOptions, QapiError> {
    let value = parse_tree(arg, Some("driver"))?;
    block::blockdev_at(&value, "").map_err(|e| e.error)
}

/// Reads `blockdev-add` arguments (strict JSON typing, as QEMU's QMP).
pub fn blockdev_from_json(json: &serde_json::Value) -> Result<BlockdevOptions, QapiError> {
    block::blockdev_at(&Value::from(json), "").map_err(|e| e.error)
}

/// Parses keyval `arg` into `T` (`--device`, `--export`...).
pub fn parse_keyval_as<T: DeserializeOwned>(
    arg: &str,
    implied_key: Option<&str>,
) -> Result<T, QapiError> {
    de::from_value(&Value::Map(keyval::parse(arg, implied_key)?))
}

/// Parses `arg` into `T`: JSON if it starts with `{`, else keyval.
pub fn parse_option_as<T: DeserializeOwned>(
    arg: &str,
    implied_key: Option<&str>,
) -> Result<T, QapiError> {
    de::from_value(&parse_tree(arg, implied_key)?)
}

/// JSON if the argument starts with `{`, else keyval.
fn parse_tree(arg: &str, implied_key: Option<&str>) -> Result<Value, QapiError> {
    if arg.trim_start().starts_with('{') {
        let json: serde_json::Value =
            serde_json::from_str(arg).map_err(|e| QapiError::Json(e.to_string()))?;
        Ok(Value::from(json))
    } else {
        keyval::parse(arg, implied_key).map(Value::Map)
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(rename_all = "kebab-case", deny_unknown_fields)]
    struct Export {
        #[serde(rename = "type")]
        kind: String,
        id: String,
        writable: Option<bool>,
    }

    #[test]
    fn json_syntax_error_is_reported_as_such() {
        let err = parse_blockdev(r#"{"driver": "file""#).unwrap_err();
        assert!(matches!(err, QapiError::Json(_)));
        assert!(err.to_string().starts_with("Invalid JSON: "), "{err}");
    }

    #[test]
    fn leading_whitespace_before_json_is_allowed() {
        let opts = parse_blockdev(r#"  {"driver": "null-co"}"#).unwrap();
        assert_eq!(opts.driver.name(), "null-co");
    }

    #[test]
    fn keyval_and_json_reach_any_deserialize_type() {
        let keyval: Export = parse_keyval_as("nbd,id=e0,writable=on", Some("type")).unwrap();
        let json: Export =
            parse_option_as(r#"{"type": "nbd", "id": "e0", "writable": true}"#, None).unwrap();
        assert_eq!(keyval, json);
        assert_eq!(keyval.kind, "nbd");
    }

    #[test]
    fn parse_keyval_as_never_takes_json() {
        let err = parse_keyval_as::<Export>("{\"type\": \"nbd\"}", None).unwrap_err();
        assert_eq!(err.to_string(), "Invalid parameter '{\"type\": \"nbd\"}'");
    }

    #[test]
    fn blockdev_from_json_reads_qmp_arguments() {
        let json = serde_json::json!({"driver": "null-co", "size": 4096, "node-name": "n0"});
        let opts = blockdev_from_json(&json).unwrap();
        assert_eq!(opts.common.node_name.as_deref(), Some("n0"));
    }

    #[test]
    fn non_object_json_is_a_type_error() {
        let err = blockdev_from_json(&serde_json::json!([1])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Invalid parameter type for '<anonymous>', expected: object"
        );
    }
}
