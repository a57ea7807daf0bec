//! Block requests and their completions.
//!
//! A [`Request`] carries its data buffers as raw `iovec`s because on the data
//! path they point into guest RAM, which no Rust reference may cover (the
//! guest can change it at any time). Building a read or write request is
//! therefore `unsafe`: the caller promises the buffers stay valid until the
//! request comes back in a [`Completion`]. The request travels by value
//! through the node queues and is handed back whole, so a caller can reuse
//! its iovec vector and never allocates per request once warm.

use std::time::Instant;

/// What a request does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestOp {
    /// Vectored read into the iovecs.
    Read,
    /// Vectored write from the iovecs.
    Write,
    /// Make completed writes durable.
    Flush,
    /// Deallocate a range (contents become unspecified, zeroes on files).
    Discard,
    /// Make a range read back as zeroes.
    WriteZeroes,
}

/// Per-request flags.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RequestFlags {
    /// Write with Force Unit Access: durable on completion.
    pub fua: bool,
    /// Write-zeroes may deallocate the range.
    pub may_unmap: bool,
    /// Write-zeroes must not fall back to writing zero buffers: a node
    /// that cannot zero the range with one cheap operation (a punched or
    /// zeroed range, the device's own write-zeroes) fails it with
    /// [`RequestError::Unsupported`] at once. QEMU's
    /// `BDRV_REQ_NO_FALLBACK`; NBD's `NBD_CMD_FLAG_FAST_ZERO`.
    pub no_fallback: bool,
}

/// Why a request failed. Small and `Copy`: it is made on the data path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The host returned an errno.
    #[error("I/O error: {}", std::io::Error::from_raw_os_error(*.0))]
    Os(i32),
    /// The request reaches past the end of the node.
    #[error("request at offset {offset} length {len} exceeds the node's size {capacity}")]
    OutOfRange {
        /// Request offset in bytes.
        offset: u64,
        /// Request length in bytes.
        len: u64,
        /// Node capacity in bytes.
        capacity: u64,
    },
    /// A modifying request on a read-only node.
    #[error("node is read-only")]
    ReadOnly,
    /// The node does not support this operation.
    #[error("operation not supported by the node")]
    Unsupported,
    /// The request breaks the node's limits (segments, transfer size).
    #[error("request exceeds the node's limits")]
    Limits,
    /// The queue cannot take more requests right now.
    #[error("queue is full")]
    QueueFull,
}

impl RequestError {
    /// The errno a POSIX-minded caller (NBD, virtio status mapping) wants.
    pub fn errno(&self) -> i32 {
        match self {
            Self::Os(e) => *e,
            Self::OutOfRange { .. } => libc::EIO,
            Self::ReadOnly => libc::EPERM,
            Self::Unsupported => libc::ENOTSUP,
            Self::Limits => libc::EINVAL,
            Self::QueueFull => libc::EAGAIN,
        }
    }

    /// Build from the last OS error.
    pub(crate) fn last_os() -> Self {
        Self::Os(
            std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO),
        )
    }
}

/// One block request.
#[derive(Debug)]
pub struct Request {
    op: RequestOp,
    offset: u64,
    len: u64,
    flags: RequestFlags,
    iovecs: Vec<libc::iovec>,
    /// Caller's tag, returned untouched in the completion.
    pub user_data: u64,
    pub(crate) start: Option<Instant>,
    /// Its latency, from `start` to when the innermost node finished it:
    /// the first layer to record the completion reads the clock, and
    /// every layer's statistics count this one figure.
    pub(crate) latency_ns: Option<u64>,
    /// Read-only and range were checked where the request entered the
    /// graph (its [`BlockBackend`](crate::backend::BlockBackend), or the
    /// first node): the nodes below do not check again.
    pub(crate) checked: bool,
}

// SAFETY: the iovec pointers are plain addresses of memory whose validity
// until completion was promised by the caller of the `unsafe` constructor;
// nothing in `Request` is tied to the thread that built it.
unsafe impl Send for Request {}

impl Request {
    fn new(op: RequestOp, offset: u64, len: u64, iovecs: Vec<libc::iovec>) -> Self {
        Request {
            op,
            offset,
            len,
            flags: RequestFlags::default(),
            iovecs,
            user_data: 0,
            start: None,
            latency_ns: None,
            checked: false,
        }
    }

    /// A vectored read of `iovecs` from byte `offset`.
    ///
    /// # Safety
    /// Every iovec must describe memory that is valid for writes and stays
    /// valid (not unmapped or freed) until this request is returned in a
    /// [`Completion`] or in a [`SubmitError`].
    pub unsafe fn read(offset: u64, iovecs: Vec<libc::iovec>) -> Self {
        let len = iovecs.iter().map(|v| v.iov_len as u64).sum();
        Self::new(RequestOp::Read, offset, len, iovecs)
    }

    /// A vectored write of `iovecs` at byte `offset`.
    ///
    /// # Safety
    /// As for [`Request::read`], with the memory valid for reads.
    pub unsafe fn write(offset: u64, iovecs: Vec<libc::iovec>, fua: bool) -> Self {
        let len = iovecs.iter().map(|v| v.iov_len as u64).sum();
        let mut r = Self::new(RequestOp::Write, offset, len, iovecs);
        r.flags.fua = fua;
        r
    }

