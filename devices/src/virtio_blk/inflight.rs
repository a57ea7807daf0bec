//! Inflight I/O tracking (vhost-user's INFLIGHT_SHMFD, split rings): a
//! record in memory the frontend keeps across backend restarts of which
//! descriptor heads the backend took from the avail ring and has not yet
//! returned, so that a backend started after a crash resubmits them
//! instead of losing them (the guest waits for those forever) or
//! replaying entries it had finished.
//!
//! The layout is the backend's own business (the frontend stores the
//! area); ours is libvhost-user's, so the same frontend area suits
//! either: per queue, a 16-byte header (`features` u64, `version` u16,
//! `desc_num` u16, `last_batch_head` u16, `used_idx` u16) and one 16-byte
//! state per descriptor head (`inflight` u8, 5 bytes padding, `next` u16,
//! `counter` u64), the queue's area rounded up to 64 bytes.
//!
//! Protocol, as libvhost-user keeps it:
//! - a head taken from the avail ring gets the next counter value, then
//!   `inflight = 1`;
//! - before its used entry is published, `last_batch_head = head`; after,
//!   `inflight = 0` and `used_idx` = the new used index;
//! - a restarted backend finds `used_idx` behind the ring's used index when
//!   it died between the two, and clears `last_batch_head`; every head
//!   still in flight is resubmitted in counter order, and the avail ring
//!   resumes at `used_idx + (heads in flight)`: everything taken was
//!   either returned or is in flight.

use std::sync::atomic::{fence, AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

const HEADER: usize = 16;
const DESC_STATE: usize = 16;
const ALIGN: usize = 64;
const VERSION: u16 = 1;

/// Bytes of one queue's area for queues of `queue_size` entries.
pub fn queue_area_size(queue_size: u16) -> usize {
    (HEADER + DESC_STATE * usize::from(queue_size)).div_ceil(ALIGN) * ALIGN
}

/// A shared mapping of the inflight area, unmapped when the last user
/// goes.
pub struct InflightMap {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; every access goes through
// atomics on addresses inside it.
unsafe impl Send for InflightMap {}
// SAFETY: as above.
unsafe impl Sync for InflightMap {}

impl InflightMap {
    /// Maps `len` bytes of `fd` from `offset`, shared.
    pub fn map(fd: std::os::fd::BorrowedFd<'_>, offset: u64, len: usize) -> std::io::Result<Self> {
        use std::os::fd::AsRawFd;
        if len == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "empty inflight area",
            ));
        }
        let off = libc::off_t::try_from(offset).map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "inflight offset")
        })?;
        // SAFETY: a new shared mapping of an fd we were given; the kernel
        // checks the fd, length and offset; nothing aliases it yet.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                off,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(InflightMap {
            ptr: ptr.cast(),
            len,
        })
    }

    /// Queue `q`'s record for queues of `queue_size` entries, if the area
    /// holds it.
    pub fn queue(self: &Arc<Self>, q: u16, queue_size: u16) -> Option<InflightQueue> {
        let size = queue_area_size(queue_size);
        let start = usize::from(q).checked_mul(size)?;
        if start.checked_add(size)? > self.len || queue_size == 0 {
            return None;
        }
        Some(InflightQueue {
            map: self.clone(),
            // SAFETY: `start + size` is inside the mapping (checked above).
            base: unsafe { self.ptr.add(start) },
            desc_num: queue_size,
            counter: 0,
        })
    }
}

impl Drop for InflightMap {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are the mapping made in `map`; the queues
        // that point into it hold an `Arc` of this map, so none is left.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// One queue's inflight record.
pub struct InflightQueue {
    map: Arc<InflightMap>,
    base: *mut u8,
    desc_num: u16,
    counter: u64,
}

// SAFETY: `base` points into `map`, which this value keeps alive; the
// record is written by the one thread that serves the queue.
unsafe impl Send for InflightQueue {}

impl InflightQueue {
    fn u8_at(&self, off: usize) -> &AtomicU8 {
        // SAFETY: every offset used is inside the queue's area (header or
        // a head below `desc_num`), which lies in the mapping `map` keeps.
        unsafe { &*self.base.add(off).cast::<AtomicU8>() }
    }

    fn u16_at(&self, off: usize) -> &AtomicU16 {
        // SAFETY: as in `u8_at`; offsets are even and the area 64-byte
        // aligned in a page-aligned mapping.
        unsafe { &*self.base.add(off).cast::<AtomicU16>() }
    }

    fn u64_at(&self, off: usize) -> &AtomicU64 {
        // SAFETY: as in `u16_at`, at multiples of 8.
        unsafe { &*self.base.add(off).cast::<AtomicU64>() }
    }

    fn desc(head: u16) -> usize {
        HEADER + DESC_STATE * usize::from(head)
    }

    /// `head` was taken from the avail ring.
    pub fn begin(&mut self, head: u16) {
        if head >= self.desc_num {
            return;
        }
        self.counter += 1;
        let d = Self::desc(head);
        self.u64_at(d + 8).store(self.counter, Ordering::Relaxed);
        self.u8_at(d).store(1, Ordering::Release);
    }

