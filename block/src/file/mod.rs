//! `file`: the protocol driver for regular files and block devices
//! (QEMU's file-posix). Two engines, one file each: a worker pool doing
//! preadv/pwritev (`aio=threads`, [`threads`]) and io_uring with the file
//! registered and the ring's completions on an eventfd (`aio=io_uring`,
//! [`uring`]). Both share the synchronous request code of [`sync_io`], which
//! also serves requests that O_DIRECT cannot take as they are (unaligned
//! offsets, lengths or buffers) by bouncing them through aligned memory.

mod fixed;
mod lock;
mod sync_io;
mod threads;
mod uring;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use qapi::{BlockdevAioOptions, BlockdevCommon, BlockdevOptionsFile, OnOffAuto};

pub use lock::FileLockError;

use crate::limits::BlockLimits;
use crate::memory::RamRegistrar;
use crate::node::{BlockNode, FormatSpecific, ImageDetails, NodeCommon, NodeQueue};
use crate::request::Request;
use crate::stats::NodeStats;
use crate::BlockError;

/// Worker threads per queue for `aio=threads` (QEMU's pool grows to 64; a
/// queue here serves one IOThread, so fewer suffice).
const THREAD_POOL_SIZE: usize = 16;

/// The unit of `st_blocks` (stat(2)), whatever the file system's block.
const ST_BLOCK_BYTES: u64 = 512;

/// State shared by the node and its queues.
pub(crate) struct FileInner {
    file: File,
    path: String,
    direct: bool,
    is_blockdev: bool,
    capacity: AtomicU64,
    limits: BlockLimits,
}

impl FileInner {
    fn capacity(&self) -> u64 {
        self.capacity.load(Ordering::Relaxed)
    }

    /// Re-reads the size (a file grows or shrinks under us).
    fn refresh_capacity(&self) -> io::Result<u64> {
        let size = file_size(&self.file)?;
        self.capacity.store(size, Ordering::Relaxed);
        Ok(size)
    }

    /// The capacity to check `req` against: when it looks out of range, the
    /// size is read again first, so a grown file is picked up on request.
    fn capacity_for(&self, req: &Request) -> u64 {
        let cap = self.capacity();
        if req.check_range(cap).is_err() {
            return self.refresh_capacity().unwrap_or(cap);
        }
        cap
    }
}

/// The `file` node.
pub struct FileNode {
    common: NodeCommon,
    inner: Arc<FileInner>,
    aio: BlockdevAioOptions,
    stats: Arc<NodeStats>,
    registrar: RamRegistrar,
}

fn file_size(file: &File) -> io::Result<u64> {
    // SEEK_END works for regular files and block devices alike.
    // SAFETY: lseek on an open fd touches no memory.
    let end = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_END) };
    if end < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(end as u64)
}

fn open_file(path: &str, read_only: bool, direct: bool) -> io::Result<File> {
    let mut o = OpenOptions::new();
    o.read(true).write(!read_only);
    if direct {
        o.custom_flags(libc::O_DIRECT);
    }
    o.open(path)
}

impl FileNode {
    pub(crate) fn open(
        name: String,
        common: &BlockdevCommon,
        opts: &BlockdevOptionsFile,
        registrar: RamRegistrar,
    ) -> Result<Self, BlockError> {
        let direct = common.cache.direct;
        let open_err = |source: io::Error| BlockError::Open {
            path: opts.filename.clone(),
            source,
        };
        let mut read_only = common.read_only;
        let file = match open_file(&opts.filename, read_only, direct) {
            Ok(f) => f,
            Err(e)
                if !read_only
                    && common.auto_read_only
                    && matches!(
                        e.raw_os_error(),
                        Some(libc::EACCES | libc::EROFS | libc::EPERM)
                    ) =>
            {
                read_only = true;
                open_file(&opts.filename, true, direct).map_err(open_err)?
            }
            Err(e) => return Err(open_err(e)),
        };
        let meta = file.metadata().map_err(open_err)?;
        let is_blockdev = meta.file_type().is_block_device();
        if !is_blockdev && !meta.file_type().is_file() {
            return Err(BlockError::Invalid(format!(
                "'{}' is not a regular file or a block device",
                opts.filename
            )));
        }
        if opts.locking != OnOffAuto::Off {
            let (perm, shared) = lock::perms_for(read_only);
            lock::apply(&file, perm, shared).map_err(|source| BlockError::Lock {
                path: opts.filename.clone(),
                source,
            })?;
        }
        let (request_alignment, buf_alignment) = if direct {
            sync_io::probe_alignment(&file, is_blockdev)
        } else {
            (1, 1)
        };
        let limits = BlockLimits {
            request_alignment,
            buf_alignment,
            optimal_io_size: 0,
            discard_granularity: if is_blockdev { request_alignment } else { 4096 },
            zeroes_granularity: request_alignment,
            ..BlockLimits::default()
        };
        let capacity = file_size(&file).map_err(open_err)?;
        Ok(FileNode {
            common: NodeCommon::new(name, common, read_only),
            inner: Arc::new(FileInner {
                file,
                path: opts.filename.clone(),
                direct,
                is_blockdev,
                capacity: AtomicU64::new(capacity),
                limits,
            }),
            aio: opts.aio,
            stats: Arc::default(),
            registrar,
        })
    }
}

