//! Modern virtio-pci (virtio 1.2, 4.1): device id 0x1040 + type, no
//! legacy interface, no INTx (interrupt pin 0): interrupts are MSI-X only.
//!
//! One 64-bit memory BAR (BAR0, [`BAR_SIZE`]) holds every structure the
//! capabilities point at:
//!
//! | offset | structure |
//! |---|---|
//! | 0x0000 | common configuration |
//! | 0x1000 | ISR status |
//! | 0x2000 | device configuration |
//! | 0x3000 | notifications: queue `q` at `4 * q` (notify_off_multiplier 4) |
//! | 0x4000 | MSI-X table |
//! | 0x6000 | MSI-X pending-bit array |
//!
//! Each queue's doorbell is an ioeventfd (no datamatch) at its address
//! while the BAR decodes; when the guest moves the BAR or turns memory
//! decoding off, the doorbells move with it and the config write returns
//! a [`BarChange`] for the VMM's bus. The VIRTIO_PCI_CAP_PCI_CFG window
//! (4.1.4.9) reaches the same BAR through configuration space.

use std::io;
use std::sync::atomic::{AtomicU16, AtomicU8, Ordering};
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use super::{mark_needs_reset, set_half, VirtioCommon, VirtioDevice, VirtioInterrupt, VirtioIrq};
use crate::bus::{BusDevice, VmHooks};
use crate::pci::msix::{Msix, MsixSignal, CTRL_ENABLE, CTRL_FUNCTION_MASK};
use crate::pci::{hdr, BarChange, ConfigSpace, PciDevice, CAP_START, CMD_MEMORY};

/// Size of BAR0.
pub const BAR_SIZE: u64 = 0x8000;
/// Virtio's PCI vendor id.
pub const VIRTIO_PCI_VENDOR: u16 = 0x1af4;
/// The value that means "no MSI-X vector".
pub const NO_VECTOR: u16 = 0xffff;
/// Most vectors (so the table fits its 0x2000 bytes).
const MAX_VECTORS: usize = 512;

const COMMON: u64 = 0x0000;
const ISR: u64 = 0x1000;
const DEVICE: u64 = 0x2000;
const NOTIFY: u64 = 0x3000;
const MSIX_TABLE: u64 = 0x4000;
const MSIX_PBA: u64 = 0x6000;
const REGION: u64 = 0x1000;
const NOTIFY_MULTIPLIER: u32 = 4;

/// Capability `cfg_type`s (4.1.4).
mod cap {
    pub const VENDOR: u8 = 0x09;
    pub const COMMON: u8 = 1;
    pub const NOTIFY: u8 = 2;
    pub const ISR: u8 = 3;
    pub const DEVICE: u8 = 4;
    pub const PCI_CFG: u8 = 5;
}

/// Common configuration offsets (4.1.4.3).
mod cc {
    pub const DFSELECT: u64 = 0x00;
    pub const DF: u64 = 0x04;
    pub const GFSELECT: u64 = 0x08;
    pub const GF: u64 = 0x0c;
    pub const MSIX: u64 = 0x10;
    pub const NUMQ: u64 = 0x12;
    pub const STATUS: u64 = 0x14;
    pub const CFGGEN: u64 = 0x15;
    pub const Q_SELECT: u64 = 0x16;
    pub const Q_SIZE: u64 = 0x18;
    pub const Q_MSIX: u64 = 0x1a;
    pub const Q_ENABLE: u64 = 0x1c;
    pub const Q_NOFF: u64 = 0x1e;
    pub const Q_DESC: u64 = 0x20;
    pub const Q_AVAIL: u64 = 0x28;
    pub const Q_USED: u64 = 0x30;
    pub const END: u64 = 0x38;
}

/// The interrupt side, shared with the device's IOThreads.
struct PciInterrupt {
    status: Arc<AtomicU8>,
    isr: AtomicU8,
    msix: Arc<MsixSignal>,
    config_vector: AtomicU16,
    queue_vectors: Vec<AtomicU16>,
}

impl VirtioInterrupt for PciInterrupt {
    fn signal(&self, irq: VirtioIrq) -> io::Result<()> {
        let (bit, vector) = match irq {
            VirtioIrq::Queue(q) => (
                1,
                self.queue_vectors
                    .get(usize::from(q))
                    .map_or(NO_VECTOR, |v| v.load(Ordering::SeqCst)),
            ),
            VirtioIrq::Config => (2, self.config_vector.load(Ordering::SeqCst)),
        };
        self.isr.fetch_or(bit, Ordering::SeqCst);
        if vector == NO_VECTOR {
            // No INTx on this transport: the ISR bit is all the driver gets.
            return Ok(());
        }
        self.msix.trigger(vector)
    }

