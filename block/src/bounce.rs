//! The bounce pool: a fixed set of buffers per data-plane queue, in one
//! memfd-backed shared mapping made at queue setup, so drivers register or
//! map it once (io_uring fixed buffer, libblkio memory region, vhost-user
//! memory table). A request whose buffers lie outside registered memory
//! copies through one of these. Nothing is allocated or mapped per request;
//! when the pool is empty the caller queues requests in order and starts
//! them as buffers come back.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::Arc;

use crate::memory::MemoryRegion;
use crate::BlockError;

/// One buffer taken from the pool.
#[derive(Debug)]
pub struct BounceBuf {
    /// Index in the pool.
    pub index: u32,
    /// Start of the buffer.
    pub addr: *mut u8,
    /// Length of the buffer.
    pub len: usize,
}

// SAFETY: a `BounceBuf` names memory owned by its pool; only the pool's
// owner hands it out and takes it back, whatever thread a request ran on.
unsafe impl Send for BounceBuf {}

impl BounceBuf {
    /// The buffer as one iovec of `len` bytes (at most the buffer's size).
    pub fn iovec(&self, len: usize) -> libc::iovec {
        libc::iovec {
            iov_base: self.addr.cast(),
            iov_len: len.min(self.len),
        }
    }
}

/// Buffers of one queue.
pub struct BouncePool {
    base: NonNull<u8>,
    map_len: usize,
    stride: usize,
    size: usize,
    free: Vec<u32>,
    fd: Arc<OwnedFd>,
}

// SAFETY: the pool owns its mapping; moving it to another thread moves
// that ownership.
unsafe impl Send for BouncePool {}

impl BouncePool {
    /// `count` buffers of `size` bytes, each aligned to `align` (a power of
    /// two up to the page size), in one shared memfd mapping.
    pub fn new(count: usize, size: usize, align: usize) -> Result<Self, BlockError> {
        let os = |what: &str| {
            let what = what.to_string();
            move |source| BlockError::Os { what, source }
        };
        let stride = size.max(1).next_multiple_of(align.clamp(1, 4096));
        let map_len = (stride * count.max(1)).next_multiple_of(4096);
        // SAFETY: the name is a valid NUL-terminated string; the result is checked.
        let raw = unsafe { libc::memfd_create(c"blkvm-bounce".as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(os("create the bounce pool's memfd")(
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: `raw` is a new fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: ftruncate on our own fd touches no memory.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), map_len as libc::off_t) } < 0 {
            return Err(os("size the bounce pool")(std::io::Error::last_os_error()));
        }
        // SAFETY: a fresh shared mapping of the whole memfd, no address hint;
        // the result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(os("map the bounce pool")(std::io::Error::last_os_error()));
        }
        let base = NonNull::new(p.cast::<u8>())
            .ok_or_else(|| BlockError::Invalid("mmap returned null".into()))?;
        Ok(BouncePool {
            base,
            map_len,
            stride,
            size,
            free: (0..count as u32).rev().collect(),
            fd: Arc::new(fd),
        })
    }

    /// The whole pool as one region, to register or map once.
    pub fn region(&self) -> MemoryRegion {
        MemoryRegion {
            host_addr: self.base.as_ptr() as u64,
            len: self.map_len as u64,
            fd: Some(self.fd.clone()),
            fd_offset: 0,
        }
    }

    /// A free buffer, if there is one.
    pub fn try_take(&mut self) -> Option<BounceBuf> {
        let index = self.free.pop()?;
        Some(BounceBuf {
            index,
            // SAFETY: `index < count`, so the offset lies inside the mapping.
            addr: unsafe { self.base.as_ptr().add(index as usize * self.stride) },
            len: self.size,
        })
    }

    /// Returns a buffer taken from this pool.
    pub fn give_back(&mut self, b: BounceBuf) {
        debug_assert!(!self.free.contains(&b.index));
        self.free.push(b.index);
    }

    /// Size of each buffer.
    pub fn buf_size(&self) -> usize {
        self.size
    }

    /// Buffers currently free.
    pub fn available(&self) -> usize {
        self.free.len()
    }
}

impl Drop for BouncePool {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`; the owner has
        // completed every request that used a buffer of it.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.map_len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_distinct_and_returned() {
        let mut pool = BouncePool::new(3, 1000, 512).unwrap();
        let a = pool.try_take().unwrap();
        let b = pool.try_take().unwrap();
        let c = pool.try_take().unwrap();
        assert!(pool.try_take().is_none(), "the pool never grows");
        for x in [&a, &b, &c] {
            assert_eq!(x.addr as usize % 512, 0);
        }
        assert_ne!(a.addr, b.addr);
        // SAFETY: `a` is a live buffer of the pool, 1000 bytes long.
        unsafe { std::ptr::write_bytes(a.addr, 0xff, a.len) };
        pool.give_back(b);
        assert_eq!(pool.available(), 1);
        let r = pool.region();
        assert!(r.fd.is_some() && r.len >= 3 * 1024);
    }
}
