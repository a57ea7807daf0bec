//! The node API: a control-plane [`BlockNode`] shared by threads, and a
//! data-plane [`NodeQueue`] owned by one thread (DESIGN.md, "Block layer
//! shapes").
//!
//! A queue's completions are announced on one file descriptor
//! ([`NodeQueue::completion_fd`], an eventfd) whatever the engine: io_uring,
//! a worker pool, or immediate completion all deliver through it, so an
//! IOThread has exactly one completion path per node queue.

use std::os::fd::RawFd;
use std::sync::Arc;

use qapi::{BlockdevCommon, BlockdevDetectZeroesOptions, BlockdevDiscardOptions};

use crate::limits::BlockLimits;
use crate::request::{Completion, Request, RequestError, RequestOp, SubmitError};
use crate::stats::NodeStats;
use crate::BlockError;

/// A node of the block graph: its control plane, shared by all threads.
pub trait BlockNode: Send + Sync {
    /// The node's name in the graph.
    fn node_name(&self) -> &str;
    /// The driver name (`file`, `raw`, `null-co`).
    fn driver(&self) -> &'static str;
    /// Size in bytes as last read.
    fn capacity(&self) -> u64;
    /// Re-read the size from the backing store (it may have been resized).
    fn refresh_capacity(&self) -> Result<u64, BlockError> {
        Ok(self.capacity())
    }
    /// Request limits.
    fn limits(&self) -> BlockLimits;
    /// Whether modifying requests are refused.
    fn read_only(&self) -> bool;
    /// The file name of a protocol node, if it has one.
    fn filename(&self) -> Option<&str> {
        None
    }
    /// Child nodes: the file child first, then the backing child if any.
    fn children(&self) -> Vec<Arc<dyn BlockNode>> {
        Vec::new()
    }
    /// The child in QEMU's `backing` role (the image below a format
    /// node's own clusters), also among [`BlockNode::children`]; every
    /// other child is in the `file` role.
    fn backing(&self) -> Option<Arc<dyn BlockNode>> {
        None
    }
    /// Bytes the node takes on the host (QEMU's `actual-size`): a file's
    /// allocated blocks; by default, its file child's.
    fn allocated_size(&self) -> Option<u64> {
        self.children().first().and_then(|c| c.allocated_size())
    }
    /// What the image's own metadata says (cluster size, backing file
    /// name, format-specific fields), for QMP's `ImageInfo`; `None` for
    /// nodes without image metadata.
    fn image_details(&self) -> Option<ImageDetails> {
        None
    }
    /// Grows or shrinks the node to `size` bytes (QMP `block_resize`).
    /// Users see the new size through [`BlockNode::capacity`].
    fn truncate(&self, size: u64) -> Result<(), BlockError> {
        let _ = size;
        Err(BlockError::Invalid(format!(
            "Driver '{}' does not support resize",
            self.driver()
        )))
    }
    /// Whether I/O bypasses the host page cache (`cache.direct=on`).
    fn cache_direct(&self) -> bool {
        false
    }
    /// The common options the node was opened with.
    fn options(&self) -> NodeOptions {
        NodeOptions::default()
    }
    /// I/O statistics of this node.
    fn stats(&self) -> &NodeStats;
    /// Open a data-plane queue for one thread.
    fn open_queue(&self) -> Result<Box<dyn NodeQueue>, BlockError>;

    /// The throttle group whose limits apply to this node (a `throttle`
    /// filter's), for QMP `block_set_io_throttle`.
    fn throttle_group(&self) -> Option<Arc<crate::throttle::ThrottleGroup>> {
        None
    }

    /// What the range from `offset` (below the capacity) holds, for at
    /// least 1 and at most `len` bytes: returns that length and its
    /// status (QEMU's `bdrv_block_status`, NBD's `base:allocation`). A
    /// blocking query (`lseek` on files). By default everything is data.
    fn block_status(&self, offset: u64, len: u64) -> Result<(u64, BlockStatus), BlockError> {
        let _ = offset;
        Ok((len.max(1), BlockStatus::Data))
    }
}

/// The role a child plays for its parent (QEMU's `BdrvChildRole`, reduced
/// to the two QMP shows).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChildRole {
    /// The node the parent's own data and metadata live on.
    File,
    /// The image that supplies what the parent has not allocated.
    Backing,
}

