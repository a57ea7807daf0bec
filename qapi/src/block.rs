//! Typed `--blockdev` / `blockdev-add` options, shaped like QEMU's
//! `BlockdevOptions` union (qapi/block-core.json): common members plus one
//! struct per driver, selected by `driver`.
//!
//! Parsing goes through [`crate::de`], which accepts both the keyval form
//! (every scalar is a string, typed on demand) and the JSON form (scalars are
//! strictly typed, as QEMU's JSON input visitor does).

use serde::{Deserialize, Serialize};

use crate::size::Size;

/// A complete `--blockdev` definition: the common members and the driver's own.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BlockdevOptions {
    /// Members every driver takes.
    #[serde(flatten)]
    pub common: BlockdevCommon,
    /// The driver and its own members.
    #[serde(flatten)]
    pub driver: BlockdevDriver,
}

/// `BlockdevOptions` common members (everything except `driver`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BlockdevCommon {
    /// Node name; generated (`#blockNNN`) when absent.
    pub node_name: Option<String>,
    /// Open read-only.
    #[serde(default)]
    pub read_only: bool,
    /// Fall back to read-only when read-write cannot be had.
    #[serde(default)]
    pub auto_read_only: bool,
    /// Cache mode.
    #[serde(default)]
    pub cache: BlockdevCacheOptions,
    /// Discard requests: passed down (`unmap`) or dropped (`ignore`, default).
    #[serde(default)]
    pub discard: BlockdevDiscardOptions,
    /// Zero detection on writes.
    #[serde(default)]
    pub detect_zeroes: BlockdevDetectZeroesOptions,
}

/// `cache.*` members.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BlockdevCacheOptions {
    /// Bypass the host page cache (O_DIRECT).
    #[serde(default)]
    pub direct: bool,
    /// Ignore flush requests.
    #[serde(default)]
    pub no_flush: bool,
}

/// `discard`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BlockdevDiscardOptions {
    /// Discard requests are completed without doing anything.
    #[default]
    Ignore,
    /// Discard requests are passed to the driver.
    Unmap,
}

/// `detect-zeroes`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BlockdevDetectZeroesOptions {
    /// No detection.
    #[default]
    Off,
    /// All-zero writes become write-zeroes requests.
    On,
    /// As `on`, and may unmap when `discard=unmap`.
    Unmap,
}

/// QEMU's `BlockdevOnError`: what a device does when its node fails a
/// request (`werror`, `rerror`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BlockdevOnError {
    /// The guest gets the error.
    Report,
    /// The guest is told the request succeeded.
    Ignore,
    /// Stop on ENOSPC, report other errors.
    Enospc,
    /// Keep the request and stop until `cont`.
    Stop,
    /// The device's default (`enospc` for writes, `report` for reads).
    Auto,
}

/// The driver-specific part, tagged by `driver`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "driver")]
pub enum BlockdevDriver {
    /// QEMU's file-posix protocol driver.
    #[serde(rename = "file")]
    File(BlockdevOptionsFile),
    /// The raw format driver (optionally a window over its child).
    #[serde(rename = "raw")]
    Raw(BlockdevOptionsRaw),
    /// The null protocol driver.
    #[serde(rename = "null-co")]
    NullCo(BlockdevOptionsNull),
    /// libblkio's io_uring driver on a file or block device.
    #[serde(rename = "io_uring")]
    IoUring(BlockdevOptionsIoUring),
    /// libblkio's NVMe driver through io_uring passthrough (`/dev/ngXnY`).
    #[serde(rename = "nvme-io_uring")]
    NvmeIoUring(BlockdevOptionsNvmeIoUring),
    /// libblkio's virtio-blk driver over a vhost-user socket.
    #[serde(rename = "virtio-blk-vhost-user")]
    VirtioBlkVhostUser(BlockdevOptionsVirtioBlkVhostUser),
    /// libblkio's virtio-blk driver over a vhost-vdpa character device.
    #[serde(rename = "virtio-blk-vhost-vdpa")]
    VirtioBlkVhostVdpa(BlockdevOptionsVirtioBlkVhostVdpa),
    /// libblkio's virtio-blk driver for a PCI device bound to vfio-pci.
    #[serde(rename = "virtio-blk-vfio-pci")]
    VirtioBlkVfioPci(BlockdevOptionsVirtioBlkVfioPci),
    /// The NBD client.
    #[serde(rename = "nbd")]
    Nbd(BlockdevOptionsNbd),
    /// The throttle filter.
    #[serde(rename = "throttle")]
    Throttle(BlockdevOptionsThrottle),
    /// The qcow2 format driver.
    #[serde(rename = "qcow2")]
    Qcow2(crate::qcow2::BlockdevOptionsQcow2),
    /// Ceph RBD through librbd.
    #[serde(rename = "rbd")]
    Rbd(crate::rbd::BlockdevOptionsRbd),
}

impl BlockdevDriver {
    /// The `driver` name as written on the command line.
    pub fn name(&self) -> &'static str {
        match self {
            Self::File(_) => "file",
            Self::Raw(_) => "raw",
            Self::NullCo(_) => "null-co",
            Self::IoUring(_) => "io_uring",
            Self::NvmeIoUring(_) => "nvme-io_uring",
            Self::VirtioBlkVhostUser(_) => "virtio-blk-vhost-user",
            Self::VirtioBlkVhostVdpa(_) => "virtio-blk-vhost-vdpa",
            Self::VirtioBlkVfioPci(_) => "virtio-blk-vfio-pci",
            Self::Nbd(_) => "nbd",
            Self::Throttle(_) => "throttle",
            Self::Qcow2(_) => "qcow2",
            Self::Rbd(_) => "rbd",
        }
    }
}

