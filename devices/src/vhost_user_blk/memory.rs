//! A vhost-user frontend's memory table: its regions mapped from the fds
//! it sent, registered with the RAM registrar (so nodes can use them as
//! fixed buffers or mapped regions), and the current generation as one
//! `GuestMem` the queue workers hold by value.
//!
//! A change (SET_MEM_TABLE, ADD_MEM_REG, REM_MEM_REG) builds the new
//! generation first and commits it only if it makes sense (regions that
//! neither overlap nor overflow); a refused table leaves the previous one
//! in place, except SET_MEM_TABLE, which replaces it or leaves none.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use block::{MemoryRegion, RamRegistrar, RegionId};
use vhost::vhost_user::message::VhostUserMemoryRegion;
use vhost::vhost_user::{Error as VuError, Result as VuResult};
use vm_memory::{GuestAddress, GuestMemoryRegion, GuestRegionMmap};

use super::session::invalid;
use crate::virtio_blk::GuestMem;

/// Memory slots offered with CONFIGURE_MEM_SLOTS (the kernel's vhost limit).
pub(super) const MAX_MEM_SLOTS: u64 = 509;

/// One region of the frontend's memory table, registered with the RAM
/// registrar for as long as it lives.
struct Region {
    mmap: Arc<GuestRegionMmap<()>>,
    /// The frontend's address of the region (vring addresses use it).
    user_addr: u64,
    registered: RegionId,
    registrar: RamRegistrar,
}

impl Drop for Region {
    fn drop(&mut self) {
        self.registrar.remove(self.registered);
    }
}

/// The frontend's memory, as one session sees it.
pub(super) struct FrontendMemory {
    registrar: RamRegistrar,
    /// Sorted by guest address.
    regions: Vec<Region>,
    current: Option<Arc<GuestMem>>,
}

impl FrontendMemory {
    pub(super) fn new(registrar: RamRegistrar) -> Self {
        FrontendMemory {
            registrar,
            regions: Vec::new(),
            current: None,
        }
    }

    /// The current generation (none before a memory table).
    pub(super) fn current(&self) -> Option<&Arc<GuestMem>> {
        self.current.as_ref()
    }

    /// The guest address of a frontend address.
    pub(super) fn to_gpa(&self, user: u64) -> Option<u64> {
        self.regions.iter().find_map(|r| {
            let off = user.checked_sub(r.user_addr)?;
            (off < r.mmap.len()).then(|| r.mmap.start_addr().0 + off)
        })
    }

    /// SET_MEM_TABLE: the table becomes `ctx`; if it is refused there is
    /// no memory until the frontend sends one that makes sense.
    pub(super) fn replace(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
    ) -> VuResult<()> {
        let mapped: VuResult<Vec<Region>> = ctx
            .iter()
            .zip(files)
            .map(|(r, file)| self.map(r, file))
            .collect();
        self.clear();
        self.commit(mapped?)
    }

    /// ADD_MEM_REG; a refused region leaves the table as it was.
    pub(super) fn add(&mut self, r: &VhostUserMemoryRegion, file: File) -> VuResult<()> {
        if self.regions.len() as u64 >= MAX_MEM_SLOTS {
            return Err(invalid("no memory slot left"));
        }
        let new = self.map(r, file)?;
        let id = new.registered;
        let mut regions = std::mem::take(&mut self.regions);
        regions.push(new);
        match build(&mut regions) {
            Ok(mem) => self.current = Some(Arc::new(mem)),
            Err(e) => {
                // The new region is the one that does not fit: forget it,
                // keep the generation that was.
                regions.retain(|x| x.registered != id);
                self.regions = regions;
                return Err(e);
            }
        }
        self.regions = regions;
        Ok(())
    }

    /// REM_MEM_REG.
    pub(super) fn remove(&mut self, gpa: u64, size: u64) -> VuResult<()> {
        let i = self
            .regions
            .iter()
            .position(|r| r.mmap.start_addr() == GuestAddress(gpa) && r.mmap.len() == size)
            .ok_or_else(|| invalid("no such memory region"))?;
        self.regions.remove(i);
        let regions = std::mem::take(&mut self.regions);
        self.current = None;
        self.commit(regions)
    }

    /// Forgets every region (the registrar lets go of them too).
    pub(super) fn clear(&mut self) {
        self.regions.clear();
        self.current = None;
    }

    /// Makes `regions` the table, or clears it if they do not fit together.
    fn commit(&mut self, mut regions: Vec<Region>) -> VuResult<()> {
        if regions.is_empty() {
            return Ok(());
        }
        // Regions that do not fit together are dropped (unregistered).
        let mem = build(&mut regions)?;
        self.regions = regions;
        self.current = Some(Arc::new(mem));
        Ok(())
    }

    fn map(&self, r: &VhostUserMemoryRegion, file: File) -> VuResult<Region> {
        // A mapping past the end of its file faults (SIGBUS) on the first
        // access, and the first is the vring check of SET_VRING_ENABLE:
        // the frontend's file must hold the whole region. (Frontends send
        // memfds, shm or hugetlbfs files: regular files.)
        let meta = file.metadata().map_err(VuError::ReqHandlerError)?;
        let end = r.mmap_offset.checked_add(r.memory_size);
        if !meta.is_file() || end.is_none_or(|end| end > meta.len()) {
            return Err(invalid(
                "a memory region reaches beyond the end of its file",
            ));
        }
        let fd = Arc::new(OwnedFd::from(
            file.try_clone().map_err(VuError::ReqHandlerError)?,
        ));
        let mmap = GuestRegionMmap::new(r.mmap_region(file)?, GuestAddress(r.guest_phys_addr))
            .ok_or_else(|| invalid("a memory region overflows the guest address space"))?;
        let registered = self.registrar.add(MemoryRegion {
            host_addr: mmap.as_ptr() as u64,
            len: mmap.len(),
            fd: Some(fd),
            fd_offset: r.mmap_offset,
        });
        Ok(Region {
            mmap: Arc::new(mmap),
            user_addr: r.user_addr,
            registered,
            registrar: self.registrar.clone(),
        })
    }
}

/// One generation of guest memory from `regions` (sorted here).
fn build(regions: &mut [Region]) -> VuResult<GuestMem> {
    regions.sort_by_key(|r| r.mmap.start_addr());
    let all = regions.iter().map(|r| r.mmap.clone()).collect();
    GuestMem::from_arc_regions(all).map_err(|e| VuError::ReqHandlerError(std::io::Error::other(e)))
}
