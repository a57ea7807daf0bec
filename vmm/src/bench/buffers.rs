//! The benchmark's data buffers: one anonymous mapping, page aligned, cut
//! into `iodepth` slots of `bs` bytes, so every request's buffer meets any
//! O_DIRECT alignment.

use std::ptr::NonNull;

use anyhow::{bail, Result};

/// Page-aligned request buffers.
pub struct Buffers {
    base: NonNull<u8>,
    len: usize,
    slot: usize,
}

impl Buffers {
    /// `count` buffers of `size` bytes, each starting on a page boundary,
    /// filled with a non-zero pattern.
    pub fn new(count: usize, size: usize) -> Result<Self> {
        let slot = size.div_ceil(4096) * 4096;
        let len = slot * count;
        // SAFETY: an anonymous private mapping with no address hint; the
        // result is checked before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
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
        Ok(Buffers { base, len, slot })
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
}

impl Drop for Buffers {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`; the job has
        // waited for every request that used it.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}
