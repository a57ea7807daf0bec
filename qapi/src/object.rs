//! `--object` / `object-add` options, shaped like QEMU's `ObjectOptions`
//! flat union (qapi/qom.json): `qom-type` selects the type, `id` is common,
//! the remaining members belong to the type.
//!
//! `iothread` and `tls-creds-x509` exist. Parsing follows the same path
//! as `BlockdevOptions` (see `block::parse`), for the same reason: the
//! keyval form must keep its on-demand typing.

use serde::{Deserialize, Deserializer, Serialize};

use crate::de::{deserialize_with, DeError, FlatUnion};
use crate::error::QapiError;
use crate::value::Value;

/// A complete `--object` definition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ObjectOptions {
    /// The object's id, by which devices refer to it (`iothread=io0`).
    pub id: String,
    /// The type and its own members.
    #[serde(flatten)]
    pub properties: ObjectProperties,
}

/// The type-specific part, tagged by `qom-type`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "qom-type", rename_all = "kebab-case")]
pub enum ObjectProperties {
    /// An I/O thread running devices' data planes.
    Iothread(IothreadProperties),
    /// X.509 TLS credentials (NBD's TLS).
    TlsCredsX509(TlsCredsX509Properties),
    /// Limits shared by `throttle` nodes.
    ThrottleGroup(Box<crate::throttle::ThrottleGroupProperties>),
    /// A secret (an rbd node's `key-secret`).
    Secret(crate::rbd::SecretProperties),
}

impl ObjectProperties {
    /// The `qom-type` as written on the command line.
    pub fn qom_type(&self) -> &'static str {
        match self {
            Self::Iothread(_) => "iothread",
            Self::TlsCredsX509(_) => "tls-creds-x509",
            Self::ThrottleGroup(_) => "throttle-group",
            Self::Secret(_) => "secret",
        }
    }
}

/// QEMU's `QCryptoTLSCredsEndpoint`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TlsCredsEndpoint {
    /// Credentials of the side that connects (QEMU's default).
    #[default]
    Client,
    /// Credentials of the side that listens.
    Server,
}

fn yes() -> bool {
    true
}

/// `qom-type=tls-creds-x509` members (QEMU's `TlsCredsX509Properties`
/// without `priority`, `sanity-check` and `passwordid`, which are
/// GnuTLS's or need the secret objects blkvm does not have).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct TlsCredsX509Properties {
    /// The directory of `ca-cert.pem`, `server-cert.pem`,
    /// `server-key.pem`, `client-cert.pem`, `client-key.pem`.
    pub dir: String,
    /// Which side the credentials are for.
    #[serde(default)]
    pub endpoint: TlsCredsEndpoint,
    /// Check the peer's certificate (default on, as QEMU).
    #[serde(default = "yes")]
    pub verify_peer: bool,
}

/// `qom-type=iothread` members.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct IothreadProperties {
    /// Longest busy-poll before sleeping, ns (QEMU's default: 32768 on Linux).
    pub poll_max_ns: Option<u64>,
    /// Factor by which the poll time grows (0: QEMU's default).
    pub poll_grow: Option<u64>,
    /// Divisor by which the poll time shrinks (0: QEMU's default).
    pub poll_shrink: Option<u64>,
}