    /// A flush.
    pub fn flush() -> Self {
        Self::new(RequestOp::Flush, 0, 0, Vec::new())
    }

    /// A discard of `len` bytes at `offset`.
    pub fn discard(offset: u64, len: u64) -> Self {
        Self::new(RequestOp::Discard, offset, len, Vec::new())
    }

    /// Zero `len` bytes at `offset`, deallocating them if `may_unmap`.
    pub fn write_zeroes(offset: u64, len: u64, may_unmap: bool) -> Self {
        let mut r = Self::new(RequestOp::WriteZeroes, offset, len, Vec::new());
        r.flags.may_unmap = may_unmap;
        r
    }

    /// Zero `len` bytes at `offset` with every write-zeroes flag given
    /// (`may_unmap`, `fua`, `no_fallback`).
    pub fn write_zeroes_with(offset: u64, len: u64, flags: RequestFlags) -> Self {
        let mut r = Self::new(RequestOp::WriteZeroes, offset, len, Vec::new());
        r.flags = flags;
        r
    }

    /// Set the caller's tag.
    pub fn with_user_data(mut self, user_data: u64) -> Self {
        self.user_data = user_data;
        self
    }

    /// The operation.
    pub fn op(&self) -> RequestOp {
        self.op
    }
    /// Byte offset in the node.
    pub fn offset(&self) -> u64 {
        self.offset
    }
    /// Length in bytes (the iovecs' total for reads and writes).
    pub fn len(&self) -> u64 {
        self.len
    }
    /// True for zero-length requests (flush, empty reads).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Flags.
    pub fn flags(&self) -> RequestFlags {
        self.flags
    }
    /// The data buffers.
    pub fn iovecs(&self) -> &[libc::iovec] {
        &self.iovecs
    }
    /// Take the iovec vector back for reuse (leaves the request empty).
    pub fn take_iovecs(&mut self) -> Vec<libc::iovec> {
        self.len = 0;
        std::mem::take(&mut self.iovecs)
    }
    /// Whether the request changes data.
    pub fn is_modifying(&self) -> bool {
        matches!(
            self.op,
            RequestOp::Write | RequestOp::Discard | RequestOp::WriteZeroes
        )
    }
    /// Moves the request by `delta` bytes (a format node's window).
    pub(crate) fn shift(&mut self, delta: u64) {
        self.offset += delta;
    }
    /// Moves the request back by `delta` bytes.
    pub(crate) fn unshift(&mut self, delta: u64) {
        self.offset -= delta;
    }
    /// Turns an all-zero write into write-zeroes (`detect-zeroes`); the
    /// iovecs stay with the request so the caller gets them back.
    pub(crate) fn make_write_zeroes(&mut self, may_unmap: bool) {
        self.op = RequestOp::WriteZeroes;
        self.flags.may_unmap = may_unmap;
    }
    /// Stamp the submission time once, at the outermost node.
    pub(crate) fn stamp(&mut self) {
        if self.start.is_none() {
            self.start = Some(Instant::now());
        }
    }
    /// Checks that `[offset, offset+len)` lies within `capacity`.
    pub(crate) fn check_range(&self, capacity: u64) -> Result<(), RequestError> {
        match self.offset.checked_add(self.len) {
            Some(end) if end <= capacity => Ok(()),
            _ => Err(RequestError::OutOfRange {
                offset: self.offset,
                len: self.len,
                capacity,
            }),
        }
    }
}

/// A finished request: the request itself (buffers handed back) and its
/// result, the number of bytes transferred.
#[derive(Debug)]
pub struct Completion {
    /// The request as submitted.
    pub request: Request,
    /// Bytes transferred, or why it failed.
    pub result: Result<u64, RequestError>,
}

/// A request the queue did not accept; nothing of it was started.
#[derive(Debug)]
pub struct SubmitError {
    /// The request, handed back so its descriptor can still be completed.
    pub request: Request,
    /// Why it was refused.
    pub error: RequestError,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_range_refuses_overflowing_end() {
        let r = Request::discard(u64::MAX - 1, 4);
        assert!(matches!(
            r.check_range(u64::MAX),
            Err(RequestError::OutOfRange { .. })
        ));
    }

    #[test]
    fn check_range_accepts_request_ending_at_capacity() {
        let r = Request::discard(4096, 4096);
        assert!(r.check_range(8192).is_ok());
        assert!(r.check_range(8191).is_err());
    }

    #[test]
    fn errno_maps_read_only_to_eperm() {
        assert_eq!(RequestError::ReadOnly.errno(), libc::EPERM);
    }
}

/// Spare iovec vectors, recycled so a warm queue never allocates (the
/// virtio-blk handler's and the NBD connection's). They are cleared
/// before reuse; the addresses they held are never read.
#[derive(Default)]
pub struct IovecPool(Vec<Vec<libc::iovec>>);

// SAFETY: the vectors only carry capacity between requests; their stale
// contents are cleared before use and never dereferenced.
unsafe impl Send for IovecPool {}

impl IovecPool {
    /// An empty vector, with capacity when one was given back.
    pub fn take(&mut self) -> Vec<libc::iovec> {
        let mut v = self.0.pop().unwrap_or_default();
        v.clear();
        v
    }

    /// Keeps `v`'s capacity for the next `take`.
    pub fn give(&mut self, mut v: Vec<libc::iovec>) {
        v.clear();
        self.0.push(v);
    }
}