/// `aio` for the `file` driver.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlockdevAioOptions {
    /// A worker-thread pool doing preadv/pwritev.
    #[default]
    Threads,
    /// Linux io_uring.
    IoUring,
}

/// `locking` for the `file` driver.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnOffAuto {
    /// Decide by what the host supports.
    #[default]
    Auto,
    /// Required.
    On,
    /// Disabled.
    Off,
}

/// `driver=file` members.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BlockdevOptionsFile {
    /// Path of the image file or block device.
    pub filename: String,
    /// I/O engine.
    #[serde(default)]
    pub aio: BlockdevAioOptions,
    /// OFD image locking.
    #[serde(default)]
    pub locking: OnOffAuto,
}

/// A child reference: either the name of an existing node or an inline
/// definition (`file.driver=file,file.filename=x`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum BlockdevRef {
    /// An inline node definition.
    Definition(Box<BlockdevOptions>),
    /// The node name of an existing node.
    Reference(String),
}

/// `driver=raw` members.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BlockdevOptionsRaw {
    /// The child node.
    pub file: BlockdevRef,
    /// Start of the window in the child, bytes.
    pub offset: Option<Size>,
    /// Length of the window, bytes (default: to the end of the child).
    pub size: Option<Size>,
}

/// `driver=null-co` members.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BlockdevOptionsNull {
    /// Virtual size in bytes (default 1 GiB, as QEMU).
    pub size: Option<Size>,
    /// Reads return zeroes (default off: buffers are left untouched).
    #[serde(default)]
    pub read_zeroes: bool,
    /// Artificial completion latency, nanoseconds.
    #[serde(default)]
    pub latency_ns: u64,
}

/// The default of the libblkio drivers' `num-queues`.
fn one_queue() -> u32 {
    1
}

/// `driver=io_uring` members (QEMU's `BlockdevOptionsIoUring`). The common
/// `cache.direct` and `read-only` become libblkio's `direct` and
/// `read-only` properties.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BlockdevOptionsIoUring {
    /// Path of the image file or block device.
    pub filename: String,
    /// libblkio queues created at start, one per data-plane thread
    /// (a blkvm extension; default 1).
    #[serde(default = "one_queue")]
    pub num_queues: u32,
}

/// `driver=nvme-io_uring` members (QEMU's `BlockdevOptionsNvmeIoUring`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BlockdevOptionsNvmeIoUring {
    /// Path of the NVMe namespace's generic character device (`/dev/ngXnY`).
    pub path: String,
    /// libblkio queues created at start (a blkvm extension; default 1).
    #[serde(default = "one_queue")]
    pub num_queues: u32,
}

/// `driver=virtio-blk-vhost-user` members (QEMU's
/// `BlockdevOptionsVirtioBlkVhostUser`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BlockdevOptionsVirtioBlkVhostUser {
    /// Path of the vhost-user-blk server's unix socket.
    pub path: String,
    /// Virtqueues set up at start (a blkvm extension; default 1).
    #[serde(default = "one_queue")]
    pub num_queues: u32,
}

/// `driver=virtio-blk-vhost-vdpa` members (QEMU's
/// `BlockdevOptionsVirtioBlkVhostVdpa`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BlockdevOptionsVirtioBlkVhostVdpa {
    /// Path of the vhost-vdpa character device (`/dev/vhost-vdpa-N`).
    pub path: String,
    /// Virtqueues set up at start (a blkvm extension; default 1).
    #[serde(default = "one_queue")]
    pub num_queues: u32,
}

/// `driver=virtio-blk-vfio-pci` members (QEMU's
/// `BlockdevOptionsVirtioBlkVfioPci`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BlockdevOptionsVirtioBlkVfioPci {
    /// The PCI device's sysfs path (`/sys/bus/pci/devices/0000:00:01.0`).
    pub path: String,
    /// Virtqueues set up at start (a blkvm extension; default 1).
    #[serde(default = "one_queue")]
    pub num_queues: u32,
}

/// `driver=nbd` members (QEMU's `BlockdevOptionsNbd`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BlockdevOptionsNbd {
    /// The server's address.
    pub server: crate::export::SocketAddress,
    /// The export's name (default: the empty name).
    pub export: Option<String>,
    /// TLS credentials (an `--object tls-creds-x509` id, endpoint=client).
    pub tls_creds: Option<String>,
    /// The name the server's certificate must carry (default: the host).
    pub tls_hostname: Option<String>,
    /// Seconds during which requests wait for a lost connection to come
    /// back before they fail (QEMU's default 0: they fail at once; the
    /// client reconnects either way).
    #[serde(default)]
    pub reconnect_delay: u32,
    /// Seconds to keep trying the first connection (default 0: one try).
    #[serde(default)]
    pub open_timeout: u32,
}

/// `driver=throttle` members (QEMU's `BlockdevOptionsThrottle`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BlockdevOptionsThrottle {
    /// The `throttle-group` object whose limits apply.
    pub throttle_group: String,
    /// The child node.
    pub file: BlockdevRef,
}

mod parse;
#[cfg(test)]
mod tests;

pub(crate) use parse::{blockdev_at, blockdev_ref_at};
