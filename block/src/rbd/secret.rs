//! `--object secret`: bytes a node names by id instead of carrying them in
//! its options (QEMU's `secret` object; the rbd driver's `key-secret`).
//!
//! The value is kept as bytes; [`Secret::as_base64`] gives it the way
//! QEMU's `qcrypto_secret_lookup_as_base64` does, which is how a cephx key
//! reaches librados (`format=base64,data=AQ...` passes a key as `ceph auth
//! print-key` shows it).

use std::fmt;

use qapi::{SecretFormat, SecretProperties};

use crate::BlockError;

/// A secret's bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// The secret the object's properties describe: `data` or the
    /// contents of `file` (exactly one), decoded per `format`.
    pub fn load(p: &SecretProperties) -> Result<Self, BlockError> {
        let raw = match (&p.data, &p.file) {
            (Some(_), Some(_)) => {
                return Err(BlockError::Invalid(
                    "'data' and 'file' are mutually exclusive".into(),
                ))
            }
            (None, None) => {
                return Err(BlockError::Invalid(
                    "Either 'file' or 'data' must be provided".into(),
                ))
            }
            (Some(d), None) => d.as_bytes().to_vec(),
            (None, Some(path)) => std::fs::read(path).map_err(|e| BlockError::Open {
                path: path.clone(),
                source: e,
            })?,
        };
        match p.format {
            SecretFormat::Raw => Ok(Secret(raw)),
            SecretFormat::Base64 => {
                // A file written by `echo` ends in a newline; base64 never does.
                let text = raw.trim_ascii();
                base64_decode(text).map(Secret).ok_or_else(|| {
                    BlockError::Invalid("Parameter 'data' (or 'file') is not valid base64".into())
                })
            }
        }
    }

    /// The secret from its bytes.
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        Secret(bytes)
    }

    /// The bytes, base64-encoded (standard alphabet, padded).
    pub fn as_base64(&self) -> String {
        base64_encode(&self.0)
    }
}

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding (RFC 4648 section 4). Written here rather
/// than taken from a crate: it is a dozen lines, used once per node open.
fn base64_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Decodes padded standard base64; `None` if it is not that.
fn base64_decode(text: &[u8]) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(4) {
        return None;
    }
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let last = text.len() / 4;
    for (i, quad) in text.chunks(4).enumerate() {
        let pad = quad.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || (pad > 0 && i + 1 != last) {
            return None;
        }
        let mut n = 0u32;
        for &c in &quad[..4 - pad] {
            let v = ALPHABET.iter().position(|&a| a == c)? as u32;
            n = n << 6 | v;
        }
        n <<= 6 * pad as u32;
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..3 - pad]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn props(data: Option<&str>, file: Option<&str>, format: SecretFormat) -> SecretProperties {
        SecretProperties {
            data: data.map(Into::into),
            file: file.map(Into::into),
            format,
        }
    }

    #[test]
    fn base64_round_trips_every_padding() {
        for s in ["", "f", "fo", "foo", "foob", "fooba", "foobar"] {
            let e = base64_encode(s.as_bytes());
            assert_eq!(base64_decode(e.as_bytes()).unwrap(), s.as_bytes(), "{e}");
        }
        assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64_encode(b"fo"), "Zm8=");
    }

    #[test]
    fn base64_refuses_what_is_not_base64() {
        for bad in ["Zm9", "Zm9v!A==", "Z===", "Zm==Zm9v"] {
            assert!(base64_decode(bad.as_bytes()).is_none(), "{bad}");
        }
    }

    #[test]
    fn a_cephx_key_given_as_base64_comes_back_unchanged() {
        let key = "AQBZQE9lAAAAABAAnq6a3c0rYwYSGJ3lIzyZ5g==";
        let s = Secret::load(&props(Some(key), None, SecretFormat::Base64)).unwrap();
        assert_eq!(s.as_base64(), key);
    }

    #[test]
    fn raw_data_is_encoded_for_librados() {
        let s = Secret::load(&props(Some("foo"), None, SecretFormat::Raw)).unwrap();
        assert_eq!(s.as_base64(), "Zm9v");
    }

    #[test]
    fn data_and_file_are_one_or_the_other() {
        let both = Secret::load(&props(Some("a"), Some("/b"), SecretFormat::Raw));
        assert!(both.unwrap_err().to_string().contains("mutually exclusive"));
        let none = Secret::load(&props(None, None, SecretFormat::Raw));
        assert!(none.unwrap_err().to_string().contains("must be provided"));
    }

    #[test]
    fn a_base64_file_may_end_in_a_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, "Zm9v\n").unwrap();
        let p = props(None, path.to_str(), SecretFormat::Base64);
        assert_eq!(
            Secret::load(&p).unwrap(),
            Secret::from_bytes(b"foo".to_vec())
        );
    }
}
