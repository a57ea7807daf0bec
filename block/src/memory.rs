//! The RAM registrar: the one place that knows which host memory requests
//! may point into (guest RAM, a benchmark's buffers), so that drivers can
//! register it once (io_uring fixed buffers, libblkio memory regions,
//! vhost-user memory tables) instead of pinning or mapping per request.
//!
//! The registrar is shared by the control plane. Each data-plane queue
//! keeps a [`RegionView`], its own copy of the region table, and syncs it
//! when the registrar's generation counter moves: one atomic load per sync
//! when nothing changed, and the lock is taken only when something did. The
//! queue's driver registers added regions and unregisters removed ones on
//! its own thread, so a ring or libblkio queue is never touched from
//! another thread. Lookups walk the view, with no lock and no allocation.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A region of this process's memory that requests may use.
#[derive(Clone, Debug)]
pub struct MemoryRegion {
    /// Start address in this process.
    pub host_addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// The memfd behind the region, for drivers that map it elsewhere
    /// (vhost-user backends).
    pub fd: Option<Arc<OwnedFd>>,
    /// Offset of the region in `fd`.
    pub fd_offset: u64,
}

impl MemoryRegion {
    fn end(&self) -> u64 {
        self.host_addr.saturating_add(self.len)
    }
}

/// A small integer naming a region while it is registered (ids are reused).
pub type RegionId = u32;

/// A registered region and the serial number of its registration: a
/// region removed and added again between two syncs (even at the same
/// address, with the same id) is a new registration that drivers must
/// map anew, so views compare serials, never contents.
#[derive(Default)]
struct Table {
    slots: Vec<Option<(u64, MemoryRegion)>>,
    next_serial: u64,
}

struct RegistrarInner {
    generation: AtomicU64,
    table: Mutex<Table>,
}

/// The registrar: add and remove regions; every queue's view follows.
#[derive(Clone)]
pub struct RamRegistrar {
    inner: Arc<RegistrarInner>,
}

impl Default for RamRegistrar {
    fn default() -> Self {
        Self::new()
    }
}

impl RamRegistrar {
    /// An empty registrar.
    pub fn new() -> Self {
        RamRegistrar {
            inner: Arc::new(RegistrarInner {
                generation: AtomicU64::new(0),
                table: Mutex::new(Table::default()),
            }),
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.inner.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a region; every queue picks it up at its next sync.
    pub fn add(&self, region: MemoryRegion) -> RegionId {
        let mut t = self.table();
        let id = match t.slots.iter().position(Option::is_none) {
            Some(i) => i,
            None => {
                t.slots.push(None);
                t.slots.len() - 1
            }
        };
        t.next_serial += 1;
        let serial = t.next_serial;
        t.slots[id] = Some((serial, region));
        self.inner.generation.fetch_add(1, Ordering::Release);
        id as RegionId
    }

    /// Unregisters a region. Requests already submitted keep working: a
    /// driver holds its own reference until they complete.
    pub fn remove(&self, id: RegionId) -> Option<MemoryRegion> {
        let mut t = self.table();
        let r = t
            .slots
            .get_mut(id as usize)
            .and_then(Option::take)
            .map(|(_, r)| r);
        if r.is_some() {
            self.inner.generation.fetch_add(1, Ordering::Release);
        }
        r
    }

    /// Every registered region.
    pub fn regions(&self) -> Vec<(RegionId, MemoryRegion)> {
        self.table()
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, r)| r.clone().map(|(_, r)| (i as RegionId, r)))
            .collect()
    }

    /// Every registration: id, serial and region.
    fn snapshot(&self) -> Vec<(RegionId, u64, MemoryRegion)> {
        self.table()
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, r)| r.clone().map(|(serial, r)| (i as RegionId, serial, r)))
            .collect()
    }
}

