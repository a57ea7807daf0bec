//! virtio-mmio, version 2 only (virtio 1.2, 4.2.2).
//!
//! Registers are 32 bits wide and accessed 32 bits at a time; anything
//! else outside the device configuration space is ignored (reads as 0), as
//! are writes to read-only registers and to a queue the driver already
//! enabled. Queue notifications are ioeventfds at QueueNotify, so KVM
//! signals the queue's IOThread without a VM exit; a write that does reach
//! the bus (no ioeventfd matched its width) kicks the queue by hand.
//!
//! The interrupt is one irqfd line. InterruptStatus keeps the reason bits
//! until the driver acknowledges them; every new reason signals the irqfd
//! again, so the edge-triggered GSI (as Firecracker and Cloud Hypervisor
//! use for virtio-mmio) never loses an interrupt.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, Ordering};
use std::sync::Arc;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{mark_needs_reset, set_half, VirtioCommon, VirtioDevice, VirtioInterrupt, VirtioIrq};
use crate::bus::{BusDevice, VmHooks};

/// Bytes of register space of one device (registers plus configuration).
pub const MMIO_LEN: u64 = 0x1000;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
/// Vendor id reported to the driver ("QEMU", as Linux does not care).
const VENDOR_ID: u32 = 0x554d_4551;

/// Register offsets (4.2.2).
mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// InterruptStatus bits.
pub const INT_VRING: u32 = 1;
/// InterruptStatus bit for a configuration change.
pub const INT_CONFIG: u32 = 2;

/// The interrupt side, shared with the device's IOThreads.
struct MmioInterrupt {
    bits: AtomicU32,
    irqfd: EventFd,
    status: Arc<AtomicU8>,
    /// A queue's notifier went to another process (until reset).
    direct: AtomicBool,
}

impl VirtioInterrupt for MmioInterrupt {
    fn signal(&self, irq: VirtioIrq) -> io::Result<()> {
        let bit = match irq {
            VirtioIrq::Queue(_) => INT_VRING,
            VirtioIrq::Config => INT_CONFIG,
        };
        self.bits.fetch_or(bit, Ordering::SeqCst);
        self.irqfd.write(1)
    }

    fn set_needs_reset(&self) {
        mark_needs_reset(&self.status);
        let _ = self.signal(VirtioIrq::Config);
    }

    fn queue_notifier(&self, _queue: u16) -> io::Result<Option<EventFd>> {
        // Whoever writes the irqfd directly cannot set INT_VRING first, so
        // InterruptStatus reports it for as long as the device runs this
        // way (Linux then looks at every queue, which costs a spurious
        // check at most).
        self.direct.store(true, Ordering::SeqCst);
        self.irqfd.try_clone().map(Some)
    }
}

/// A virtio device on virtio-mmio.
pub struct MmioTransport<D: VirtioDevice> {
    device: D,
    common: VirtioCommon,
    hooks: Arc<dyn VmHooks>,
    base: u64,
    gsi: u32,
    interrupt: Arc<MmioInterrupt>,
    /// Datamatch each queue's ioeventfd was registered with.
    notify_match: Vec<Option<u32>>,
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// Places `device` at MMIO `base` with interrupt `gsi`: registers one
    /// ioeventfd per queue at QueueNotify and an irqfd on `gsi`.
    pub fn new(device: D, hooks: Arc<dyn VmHooks>, base: u64, gsi: u32) -> io::Result<Self> {
        let common = VirtioCommon::new(&device);
        let interrupt = Arc::new(MmioInterrupt {
            bits: AtomicU32::new(0),
            direct: AtomicBool::new(false),
            irqfd: EventFd::new(EFD_NONBLOCK)?,
            status: common.status.clone(),
        });
        hooks.register_irqfd(&interrupt.irqfd, gsi)?;
        let nq = device.queue_events().len();
        // One queue: no datamatch, so any write width matches. Several:
        // the queue index, matched on the 32-bit stores Linux makes.
        let notify_match: Vec<Option<u32>> =
            (0..nq).map(|i| (nq > 1).then_some(i as u32)).collect();
        let mut t = MmioTransport {
            device,
            common,
            hooks,
            base,
            gsi,
            interrupt,
            notify_match: Vec::new(),
        };
        for (i, dm) in notify_match.iter().enumerate() {
            let fd = &t.device.queue_events()[i];
            if let Err(e) = t.hooks.register_ioevent(fd, base + reg::QUEUE_NOTIFY, *dm) {
                t.unregister();
                return Err(e);
            }
            t.notify_match.push(*dm);
        }
        Ok(t)
    }

