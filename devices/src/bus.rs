//! Address buses and what a device needs from the VM, so transports and
//! legacy devices live here without depending on KVM.
//!
//! The VMM owns one MMIO bus and one PIO bus. A vCPU thread that exits on
//! an access looks the address up and calls the device with the offset
//! into its range. Queue notifications never come this way: they are
//! ioeventfds that KVM signals straight to the device's IOThread.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

/// A device reachable by guest loads and stores on a bus.
pub trait BusDevice: Send {
    /// A guest read of `data.len()` bytes at `offset` into the device's range.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// A guest write of `data` at `offset` into the device's range.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Why a device could not be placed on a bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The range is empty or wraps around.
    #[error("bus range {base:#x}+{len:#x} is empty or wraps")]
    BadRange {
        /// Start of the range.
        base: u64,
        /// Length of the range.
        len: u64,
    },
    /// The range overlaps one already on the bus.
    #[error("bus range {base:#x}+{len:#x} overlaps another device")]
    Overlap {
        /// Start of the range.
        base: u64,
        /// Length of the range.
        len: u64,
    },
}

type Shared = Arc<Mutex<dyn BusDevice>>;

/// Non-overlapping address ranges, each served by one device.
#[derive(Default, Clone)]
pub struct Bus {
    ranges: BTreeMap<u64, (u64, Shared)>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `dev` at `[base, base + len)`.
    pub fn insert(&mut self, base: u64, len: u64, dev: Shared) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::BadRange { base, len })?;
        let before = self.ranges.range(..end).next_back();
        if let Some((&b, &(l, _))) = before {
            if b + l > base {
                return Err(BusError::Overlap { base, len });
            }
        }
        self.ranges.insert(base, (len, dev));
        Ok(())
    }

    /// Removes the device placed at `base`.
    pub fn remove(&mut self, base: u64) -> Option<Shared> {
        self.ranges.remove(&base).map(|(_, d)| d)
    }

    fn find(&self, addr: u64, size: usize) -> Option<(u64, &Shared)> {
        let (&base, (len, dev)) = self.ranges.range(..=addr).next_back()?;
        let off = addr - base;
        (off.checked_add(size as u64)? <= *len).then_some((off, dev))
    }

    /// Dispatches a read. Returns false when no device covers the access.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((off, dev)) => {
                dev.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .read(off, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write. Returns false when no device covers the access.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((off, dev)) => {
                dev.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .write(off, data);
                true
            }
            None => false,
        }
    }
}

/// An MSI message as the guest programs it into an MSI-X table entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsiMessage {
    /// Message address (low 32 bits and high 32 bits).
    pub address: u64,
    /// Message data.
    pub data: u32,
}

/// What devices ask of the VM: doorbells that KVM turns into eventfd
/// signals, and interrupts that eventfds raise. The VMM implements it on
/// top of KVM (ioeventfd, irqfd, GSI routing); tests implement it with
/// plain records.
pub trait VmHooks: Send + Sync {
    /// Signals `fd` on every guest write to the MMIO address `addr`
    /// (with `datamatch`, only 4-byte writes of that value, as Linux
    /// writes virtio-mmio QueueNotify).
    fn register_ioevent(&self, fd: &EventFd, addr: u64, datamatch: Option<u32>) -> io::Result<()>;
    /// Undoes [`VmHooks::register_ioevent`].
    fn unregister_ioevent(&self, fd: &EventFd, addr: u64, datamatch: Option<u32>)
        -> io::Result<()>;
    /// Raises interrupt `gsi` whenever `fd` is signalled.
    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> io::Result<()>;
    /// Undoes [`VmHooks::register_irqfd`].
    fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> io::Result<()>;
    /// Routes `gsi` to the MSI `msg`, or removes the route (`None`, masked
    /// vector). `gsi` comes from [`VmHooks::allocate_gsi`].
    fn set_msi_route(&self, gsi: u32, msg: Option<MsiMessage>) -> io::Result<()>;
    /// A GSI for an MSI route that no other device uses.
    fn allocate_gsi(&self) -> io::Result<u32>;
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Reg(Vec<u8>);
    impl BusDevice for Reg {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            let o = offset as usize;
            data.copy_from_slice(&self.0[o..o + data.len()]);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            let o = offset as usize;
            self.0[o..o + data.len()].copy_from_slice(data);
        }
    }

    #[test]
    fn ranges_dispatch_and_refuse_overlap() {
        let mut bus = Bus::new();
        bus.insert(0x1000, 0x10, Arc::new(Mutex::new(Reg(vec![0; 16]))))
            .unwrap();
        bus.insert(0x1010, 0x10, Arc::new(Mutex::new(Reg(vec![0; 16]))))
            .unwrap();
        assert!(matches!(
            bus.insert(0x100f, 2, Arc::new(Mutex::new(Reg(vec![0; 2])))),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(0x0ff0, 0x11, Arc::new(Mutex::new(Reg(vec![0; 17])))),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(u64::MAX, 2, Arc::new(Mutex::new(Reg(vec![0; 2])))),
            Err(BusError::BadRange { .. })
        ));
        assert!(bus.write(0x1012, &[7, 8]));
        let mut b = [0u8; 2];
        assert!(bus.read(0x1012, &mut b));
        assert_eq!(b, [7, 8]);
        // An access that runs past the end of a range reaches nobody.
        assert!(!bus.read(0x101f, &mut b));
        assert!(!bus.read(0x2000, &mut b));
        assert!(bus.remove(0x1010).is_some());
        assert!(!bus.read(0x1012, &mut b));
    }
}