/// Parses an `--object` argument: JSON if it starts with `{`, else keyval
/// with `qom-type` implied.
pub fn parse_object(arg: &str) -> Result<ObjectOptions, QapiError> {
    crate::parse_option_as(arg, Some("qom-type"))
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
enum QomType {
    Iothread,
    TlsCredsX509,
    ThrottleGroup,
    Secret,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ObjectBase {
    id: String,
}

fn object_at(value: &Value, path: &str) -> Result<ObjectOptions, DeError> {
    let union = FlatUnion::new(value, path, "qom-type", &["id"])?;
    let properties = match union.tag()? {
        QomType::Iothread => ObjectProperties::Iothread(union.variant()?),
        QomType::TlsCredsX509 => ObjectProperties::TlsCredsX509(union.variant()?),
        QomType::ThrottleGroup => ObjectProperties::ThrottleGroup(union.variant()?),
        QomType::Secret => ObjectProperties::Secret(union.variant()?),
    };
    let ObjectBase { id } = union.base()?;
    Ok(ObjectOptions { id, properties })
}

impl<'de> Deserialize<'de> for ObjectOptions {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        deserialize_with(d, object_at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(arg: &str) -> String {
        parse_object(arg).unwrap_err().to_string()
    }

    #[test]
    fn iothread_with_id_only() {
        let o = parse_object("iothread,id=io0").unwrap();
        assert_eq!(o.id, "io0");
        assert_eq!(o.properties, ObjectProperties::Iothread(Default::default()));
        assert_eq!(o.properties.qom_type(), "iothread");
    }

    #[test]
    fn iothread_poll_members_are_numbers() {
        let o = parse_object("iothread,id=io0,poll-max-ns=0x100,poll-grow=2,poll-shrink=4");
        let expected = IothreadProperties {
            poll_max_ns: Some(256),
            poll_grow: Some(2),
            poll_shrink: Some(4),
        };
        assert_eq!(o.unwrap().properties, ObjectProperties::Iothread(expected));
    }

    #[test]
    fn json_form_gives_the_same_object() {
        let json = r#"{"qom-type": "iothread", "id": "io0", "poll-max-ns": 1000}"#;
        let keyval = "iothread,id=io0,poll-max-ns=1000";
        assert_eq!(parse_object(json).unwrap(), parse_object(keyval).unwrap());
    }

    #[test]
    fn errors_name_the_member() {
        assert_eq!(
            err("foo,id=x"),
            "Parameter 'qom-type' does not accept value 'foo'"
        );
        assert_eq!(err("id=x"), "Parameter 'qom-type' is missing");
        assert_eq!(err("iothread"), "Parameter 'id' is missing");
        assert_eq!(err("iothread,id=x,bogus=1"), "Invalid parameter 'bogus'");
        assert_eq!(
            err("iothread,id=x,poll-max-ns=lots"),
            "Parameter 'poll-max-ns' expects a number"
        );
        assert_eq!(
            err(r#"{"qom-type": "iothread", "id": 1}"#),
            "Invalid parameter type for 'id', expected: string"
        );
    }

    #[test]
    fn tls_creds_x509_defaults_as_qemu() {
        let o = parse_object("tls-creds-x509,id=tls0,dir=/etc/pki/qemu").unwrap();
        assert_eq!(o.id, "tls0");
        assert_eq!(o.properties.qom_type(), "tls-creds-x509");
        let expected = TlsCredsX509Properties {
            dir: "/etc/pki/qemu".into(),
            endpoint: TlsCredsEndpoint::Client,
            verify_peer: true,
        };
        assert_eq!(o.properties, ObjectProperties::TlsCredsX509(expected));
        let o = parse_object("tls-creds-x509,id=t,dir=d,endpoint=server,verify-peer=off").unwrap();
        let ObjectProperties::TlsCredsX509(p) = o.properties else {
            panic!("not tls-creds-x509");
        };
        assert_eq!(
            (p.endpoint, p.verify_peer),
            (TlsCredsEndpoint::Server, false)
        );
        assert_eq!(
            err("tls-creds-x509,id=t,dir=d,endpoint=both"),
            "Parameter 'endpoint' does not accept value 'both'"
        );
        assert_eq!(err("tls-creds-x509,id=t"), "Parameter 'dir' is missing");
    }

    #[test]
    fn serializes_like_qemu() {
        let o = parse_object("iothread,id=io0,poll-max-ns=5").unwrap();
        let json = serde_json::to_value(&o).unwrap();
        assert_eq!(json["qom-type"], "iothread");
        assert_eq!(json["id"], "io0");
        assert_eq!(json["poll-max-ns"], 5);
    }
}
