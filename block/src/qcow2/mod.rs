//! `qcow2`: QEMU's image format over any protocol node (docs/interop/
//! qcow2.txt), versions 2 and 3, with backing chains.
//!
//! Why our own: the Rust implementations (Cloud Hypervisor's and crosvm's
//! disks, qcow2-rs, imago) each bring their own I/O model (blocking
//! `Read + Seek` files, or their own async runtime) where blkvm has node
//! queues whose iovecs point into registered guest RAM; the format is
//! small enough to write to that model directly.
//!
//! Design:
//! - the metadata ([`meta::Meta`]: L1 table, refcount table, bounded slice
//!   caches of L2 tables and refcount blocks) sits behind one lock shared
//!   by every queue; lookups and every metadata change happen under it,
//!   in the cache; what reaches the disk does so at checkpoints, with
//!   synchronous I/O on the calling queue's own metadata queue of the
//!   child ([`io`]);
//! - reads and in-place writes of allocated clusters leave the lock as
//!   host ranges and go to the child's data queue asynchronously with the
//!   guest's own iovecs, sliced (registered buffers stay registered);
//! - allocating writes too are asynchronous, many in flight, in the
//!   crash-safe order of QEMU's cache dependencies described in
//!   [`alloc`]: clusters handed out in the cache, the data (with its
//!   copy-on-write) written, then the L2 entries linked in the cache;
//!   refcounts, flush, L2 tables, flush only at a checkpoint (a guest
//!   flush). The guest clusters are busy meanwhile: allocation of one
//!   cluster is serialised, of different clusters it runs in parallel;
//! - zero clusters, discard and compressed clusters are served under the
//!   lock ([`plan`]);
//! - backing nodes are opened by the graph ([`open`]) from the header's
//!   backing file name and format, read-only, to any depth.
//!
//! Not supported (refused with an error that says so): refcount widths
//! other than 16 bits, encryption, external data files, extended L2
//! entries, writing images with internal snapshots, a dirty or corrupt
//! image opened read-write, and `lazy-refcounts=on` (refcounts are always
//! kept up to date, which QEMU accepts in any image).

mod alloc;
mod cache;
mod compress;
mod header;
mod io;
mod meta;
mod open;
mod plan;
mod queue;
mod write;

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use vmm_sys_util::eventfd::EventFd;

use qapi::{BlockdevCommon, BlockdevOptionsQcow2};

use crate::completion;
use crate::limits::BlockLimits;
use crate::node::{BlockNode, BlockStatus, ImageDetails, NodeCommon, NodeQueue};
use crate::request::RequestError;
use crate::stats::NodeStats;
use crate::BlockError;

use header::Header;
use io::AlignedBuf;
use meta::{Geometry, Meta};

/// The default L2 cache: QEMU's upper bound, 32 MiB (enough to map 256 GiB
/// of 64 KiB clusters), or less when that covers the whole image.
const DEFAULT_L2_CACHE_MAX: u64 = 32 << 20;

/// Why an image could not be used.
#[derive(Debug, thiserror::Error)]
pub enum Qcow2Error {
    /// The file does not start with the qcow2 magic.
    #[error("the image is not in qcow2 format")]
    NotQcow2,
    /// A feature blkvm does not implement.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// Metadata that breaks the format's rules.
    #[error("corrupt image: {0}")]
    Corrupt(String),
    /// The image file could not grow.
    #[error("could not grow the image file: {0}")]
    Grow(String),
    /// I/O on the image file failed.
    #[error("could not {what}")]
    Io {
        /// What was being done.
        what: String,
        /// The request's error.
        #[source]
        source: RequestError,
    },
}

impl Qcow2Error {
    /// The data-path error a guest request gets.
    pub(crate) fn request_error(&self) -> RequestError {
        match self {
            Self::Io { source, .. } => *source,
            Self::Unsupported(_) => RequestError::Unsupported,
            _ => RequestError::Os(libc::EIO),
        }
    }
}

/// Least zero memory kept for write-zeroes and copy-on-write (one iovec
/// per this many bytes of a long write of zeroes).
const MIN_ZERO_BUF: usize = 1 << 20;

/// State every queue of a node shares.
pub(crate) struct Shared {
    meta: Mutex<Meta>,
    size: AtomicU64,
    cluster_bits: u32,
    g: Geometry,
    child: Arc<dyn BlockNode>,
    discard_keep: bool,
    /// Zeroes (at least a cluster), never written to.
    zeroes: AlignedBuf,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Meta> {
        self.meta.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Iovecs of `len` zero bytes.
    fn zero_iovecs(&self, len: usize) -> Vec<libc::iovec> {
        let step = self.zeroes.len();
        (0..len)
            .step_by(step.max(1))
            .map(|at| self.zeroes.iovec(0, step.min(len - at)))
            .collect()
    }
}

/// How a queue whose request waits for busy clusters is told they went:
/// an eventfd in its epoll set, and a flag its poller reads without a
/// system call.
pub(crate) struct Waker {
    fd: EventFd,
    pending: AtomicBool,
}

impl Waker {
    fn new() -> Result<Self, BlockError> {
        Ok(Waker {
            fd: completion::new_eventfd()?,
            pending: AtomicBool::new(false),
        })
    }

    fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Called with the metadata lock held, when busy marks went.
    fn wake(&self) {
        // The fd first: whoever sees the flag then clears a readable fd,
        // so it never stays readable with the flag down for long.
        let _ = self.fd.write(1);
        self.pending.store(true, Ordering::Release);
    }

    fn pending(&self) -> bool {
        self.pending.load(Ordering::Acquire)
    }

    /// Whether a wake came since the last call; clears it.
    fn take(&self) -> bool {
        if !self.pending() || !self.pending.swap(false, Ordering::AcqRel) {
            return false;
        }
        completion::clear_eventfd(&self.fd);
        true
    }
}

/// An image whose header and tables were read, before its backing node is
/// known.
pub(crate) struct Qcow2Image {
    header: Header,
    meta: Meta,
    control: Box<dyn NodeQueue>,
}

impl Qcow2Image {
    /// Reads the header and tables from `child`.
    pub(crate) fn load(
        child: Arc<dyn BlockNode>,
        opts: &BlockdevOptionsQcow2,
        read_only: bool,
    ) -> Result<Self, Qcow2Error> {
        if opts.lazy_refcounts == Some(true) {
            return Err(Qcow2Error::Unsupported(
                "lazy-refcounts=on (blkvm always updates refcounts)".into(),
            ));
        }
        let mut control = child.open_queue().map_err(|e| Qcow2Error::Io {
            what: format!("open a queue on the image file: {e}"),
            source: RequestError::Os(libc::EIO),
        })?;
        let cap = child.capacity();
        let read_err = |source| Qcow2Error::Io {
            what: "read the image header".into(),
            source,
        };
        // The header's first sector says the cluster size; the header and
        // its extensions fill (at most) the first cluster.
        let head = cap.min(512) as usize;
        let mut buf = vec![0u8; 512];
        io::pread(control.as_mut(), 0, &mut buf[..head]).map_err(read_err)?;
        let bits = u32::from_be_bytes(buf[20..24].try_into().expect("4 bytes"))
            .clamp(header::MIN_CLUSTER_BITS, header::MAX_CLUSTER_BITS);
        let first = cap.min(1 << bits) as usize;
        if first > head {
            buf.resize(first, 0);
            io::pread(control.as_mut(), head as u64, &mut buf[head..first]).map_err(read_err)?;
        }
        let h = Header::parse(&buf[..first])?;
        if !read_only {
            h.writable_check()?;
        }
        let l2_cover = u64::from(h.l1_size) * h.cluster_size();
        let l2_cache = opts
            .l2_cache_size
            .or(opts.cache_size)
            .map_or(DEFAULT_L2_CACHE_MAX.min(l2_cover), |s| s.0);
        let mut meta = Meta::load(control.as_mut(), child, &h, buf[..512].to_vec(), l2_cache)?;
        if !read_only && h.autoclear != 0 {
            meta.clear_autoclear(control.as_mut())?;
        }
        Ok(Qcow2Image {
            header: h,
            meta,
            control,
        })
    }

    /// The backing file name and format the header names.
    pub(crate) fn backing_file(&self) -> Option<(&str, Option<&str>)> {
        self.header
            .backing_file
            .as_deref()
            .map(|f| (f, self.header.backing_format.as_deref()))
    }

    /// What QMP's `ImageInfo` shows of this image.
    fn details(&self) -> ImageDetails {
        let h = &self.header;
        ImageDetails {
            cluster_size: Some(h.cluster_size()),
            backing_filename: h.backing_file.clone(),
            full_backing_filename: h
                .backing_file
                .as_deref()
                .and_then(|f| open::resolve_backing(self.meta.child.filename(), f)),
            backing_format: h.backing_format.clone(),
            dirty: h.incompatible & header::INCOMPAT_DIRTY != 0,
            specific: Some(h.format_specific()),
        }
    }
}

/// The `qcow2` node.
pub struct Qcow2Node {
    common: NodeCommon,
    child: Arc<dyn BlockNode>,
    backing: Option<Arc<dyn BlockNode>>,
    details: ImageDetails,
    shared: Arc<Shared>,
    /// Metadata I/O of the control plane (status, resize).
    control: Mutex<Box<dyn NodeQueue>>,
    stats: Arc<NodeStats>,
}

impl Qcow2Node {
    pub(crate) fn new(
        name: String,
        common: &BlockdevCommon,
        opts: &BlockdevOptionsQcow2,
        image: Qcow2Image,
        backing: Option<Arc<dyn BlockNode>>,
    ) -> Result<Self, BlockError> {
        let child = image.meta.child.clone();
        if !common.read_only && child.read_only() {
            return Err(BlockError::Invalid(format!(
                "Block node '{}' is read-only",
                child.node_name()
            )));
        }
        Ok(Qcow2Node {
            common: NodeCommon::new(name, common, common.read_only),
            child: child.clone(),
            backing,
            details: image.details(),
            shared: Arc::new(Shared {
                size: AtomicU64::new(image.meta.size),
                cluster_bits: image.meta.g.cluster_bits,
                g: image.meta.g,
                child: child.clone(),
                zeroes: AlignedBuf::zeroed(
                    (image.meta.g.cluster_size() as usize).max(MIN_ZERO_BUF),
                ),
                meta: Mutex::new(image.meta),
                discard_keep: opts.discard_no_unref,
            }),
            control: Mutex::new(image.control),
            stats: Arc::default(),
        })
    }

