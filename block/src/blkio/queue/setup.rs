//! Opening a queue: the duplicate of libblkio's completion eventfd, the
//! bounce pool (mapped for drivers that need memory regions), and the
//! queue's view of registered memory.

use std::collections::VecDeque;
use std::mem::{ManuallyDrop, MaybeUninit};
use std::os::fd::FromRawFd;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use blkio::Blkioq;
use vmm_sys_util::eventfd::EventFd;

use super::{BlkioQueue, REAP_BATCH};
use crate::blkio::control::{io_error, Control, MapKey};
use crate::blkio::job::Geometry;
use crate::blkio::regions::QueueRegions;
use crate::bounce::BouncePool;
use crate::completion::LocalCompletions;
use crate::limits::BlockLimits;
use crate::memory::RamRegistrar;
use crate::node::NodeCommon;
use crate::request::Request;
use crate::stats::NodeStats;
use crate::BlockError;

/// What every queue of a node does the same way.
pub(in crate::blkio) struct QueueConfig {
    pub geo: Geometry,
    /// Alignment of requests that go to libblkio as they are.
    pub limits: BlockLimits,
    /// The device's own largest transfer (0: none).
    pub max_transfer: u64,
    /// The device's largest segment (0: none).
    pub max_segment_len: usize,
    pub needs_mem_regions: bool,
    /// Send discards as write-zeroes that may unmap: libblkio's `io_uring`
    /// discards with `FALLOC_FL_NO_HIDE_STALE`, which regular files refuse;
    /// a punched hole is what our `file` driver does for a discard.
    pub discard_as_zeroes: bool,
    pub pool_bufs: usize,
    pub pool_align: usize,
}

impl QueueConfig {
    /// Whether libblkio takes a read or write with these buffers as it is.
    pub(in crate::blkio) fn takes_as_is(&self, req: &Request) -> bool {
        let iov = req.iovecs();
        self.limits.is_aligned(req.offset(), req.len(), iov)
            && iov.len() <= self.limits.max_segments as usize
            && (self.max_transfer == 0 || req.len() <= self.max_transfer)
            && (self.max_segment_len == 0 || iov.iter().all(|v| v.iov_len <= self.max_segment_len))
    }
}

/// What a queue is opened with.
pub(in crate::blkio) struct QueueContext<'a> {
    pub ctl: Arc<Control>,
    pub cfg: Arc<QueueConfig>,
    pub common: NodeCommon,
    pub capacity: Arc<AtomicU64>,
    pub stats: Arc<NodeStats>,
    pub registrar: &'a RamRegistrar,
    pub driver: &'static str,
}

/// Duplicates libblkio's completion fd so the queue can write it too.
fn dup_completion_fd(q: &Blkioq) -> Result<EventFd, String> {
    let fd = q
        .get_completion_fd()
        .ok_or("the libblkio queue has no completion fd")?;
    // SAFETY: F_DUPFD_CLOEXEC on a valid fd touches no memory; the result is checked.
    let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if dup < 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    // SAFETY: `dup` is a new descriptor that nothing else owns, and it
    // refers to libblkio's completion eventfd (libblkio creates an eventfd
    // for every queue that is not a poll queue, and writes it itself).
    Ok(unsafe { EventFd::from_raw_fd(dup) })
}
impl BlkioQueue {
    /// Sets up a queue on `q`; on failure `q` goes back to the node.
    pub fn new(q: Blkioq, cx: QueueContext<'_>) -> Result<Self, BlockError> {
        let ctl = cx.ctl.clone();
        match Self::setup(&q, &cx) {
            Ok((eventfd, pool, pool_key)) => Ok(Self::assemble(q, cx, eventfd, pool, pool_key)),
            Err(e) => {
                ctl.give_back(q);
                Err(e)
            }
        }
    }

    fn setup(
        q: &Blkioq,
        cx: &QueueContext<'_>,
    ) -> Result<(EventFd, BouncePool, Option<MapKey>), BlockError> {
        let eventfd = dup_completion_fd(q).map_err(|e| BlockError::Os {
            what: "duplicate libblkio's completion fd".into(),
            source: std::io::Error::other(e),
        })?;
        let pool = BouncePool::new(
            cx.cfg.pool_bufs,
            cx.cfg.geo.chunk as usize,
            cx.cfg.pool_align,
        )?;
        let pool_key = match cx.cfg.needs_mem_regions {
            true => Some(cx.ctl.map(&pool.region()).map_err(|e| BlockError::Os {
                what: format!("map the bounce pool for '{}'", cx.driver),
                source: io_error(&e, "map memory region"),
            })?),
            false => None,
        };
        Ok((eventfd, pool, pool_key))
    }

    fn assemble(
        q: Blkioq,
        cx: QueueContext<'_>,
        eventfd: EventFd,
        pool: BouncePool,
        pool_key: Option<MapKey>,
    ) -> Self {
        let eventfd = Arc::new(eventfd);
        let regions = cx
            .cfg
            .needs_mem_regions
            .then(|| QueueRegions::new(cx.registrar, cx.ctl.clone()));
        BlkioQueue {
            q: ManuallyDrop::new(q),
            ctl: cx.ctl,
            cfg: cx.cfg,
            common: cx.common,
            capacity: cx.capacity,
            stats: cx.stats.queue(),
            local: LocalCompletions::new(eventfd.clone()),
            eventfd,
            slots: Vec::new(),
            free: Vec::new(),
            waiting: VecDeque::new(),
            rmw_waiting: 0,
            rmw_running: false,
            pool,
            pool_key,
            regions,
            in_lib: 0,
            in_flight: 0,
            unsubmitted: false,
            zeroes_by_hand: false,
            reaped: (0..REAP_BATCH).map(|_| MaybeUninit::uninit()).collect(),
            spill: Vec::new(),
        }
    }
}