    fn set_needs_reset(&self) {
        mark_needs_reset(&self.status);
        let _ = self.signal(VirtioIrq::Config);
    }

    fn queue_notifier(&self, queue: u16) -> io::Result<Option<EventFd>> {
        let vector = self
            .queue_vectors
            .get(usize::from(queue))
            .map_or(NO_VECTOR, |v| v.load(Ordering::SeqCst));
        if vector == NO_VECTOR {
            return Ok(None);
        }
        self.msix.direct_notifier(vector)
    }
}

/// Offsets of our capabilities in configuration space.
#[derive(Clone, Copy)]
struct CapOffsets {
    msix: usize,
    pci_cfg: usize,
}

/// A virtio device on modern virtio-pci.
pub struct VirtioPciDevice<D: VirtioDevice> {
    device: D,
    common: VirtioCommon,
    hooks: Arc<dyn VmHooks>,
    config: ConfigSpace,
    caps: CapOffsets,
    msix: Msix,
    interrupt: Arc<PciInterrupt>,
    /// Where BAR0 decodes now (doorbells are registered there).
    mapped: Option<u64>,
}

impl<D: VirtioDevice> VirtioPciDevice<D> {
    /// `device` with BAR0 at `bar_base` (decoding, doorbells registered),
    /// one MSI-X vector per queue plus one for configuration changes.
    pub fn new(device: D, hooks: Arc<dyn VmHooks>, bar_base: u64) -> io::Result<Self> {
        let common = VirtioCommon::new(&device);
        let nq = common.queues.len();
        if nq > (REGION / u64::from(NOTIFY_MULTIPLIER)) as usize {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "too many queues for virtio-pci",
            ));
        }
        if !bar_base.is_multiple_of(BAR_SIZE) || bar_base == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "BAR0 must be non-zero and aligned to its size",
            ));
        }
        let msix = Msix::new((nq + 1).min(MAX_VECTORS) as u16, hooks.clone())?;
        let interrupt = Arc::new(PciInterrupt {
            status: common.status.clone(),
            isr: AtomicU8::new(0),
            msix: msix.signal(),
            config_vector: AtomicU16::new(NO_VECTOR),
            queue_vectors: (0..nq).map(|_| AtomicU16::new(NO_VECTOR)).collect(),
        });
        let (config, caps) = build_config(device.device_type(), &msix, bar_base);
        let mut d = VirtioPciDevice {
            device,
            common,
            hooks,
            config,
            caps,
            msix,
            interrupt,
            mapped: None,
        };
        d.map_doorbells(Some(bar_base))?;
        Ok(d)
    }

    /// The device.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device, mutably.
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// Device status as the driver sees it.
    pub fn status(&self) -> u8 {
        self.common.status()
    }

    /// GSI of MSI-X vector `v`.
    pub fn vector_gsi(&self, v: u16) -> Option<u32> {
        self.msix.gsi(v)
    }

    /// The configuration space changed (a resize): reread it, bump the
    /// generation and, if the driver is running, raise the config interrupt.
    pub fn config_changed(&mut self) {
        self.device.refresh_config();
        self.common.config_generation = self.common.config_generation.wrapping_add(1);
        if self.common.driver_ok() {
            let _ = self.interrupt.signal(VirtioIrq::Config);
        }
    }

    /// Moves the doorbell ioeventfds from the current mapping to `to`.
    fn map_doorbells(&mut self, to: Option<u64>) -> io::Result<()> {
        if to == self.mapped {
            return Ok(());
        }
        let events = self.device.queue_events();
        if let Some(old) = self.mapped.take() {
            for (q, fd) in events.iter().enumerate() {
                let addr = old + NOTIFY + u64::from(NOTIFY_MULTIPLIER) * q as u64;
                let _ = self.hooks.unregister_ioevent(fd, addr, None);
            }
        }
        if let Some(new) = to {
            for (q, fd) in events.iter().enumerate() {
                let addr = new + NOTIFY + u64::from(NOTIFY_MULTIPLIER) * q as u64;
                if let Err(e) = self.hooks.register_ioevent(fd, addr, None) {
                    for (p, fd) in events.iter().enumerate().take(q) {
                        let a = new + NOTIFY + u64::from(NOTIFY_MULTIPLIER) * p as u64;
                        let _ = self.hooks.unregister_ioevent(fd, a, None);
                    }
                    return Err(e);
                }
            }
            self.mapped = Some(new);
        }
        Ok(())
    }

    fn bar_address(&self) -> u64 {
        let lo = u64::from(self.config.u32(hdr::BAR0));
        let hi = u64::from(self.config.u32(hdr::BAR0 + 4));
        ((hi << 32) | lo) & !(BAR_SIZE - 1)
    }

    /// Where BAR0 should decode given the command register and its value.
    fn wanted_mapping(&self) -> Option<u64> {
        let base = self.bar_address();
        let on = self.config.u16(hdr::COMMAND) & CMD_MEMORY != 0;
        (on && base != 0 && base.checked_add(BAR_SIZE).is_some()).then_some(base)
    }

    fn read_common(&self, off: u64, data: &mut [u8]) {
        data.fill(0);
        let c = &self.common;
        let q = c.selected();
        let qi = usize::from(c.queue_select);
        let v: u64 = match (off, data.len()) {
            (cc::DFSELECT, 4) => u64::from(c.device_feature_select),
            (cc::DF, 4) => u64::from(c.device_features_page()),
            (cc::GFSELECT, 4) => u64::from(c.driver_feature_select),
            (cc::GF, 4) => match c.driver_feature_select {
                0 => c.driver_features & 0xffff_ffff,
                1 => c.driver_features >> 32,
                _ => 0,
            },
            (cc::MSIX, 2) => u64::from(self.interrupt.config_vector.load(Ordering::SeqCst)),
            (cc::NUMQ, 2) => c.queues.len() as u64,
            (cc::STATUS, 1) => u64::from(c.status()),
            (cc::CFGGEN, 1) => u64::from(c.config_generation as u8),
            (cc::Q_SELECT, 2) => u64::from(c.queue_select),
            (cc::Q_SIZE, 2) => q.map_or(0, |q| u64::from(q.size)),
            (cc::Q_MSIX, 2) => self
                .interrupt
                .queue_vectors
                .get(qi)
                .map_or(u64::from(NO_VECTOR), |v| {
                    u64::from(v.load(Ordering::SeqCst))
                }),
            (cc::Q_ENABLE, 2) => q.map_or(0, |q| u64::from(q.ready)),
            (cc::Q_NOFF, 2) => q.map_or(0, |_| qi as u64),
            (o @ cc::Q_DESC..cc::END, 4 | 8) if o % data.len() as u64 == 0 => {
                let Some(q) = q else { return };
                let field = match o & !7 {
                    cc::Q_DESC => q.desc,
                    cc::Q_AVAIL => q.avail,
                    cc::Q_USED => q.used,
                    _ => return,
                };
                if o % 8 == 4 {
                    field >> 32
                } else {
                    field
                }
            }
            _ => return,
        };
        let n = data.len();
        data.copy_from_slice(&v.to_le_bytes()[..n]);
    }

    fn write_common(&mut self, off: u64, data: &[u8]) {
        let mut b = [0u8; 8];
        b[..data.len()].copy_from_slice(data);
        let v = u64::from_le_bytes(b);
        let nvec = self.msix.len();
        let c = &mut self.common;
        match (off, data.len()) {
            (cc::DFSELECT, 4) => c.device_feature_select = v as u32,
            (cc::GFSELECT, 4) => c.driver_feature_select = v as u32,
            (cc::GF, 4) => c.write_driver_features(v as u32),
            (cc::MSIX, 2) => {
                let vec = if (v as u16) < nvec {
                    v as u16
                } else {
                    NO_VECTOR
                };
                self.interrupt.config_vector.store(vec, Ordering::SeqCst);
            }
            (cc::STATUS, 1) => {
                let irq: Arc<dyn VirtioInterrupt> = self.interrupt.clone();
                c.write_status(v as u8, &mut self.device, &irq);
                if v == 0 {
                    self.interrupt.isr.store(0, Ordering::SeqCst);
                    self.interrupt
                        .config_vector
                        .store(NO_VECTOR, Ordering::SeqCst);
                    for q in &self.interrupt.queue_vectors {
                        q.store(NO_VECTOR, Ordering::SeqCst);
                    }
                }
            }
            (cc::Q_SELECT, 2) => c.queue_select = v as u16,
            (cc::Q_SIZE, 2) => c.set_queue_size(v as u16),
            (cc::Q_MSIX, 2) => {
                let qi = usize::from(c.queue_select);
                if c.selected_for_write().is_some() {
                    let vec = if (v as u16) < nvec {
                        v as u16
                    } else {
                        NO_VECTOR
                    };
                    if let Some(slot) = self.interrupt.queue_vectors.get(qi) {
                        slot.store(vec, Ordering::SeqCst);
                    }
                }
            }
            (cc::Q_ENABLE, 2) => c.set_queue_ready(v == 1),
            (o @ cc::Q_DESC..cc::END, 4 | 8) if o % data.len() as u64 == 0 => {
                let Some(q) = c.selected_for_write() else {
                    return;
                };
                let field = match o & !7 {
                    cc::Q_DESC => &mut q.desc,
                    cc::Q_AVAIL => &mut q.avail,
                    cc::Q_USED => &mut q.used,
                    _ => return,
                };
                if data.len() == 8 {
                    *field = v;
                } else {
                    set_half(field, o % 8 == 4, v as u32);
                }
            }
            // Read-only fields, wrong widths: ignored (4.1.3.1).
            _ => {}
        }
    }

    fn bar_read(&mut self, off: u64, data: &mut [u8]) {
        match off {
            COMMON..ISR => self.read_common(off - COMMON, data),
            ISR..DEVICE => {
                data.fill(0);
                if off == ISR {
                    // Reading ISR status clears it (4.1.4.5).
                    data[0] = self.interrupt.isr.swap(0, Ordering::SeqCst);
                }
            }
            DEVICE..NOTIFY => self.device.read_config(off - DEVICE, data),
            MSIX_TABLE..MSIX_PBA => self.msix.table_read(off - MSIX_TABLE, data),
            MSIX_PBA..BAR_SIZE => self.msix.pba_read(off - MSIX_PBA, data),
            _ => data.fill(0),
        }
    }

    fn bar_write(&mut self, off: u64, data: &[u8]) {
        match off {
            COMMON..ISR => self.write_common(off - COMMON, data),
            DEVICE..NOTIFY => self.device.write_config(off - DEVICE, data),
            NOTIFY..MSIX_TABLE => {
                // Reached only when the doorbell's ioeventfd did not fire.
                let rel = off - NOTIFY;
                if rel.is_multiple_of(u64::from(NOTIFY_MULTIPLIER)) {
                    let q = (rel / u64::from(NOTIFY_MULTIPLIER)) as usize;
                    if let Some(fd) = self.device.queue_events().get(q) {
                        let _ = fd.write(1);
                    }
                }
            }
            MSIX_TABLE..MSIX_PBA => self.msix.table_write(off - MSIX_TABLE, data),
            _ => {}
        }
    }

    /// The VIRTIO_PCI_CAP_PCI_CFG window: BAR, offset and length the
    /// driver chose, if they describe a valid access.
    fn pci_cfg_target(&self) -> Option<(u64, usize)> {
        let at = self.caps.pci_cfg;
        let bar = self.config.u32(at + 4) & 0xff;
        let off = u64::from(self.config.u32(at + 8));
        let len = self.config.u32(at + 12) as usize;
        (bar == 0
            && matches!(len, 1 | 2 | 4)
            && off.is_multiple_of(len as u64)
            && off + len as u64 <= BAR_SIZE)
            .then_some((off, len))
    }
}