impl ChildRole {
    /// The child's name in QEMU's graph (`file`, `backing`).
    pub fn name(self) -> &'static str {
        match self {
            ChildRole::File => "file",
            ChildRole::Backing => "backing",
        }
    }
}

/// The children of `node` with their roles, file children first.
pub fn children_with_roles(node: &dyn BlockNode) -> Vec<(ChildRole, Arc<dyn BlockNode>)> {
    let backing = node.backing();
    node.children()
        .into_iter()
        .map(|c| {
            let role = match &backing {
                Some(b) if Arc::ptr_eq(b, &c) => ChildRole::Backing,
                _ => ChildRole::File,
            };
            (role, c)
        })
        .collect()
}

/// The fields of QEMU's `ImageInfo` that come from an image's metadata.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageDetails {
    /// Bytes per cluster.
    pub cluster_size: Option<u64>,
    /// The backing file name as the image header spells it.
    pub backing_filename: Option<String>,
    /// That name resolved against the image's directory.
    pub full_backing_filename: Option<String>,
    /// The backing format the header names.
    pub backing_format: Option<String>,
    /// Whether the image is marked as not closed cleanly.
    pub dirty: bool,
    /// QEMU's `ImageInfoSpecific`.
    pub specific: Option<FormatSpecific>,
}

/// QEMU's `ImageInfoSpecific`, for the formats blkvm has.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FormatSpecific {
    /// `ImageInfoSpecificQCow2`.
    Qcow2 {
        /// `0.10` for version 2, `1.1` for version 3.
        compat: &'static str,
        /// `zlib` or `zstd`.
        compression_type: &'static str,
        /// Bits per refcount.
        refcount_bits: u32,
        /// Version 3 only: the lazy refcounts, corrupt and extended L2
        /// bits.
        v3: Option<Qcow2V3Bits>,
    },
    /// `ImageInfoSpecificFile` (no fields blkvm reports).
    File,
}

/// The feature bits a version 3 qcow2 image reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Qcow2V3Bits {
    /// The lazy refcounts compatible feature.
    pub lazy_refcounts: bool,
    /// The corrupt incompatible feature.
    pub corrupt: bool,
    /// The extended L2 incompatible feature.
    pub extended_l2: bool,
}

/// What a range of a node holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockStatus {
    /// Allocated data (or unknown).
    Data,
    /// Reads as zeroes and takes no space (a hole).
    Hole,
    /// Reads as zeroes, allocated.
    Zero,
}

/// The data plane of a node for one thread. Not shared: the thread that owns
/// it submits, kicks and polls.
pub trait NodeQueue: Send {
    /// Queue a request. The queue may hold it until [`NodeQueue::kick`]; on
    /// refusal the request comes back untouched, so the caller can still
    /// complete whatever it stands for.
    fn submit(&mut self, req: Request) -> Result<(), SubmitError>;

    /// Start everything submitted since the last kick (one system call for a
    /// batch where the engine allows).
    fn kick(&mut self) {}

    /// Brings the queue's registered memory up to date with the RAM
    /// registrar now rather than at its next request: a user that removed
    /// regions (a vhost-user frontend went away) and may stay idle calls
    /// it, so the node lets go of memory that is gone (fixed buffers,
    /// mapped regions, their fds).
    fn sync_memory(&mut self) {}

    /// Whether [`NodeQueue::poll_completions`] would find anything, found
    /// without a system call. A busy poller asks first, so that polling an
    /// idle queue costs no eventfd read; `true` when the engine cannot tell
    /// cheaply.
    fn completions_ready(&mut self) -> bool {
        true
    }

    /// A file descriptor that becomes readable when completions are ready.
    fn completion_fd(&self) -> RawFd;

    /// Move ready completions to `out` without blocking; returns how many.
    fn poll_completions(&mut self, out: &mut Vec<Completion>) -> usize;

    /// Requests submitted and not yet returned.
    fn in_flight(&self) -> usize;

    /// Deliver a request that is already finished through this queue's
    /// completion path (a parent node completing without its child).
    fn complete_now(&mut self, c: Completion);

