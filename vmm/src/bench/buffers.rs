//! The benchmark's data buffers: one mapping, page aligned, cut into
//! `iodepth` slots of `bs` bytes, so every request's buffer meets any
//! O_DIRECT alignment. Backed by a memfd and shared, so the registrar can
//! hand the memory (or one slot of it) to drivers that map it elsewhere.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::Arc;

use anyhow::{bail, Result};
use block::MemoryRegion;

/// Page-aligned request buffers.
pub struct Buffers {
    base: NonNull<u8>,
    len: usize,
    slot: usize,
    fd: Option<Arc<OwnedFd>>,
}

impl Buffers {
    /// `count` buffers of `size` bytes, each starting on a page boundary,
    /// filled with a non-zero pattern: in a memfd when `shared`, else in
    /// plain anonymous memory (what a block layer sees from a caller that
    /// registered nothing).
    pub fn new(count: usize, size: usize, shared: bool) -> Result<Self> {
        let slot = size.div_ceil(4096) * 4096;
        let len = slot * count;
        let fd = if shared {
            Some(Arc::new(memfd(len)?))
        } else {
            None
        };
        let (flags, raw_fd) = match &fd {
            Some(fd) => (libc::MAP_SHARED, fd.as_raw_fd()),
            None => (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1),
        };
        // SAFETY: a fresh mapping with no address hint (of our own memfd,
        // sized above, when shared); the result is checked before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags | libc::MAP_POPULATE,
                raw_fd,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            bail!(
                "could not map {len} bytes of buffers: {}",
                std::io::Error::last_os_error()
            );
        }
        let Some(base) = NonNull::new(p.cast::<u8>()) else {
            bail!("mmap returned a null mapping");
        };
        // SAFETY: `base..base+len` is the mapping just created, writable.
        unsafe { std::ptr::write_bytes(base.as_ptr(), 0xa5, len) };
        Ok(Buffers {
            base,
            len,
            slot,
            fd,
        })
    }

    /// The iovec of buffer `i`, `size` bytes long.
    pub fn iovec(&self, i: usize, size: usize) -> libc::iovec {
        assert!((i + 1) * self.slot <= self.len && size <= self.slot);
        libc::iovec {
            // SAFETY: checked above: the slot lies within the mapping.
            iov_base: unsafe { self.base.as_ptr().add(i * self.slot) }.cast(),
            iov_len: size,
        }
    }

    /// All buffers as one region (shared buffers only).
    pub fn region(&self) -> Option<MemoryRegion> {
        Some(MemoryRegion {
            host_addr: self.base.as_ptr() as u64,
            len: self.len as u64,
            fd: Some(self.fd.clone()?),
            fd_offset: 0,
        })
    }

    /// Buffer `i` alone as a region (shared buffers only).
    pub fn slot_region(&self, i: usize) -> Option<MemoryRegion> {
        let off = (i * self.slot) as u64;
        Some(MemoryRegion {
            host_addr: self.base.as_ptr() as u64 + off,
            len: self.slot as u64,
            fd: Some(self.fd.clone()?),
            fd_offset: off,
        })
    }
}

fn memfd(len: usize) -> Result<OwnedFd> {
    // SAFETY: the name is NUL-terminated; the result is checked.
    let raw = unsafe { libc::memfd_create(c"blkvm-bench".as_ptr(), libc::MFD_CLOEXEC) };
    if raw < 0 {
        bail!("memfd_create failed: {}", std::io::Error::last_os_error());
    }
    // SAFETY: a new fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: ftruncate on our own fd touches no memory.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } < 0 {
        bail!(
            "could not size the buffers' memfd: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(fd)
}

impl Drop for Buffers {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`; the job has
        // waited for every request that used it.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}