/// A change a queue's driver applies to its own registration.
pub enum RegionChange<'a> {
    /// Register this region (return whether the driver could).
    Added(RegionId, &'a MemoryRegion),
    /// Unregister this region.
    Removed(RegionId, &'a MemoryRegion),
}

struct ViewEntry {
    id: RegionId,
    serial: u64,
    region: MemoryRegion,
    accepted: bool,
}

/// One queue's copy of the registrar's table.
pub struct RegionView {
    registrar: RamRegistrar,
    generation: u64,
    entries: Vec<ViewEntry>,
}

impl RegionView {
    /// A view that has seen nothing yet (the first sync adds every region).
    pub fn new(registrar: &RamRegistrar) -> Self {
        RegionView {
            registrar: registrar.clone(),
            generation: u64::MAX,
            entries: Vec::new(),
        }
    }

    /// Brings the view up to date, calling `apply` for every change since
    /// the last sync, removals first. `apply` returns whether the driver
    /// accepted an added region; lookups only return accepted regions.
    pub fn sync(&mut self, apply: &mut dyn FnMut(RegionChange<'_>) -> bool) {
        let generation = self.registrar.inner.generation.load(Ordering::Acquire);
        if generation == self.generation {
            return;
        }
        let current = self.registrar.snapshot();
        let mut kept = Vec::with_capacity(current.len());
        for e in self.entries.drain(..) {
            let still = current.iter().any(|(_, serial, _)| *serial == e.serial);
            if still {
                kept.push(e);
            } else if e.accepted {
                apply(RegionChange::Removed(e.id, &e.region));
            }
        }
        for (id, serial, region) in current {
            if kept.iter().any(|e| e.serial == serial) {
                continue;
            }
            let accepted = apply(RegionChange::Added(id, &region));
            kept.push(ViewEntry {
                id,
                serial,
                region,
                accepted,
            });
        }
        self.entries = kept;
        self.generation = generation;
    }

    /// The accepted region holding every byte of `iovecs`, and the region.
    pub fn lookup(&self, iovecs: &[libc::iovec]) -> Option<(RegionId, &MemoryRegion)> {
        let first = iovecs.first()?;
        let e = self.find(first)?;
        iovecs[1..]
            .iter()
            .all(|v| contains(&e.region, v))
            .then_some((e.id, &e.region))
    }

    fn find(&self, v: &libc::iovec) -> Option<&ViewEntry> {
        self.entries
            .iter()
            .find(|e| e.accepted && contains(&e.region, v))
    }

    /// Forgets everything, calling `apply` to unregister accepted regions.
    pub fn clear(&mut self, apply: &mut dyn FnMut(RegionChange<'_>) -> bool) {
        for e in self.entries.drain(..) {
            if e.accepted {
                apply(RegionChange::Removed(e.id, &e.region));
            }
        }
        self.generation = u64::MAX;
    }
}

fn contains(r: &MemoryRegion, v: &libc::iovec) -> bool {
    let start = v.iov_base as u64;
    start >= r.host_addr && start.saturating_add(v.iov_len as u64) <= r.end()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(addr: u64, len: u64) -> MemoryRegion {
        MemoryRegion {
            host_addr: addr,
            len,
            fd: None,
            fd_offset: 0,
        }
    }

    fn iov(addr: u64, len: usize) -> libc::iovec {
        libc::iovec {
            iov_base: addr as *mut libc::c_void,
            iov_len: len,
        }
    }

    #[test]
    fn view_follows_adds_and_removes_with_removals_first() {
        let reg = RamRegistrar::new();
        let a = reg.add(region(0x1000, 0x1000));
        let mut view = RegionView::new(&reg);
        let mut log = Vec::new();
        let mut apply = |c: RegionChange<'_>| {
            log.push(match c {
                RegionChange::Added(id, _) => format!("+{id}"),
                RegionChange::Removed(id, _) => format!("-{id}"),
            });
            true
        };
        view.sync(&mut apply);
        reg.remove(a);
        let b = reg.add(region(0x8000, 0x1000));
        view.sync(&mut apply);
        view.sync(&mut apply);
        assert_eq!(log, vec!["+0", "-0", format!("+{b}").as_str()]);
    }

    #[test]
    fn lookup_needs_every_iovec_inside_one_accepted_region() {
        let reg = RamRegistrar::new();
        reg.add(region(0x1000, 0x1000));
        reg.add(region(0x2000, 0x1000));
        let rejected = reg.add(region(0x9000, 0x1000));
        let mut view = RegionView::new(&reg);
        view.sync(&mut |c| !matches!(c, RegionChange::Added(id, _) if id == rejected));
        assert_eq!(view.lookup(&[iov(0x1000, 0x1000)]).map(|r| r.0), Some(0));
        assert!(
            view.lookup(&[iov(0x1800, 0x1000)]).is_none(),
            "crosses regions"
        );
        assert!(view.lookup(&[iov(0x1000, 16), iov(0x2000, 16)]).is_none());
        assert!(view.lookup(&[iov(0x9000, 16)]).is_none(), "rejected region");
        assert!(view.lookup(&[iov(0x5000, 16)]).is_none());
    }

    #[test]
    fn remove_and_add_again_between_syncs_is_seen() {
        let reg = RamRegistrar::new();
        let a = reg.add(region(0x1000, 0x1000));
        let mut view = RegionView::new(&reg);
        view.sync(&mut |_| true);
        reg.remove(a);
        let b = reg.add(region(0x1000, 0x1000));
        assert_eq!(a, b, "the id is reused");
        let mut log = Vec::new();
        view.sync(&mut |c| {
            log.push(matches!(c, RegionChange::Added(..)));
            true
        });
        assert_eq!(log, vec![false, true], "unmapped, then mapped again");
    }

    #[test]
    fn unchanged_registrar_costs_no_callbacks() {
        let reg = RamRegistrar::new();
        reg.add(region(0x1000, 0x1000));
        let mut view = RegionView::new(&reg);
        let mut n = 0;
        view.sync(&mut |_| {
            n += 1;
            true
        });
        view.sync(&mut |_| {
            n += 1;
            true
        });
        assert_eq!(n, 1);
    }
}