    fn control(&self) -> MutexGuard<'_, Box<dyn NodeQueue>> {
        self.control.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Qcow2Node {
    fn drop(&mut self) {
        // What the guest wrote since its last flush reaches the disk on a
        // clean close, as with QEMU.
        // The file's tail that growth reserved and no cluster took goes.
        let mut control = self.control();
        let mut meta = self.shared.lock();
        if meta.checkpoint(control.as_mut()).is_ok() {
            let _ = meta.trim_tail();
        }
    }
}

/// A control-plane error from a metadata one.
fn block_error(node: &str, e: Qcow2Error) -> BlockError {
    BlockError::Invalid(format!("qcow2 node '{node}': {e}"))
}

impl BlockNode for Qcow2Node {
    fn node_name(&self) -> &str {
        &self.common.name
    }
    fn driver(&self) -> &'static str {
        "qcow2"
    }
    fn capacity(&self) -> u64 {
        self.shared.size.load(Ordering::Acquire)
    }
    fn limits(&self) -> BlockLimits {
        let cs = 1u32 << self.shared.cluster_bits;
        let child = self.child.limits();
        BlockLimits {
            request_alignment: child.request_alignment,
            buf_alignment: child.buf_alignment,
            optimal_io_size: cs,
            discard_granularity: cs,
            ..BlockLimits::default()
        }
    }
    fn read_only(&self) -> bool {
        self.common.read_only
    }
    fn filename(&self) -> Option<&str> {
        self.child.filename()
    }
    fn children(&self) -> Vec<Arc<dyn BlockNode>> {
        let mut c = vec![self.child.clone()];
        c.extend(self.backing.clone());
        c
    }
    fn backing(&self) -> Option<Arc<dyn BlockNode>> {
        self.backing.clone()
    }
    fn image_details(&self) -> Option<ImageDetails> {
        Some(self.details.clone())
    }
    fn cache_direct(&self) -> bool {
        self.child.cache_direct()
    }
    fn options(&self) -> crate::node::NodeOptions {
        self.common.options()
    }
    fn stats(&self) -> &NodeStats {
        &self.stats
    }
    fn truncate(&self, size: u64) -> Result<(), BlockError> {
        if self.common.read_only {
            return Err(BlockError::Invalid(format!(
                "Block node '{}' is read-only",
                self.common.name
            )));
        }
        let mut control = self.control();
        let mut meta = self.shared.lock();
        if size < meta.size {
            return Err(BlockError::Invalid(
                "qcow2 images cannot be shrunk by blkvm".into(),
            ));
        }
        if !size.is_multiple_of(512) {
            return Err(BlockError::Invalid(
                "The new size must be a multiple of 512".into(),
            ));
        }
        meta.grow(control.as_mut(), size)
            .map_err(|e| block_error(&self.common.name, e))?;
        self.shared.size.store(size, Ordering::Release);
        Ok(())
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<(u64, BlockStatus), BlockError> {
        let (n, st) = {
            let mut control = self.control();
            let mut meta = self.shared.lock();
            meta.status(control.as_mut(), offset, len)
                .map_err(|e| block_error(&self.common.name, e))?
        };
        Ok(match st {
            plan::Status::Data => (n, BlockStatus::Data),
            // As QEMU reports them (`BDRV_BLOCK_ZERO` without `DATA`: NBD's
            // HOLE|ZERO), allocated or not.
            plan::Status::Zero => (n, BlockStatus::Hole),
            plan::Status::Unallocated => match &self.backing {
                Some(b) if offset < b.capacity() => {
                    let (m, s) = b.block_status(offset, n.min(b.capacity() - offset))?;
                    (m.min(n), s)
                }
                _ => (n, BlockStatus::Hole),
            },
        })
    }
    fn open_queue(&self) -> Result<Box<dyn NodeQueue>, BlockError> {
        let backing = match &self.backing {
            Some(b) => Some(plan::Backing {
                node: b.clone(),
                queue: b.open_queue()?,
            }),
            None => None,
        };
        Ok(Box::new(queue::Qcow2Queue::new(
            self.common.clone(),
            self.shared.clone(),
            self.child.open_queue()?,
            self.child.open_queue()?,
            backing,
            self.stats.queue(),
        )?))
    }
}
