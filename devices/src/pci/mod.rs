//! PCI for the VMM: one segment with bus 0 only, a host bridge at 00.0,
//! and devices in the other slots, with configuration space reachable
//! through ECAM ([`PciEcam`], an MMIO window) and the legacy 0xCF8/0xCFC
//! ports ([`PciConfigIo`]). Absent functions read as all ones.
//!
//! Devices own one memory BAR each. When the guest moves or (un)maps it
//! (BAR writes, the command register's memory enable), the config write
//! yields a [`BarReprogram`] that the segment queues; the VMM takes them
//! after the exit ([`PciSegment::take_bar_reprograms`]) and moves the
//! device's range on its MMIO bus ([`PciSegment::apply_bar_reprograms`]).
//! The device itself has already moved its doorbell ioeventfds.

pub mod msix;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::bus::{Bus, BusDevice, BusError};

/// Slots on bus 0.
pub const SLOTS: usize = 32;
/// Bytes of configuration space per function under ECAM.
pub const CONFIG_SPACE_LEN: usize = 4096;
/// Bytes of the ECAM window for bus 0.
pub const ECAM_BUS0_LEN: u64 = 1 << 20;
/// Offset of the first capability we place.
pub const CAP_START: usize = 0x40;

/// Standard header offsets.
pub mod hdr {
    /// Vendor id.
    pub const VENDOR: usize = 0x00;
    /// Device id.
    pub const DEVICE: usize = 0x02;
    /// Command register.
    pub const COMMAND: usize = 0x04;
    /// Status register.
    pub const STATUS: usize = 0x06;
    /// Revision id (class code follows).
    pub const REVISION: usize = 0x08;
    /// Header type.
    pub const HEADER_TYPE: usize = 0x0e;
    /// BAR0.
    pub const BAR0: usize = 0x10;
    /// Subsystem vendor id.
    pub const SUBSYS_VENDOR: usize = 0x2c;
    /// Subsystem id.
    pub const SUBSYS_ID: usize = 0x2e;
    /// Capabilities pointer.
    pub const CAP_PTR: usize = 0x34;
    /// Interrupt line.
    pub const INT_LINE: usize = 0x3c;
    /// Interrupt pin.
    pub const INT_PIN: usize = 0x3d;
}

/// Command register: memory space decoding.
pub const CMD_MEMORY: u16 = 1 << 1;
/// Command register: bus master.
pub const CMD_BUS_MASTER: u16 = 1 << 2;
/// Command register: INTx disable.
pub const CMD_INTX_DISABLE: u16 = 1 << 10;
/// Status register: a capability list is present.
pub const STATUS_CAP_LIST: u16 = 1 << 4;

/// A change to where a device's memory BAR decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarChange {
    /// Where it decoded before (`None`: nowhere).
    pub old: Option<u64>,
    /// Where it decodes now (`None`: nowhere).
    pub new: Option<u64>,
    /// The BAR's size.
    pub len: u64,
}

/// A PCI function's configuration space.
pub trait PciDevice: Send {
    /// Reads `data.len()` (1, 2 or 4) bytes at `offset` (< 4096, aligned).
    fn config_read(&mut self, offset: usize, data: &mut [u8]);
    /// Writes at `offset`; returns how the memory BAR moved, if it did.
    fn config_write(&mut self, offset: usize, data: &[u8]) -> Option<BarChange>;
    /// Where the memory BAR decodes now, and its size.
    fn bar_mapping(&self) -> Option<(u64, u64)> {
        None
    }
}

/// 256 bytes of conventional configuration space with a per-byte write
/// mask; the extended space (256..4096) reads as zero (no extended
/// capabilities).
#[derive(Clone)]
pub struct ConfigSpace {
    bytes: [u8; 256],
    wmask: [u8; 256],
}

impl Default for ConfigSpace {
    fn default() -> Self {
        ConfigSpace {
            bytes: [0; 256],
            wmask: [0; 256],
        }
    }
}