impl BlockNode for FileNode {
    fn node_name(&self) -> &str {
        &self.common.name
    }
    fn driver(&self) -> &'static str {
        "file"
    }
    fn capacity(&self) -> u64 {
        self.inner.capacity()
    }
    fn refresh_capacity(&self) -> Result<u64, BlockError> {
        self.inner
            .refresh_capacity()
            .map_err(|source| BlockError::Os {
                what: format!("read the size of '{}'", self.inner.path),
                source,
            })
    }
    fn limits(&self) -> BlockLimits {
        self.inner.limits
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<(u64, crate::BlockStatus), BlockError> {
        let len = len.max(1);
        if self.inner.is_blockdev {
            return Ok((len, crate::BlockStatus::Data));
        }
        let fd = self.inner.file.as_raw_fd();
        let seek = |whence| {
            // SAFETY: lseek on our open fd touches no memory.
            let r = unsafe { libc::lseek(fd, offset as libc::off_t, whence) };
            if r < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(r as u64)
            }
        };
        // SEEK_DATA from a hole lands on the next data (ENXIO: none up to
        // the end); from data it stays, and SEEK_HOLE says where it ends.
        match seek(libc::SEEK_DATA) {
            Ok(d) if d > offset => Ok(((d - offset).min(len), crate::BlockStatus::Hole)),
            Ok(_) => match seek(libc::SEEK_HOLE) {
                Ok(h) if h > offset => Ok(((h - offset).min(len), crate::BlockStatus::Data)),
                _ => Ok((len, crate::BlockStatus::Data)),
            },
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok((len, crate::BlockStatus::Hole)),
            // No SEEK_DATA here: all data.
            Err(_) => Ok((len, crate::BlockStatus::Data)),
        }
    }
    fn truncate(&self, size: u64) -> Result<(), BlockError> {
        if self.common.read_only {
            return Err(BlockError::Invalid(format!(
                "Block node '{}' is read-only",
                self.common.name
            )));
        }
        let cur = self.refresh_capacity()?;
        if self.inner.is_blockdev {
            // A device's size is the device's: QEMU refuses to grow it.
            return match size.cmp(&cur) {
                std::cmp::Ordering::Equal => Ok(()),
                std::cmp::Ordering::Greater => {
                    Err(BlockError::Invalid("Cannot grow device files".into()))
                }
                std::cmp::Ordering::Less => {
                    Err(BlockError::Invalid("Cannot shrink device files".into()))
                }
            };
        }
        self.inner
            .file
            .set_len(size)
            .map_err(|source| BlockError::Os {
                what: format!("resize '{}' to {size} bytes", self.inner.path),
                source,
            })?;
        self.refresh_capacity().map(|_| ())
    }
    fn cache_direct(&self) -> bool {
        self.inner.direct
    }
    fn read_only(&self) -> bool {
        self.common.read_only
    }
    fn options(&self) -> crate::node::NodeOptions {
        self.common.options()
    }
    fn filename(&self) -> Option<&str> {
        Some(&self.inner.path)
    }
    fn allocated_size(&self) -> Option<u64> {
        let m = self.inner.file.metadata().ok()?;
        Some(m.blocks() * ST_BLOCK_BYTES)
    }
    fn image_details(&self) -> Option<ImageDetails> {
        Some(ImageDetails {
            specific: Some(FormatSpecific::File),
            ..ImageDetails::default()
        })
    }
    fn stats(&self) -> &NodeStats {
        &self.stats
    }
    fn open_queue(&self) -> Result<Box<dyn NodeQueue>, BlockError> {
        let ctx = QueueContext {
            common: self.common.clone(),
            inner: self.inner.clone(),
            stats: self.stats.clone(),
            registrar: self.registrar.clone(),
        };
        Ok(match self.aio {
            BlockdevAioOptions::Threads => {
                Box::new(threads::ThreadsQueue::new(ctx, THREAD_POOL_SIZE)?)
            }
            BlockdevAioOptions::IoUring => Box::new(uring::UringQueue::new(ctx)?),
        })
    }
}

/// What every queue of a file node carries.
#[derive(Clone)]
pub(crate) struct QueueContext {
    common: NodeCommon,
    inner: Arc<FileInner>,
    stats: Arc<NodeStats>,
    registrar: RamRegistrar,
}
