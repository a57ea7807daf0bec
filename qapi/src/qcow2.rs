//! `driver=qcow2` members (QEMU's `BlockdevOptionsQcow2`, the subset blkvm
//! implements). `backing` is QEMU's `BlockdevRefOrNull`: absent means
//! "open what the image header names", `null` means "no backing file".

use serde::{Deserialize, Deserializer, Serialize};

use crate::block::BlockdevRef;
use crate::de::{deserialize_with, DeError};
use crate::size::Size;
use crate::value::Value;

/// `driver=qcow2` members.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BlockdevOptionsQcow2 {
    /// The protocol node holding the image.
    pub file: BlockdevRef,
    /// The backing node: absent opens the header's backing file.
    #[serde(default)]
    pub backing: Qcow2Backing,
    /// Metadata cache size in bytes (the L2 part of it, as blkvm keeps no
    /// refcount cache budget of its own).
    pub cache_size: Option<Size>,
    /// L2 cache size in bytes.
    pub l2_cache_size: Option<Size>,
    /// Discard keeps clusters allocated (only their L2 entries change).
    #[serde(default)]
    pub discard_no_unref: bool,
    /// Lazy refcounts (`on` is refused: blkvm updates refcounts eagerly).
    pub lazy_refcounts: Option<bool>,
}

/// QEMU's `BlockdevRefOrNull` for `backing`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Qcow2Backing {
    /// Open the backing file the image header names, if any.
    #[default]
    FromImage,
    /// This node (by name or inline) is the backing node.
    Node(BlockdevRef),
    /// No backing node (`backing=null`, JSON `null`): unallocated
    /// clusters read as zeroes.
    None,
}

fn backing_at(value: &Value, path: &str) -> Result<Qcow2Backing, DeError> {
    match value {
        Value::Null => Ok(Qcow2Backing::None),
        // Keyval has no null: QEMU reads an empty string as null there;
        // `null` is taken too, as written in QEMU's documentation.
        Value::Keyval(s) if s.is_empty() || s == "null" => Ok(Qcow2Backing::None),
        v => crate::block::blockdev_ref_at(v, path).map(Qcow2Backing::Node),
    }
}

impl<'de> Deserialize<'de> for Qcow2Backing {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        deserialize_with(d, backing_at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{parse_blockdev, BlockdevDriver};

    fn qcow2(arg: &str) -> BlockdevOptionsQcow2 {
        match parse_blockdev(arg).unwrap().driver {
            BlockdevDriver::Qcow2(q) => q,
            d => panic!("not qcow2: {d:?}"),
        }
    }

    #[test]
    fn backing_absent_means_from_the_image() {
        assert_eq!(qcow2("qcow2,file=f0").backing, Qcow2Backing::FromImage);
    }

    #[test]
    fn backing_null_in_keyval_and_json_means_none() {
        assert_eq!(
            qcow2("qcow2,file=f0,backing=null").backing,
            Qcow2Backing::None
        );
        let j = r#"{"driver":"qcow2","file":"f0","backing":null}"#;
        assert_eq!(qcow2(j).backing, Qcow2Backing::None);
    }

    #[test]
    fn backing_by_name_and_inline_children_parse() {
        let q = qcow2("qcow2,file.driver=file,file.filename=/x,backing=b0,l2-cache-size=1M");
        assert_eq!(
            q.backing,
            Qcow2Backing::Node(BlockdevRef::Reference("b0".into()))
        );
        assert!(matches!(q.file, BlockdevRef::Definition(_)));
        assert_eq!(q.l2_cache_size, Some(Size(1 << 20)));
    }

    #[test]
    fn on_off_members_parse_in_keyval() {
        let q = qcow2("qcow2,file=f0,discard-no-unref=on,lazy-refcounts=off");
        assert!(q.discard_no_unref);
        assert_eq!(q.lazy_refcounts, Some(false));
    }

    #[test]
    fn unknown_member_is_refused_naming_the_key() {
        let e = parse_blockdev("qcow2,file=f0,bogus=1").unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
    }
}
