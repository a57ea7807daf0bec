//! `Deserialize` for the `BlockdevOptions` flat union and the
//! `BlockdevRef` alternate, written by hand.
//!
//! Serde's `#[serde(tag = "driver")]` + `#[serde(flatten)]` would buffer
//! the input first and so read `read-only=on` as the string `"on"`, not a
//! bool. Instead we do what QEMU's generated visitor does: read `driver`,
//! read the common members (`BlockdevCommon`) from the members QEMU puts in
//! the union's base, and read the driver's struct (`deny_unknown_fields`)
//! from everything else, each straight from the [`Value`] tree.

use serde::{Deserialize, Deserializer};

use super::{BlockdevDriver, BlockdevOptions, BlockdevRef};
use crate::de::{deserialize_with, DeError, FlatUnion};
use crate::error::QapiError;
use crate::value::Value;

/// The base members of `BlockdevOptions` other than `driver`.
const COMMON: &[&str] = &[
    "node-name",
    "read-only",
    "auto-read-only",
    "cache",
    "discard",
    "detect-zeroes",
];

/// The values of `driver`.
#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
enum DriverName {
    /// QEMU spells file-posix on a block device `host_device`; the same
    /// driver serves both here.
    #[serde(alias = "host_device")]
    File,
    Raw,
    NullCo,
    #[serde(rename = "io_uring")]
    IoUring,
    #[serde(rename = "nvme-io_uring")]
    NvmeIoUring,
    VirtioBlkVhostUser,
    VirtioBlkVhostVdpa,
    VirtioBlkVfioPci,
    Nbd,
    Throttle,
    Qcow2,
    Rbd,
}

/// Parses the `BlockdevOptions` at the dotted `path` (empty for the root).
pub(crate) fn blockdev_at(value: &Value, path: &str) -> Result<BlockdevOptions, DeError> {
    let union = FlatUnion::new(value, path, "driver", COMMON)?;
    let driver = match union.tag()? {
        DriverName::File => BlockdevDriver::File(union.variant()?),
        DriverName::Raw => BlockdevDriver::Raw(union.variant()?),
        DriverName::NullCo => BlockdevDriver::NullCo(union.variant()?),
        DriverName::IoUring => BlockdevDriver::IoUring(union.variant()?),
        DriverName::NvmeIoUring => BlockdevDriver::NvmeIoUring(union.variant()?),
        DriverName::VirtioBlkVhostUser => BlockdevDriver::VirtioBlkVhostUser(union.variant()?),
        DriverName::VirtioBlkVhostVdpa => BlockdevDriver::VirtioBlkVhostVdpa(union.variant()?),
        DriverName::VirtioBlkVfioPci => BlockdevDriver::VirtioBlkVfioPci(union.variant()?),
        DriverName::Nbd => BlockdevDriver::Nbd(union.variant()?),
        DriverName::Throttle => BlockdevDriver::Throttle(union.variant()?),
        DriverName::Qcow2 => BlockdevDriver::Qcow2(union.variant()?),
        DriverName::Rbd => BlockdevDriver::Rbd(union.variant()?),
    };
    let common = union.base()?;
    Ok(BlockdevOptions { common, driver })
}

/// Parses a `BlockdevRef`: a node name, or an inline definition.
pub(crate) fn blockdev_ref_at(value: &Value, path: &str) -> Result<BlockdevRef, DeError> {
    match value {
        Value::Keyval(name) | Value::String(name) => Ok(BlockdevRef::Reference(name.clone())),
        Value::Map(_) => blockdev_at(value, path).map(|o| BlockdevRef::Definition(Box::new(o))),
        _ => Err(DeError::placed(QapiError::InvalidType {
            key: path.into(),
            expected: "BlockdevRef".into(),
        })),
    }
}

impl<'de> Deserialize<'de> for BlockdevOptions {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        deserialize_with(d, blockdev_at)
    }
}

impl<'de> Deserialize<'de> for BlockdevRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        deserialize_with(d, blockdev_ref_at)
    }
}
