//! The libblkio driver family, through the `blkio` crate (libblkio itself,
//! in Rust). As QEMU's block/blkio.c does, each libblkio driver is its own
//! block driver with its own typed options: `io_uring` (a file or block
//! device), `nvme-io_uring` (an NVMe namespace's character device),
//! `virtio-blk-vhost-user` (a vhost-user-blk server's socket),
//! `virtio-blk-vhost-vdpa` and `virtio-blk-vfio-pci`.
//!
//! The node connects and starts libblkio at open with `num-queues` queues
//! (a blkvm extension, default 1); [`BlockNode::open_queue`] hands one to
//! each data-plane thread and it returns to the node when the queue is
//! dropped. Limits, capacity and read-only come from libblkio's
//! properties (`props.rs`). `cache.direct` becomes the `io_uring`
//! driver's `direct`; the other drivers have no host page cache of ours
//! to bypass, so they ignore it (QEMU insists on `cache.direct=on` for
//! them).
//!
//! Drivers with `needs-mem-regions` (the virtio-blk ones) can only do I/O
//! on memory mapped for the device. Each queue follows the graph's RAM
//! registrar (`regions.rs`) and maps its regions, once per device however
//! many queues use them (`control.rs`); requests in them go to libblkio as
//! they are, others copy through the queue's bounce pool (`job.rs`,
//! `queue/`), as do requests the device cannot take as they are
//! (misaligned, too large, too many segments).

mod control;
mod job;
mod props;
mod queue;
mod regions;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use blkio::Errno;
use qapi::{
    BlockdevCommon, BlockdevOptionsIoUring, BlockdevOptionsNvmeIoUring,
    BlockdevOptionsVirtioBlkVfioPci, BlockdevOptionsVirtioBlkVhostUser,
    BlockdevOptionsVirtioBlkVhostVdpa,
};

use self::control::{io_error, Control};
use self::props::{plan, start, StepError};
use self::queue::{BlkioQueue, QueueConfig};
use crate::limits::BlockLimits;
use crate::memory::RamRegistrar;
use crate::node::{BlockNode, NodeCommon, NodeQueue};
use crate::stats::NodeStats;
use crate::BlockError;

/// The libblkio drivers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlkioDriver {
    /// `io_uring`.
    IoUring,
    /// `nvme-io_uring`.
    NvmeIoUring,
    /// `virtio-blk-vhost-user`.
    VirtioBlkVhostUser,
    /// `virtio-blk-vhost-vdpa`.
    VirtioBlkVhostVdpa,
    /// `virtio-blk-vfio-pci`.
    VirtioBlkVfioPci,
}

impl BlkioDriver {
    /// The driver name, libblkio's and ours.
    pub fn name(self) -> &'static str {
        match self {
            Self::IoUring => "io_uring",
            Self::NvmeIoUring => "nvme-io_uring",
            Self::VirtioBlkVhostUser => "virtio-blk-vhost-user",
            Self::VirtioBlkVhostVdpa => "virtio-blk-vhost-vdpa",
            Self::VirtioBlkVfioPci => "virtio-blk-vfio-pci",
        }
    }

    /// Whether a `max-discard-len` or `max-write-zeroes-len` of 0 means
    /// "no limit" (the kernel splits) rather than "not supported".
    fn zero_len_is_unlimited(self) -> bool {
        self == Self::IoUring
    }
}

/// What opening a libblkio node needs from its options.
#[derive(Clone, Debug)]
pub struct BlkioOptions {
    /// Which driver.
    pub driver: BlkioDriver,
    /// `filename` or `path`.
    pub path: String,
    /// libblkio queues to create.
    pub num_queues: u32,
}

macro_rules! blkio_options_from {
    ($($opts:ty => $driver:ident . $path:ident),* $(,)?) => {$(
        impl From<&$opts> for BlkioOptions {
            fn from(o: &$opts) -> Self {
                BlkioOptions {
                    driver: BlkioDriver::$driver,
                    path: o.$path.clone(),
                    num_queues: o.num_queues,
                }
            }
        }
    )*};
}