impl ConfigSpace {
    /// A type-0 header: ids, class (`class << 8 | subclass`, prog-if 0),
    /// revision; command bits the guest may set are memory, bus master and
    /// INTx disable; the interrupt line is a scratch byte.
    pub fn type0(vendor: u16, device: u16, class: u16, revision: u8) -> Self {
        let mut c = ConfigSpace::default();
        c.set_u16(hdr::VENDOR, vendor);
        c.set_u16(hdr::DEVICE, device);
        c.bytes[hdr::REVISION] = revision;
        c.set_u16(hdr::REVISION + 2, class);
        let cmd = CMD_MEMORY | CMD_BUS_MASTER | CMD_INTX_DISABLE;
        c.wmask[hdr::COMMAND..hdr::COMMAND + 2].copy_from_slice(&cmd.to_le_bytes());
        c.wmask[hdr::INT_LINE] = 0xff;
        c
    }

    /// Reads, zero outside the 256 bytes.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.bytes.get(offset + i).copied().unwrap_or(0);
        }
    }

    /// Writes through the mask; bytes past 256 are dropped.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            let o = offset + i;
            if o < 256 {
                let m = self.wmask[o];
                self.bytes[o] = (self.bytes[o] & !m) | (b & m);
            }
        }
    }

    /// A little-endian u16 at `o`.
    pub fn u16(&self, o: usize) -> u16 {
        u16::from_le_bytes([self.bytes[o], self.bytes[o + 1]])
    }

    /// A little-endian u32 at `o`.
    pub fn u32(&self, o: usize) -> u32 {
        u32::from_le_bytes(self.bytes[o..o + 4].try_into().unwrap_or_default())
    }

    /// Sets a byte (ignoring the mask).
    pub fn set_u8(&mut self, o: usize, v: u8) {
        self.bytes[o] = v;
    }

    /// Sets a u16 (ignoring the mask).
    pub fn set_u16(&mut self, o: usize, v: u16) {
        self.bytes[o..o + 2].copy_from_slice(&v.to_le_bytes());
    }

    /// Sets a u32 (ignoring the mask).
    pub fn set_u32(&mut self, o: usize, v: u32) {
        self.bytes[o..o + 4].copy_from_slice(&v.to_le_bytes());
    }

    /// Makes `len` bytes at `o` writable under `mask` (same mask each byte).
    pub fn set_writable(&mut self, o: usize, len: usize, mask: u8) {
        self.wmask[o..o + len].fill(mask);
    }

    /// Appends a capability `body` (whose first byte is the capability id)
    /// at `at`, linking it after `prev` (0: the header's pointer). Returns
    /// the offset after it, 4-byte aligned.
    pub fn add_capability(&mut self, at: usize, prev: usize, body: &[u8]) -> usize {
        self.bytes[at..at + body.len()].copy_from_slice(body);
        self.bytes[at + 1] = 0;
        if prev == 0 {
            self.bytes[hdr::CAP_PTR] = at as u8;
            let s = self.u16(hdr::STATUS) | STATUS_CAP_LIST;
            self.set_u16(hdr::STATUS, s);
        } else {
            self.bytes[prev + 1] = at as u8;
        }
        (at + body.len()).next_multiple_of(4)
    }
}

/// The host bridge at 00.0.
pub struct HostBridge {
    config: ConfigSpace,
}

/// Host bridge vendor (Intel) and device id (as Cloud Hypervisor's root).
pub const HOST_BRIDGE_IDS: (u16, u16) = (0x8086, 0x0d57);

impl Default for HostBridge {
    fn default() -> Self {
        // Class 06 (bridge), subclass 00 (host bridge).
        let mut config = ConfigSpace::type0(HOST_BRIDGE_IDS.0, HOST_BRIDGE_IDS.1, 0x0600, 0);
        config.set_u16(hdr::SUBSYS_VENDOR, HOST_BRIDGE_IDS.0);
        HostBridge { config }
    }
}

impl PciDevice for HostBridge {
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        self.config.read(offset, data);
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) -> Option<BarChange> {
        self.config.write(offset, data);
        None
    }
}

/// Why a device could not join the segment.
#[derive(Debug, thiserror::Error)]
pub enum PciError {
    /// All 31 device slots are taken.
    #[error("no free PCI slot on bus 0")]
    NoSlot,
}

/// A BAR move for the VMM to apply to its MMIO bus.
pub struct BarReprogram {
    /// The change.
    pub change: BarChange,
    /// The device serving the BAR.
    pub device: Arc<Mutex<dyn BusDevice>>,
}

