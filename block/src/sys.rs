//! The few system-call wrappers the block layer needs, kept in one place so
//! every `unsafe` block sits next to the reasoning for it.

use std::alloc::{self, Layout};
use std::os::fd::RawFd;
use std::ptr::NonNull;

use crate::request::RequestError;

/// `BLKDISCARD`: `_IO(0x12, 119)`.
pub const BLKDISCARD: libc::c_ulong = 0x1277;
/// `BLKZEROOUT`: `_IO(0x12, 127)`.
pub const BLKZEROOUT: libc::c_ulong = 0x127f;

/// Blocks until `fd` is readable (or an error/hang-up is pending).
pub fn wait_readable(fd: RawFd) {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is a valid pollfd for the duration of the call and the
    // count is 1. EINTR simply returns early; the caller loops.
    unsafe { libc::poll(&mut pfd, 1, -1) };
}

/// Converts a `-1`-style return into a [`RequestError`].
pub fn check(ret: isize) -> Result<u64, RequestError> {
    if ret < 0 {
        Err(RequestError::last_os())
    } else {
        Ok(ret as u64)
    }
}

/// Whether every byte the iovecs describe is zero.
///
/// Reads with volatile loads: the memory may be guest RAM that changes under
/// us; a racing guest merely gets a zero or non-zero verdict, never UB.
pub fn iovecs_are_zero(iovecs: &[libc::iovec]) -> bool {
    iovecs.iter().all(|v| {
        let p = v.iov_base as *const u8;
        (0..v.iov_len).all(|i| {
            // SAFETY: the request's constructor promised `iov_base..+iov_len`
            // is valid for reads until completion; `i < iov_len`.
            unsafe { std::ptr::read_volatile(p.add(i)) == 0 }
        })
    })
}

/// Copies `len` bytes starting `skip` bytes into the iovecs' data into `dst`.
pub fn copy_from_iovecs(iovecs: &[libc::iovec], mut skip: usize, dst: &mut [u8]) {
    let mut done = 0;
    for v in iovecs {
        if done == dst.len() {
            break;
        }
        if skip >= v.iov_len {
            skip -= v.iov_len;
            continue;
        }
        let n = (v.iov_len - skip).min(dst.len() - done);
        // SAFETY: the source lies within an iovec valid for reads (request
        // contract); the destination is `dst[done..done + n]`, in bounds;
        // the two cannot overlap because `dst` is our own bounce buffer.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (v.iov_base as *const u8).add(skip),
                dst.as_mut_ptr().add(done),
                n,
            )
        };
        done += n;
        skip = 0;
    }
}

/// Copies `src` into the iovecs' data starting `skip` bytes in.
pub fn copy_to_iovecs(iovecs: &[libc::iovec], mut skip: usize, src: &[u8]) {
    let mut done = 0;
    for v in iovecs {
        if done == src.len() {
            break;
        }
        if skip >= v.iov_len {
            skip -= v.iov_len;
            continue;
        }
        let n = (v.iov_len - skip).min(src.len() - done);
        // SAFETY: the destination lies within an iovec valid for writes
        // (request contract); the source is `src[done..done + n]`.
        unsafe {
            std::ptr::copy_nonoverlapping(
                src.as_ptr().add(done),
                (v.iov_base as *mut u8).add(skip),
                n,
            )
        };
        done += n;
        skip = 0;
    }
}

/// Fills the iovecs' data with zeroes from `skip` bytes in.
pub fn zero_iovecs(iovecs: &[libc::iovec], mut skip: usize) {
    for v in iovecs {
        if skip >= v.iov_len {
            skip -= v.iov_len;
            continue;
        }
        // SAFETY: the range lies within an iovec valid for writes (request
        // contract).
        unsafe { std::ptr::write_bytes((v.iov_base as *mut u8).add(skip), 0, v.iov_len - skip) };
        skip = 0;
    }
}

/// A heap buffer with a chosen alignment, for O_DIRECT bounce I/O.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: the buffer is uniquely owned heap memory.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes (at least 1) aligned to `align` (a power of two).
    pub fn new(len: usize, align: usize) -> Self {
        let layout = Layout::from_size_align(len.max(1), align.max(1))
            .expect("alignment is a power of two and the size fits");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(ptr) else {
            alloc::handle_alloc_error(layout)
        };
        AlignedBuf { ptr, layout }
    }

    /// The bytes.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` points at `layout.size()` initialized (zeroed) bytes
        // owned by `self`, borrowed mutably for the slice's lifetime.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }

    /// The start address.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with exactly this layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iov(buf: &mut [u8]) -> libc::iovec {
        libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }
    }

    #[test]
    fn copy_round_trips_across_segments_with_skip() {
        let mut a = [0u8; 3];
        let mut b = [0u8; 5];
        let iovs = [iov(&mut a), iov(&mut b)];
        copy_to_iovecs(&iovs, 2, &[1, 2, 3, 4]);
        let mut out = [0u8; 4];
        copy_from_iovecs(&iovs, 2, &mut out);
        assert_eq!(out, [1, 2, 3, 4]);
        assert_eq!(a, [0, 0, 1]);
        assert_eq!(b, [2, 3, 4, 0, 0]);
    }

    #[test]
    fn zero_detection_sees_a_single_set_byte() {
        let mut a = [0u8; 100];
        assert!(iovecs_are_zero(&[iov(&mut a)]));
        a[99] = 1;
        assert!(!iovecs_are_zero(&[iov(&mut a)]));
    }

    #[test]
    fn aligned_buf_is_aligned() {
        let mut b = AlignedBuf::new(512, 4096);
        assert_eq!(b.as_mut_ptr() as usize % 4096, 0);
        assert_eq!(b.as_mut_slice().len(), 512);
    }
}
