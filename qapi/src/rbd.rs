//! `driver=rbd` members (QEMU's `BlockdevOptionsRbd`, without `encrypt`)
//! and the `secret` object its `key-secret` names (QEMU's
//! `SecretProperties`).
//!
//! Like everything in this crate these are data only: the secret's `file`
//! is read and its `format` decoded where objects are created (the binary),
//! not here.

use serde::{Deserialize, Serialize};

/// `driver=rbd` members.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BlockdevOptionsRbd {
    /// The Ceph pool the image lives in.
    pub pool: String,
    /// The RADOS namespace within the pool (default: none).
    pub namespace: Option<String>,
    /// The image's name.
    pub image: String,
    /// A ceph.conf to read (default: librados's search path and the
    /// `CEPH_CONF` environment variable).
    pub conf: Option<String>,
    /// A snapshot to open (read-only).
    pub snapshot: Option<String>,
    /// The Ceph user without `client.` (default: librados's, `admin`).
    pub user: Option<String>,
    /// Accepted authentication modes, in order of preference
    /// (`auth_client_required`).
    pub auth_client_required: Option<Vec<RbdAuthMode>>,
    /// The id of a `secret` object holding the user's cephx key.
    pub key_secret: Option<String>,
    /// Monitors to reach instead of those of the configuration.
    pub server: Option<Vec<InetSocketAddressBase>>,
}

/// QEMU's `RbdAuthMode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RbdAuthMode {
    /// cephx.
    Cephx,
    /// No authentication.
    None,
}

impl RbdAuthMode {
    /// The mode as Ceph's `auth_client_required` spells it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Cephx => "cephx",
            Self::None => "none",
        }
    }
}

/// QEMU's `InetSocketAddressBase`: a host and a port (a number or a
/// service name, as a string).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InetSocketAddressBase {
    /// Host name or address.
    pub host: String,
    /// Port.
    pub port: String,
}

/// QEMU's `QCryptoSecretFormat`: how `data` or the file's contents are
/// encoded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SecretFormat {
    /// The bytes themselves.
    #[default]
    Raw,
    /// Base64 of the bytes.
    Base64,
}

/// `qom-type=secret` members (QEMU's `SecretProperties`, without the
/// `keyid`/`iv` encryption of the secret by another).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct SecretProperties {
    /// The secret, inline.
    pub data: Option<String>,
    /// A file holding the secret.
    pub file: Option<String>,
    /// How `data` or the file is encoded.
    #[serde(default)]
    pub format: SecretFormat,
}

#[cfg(test)]
mod tests {
    use crate::object::{parse_object, ObjectProperties};
    use crate::{parse_blockdev, BlockdevDriver};

    use super::*;

    fn rbd(arg: &str) -> BlockdevOptionsRbd {
        match parse_blockdev(arg).unwrap().driver {
            BlockdevDriver::Rbd(o) => o,
            d => panic!("not rbd: {}", d.name()),
        }
    }

    #[test]
    fn keyval_and_json_give_the_same_options() {
        let keyval = rbd(
            "rbd,pool=p,image=i,user=u,key-secret=s0,conf=/c,snapshot=s,\
             namespace=ns,auth-client-required.0=cephx,auth-client-required.1=none,\
             server.0.host=127.0.0.1,server.0.port=3300",
        );
        let json = rbd(r#"{"driver": "rbd", "pool": "p", "image": "i", "user": "u",
            "key-secret": "s0", "conf": "/c", "snapshot": "s", "namespace": "ns",
            "auth-client-required": ["cephx", "none"],
            "server": [{"host": "127.0.0.1", "port": "3300"}]}"#);
        assert_eq!(keyval, json);
        assert_eq!(
            keyval.auth_client_required,
            Some(vec![RbdAuthMode::Cephx, RbdAuthMode::None])
        );
        assert_eq!(keyval.server.unwrap()[0].port, "3300");
    }

    #[test]
    fn errors_name_the_field() {
        let err = |a: &str| parse_blockdev(a).unwrap_err().to_string();
        assert_eq!(err("rbd,image=i"), "Parameter 'pool' is missing");
        assert_eq!(err("rbd,pool=p"), "Parameter 'image' is missing");
        assert_eq!(
            err("rbd,pool=p,image=i,bogus=1"),
            "Invalid parameter 'bogus'"
        );
        assert_eq!(
            err("rbd,pool=p,image=i,auth-client-required.0=kerberos"),
            "Parameter 'auth-client-required.0' does not accept value 'kerberos'"
        );
    }

    #[test]
    fn secret_object_defaults_to_raw() {
        let o = parse_object("secret,id=s0,data=AQB").unwrap();
        let ObjectProperties::Secret(p) = o.properties else {
            panic!("not a secret");
        };
        assert_eq!(p.data.as_deref(), Some("AQB"));
        assert_eq!(p.format, SecretFormat::Raw);
        let o = parse_object("secret,id=s1,file=/k,format=base64").unwrap();
        assert_eq!(o.properties.qom_type(), "secret");
        let err = parse_object("secret,id=s2,format=hex").unwrap_err();
        assert_eq!(
            err.to_string(),
            "Parameter 'format' does not accept value 'hex'"
        );
    }
}