/// Builds the configuration space: header, BAR0, the MSI-X capability and
/// the virtio capabilities.
fn build_config(device_type: u32, msix: &Msix, bar_base: u64) -> (ConfigSpace, CapOffsets) {
    let id = 0x1040 + device_type as u16;
    // Class 01 (mass storage), subclass 80 (other) for block; 0xff00 else.
    let class = if device_type == 2 { 0x0180 } else { 0xff00 };
    let mut c = ConfigSpace::type0(VIRTIO_PCI_VENDOR, id, class, 1);
    c.set_u16(hdr::SUBSYS_VENDOR, VIRTIO_PCI_VENDOR);
    c.set_u16(hdr::SUBSYS_ID, 0x1100);
    c.set_u16(hdr::COMMAND, CMD_MEMORY);
    // 64-bit memory BAR, not prefetchable.
    c.set_u32(hdr::BAR0, (bar_base as u32) | 0x4);
    c.set_u32(hdr::BAR0 + 4, (bar_base >> 32) as u32);
    c.set_writable(hdr::BAR0, 8, 0xff);
    c.set_u8(hdr::INT_PIN, 0);

    let msix_at = CAP_START;
    let next = c.add_capability(
        msix_at,
        0,
        &msix.capability(0, MSIX_TABLE as u32, MSIX_PBA as u32),
    );
    // Function mask and enable (bits 14, 15 of message control).
    c.set_writable(msix_at + 3, 1, 0xc0);
    let vcap = |ty: u8, offset: u64, len: u64, extra: &[u8]| {
        let mut v = vec![cap::VENDOR, 0, (16 + extra.len()) as u8, ty, 0, 0, 0, 0];
        v.extend((offset as u32).to_le_bytes());
        v.extend((len as u32).to_le_bytes());
        v.extend(extra);
        v
    };
    let mut prev = msix_at;
    let mut at = next;
    for body in [
        vcap(cap::COMMON, COMMON, cc::END, &[]),
        vcap(
            cap::NOTIFY,
            NOTIFY,
            REGION,
            &NOTIFY_MULTIPLIER.to_le_bytes(),
        ),
        vcap(cap::ISR, ISR, 1, &[]),
        vcap(cap::DEVICE, DEVICE, REGION, &[]),
    ] {
        let n = c.add_capability(at, prev, &body);
        prev = at;
        at = n;
    }
    let pci_cfg = at;
    c.add_capability(pci_cfg, prev, &vcap(cap::PCI_CFG, 0, 0, &[0; 4]));
    // bar, offset, length and the data window are the driver's to write.
    c.set_writable(pci_cfg + 4, 1, 0xff);
    c.set_writable(pci_cfg + 8, 8, 0xff);
    (
        c,
        CapOffsets {
            msix: msix_at,
            pci_cfg,
        },
    )
}