    /// The device.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device, mutably.
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// The MMIO base address.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// The interrupt line.
    pub fn gsi(&self) -> u32 {
        self.gsi
    }

    /// Device status as the driver sees it.
    pub fn status(&self) -> u8 {
        self.common.status()
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

    fn unregister(&mut self) {
        for (i, dm) in self.notify_match.drain(..).enumerate() {
            let fd = &self.device.queue_events()[i];
            let _ = self
                .hooks
                .unregister_ioevent(fd, self.base + reg::QUEUE_NOTIFY, dm);
        }
        let _ = self.hooks.unregister_irqfd(&self.interrupt.irqfd, self.gsi);
    }

    fn read_reg(&self, offset: u64) -> u32 {
        let c = &self.common;
        let q = c.selected();
        match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => c.device_features_page(),
            reg::QUEUE_NUM_MAX => q.map_or(0, |q| u32::from(q.max_size)),
            reg::QUEUE_READY => q.map_or(0, |q| u32::from(q.ready)),
            reg::INTERRUPT_STATUS => {
                let direct = if self.interrupt.direct.load(Ordering::SeqCst) {
                    INT_VRING
                } else {
                    0
                };
                self.interrupt.bits.load(Ordering::SeqCst) | direct
            }
            reg::STATUS => u32::from(c.status()),
            // No shared memory regions: length and base read as all ones.
            reg::SHM_LEN_LOW..=reg::SHM_BASE_HIGH => u32::MAX,
            reg::CONFIG_GENERATION => c.config_generation,
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        let c = &mut self.common;
        match offset {
            reg::DEVICE_FEATURES_SEL => c.device_feature_select = v,
            reg::DRIVER_FEATURES => c.write_driver_features(v),
            reg::DRIVER_FEATURES_SEL => c.driver_feature_select = v,
            reg::QUEUE_SEL => c.queue_select = v.min(u32::from(u16::MAX)) as u16,
            reg::QUEUE_NUM => c.set_queue_size(v.min(u32::from(u16::MAX)) as u16),
            reg::QUEUE_READY => c.set_queue_ready(v == 1),
            reg::QUEUE_NOTIFY => {
                // Reached only when no ioeventfd matched the write.
                if let Some(fd) = self.device.queue_events().get(v as usize) {
                    let _ = fd.write(1);
                }
            }
            reg::INTERRUPT_ACK => {
                self.interrupt.bits.fetch_and(!v, Ordering::SeqCst);
            }
            reg::STATUS => {
                let irq: Arc<dyn VirtioInterrupt> = self.interrupt.clone();
                c.write_status(v as u8, &mut self.device, &irq);
                if v == 0 {
                    self.interrupt.bits.store(0, Ordering::SeqCst);
                    self.interrupt.direct.store(false, Ordering::SeqCst);
                }
            }
            reg::QUEUE_DESC_LOW | reg::QUEUE_DESC_HIGH => {
                if let Some(q) = c.selected_for_write() {
                    set_half(&mut q.desc, offset == reg::QUEUE_DESC_HIGH, v);
                }
            }
            reg::QUEUE_DRIVER_LOW | reg::QUEUE_DRIVER_HIGH => {
                if let Some(q) = c.selected_for_write() {
                    set_half(&mut q.avail, offset == reg::QUEUE_DRIVER_HIGH, v);
                }
            }
            reg::QUEUE_DEVICE_LOW | reg::QUEUE_DEVICE_HIGH => {
                if let Some(q) = c.selected_for_write() {
                    set_half(&mut q.used, offset == reg::QUEUE_DEVICE_HIGH, v);
                }
            }
            // Read-only or unknown registers: ignored (4.2.2.1).
            _ => {}
        }
    }
}

impl<D: VirtioDevice> BusDevice for MmioTransport<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            self.device.read_config(offset - reg::CONFIG, data);
            return;
        }
        if data.len() == 4 && offset.is_multiple_of(4) {
            data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
        } else {
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            self.device.write_config(offset - reg::CONFIG, data);
            return;
        }
        if let Ok(b) = <[u8; 4]>::try_from(data) {
            if offset.is_multiple_of(4) {
                self.write_reg(offset, u32::from_le_bytes(b));
            }
        }
    }
}

impl<D: VirtioDevice> Drop for MmioTransport<D> {
    fn drop(&mut self) {
        if self.common.driver_ok() {
            self.device.reset();
        }
        self.unregister();
    }
}

#[cfg(test)]
mod tests;
