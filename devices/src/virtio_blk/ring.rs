//! The driver's avail index, read straight from a host pointer resolved
//! once per memory-table generation. A polling IOThread reads it every
//! poll round; through vm-memory each read looks the address up in the
//! region table again (measured: a tenth of a polling export's CPU time
//! in `to_region_addr`). Everything else on the ring keeps going through
//! vm-memory's checked accessors.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend};

use super::GuestMem;

/// Offset of `idx` in the avail ring (virtio 1.2, 2.7.6).
const AVAIL_IDX_OFFSET: u64 = 2;

/// A queue's avail `idx` in one memory generation.
pub struct AvailIdx {
    idx: Option<NonNull<AtomicU16>>,
    /// Keeps the mapping `idx` points into alive.
    _mem: Arc<GuestMem>,
}

// SAFETY: `idx` points into guest RAM mapped by `_mem`, which the struct
// keeps alive; the pointer is only read atomically, from whichever thread
// owns the struct.
unsafe impl Send for AvailIdx {}

impl AvailIdx {
    /// Resolves `queue`'s avail index in `mem`; an address that is not
    /// mapped or not aligned leaves reads to vm-memory's checked path.
    pub fn resolve(queue: &Queue, mem: Arc<GuestMem>) -> Self {
        let idx = queue
            .avail_ring()
            .checked_add(AVAIL_IDX_OFFSET)
            .and_then(|a| mem.get_host_address(GuestAddress(a)).ok())
            .filter(|p| p.align_offset(std::mem::align_of::<AtomicU16>()) == 0)
            .and_then(|p| NonNull::new(p.cast::<AtomicU16>()));
        AvailIdx { idx, _mem: mem }
    }

    /// The driver's avail index (None: read it through vm-memory).
    pub fn load(&self) -> Option<u16> {
        // SAFETY: `idx` is aligned and points into a mapping `_mem` keeps
        // alive; the guest may change the value at any time, which an
        // atomic load tolerates (no reference to plain memory is formed).
        self.idx
            .map(|p| u16::from_le(unsafe { p.as_ref() }.load(Ordering::Acquire)))
    }
}
