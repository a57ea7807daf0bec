//! io_uring fixed buffers fed by the RAM registrar: each registered region
//! becomes one or more entries of the ring's (sparse) buffer table, so
//! reads and writes into it use READ_FIXED/WRITE_FIXED (and the vectored
//! fixed opcodes where the kernel has them) and the kernel does not pin the
//! pages per request.

use io_uring::{opcode, IoUring, Probe};

use crate::memory::{RamRegistrar, RegionChange, RegionView};
use crate::stats::QueueStats;

/// Entries in each ring's buffer table.
const FIXED_SLOTS: usize = 64;
/// The kernel's largest fixed buffer; bigger regions take several entries.
const MAX_FIXED_BUF: u64 = 1 << 30;

/// One ring's fixed-buffer table and the view of the registrar behind it.
pub(super) struct FixedBuffers {
    view: RegionView,
    used: [bool; FIXED_SLOTS],
    /// First table entry of each accepted region, by region id.
    first: Vec<Option<u16>>,
    /// The sparse table could be registered (kernel 5.19+).
    enabled: bool,
    /// The kernel has READV_FIXED/WRITEV_FIXED (6.15+).
    vectored: bool,
}

impl FixedBuffers {
    pub fn new(ring: &IoUring, registrar: &RamRegistrar) -> Self {
        let sub = ring.submitter();
        let enabled = sub.register_buffers_sparse(FIXED_SLOTS as u32).is_ok();
        let mut probe = Probe::new();
        let vectored = sub.register_probe(&mut probe).is_ok()
            && probe.is_supported(opcode::ReadvFixed::CODE)
            && probe.is_supported(opcode::WritevFixed::CODE);
        FixedBuffers {
            view: RegionView::new(registrar),
            used: [false; FIXED_SLOTS],
            first: Vec::new(),
            enabled,
            vectored,
        }
    }

    /// Follows the registrar: registers added regions, unregisters removed
    /// ones. One atomic load when nothing changed.
    pub fn sync(&mut self, ring: &IoUring, stats: &QueueStats) {
        if !self.enabled {
            return;
        }
        let FixedBuffers {
            view, used, first, ..
        } = self;
        view.sync(&mut |change| match change {
            RegionChange::Added(id, r) => {
                let chunks = r.len.div_ceil(MAX_FIXED_BUF) as usize;
                let ok = register(ring, used, r.host_addr, r.len, chunks).map(|slot| {
                    if first.len() <= id as usize {
                        first.resize(id as usize + 1, None);
                    }
                    first[id as usize] = Some(slot);
                });
                if ok.is_none() {
                    stats.count_region_map_failure();
                }
                ok.is_some()
            }
            RegionChange::Removed(id, r) => {
                if let Some(slot) = first.get_mut(id as usize).and_then(Option::take) {
                    let chunks = r.len.div_ceil(MAX_FIXED_BUF) as usize;
                    unregister(ring, used, slot, chunks);
                }
                true
            }
        });
    }

    /// The table entry that holds all of `iovecs`, if there is one and the
    /// kernel can use it for this many segments.
    pub fn lookup(&self, iovecs: &[libc::iovec]) -> Option<u16> {
        if iovecs.len() > 1 && !self.vectored {
            return None;
        }
        let (id, r) = self.view.lookup(iovecs)?;
        let first = (*self.first.get(id as usize)?)?;
        let chunk_of = |v: &libc::iovec| {
            let start = (v.iov_base as u64 - r.host_addr) / MAX_FIXED_BUF;
            let end = (v.iov_base as u64 + v.iov_len as u64 - 1 - r.host_addr) / MAX_FIXED_BUF;
            (start == end).then_some(start)
        };
        let chunk = chunk_of(&iovecs[0])?;
        if iovecs[1..].iter().any(|v| chunk_of(v) != Some(chunk)) {
            return None;
        }
        Some(first + chunk as u16)
    }
}

/// Registers `len` bytes at `addr` as `chunks` consecutive table entries.
fn register(
    ring: &IoUring,
    used: &mut [bool; FIXED_SLOTS],
    addr: u64,
    len: u64,
    chunks: usize,
) -> Option<u16> {
    let start =
        (0..=FIXED_SLOTS.checked_sub(chunks)?).find(|&s| used[s..s + chunks].iter().all(|u| !u))?;
    let iovecs: Vec<libc::iovec> = (0..chunks as u64)
        .map(|i| libc::iovec {
            iov_base: (addr + i * MAX_FIXED_BUF) as *mut libc::c_void,
            iov_len: (len - i * MAX_FIXED_BUF).min(MAX_FIXED_BUF) as usize,
        })
        .collect();
    // SAFETY: the kernel pins the pages of these ranges (it fails if they
    // are not mapped) and only accesses them for requests we submit with
    // this buffer index, whose buffers are valid by the request contract.
    unsafe {
        ring.submitter()
            .register_buffers_update(start as u32, &iovecs, None)
    }
    .ok()?;
    used[start..start + chunks]
        .iter_mut()
        .for_each(|u| *u = true);
    Some(start as u16)
}

/// Empties `chunks` table entries from `slot` (in-flight requests keep
/// their own reference to the pages until they complete).
fn unregister(ring: &IoUring, used: &mut [bool; FIXED_SLOTS], slot: u16, chunks: usize) {
    let empty = vec![
        libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        };
        chunks
    ];
    // SAFETY: empty entries reference no memory.
    let _ = unsafe {
        ring.submitter()
            .register_buffers_update(u32::from(slot), &empty, None)
    };
    let s = slot as usize;
    used[s..s + chunks].iter_mut().for_each(|u| *u = false);
}