impl<D: VirtioDevice> PciDevice for VirtioPciDevice<D> {
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        let window = self.caps.pci_cfg + 16;
        if offset >= window && offset < window + 4 {
            data.fill(0);
            if let Some((off, len)) = self.pci_cfg_target() {
                let mut buf = [0u8; 4];
                self.bar_read(off, &mut buf[..len]);
                let start = offset - window;
                for (i, b) in data.iter_mut().enumerate() {
                    *b = buf.get(start + i).copied().unwrap_or(0);
                }
            }
            return;
        }
        self.config.read(offset, data);
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) -> Option<BarChange> {
        let window = self.caps.pci_cfg + 16;
        if offset >= window && offset < window + 4 {
            if let Some((off, len)) = self.pci_cfg_target() {
                if offset == window && data.len() >= len {
                    self.bar_write(off, &data[..len]);
                }
            }
            return None;
        }
        self.config.write(offset, data);
        // BAR0's low bits are its type and size: they read back fixed.
        let lo = (self.config.u32(hdr::BAR0) & !(BAR_SIZE as u32 - 1)) | 0x4;
        self.config.set_u32(hdr::BAR0, lo);
        let ctrl_at = self.caps.msix + 2;
        if offset < ctrl_at + 2 && offset + data.len() > ctrl_at {
            let ctrl = self.config.u16(ctrl_at) & (CTRL_ENABLE | CTRL_FUNCTION_MASK);
            self.msix.set_control(ctrl);
        }
        let want = self.wanted_mapping();
        if want == self.mapped {
            return None;
        }
        let old = self.mapped;
        if let Err(e) = self.map_doorbells(want) {
            eprintln!("virtio-pci: could not move the doorbells: {e}");
        }
        Some(BarChange {
            old,
            new: self.mapped,
            len: BAR_SIZE,
        })
    }

    fn bar_mapping(&self) -> Option<(u64, u64)> {
        self.mapped.map(|b| (b, BAR_SIZE))
    }
}

impl<D: VirtioDevice> BusDevice for VirtioPciDevice<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.bar_read(offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.bar_write(offset, data);
    }
}

impl<D: VirtioDevice> Drop for VirtioPciDevice<D> {
    fn drop(&mut self) {
        if self.common.driver_ok() {
            self.device.reset();
        }
        let _ = self.map_doorbells(None);
    }
}

#[cfg(test)]
mod tests;