    /// `head`'s used entry is about to be published.
    pub fn pre_put(&self, head: u16) {
        self.u16_at(12).store(head, Ordering::Release);
    }

    /// `head`'s used entry is published; the used index is now `used_idx`.
    pub fn post_put(&self, head: u16, used_idx: u16) {
        if head < self.desc_num {
            self.u8_at(Self::desc(head)).store(0, Ordering::Release);
        }
        fence(Ordering::SeqCst);
        self.u16_at(14).store(used_idx, Ordering::Release);
    }

    /// Reads the record when the queue starts, the ring's used index being
    /// `used_idx`. A fresh (zeroed) area is initialised and yields nothing.
    /// Otherwise returns the heads to resubmit, in the order they were
    /// taken, and where the avail ring resumes. Heads at or above
    /// `ring_size` (a record that does not fit the ring) are dropped.
    pub fn recover(&mut self, used_idx: u16, ring_size: u16) -> Option<(Vec<u16>, u16)> {
        if self.u16_at(8).load(Ordering::Acquire) != VERSION {
            for off in (0..queue_area_size(self.desc_num)).step_by(8) {
                self.u64_at(off).store(0, Ordering::Relaxed);
            }
            self.u16_at(10).store(self.desc_num, Ordering::Relaxed);
            self.u16_at(14).store(used_idx, Ordering::Relaxed);
            self.u16_at(8).store(VERSION, Ordering::Release);
            self.counter = 0;
            return None;
        }
        if self.u16_at(14).load(Ordering::Acquire) != used_idx {
            // Died between publishing a used entry and clearing its head.
            let last = self.u16_at(12).load(Ordering::Acquire);
            if last < self.desc_num {
                self.u8_at(Self::desc(last)).store(0, Ordering::Release);
            }
            self.u16_at(14).store(used_idx, Ordering::Release);
        }
        let mut heads: Vec<(u64, u16)> = (0..self.desc_num.min(ring_size))
            .filter(|&h| self.u8_at(Self::desc(h)).load(Ordering::Acquire) == 1)
            .map(|h| (self.u64_at(Self::desc(h) + 8).load(Ordering::Acquire), h))
            .collect();
        heads.sort_unstable();
        self.counter = (0..self.desc_num)
            .map(|h| self.u64_at(Self::desc(h) + 8).load(Ordering::Acquire))
            .max()
            .unwrap_or(0);
        let next_avail = used_idx.wrapping_add(heads.len() as u16);
        Some((heads.into_iter().map(|(_, h)| h).collect(), next_avail))
    }

    /// The mapping this record lives in.
    pub fn map(&self) -> &Arc<InflightMap> {
        &self.map
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsFd, FromRawFd};

    fn area(queues: u16, qsize: u16) -> (std::fs::File, Arc<InflightMap>) {
        // SAFETY: a NUL-terminated name; memfd_create returns a new fd or -1.
        let fd = unsafe { libc::memfd_create(c"inflight-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: the fd was just created and is owned by nobody else.
        let f = unsafe { std::fs::File::from_raw_fd(fd) };
        let len = queue_area_size(qsize) * usize::from(queues);
        f.set_len(len as u64).unwrap();
        let m = Arc::new(InflightMap::map(f.as_fd(), 0, len).unwrap());
        (f, m)
    }

    #[test]
    fn a_restarted_backend_finds_what_it_had_not_returned_in_order() {
        let (f, m) = area(2, 8);
        let mut q = m.queue(1, 8).unwrap();
        assert!(q.recover(0, 8).is_none(), "a fresh area has nothing");
        // Heads 3, 5, 1 taken in that order; 5 returned (used index 1).
        for h in [3, 5, 1] {
            q.begin(h);
        }
        q.pre_put(5);
        q.post_put(5, 1);
        drop(q);
        // The backend dies; a new one maps the same area.
        let m2 = Arc::new(InflightMap::map(f.as_fd(), 0, m.len).unwrap());
        let mut q2 = m2.queue(1, 8).unwrap();
        assert_eq!(q2.recover(1, 8), Some((vec![3, 1], 3)));
        // Queue 0 was never used: fresh.
        assert!(m2.queue(0, 8).unwrap().recover(0, 8).is_none());
        // New heads count on from the old counter.
        q2.begin(6);
        assert_eq!(q2.recover(1, 8), Some((vec![3, 1, 6], 4)));
        assert!(m2.queue(2, 8).is_none(), "no third queue in the area");
    }

    #[test]
    fn a_death_between_publishing_and_clearing_is_repaired() {
        let (_f, m) = area(1, 4);
        let mut q = m.queue(0, 4).unwrap();
        q.recover(0, 4);
        q.begin(2);
        q.begin(0);
        // Head 2's used entry went out (used index 1), then the backend
        // died before clearing it.
        q.pre_put(2);
        let mut q2 = m.queue(0, 4).unwrap();
        assert_eq!(q2.recover(1, 4), Some((vec![0], 2)));
    }
}
