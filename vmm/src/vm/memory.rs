//! Guest RAM: one memfd, mapped `MAP_SHARED` region by region, so that the
//! same pages can later be handed to a vhost-user backend (which maps the
//! memfd itself) and registered with the block layer (io_uring fixed
//! buffers). The mapping is a vm-memory `GuestMemoryMmap<()>`, the type the
//! devices use ([`devices::virtio_blk::GuestMem`]).

use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::Arc;

use block::memory::{MemoryRegion, RamRegistrar};
use devices::virtio_blk::GuestMem;
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap, MmapRegion,
};

use super::layout::RamRange;

/// Why guest RAM could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum GuestRamError {
    /// memfd_create or ftruncate failed.
    #[error("could not create the guest RAM memfd")]
    Memfd(#[source] std::io::Error),
    /// mmap of a region failed.
    #[error("could not map guest RAM at {0:#x}")]
    Mmap(u64, #[source] vm_memory::mmap::MmapRegionError),
    /// The regions do not form a valid guest memory.
    #[error("invalid guest RAM layout")]
    Layout(#[source] vm_memory::GuestRegionCollectionError),
    /// A region's guest range wraps around.
    #[error("guest RAM region at {0:#x} wraps around")]
    Wraps(u64),
    /// A region has no host mapping.
    #[error("guest RAM region at {0:#x} is not mapped")]
    Unmapped(u64),
    /// KVM refused a memory slot.
    #[error("KVM refused the guest RAM slot at {0:#x}")]
    Slot(u64, #[source] kvm_ioctls::Error),
}

/// Guest RAM and the memfd behind it.
pub struct GuestRam {
    /// The mapping the VMM and devices use.
    pub mem: Arc<GuestMem>,
    /// The memfd, shared with whoever maps guest RAM elsewhere.
    pub memfd: Arc<OwnedFd>,
    /// `(guest address, length, offset in the memfd)` of each region.
    pub regions: Vec<(u64, u64, u64)>,
}

fn memfd(size: u64) -> std::io::Result<File> {
    // SAFETY: the name is a NUL-terminated literal; the return value is
    // checked before use.
    let fd = unsafe { libc::memfd_create(c"blkvm-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)?;
    Ok(file)
}

impl GuestRam {
    /// Creates a memfd as large as all `ranges` and maps each range from
    /// its own offset in it, shared.
    pub fn new(ranges: &[RamRange]) -> Result<Self, GuestRamError> {
        let total = ranges.iter().map(|r| r.len).sum();
        let file = memfd(total).map_err(GuestRamError::Memfd)?;
        let memfd: OwnedFd = file.try_clone().map_err(GuestRamError::Memfd)?.into();
        let file = Arc::new(file);
        let mut offset = 0;
        let mut regions = Vec::new();
        let mut mmaps = Vec::new();
        for r in ranges {
            let fo = FileOffset::from_arc(file.clone(), offset);
            let mapping = MmapRegion::build(
                Some(fo),
                r.len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
            )
            .map_err(|e| GuestRamError::Mmap(r.start, e))?;
            let region = GuestRegionMmap::new(mapping, GuestAddress(r.start))
                .ok_or(GuestRamError::Wraps(r.start))?;
            mmaps.push(region);
            regions.push((r.start, r.len, offset));
            offset += r.len;
        }
        let mem = GuestMem::from_regions(mmaps).map_err(GuestRamError::Layout)?;
        Ok(GuestRam {
            mem: Arc::new(mem),
            memfd: Arc::new(memfd),
            regions,
        })
    }

    /// Gives every region to KVM as a memory slot (slot = region index).
    pub fn register_with_kvm(&self, vm: &VmFd) -> Result<(), GuestRamError> {
        for (slot, region) in self.mem.iter().enumerate() {
            let start = region.start_addr().0;
            let host = self
                .mem
                .get_host_address(region.start_addr())
                .map_err(|_| GuestRamError::Unmapped(start))?;
            let slot_desc = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: start,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the slot describes a live mapping of exactly
            // `memory_size` bytes owned by `self.mem`, which the VM keeps
            // for as long as the VM fd lives (both live until the process
            // exits); no other slot overlaps it.
            unsafe { vm.set_user_memory_region(slot_desc) }
                .map_err(|e| GuestRamError::Slot(start, e))?;
        }
        Ok(())
    }

    /// Hands every region to the block layer's RAM registrar, so nodes
    /// can register guest RAM (io_uring fixed buffers, vhost-user tables).
    pub fn register_with_block_layer(&self, registrar: &RamRegistrar) {
        for (region, &(_, len, off)) in self.mem.iter().zip(&self.regions) {
            let host = self
                .mem
                .get_host_address(region.start_addr())
                .map(|p| p as u64)
                .unwrap_or(0);
            registrar.add(MemoryRegion {
                host_addr: host,
                len,
                fd: Some(self.memfd.clone()),
                fd_offset: off,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::Bytes;

    use super::*;
    use crate::vm::layout::ram_ranges;

    #[test]
    fn regions_share_one_memfd_at_consecutive_offsets() {
        // 3 GiB + 64 MiB of address space costs nothing: MAP_NORESERVE
        // and a sparse memfd.
        let ram = GuestRam::new(&ram_ranges((3 << 30) + (64 << 20))).unwrap();
        assert_eq!(
            ram.regions,
            vec![(0, 3 << 30, 0), (1 << 32, 64 << 20, 3 << 30)]
        );
        // A write above 4 GiB lands in the memfd at offset 3 GiB.
        ram.mem
            .write_obj(0xabcd_u32, GuestAddress((1 << 32) + 8))
            .unwrap();
        let mut buf = [0u8; 4];
        let file = File::from(ram.memfd.try_clone().unwrap());
        use std::os::unix::fs::FileExt;
        file.read_exact_at(&mut buf, (3 << 30) + 8).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0xabcd);
        // Nothing maps the hole.
        assert!(ram.mem.write_obj(1u8, GuestAddress(0xfec0_0000)).is_err());
    }

    #[test]
    fn every_region_reaches_the_registrar_with_its_fd_offset() {
        let ram = GuestRam::new(&ram_ranges((3 << 30) + (4 << 20))).unwrap();
        let registrar = RamRegistrar::new();
        ram.register_with_block_layer(&registrar);
        let regions = registrar.regions();
        assert_eq!(regions.len(), 2);
        assert_eq!(regions[1].1.fd_offset, 3 << 30);
        assert_eq!(regions[1].1.len, 4 << 20);
        assert!(regions
            .iter()
            .all(|(_, r)| r.fd.is_some() && r.host_addr != 0));
    }
}