    /// Kick, then block until at least `min` completions were moved to
    /// `out` (or nothing is in flight). For callers without an event loop,
    /// such as the benchmark.
    fn wait_completions(&mut self, min: usize, out: &mut Vec<Completion>) -> usize {
        // What the node finished inline is taken before the kick, which
        // then has nothing to signal (no eventfd write and read).
        let mut got = self.poll_completions(out);
        self.kick();
        if got < min {
            got += self.poll_completions(out);
        }
        while got < min && self.in_flight() > 0 {
            crate::sys::wait_readable(self.completion_fd());
            got += self.poll_completions(out);
        }
        got
    }
}

/// What the common options say to do with a request before the driver sees it.
pub(crate) enum Precheck {
    /// Hand it to the driver.
    Forward(Request),
    /// It is finished already (flush with `cache.no-flush`, ignored discard).
    Done(Completion),
}

/// The common options of a node as QMP reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeOptions {
    /// `cache.no-flush`.
    pub no_flush: bool,
    /// `discard`.
    pub discard: BlockdevDiscardOptions,
    /// `detect-zeroes`.
    pub detect_zeroes: BlockdevDetectZeroesOptions,
}

/// The common `--blockdev` options that apply to every node.
#[derive(Clone, Debug)]
pub(crate) struct NodeCommon {
    pub name: String,
    pub read_only: bool,
    pub no_flush: bool,
    pub discard: BlockdevDiscardOptions,
    pub detect_zeroes: BlockdevDetectZeroesOptions,
}

impl NodeCommon {
    pub fn options(&self) -> NodeOptions {
        NodeOptions {
            no_flush: self.no_flush,
            discard: self.discard,
            detect_zeroes: self.detect_zeroes,
        }
    }

    pub fn new(name: String, opts: &BlockdevCommon, read_only: bool) -> Self {
        NodeCommon {
            name,
            read_only,
            no_flush: opts.cache.no_flush,
            discard: opts.discard,
            detect_zeroes: opts.detect_zeroes,
        }
    }

    /// Applies read-only and bounds (unless the request was checked where
    /// it entered the graph), then `cache.no-flush`, `discard` and
    /// `detect-zeroes`, which are this node's own.
    pub fn precheck(&self, req: Request, capacity: u64) -> Result<Precheck, SubmitError> {
        self.precheck_with(req, || capacity)
    }

    /// [`Self::precheck`] for a node whose size costs something to read:
    /// `capacity` is asked only for a request not checked yet.
    pub fn precheck_with(
        &self,
        mut req: Request,
        capacity: impl FnOnce() -> u64,
    ) -> Result<Precheck, SubmitError> {
        if !req.checked {
            let capacity = capacity();
            req.stamp();
            if let Err(error) = check_request(&req, self.read_only, capacity) {
                return Err(SubmitError {
                    request: req,
                    error,
                });
            }
            req.checked = true;
        }
        let done = match req.op() {
            RequestOp::Flush => self.no_flush,
            RequestOp::Discard => self.discard == BlockdevDiscardOptions::Ignore,
            RequestOp::Write if self.detect_zeroes != BlockdevDetectZeroesOptions::Off => {
                if crate::sys::iovecs_are_zero(req.iovecs()) {
                    let unmap = self.detect_zeroes == BlockdevDetectZeroesOptions::Unmap
                        && self.discard == BlockdevDiscardOptions::Unmap;
                    req.make_write_zeroes(unmap);
                }
                false
            }
            _ => false,
        };
        if done {
            return Ok(Precheck::Done(Completion {
                result: Ok(req.len()),
                request: req,
            }));
        }
        Ok(Precheck::Forward(req))
    }
}

/// The request check, made once per request where it enters the graph:
/// a modifying request on a read-only user or node, and a range past the
/// end (a flush has none), are refused.
pub(crate) fn check_request(
    req: &Request,
    read_only: bool,
    capacity: u64,
) -> Result<(), RequestError> {
    if read_only && req.is_modifying() {
        return Err(RequestError::ReadOnly);
    }
    if req.op() != RequestOp::Flush {
        req.check_range(capacity)?;
    }
    Ok(())
}

impl std::fmt::Debug for dyn BlockNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockNode")
            .field("node_name", &self.node_name())
            .field("driver", &self.driver())
            .field("capacity", &self.capacity())
            .finish()
    }
}
