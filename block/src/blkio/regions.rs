//! One queue's view of registered memory, for drivers that can only reach
//! mapped memory (`needs-mem-regions`): the registrar's changes are applied
//! at submit time (one atomic load when nothing changed), added regions are
//! mapped through the node's [`Control`], and a removed region stays
//! mapped until the last request of this queue that uses it completes.

use std::sync::Arc;

use super::control::{Control, MapKey};
use crate::memory::{RamRegistrar, RegionChange, RegionId, RegionView};
use crate::stats::QueueStats;

struct Use {
    id: RegionId,
    key: MapKey,
    /// Requests of this queue whose buffers lie in the region.
    in_flight: u32,
    /// The registrar removed it; unmap when `in_flight` reaches zero.
    removed: bool,
}

/// The regions one queue maps, and how many of its requests use each.
pub(super) struct QueueRegions {
    view: RegionView,
    uses: Vec<Option<Use>>,
    ctl: Arc<Control>,
}

impl QueueRegions {
    pub fn new(registrar: &RamRegistrar, ctl: Arc<Control>) -> Self {
        QueueRegions {
            view: RegionView::new(registrar),
            uses: Vec::new(),
            ctl,
        }
    }

    /// Applies the registrar's changes; a region the device refuses is
    /// counted in `stats` and never used (its requests bounce).
    pub fn sync(&mut self, stats: &QueueStats) {
        let QueueRegions { view, uses, ctl } = self;
        view.sync(&mut |change| match change {
            RegionChange::Added(id, region) => match ctl.map(region) {
                Ok(key) => {
                    let u = Some(Use {
                        id,
                        key,
                        in_flight: 0,
                        removed: false,
                    });
                    match uses.iter().position(Option::is_none) {
                        Some(i) => uses[i] = u,
                        None => uses.push(u),
                    }
                    true
                }
                Err(_) => {
                    stats.count_region_map_failure();
                    false
                }
            },
            RegionChange::Removed(id, _) => {
                let found = uses
                    .iter_mut()
                    .find(|u| u.as_ref().is_some_and(|u| u.id == id && !u.removed));
                if let Some(slot) = found {
                    match slot {
                        Some(u) if u.in_flight > 0 => u.removed = true,
                        Some(u) => {
                            ctl.unmap(u.key);
                            *slot = None;
                        }
                        None => {}
                    }
                }
                true
            }
        });
    }

    /// The mapped region holding every byte of `iovecs`, counted as used
    /// until [`QueueRegions::release`].
    pub fn acquire(&mut self, iovecs: &[libc::iovec]) -> Option<usize> {
        let (id, _) = self.view.lookup(iovecs)?;
        let i = self
            .uses
            .iter()
            .position(|u| u.as_ref().is_some_and(|u| u.id == id && !u.removed))?;
        if let Some(u) = &mut self.uses[i] {
            u.in_flight += 1;
        }
        Some(i)
    }

    /// A request that used region `i` completed.
    pub fn release(&mut self, i: usize) {
        let Some(slot) = self.uses.get_mut(i) else {
            return;
        };
        if let Some(u) = slot {
            u.in_flight = u.in_flight.saturating_sub(1);
            if u.removed && u.in_flight == 0 {
                self.ctl.unmap(u.key);
                *slot = None;
            }
        }
    }

    /// Lets go of every mapping (the queue is closing; nothing is in flight).
    pub fn clear(&mut self) {
        let QueueRegions { view, uses, ctl } = self;
        view.clear(&mut |_| true);
        for u in uses.drain(..).flatten() {
            ctl.unmap(u.key);
        }
    }
}