blkio_options_from!(
    BlockdevOptionsIoUring => IoUring.filename,
    BlockdevOptionsNvmeIoUring => NvmeIoUring.path,
    BlockdevOptionsVirtioBlkVhostUser => VirtioBlkVhostUser.path,
    BlockdevOptionsVirtioBlkVhostVdpa => VirtioBlkVhostVdpa.path,
    BlockdevOptionsVirtioBlkVfioPci => VirtioBlkVfioPci.path,
);

/// A libblkio node.
pub struct BlkioNode {
    common: NodeCommon,
    driver: BlkioDriver,
    path: String,
    capacity: Arc<AtomicU64>,
    limits: BlockLimits,
    cfg: Arc<QueueConfig>,
    ctl: Arc<Control>,
    registrar: RamRegistrar,
    stats: Arc<NodeStats>,
}

impl BlkioNode {
    pub(crate) fn open(
        name: String,
        common: &BlockdevCommon,
        opts: BlkioOptions,
        registrar: RamRegistrar,
    ) -> Result<Self, BlockError> {
        let fail = |e: StepError| BlockError::Driver {
            driver: opts.driver.name(),
            path: opts.path.clone(),
            source: io_error(&e.error, &e.what),
        };
        if opts.num_queues == 0 {
            return Err(fail(StepError {
                what: "set 'num-queues'".into(),
                error: blkio::Error::new(Errno::INVAL, "num-queues must be at least 1"),
            }));
        }
        let direct = common.cache.direct;
        let started = match start(&opts, common.read_only, direct) {
            Err(e)
                if !common.read_only
                    && common.auto_read_only
                    && [Errno::ACCESS, Errno::ROFS, Errno::PERM].contains(&e.error.errno()) =>
            {
                start(&opts, true, direct)
            }
            r => r,
        }
        .map_err(fail)?;
        let p = &started.props;
        let (limits, cfg) = plan(opts.driver, p);
        let ctl = Control::new(
            started.blkio,
            started.queues,
            p.needs_mem_region_fd,
            p.mem_region_alignment,
        );
        Ok(BlkioNode {
            common: NodeCommon::new(name, common, p.read_only),
            driver: opts.driver,
            path: opts.path,
            capacity: Arc::new(AtomicU64::new(p.capacity)),
            limits,
            cfg: Arc::new(cfg),
            ctl: Arc::new(ctl),
            registrar,
            stats: Arc::default(),
        })
    }
}

impl BlockNode for BlkioNode {
    fn node_name(&self) -> &str {
        &self.common.name
    }
    fn driver(&self) -> &'static str {
        self.driver.name()
    }
    fn capacity(&self) -> u64 {
        self.capacity.load(Ordering::Relaxed)
    }
    fn refresh_capacity(&self) -> Result<u64, BlockError> {
        let cap = self.ctl.capacity().map_err(|e| BlockError::Os {
            what: format!("read the size of '{}'", self.path),
            source: io_error(&e, "capacity"),
        })?;
        self.capacity.store(cap, Ordering::Relaxed);
        Ok(cap)
    }
    fn limits(&self) -> BlockLimits {
        self.limits
    }
    fn read_only(&self) -> bool {
        self.common.read_only
    }
    fn options(&self) -> crate::node::NodeOptions {
        self.common.options()
    }
    fn filename(&self) -> Option<&str> {
        Some(&self.path)
    }
    fn stats(&self) -> &NodeStats {
        &self.stats
    }
    fn open_queue(&self) -> Result<Box<dyn NodeQueue>, BlockError> {
        let q = self.ctl.take_queue().ok_or_else(|| {
            let n = self.ctl.num_queues();
            BlockError::Invalid(format!(
                "Node '{}' has no free queue (num-queues={n}, all in use)",
                self.common.name
            ))
        })?;
        let queue = BlkioQueue::new(
            q,
            queue::QueueContext {
                ctl: self.ctl.clone(),
                cfg: self.cfg.clone(),
                common: self.common.clone(),
                capacity: self.capacity.clone(),
                stats: self.stats.clone(),
                registrar: &self.registrar,
                driver: self.driver.name(),
            },
        )?;
        Ok(Box::new(queue))
    }
}