struct Slot {
    config: Arc<Mutex<dyn PciDevice>>,
    bar: Option<Arc<Mutex<dyn BusDevice>>>,
}

struct Inner {
    slots: Mutex<Vec<Option<Slot>>>,
    window: Mutex<(u64, u64)>,
    pending: Mutex<Vec<BarReprogram>>,
    has_pending: AtomicBool,
}

/// PCI segment 0, bus 0.
#[derive(Clone)]
pub struct PciSegment {
    inner: Arc<Inner>,
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl PciSegment {
    /// A segment with a host bridge at 00.0, assigning BARs from the MMIO
    /// window `[base, base + len)`.
    pub fn new(bar_window_base: u64, bar_window_len: u64) -> Self {
        let mut slots: Vec<Option<Slot>> = (0..SLOTS).map(|_| None).collect();
        slots[0] = Some(Slot {
            config: Arc::new(Mutex::new(HostBridge::default())),
            bar: None,
        });
        PciSegment {
            inner: Arc::new(Inner {
                slots: Mutex::new(slots),
                window: Mutex::new((
                    bar_window_base,
                    bar_window_base.saturating_add(bar_window_len),
                )),
                pending: Mutex::new(Vec::new()),
                has_pending: AtomicBool::new(false),
            }),
        }
    }

    /// A naturally aligned BAR base of `size` (a power of two) from the
    /// window, or `None` when it is used up.
    pub fn allocate_bar(&self, size: u64) -> Option<u64> {
        if !size.is_power_of_two() {
            return None;
        }
        let mut w = lock(&self.inner.window);
        let base = w.0.checked_next_multiple_of(size)?;
        let end = base.checked_add(size)?;
        if end > w.1 {
            return None;
        }
        w.0 = end;
        Some(base)
    }

    /// Puts `dev` in the first free slot and returns its slot number; the
    /// same object serves its BAR on the MMIO bus (the VMM inserts it at
    /// [`PciDevice::bar_mapping`]).
    pub fn add_device<T: PciDevice + BusDevice + 'static>(
        &self,
        dev: Arc<Mutex<T>>,
    ) -> Result<u8, PciError> {
        let mut slots = lock(&self.inner.slots);
        let (i, s) = slots
            .iter_mut()
            .enumerate()
            .find(|(_, s)| s.is_none())
            .ok_or(PciError::NoSlot)?;
        *s = Some(Slot {
            config: dev.clone(),
            bar: Some(dev),
        });
        Ok(i as u8)
    }

    /// The ECAM window's bus device (place it at the ECAM base, length
    /// [`ECAM_BUS0_LEN`] or more; other buses read all ones).
    pub fn ecam(&self) -> PciEcam {
        PciEcam {
            segment: self.clone(),
        }
    }

    /// The bus device for PIO ports 0xcf8..0xd00.
    pub fn config_io(&self) -> PciConfigIo {
        PciConfigIo {
            segment: self.clone(),
            address: 0,
        }
    }

    /// Whether BAR moves wait to be applied (a cheap check after each exit).
    pub fn has_bar_reprograms(&self) -> bool {
        self.inner.has_pending.load(Ordering::Acquire)
    }

    /// Takes the BAR moves queued by config writes, oldest first.
    pub fn take_bar_reprograms(&self) -> Vec<BarReprogram> {
        if !self.inner.has_pending.swap(false, Ordering::AcqRel) {
            return Vec::new();
        }
        std::mem::take(&mut *lock(&self.inner.pending))
    }

    /// Applies the queued BAR moves to `bus`: removes each old range and
    /// inserts the device at the new one.
    pub fn apply_bar_reprograms(&self, bus: &mut Bus) -> Result<(), BusError> {
        for r in self.take_bar_reprograms() {
            if let Some(old) = r.change.old {
                bus.remove(old);
            }
            if let Some(new) = r.change.new {
                bus.insert(new, r.change.len, r.device)?;
            }
        }
        Ok(())
    }

    fn device(&self, bus: u8, dev: u8, func: u8) -> Option<Arc<Mutex<dyn PciDevice>>> {
        if bus != 0 || func != 0 {
            return None;
        }
        let slots = lock(&self.inner.slots);
        slots
            .get(usize::from(dev))?
            .as_ref()
            .map(|s| s.config.clone())
    }

