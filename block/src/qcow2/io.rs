//! Synchronous I/O on a node queue, for metadata and the slow paths
//! (allocation, copy-on-write, compressed clusters, backing reads): submit
//! one request on a queue nobody else uses and wait for it.

use crate::node::NodeQueue;
use crate::request::{Completion, Request, RequestError};

/// Submits `req` on `q` and waits for its completion. `q` must have
/// nothing else in flight.
pub(crate) fn run(q: &mut dyn NodeQueue, req: Request) -> Result<u64, RequestError> {
    q.submit(req).map_err(|e| e.error)?;
    let mut out: Vec<Completion> = Vec::with_capacity(1);
    loop {
        q.wait_completions(1, &mut out);
        if let Some(c) = out.pop() {
            return c.result;
        }
        if q.in_flight() == 0 {
            // The queue lost the request: nothing holds its buffers now.
            return Err(RequestError::Os(libc::EIO));
        }
    }
}

/// Turns a short transfer into an error.
fn whole(done: Result<u64, RequestError>, len: usize) -> Result<(), RequestError> {
    match done {
        Ok(n) if n == len as u64 => Ok(()),
        Ok(_) => Err(RequestError::Os(libc::EIO)),
        Err(e) => Err(e),
    }
}

/// Reads `buf.len()` bytes at `off`.
pub(crate) fn pread(q: &mut dyn NodeQueue, off: u64, buf: &mut [u8]) -> Result<(), RequestError> {
    let iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: `buf` is borrowed mutably until `run` returns, and `run`
    // returns only once the request came back.
    let req = unsafe { Request::read(off, vec![iov]) };
    whole(run(q, req), buf.len())
}

/// Writes `buf` at `off`.
pub(crate) fn pwrite(q: &mut dyn NodeQueue, off: u64, buf: &[u8]) -> Result<(), RequestError> {
    let iov = libc::iovec {
        iov_base: buf.as_ptr().cast_mut().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: `buf` is borrowed until `run` returns, after the request came
    // back; a write only reads the memory.
    let req = unsafe { Request::write(off, vec![iov], false) };
    whole(run(q, req), buf.len())
}

/// Reads into `iovecs` at `off`.
///
/// # Safety
/// The iovecs must be valid for writes until this returns.
pub(crate) unsafe fn preadv(
    q: &mut dyn NodeQueue,
    off: u64,
    iovecs: Vec<libc::iovec>,
) -> Result<(), RequestError> {
    let len = iovecs.iter().map(|v| v.iov_len).sum();
    // SAFETY: the caller keeps the memory valid until we return, and `run`
    // returns after the request came back.
    let req = unsafe { Request::read(off, iovecs) };
    whole(run(q, req), len)
}

/// Makes everything written so far durable.
pub(crate) fn flush(q: &mut dyn NodeQueue) -> Result<(), RequestError> {
    run(q, Request::flush()).map(|_| ())
}

/// The part `[skip, skip + len)` of the data `iovecs` describe, as iovecs
/// over the same memory.
pub(crate) fn slice_iovecs(
    iovecs: &[libc::iovec],
    mut skip: usize,
    mut len: usize,
) -> Vec<libc::iovec> {
    let mut out = Vec::new();
    for v in iovecs {
        if len == 0 {
            break;
        }
        if skip >= v.iov_len {
            skip -= v.iov_len;
            continue;
        }
        let n = (v.iov_len - skip).min(len);
        out.push(libc::iovec {
            // The pointer stays inside the iovec: `skip < iov_len`.
            iov_base: v.iov_base.cast::<u8>().wrapping_add(skip).cast(),
            iov_len: n,
        });
        len -= n;
        skip = 0;
    }
    out
}

/// Alignment of the buffers the driver makes itself (copy-on-write data,
/// zeroes): enough for any O_DIRECT file, so their writes take the
/// protocol node's fast path.
pub(crate) const BUF_ALIGN: usize = 4096;

/// A heap buffer whose bytes start at a [`BUF_ALIGN`] boundary.
pub(crate) struct AlignedBuf {
    mem: Vec<u8>,
    off: usize,
    len: usize,
}

impl AlignedBuf {
    /// `len` zero bytes.
    pub fn zeroed(len: usize) -> Self {
        let mem = vec![0u8; len + BUF_ALIGN];
        let off = mem.as_ptr().align_offset(BUF_ALIGN);
        AlignedBuf { mem, off, len }
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.mem[self.off..self.off + self.len]
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// An iovec over bytes `[skip, skip + len)`. The memory stays valid
    /// (the heap block does not move) as long as the buffer lives.
    pub fn iovec(&self, skip: usize, len: usize) -> libc::iovec {
        assert!(skip + len <= self.len, "inside the buffer");
        libc::iovec {
            iov_base: self.mem[self.off + skip..].as_ptr().cast_mut().cast(),
            iov_len: len,
        }
    }
}

/// An iovec over `buf`.
pub(crate) fn iovec_of(buf: &mut [u8]) -> libc::iovec {
    libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slicing_crosses_iovec_boundaries() {
        let mut a = [0u8; 10];
        let mut b = [0u8; 10];
        let v = [iovec_of(&mut a), iovec_of(&mut b)];
        let s = slice_iovecs(&v, 7, 6);
        assert_eq!(s.len(), 2);
        assert_eq!((s[0].iov_len, s[1].iov_len), (3, 3));
        assert_eq!(s[1].iov_base, v[1].iov_base);
    }

    #[test]
    fn aligned_buffers_start_at_the_alignment() {
        for len in [0, 1, 512, 65536] {
            let b = AlignedBuf::zeroed(len);
            assert_eq!(b.iovec(0, len).iov_base as usize % BUF_ALIGN, 0);
            assert_eq!(b.len(), len);
        }
    }
}