    /// A configuration read of function `bus:dev.func` at `reg`; all ones
    /// when absent or the access is not 1, 2 or 4 aligned bytes.
    pub fn config_read(&self, bus: u8, dev: u8, func: u8, reg: usize, data: &mut [u8]) {
        data.fill(0xff);
        if !access_ok(reg, data.len()) {
            return;
        }
        if let Some(d) = self.device(bus, dev, func) {
            lock(&d).config_read(reg, data);
        }
    }

    /// A configuration write; dropped when absent or badly sized.
    pub fn config_write(&self, bus: u8, dev: u8, func: u8, reg: usize, data: &[u8]) {
        if !access_ok(reg, data.len()) {
            return;
        }
        let Some(d) = self.device(bus, dev, func) else {
            return;
        };
        let change = lock(&d).config_write(reg, data);
        if let Some(change) = change {
            let slots = lock(&self.inner.slots);
            let bar = slots
                .get(usize::from(dev))
                .and_then(|s| s.as_ref())
                .and_then(|s| s.bar.clone());
            if let Some(device) = bar {
                lock(&self.inner.pending).push(BarReprogram { change, device });
                self.inner.has_pending.store(true, Ordering::Release);
            }
        }
    }
}

fn access_ok(reg: usize, len: usize) -> bool {
    matches!(len, 1 | 2 | 4) && reg.is_multiple_of(len) && reg + len <= CONFIG_SPACE_LEN
}

/// The ECAM window: offset = bus << 20 | dev << 15 | fn << 12 | reg.
pub struct PciEcam {
    segment: PciSegment,
}

fn ecam_split(offset: u64) -> (u8, u8, u8, usize) {
    (
        ((offset >> 20) & 0xff) as u8,
        ((offset >> 15) & 0x1f) as u8,
        ((offset >> 12) & 0x7) as u8,
        (offset & 0xfff) as usize,
    )
}

impl BusDevice for PciEcam {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let (b, d, f, r) = ecam_split(offset);
        if offset >> 28 != 0 {
            data.fill(0xff);
            return;
        }
        self.segment.config_read(b, d, f, r, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (b, d, f, r) = ecam_split(offset);
        if offset >> 28 == 0 {
            self.segment.config_write(b, d, f, r, data);
        }
    }
}

/// The legacy configuration mechanism #1: the address register at 0xcf8
/// (32-bit accesses only) and the data window at 0xcfc..0xcff.
pub struct PciConfigIo {
    segment: PciSegment,
    address: u32,
}

/// Start of the port range [`PciConfigIo`] serves.
pub const CONFIG_IO_BASE: u64 = 0xcf8;
/// Length of that range.
pub const CONFIG_IO_LEN: u64 = 8;

impl PciConfigIo {
    /// The function and register the data window at `port_off` (0..4) hits,
    /// if the address register is enabled.
    fn target(&self, port_off: usize) -> Option<(u8, u8, u8, usize)> {
        let a = self.address;
        if a & 0x8000_0000 == 0 {
            return None;
        }
        let bus = ((a >> 16) & 0xff) as u8;
        let dev = ((a >> 11) & 0x1f) as u8;
        let func = ((a >> 8) & 0x7) as u8;
        Some((bus, dev, func, (a & 0xfc) as usize + port_off))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            0 if data.len() == 4 => data.copy_from_slice(&self.address.to_le_bytes()),
            4..=7 => {
                data.fill(0xff);
                let off = offset as usize - 4;
                if off + data.len() > 4 {
                    return;
                }
                if let Some((b, d, f, r)) = self.target(off) {
                    self.segment.config_read(b, d, f, r, data);
                }
            }
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            0 => {
                if let Ok(b) = <[u8; 4]>::try_from(data) {
                    // Bits 1:0 are reserved and read back as zero.
                    self.address = u32::from_le_bytes(b) & !3;
                }
            }
            4..=7 => {
                let off = offset as usize - 4;
                if off + data.len() > 4 {
                    return;
                }
                if let Some((b, d, f, r)) = self.target(off) {
                    self.segment.config_write(b, d, f, r, data);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests;
