//! Virtio transports of the VMM: virtio-mmio version 2 ([`mmio`]) and
//! modern virtio-pci with MSI-X ([`pci`]), over one device interface
//! ([`VirtioDevice`]).
//!
//! What the driver negotiates (features, status, queue addresses) is the
//! same for both and lives in [`VirtioCommon`]; the transports only map it
//! onto their registers and deliver interrupts their own way
//! ([`VirtioInterrupt`]). Device status is an atomic because a device's
//! IOThread may set DEVICE_NEEDS_RESET (virtio 1.2, 2.1.1) while a vCPU
//! reads it.

pub mod mmio;
pub mod pci;

use std::io;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_config::*;
use vmm_sys_util::eventfd::EventFd;

/// Device status bits (virtio 1.2, 2.1).
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u8 = 1;
    /// The guest knows how to drive it.
    pub const DRIVER: u8 = 2;
    /// The driver is ready: queues may run.
    pub const DRIVER_OK: u8 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u8 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const NEEDS_RESET: u8 = 0x40;
    /// The driver gave up on the device.
    pub const FAILED: u8 = 0x80;
}

/// The interrupt a device raises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VirtioIrq {
    /// Used buffers on this queue.
    Queue(u16),
    /// The configuration space changed (or NEEDS_RESET was set).
    Config,
}

/// How a device reaches the guest; implemented by each transport. Called
/// from IOThreads, so it takes no lock the vCPU side may hold.
pub trait VirtioInterrupt: Send + Sync {
    /// Raises `irq`.
    fn signal(&self, irq: VirtioIrq) -> io::Result<()>;
    /// Sets DEVICE_NEEDS_RESET and raises the config interrupt (2.1.2).
    fn set_needs_reset(&self);
    /// An eventfd that raises queue `queue`'s interrupt when written, for
    /// a device whose queues another process serves (vhost-user: the
    /// backend's call fd): the irqfd of the queue's MSI-X vector, or the
    /// virtio-mmio line with InterruptStatus reporting used buffers from
    /// then on. `None` when the transport cannot (no vector assigned).
    fn queue_notifier(&self, _queue: u16) -> io::Result<Option<EventFd>> {
        Ok(None)
    }
}

/// One virtqueue as the driver configured it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueConfig {
    /// Largest size the device accepts.
    pub max_size: u16,
    /// Size the driver chose.
    pub size: u16,
    /// The driver enabled the queue.
    pub ready: bool,
    /// Descriptor table address.
    pub desc: u64,
    /// Driver (avail) ring address.
    pub avail: u64,
    /// Device (used) ring address.
    pub used: u64,
}

impl QueueConfig {
    fn new(max_size: u16) -> Self {
        QueueConfig {
            max_size,
            size: max_size,
            ..QueueConfig::default()
        }
    }
}

/// Why a device could not start.
#[derive(Debug, thiserror::Error)]
pub enum VirtioDeviceError {
    /// A queue's rings are not valid in guest memory.
    #[error("virtqueue {0} is not valid")]
    BadQueue(usize),
    /// Something on the host failed (an eventfd, an IOThread).
    #[error("device activation failed")]
    Host(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// A virtio device behind a transport.
pub trait VirtioDevice: Send {
    /// Virtio device id (2: block).
    fn device_type(&self) -> u32;
    /// Largest size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Offered features.
    fn features(&self) -> u64;
    /// Reads device configuration space at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device configuration space at `offset`.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The queues' notification EventFds, one per queue; the transport
    /// registers each as an ioeventfd.
    fn queue_events(&self) -> &[EventFd];
    /// Starts serving the queues (DRIVER_OK).
    fn activate(
        &mut self,
        features: u64,
        queues: &[QueueConfig],
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), VirtioDeviceError>;
    /// Stops the queues, completes what is in flight and returns to the
    /// state before activation.
    fn reset(&mut self);
    /// Rereads what the configuration space is made from (capacity after a
    /// resize).
    fn refresh_config(&mut self) {}
}

/// Transport state the driver negotiates, shared by both transports.
pub struct VirtioCommon {
    /// Offered features.
    pub device_features: u64,
    /// Page of `device_features` the driver reads (0 or 1).
    pub device_feature_select: u32,
    /// Page of driver features the driver writes.
    pub driver_feature_select: u32,
    /// Features the driver accepted.
    pub driver_features: u64,
    /// Queue the queue registers refer to.
    pub queue_select: u16,
    /// All queues.
    pub queues: Vec<QueueConfig>,
    /// Device status, shared with the interrupt side.
    pub status: Arc<AtomicU8>,
    /// Bumped on every configuration change.
    pub config_generation: u32,
}

impl VirtioCommon {
    /// The initial state for `device`.
    pub fn new(device: &dyn VirtioDevice) -> Self {
        VirtioCommon {
            device_features: device.features(),
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            queue_select: 0,
            queues: device
                .queue_max_sizes()
                .into_iter()
                .map(QueueConfig::new)
                .collect(),
            status: Arc::new(AtomicU8::new(0)),
            config_generation: 0,
        }
    }

    /// Current device status.
    pub fn status(&self) -> u8 {
        self.status.load(Ordering::SeqCst)
    }

    /// The selected page of the offered features.
    pub fn device_features_page(&self) -> u32 {
        match self.device_feature_select {
            0 => self.device_features as u32,
            1 => (self.device_features >> 32) as u32,
            _ => 0,
        }
    }

    /// Writes the selected page of the driver's features. Ignored once
    /// FEATURES_OK is set (3.1.1); bits not offered are dropped.
    pub fn write_driver_features(&mut self, value: u32) {
        if self.status() & status::FEATURES_OK != 0 {
            return;
        }
        let (shift, mask) = match self.driver_feature_select {
            0 => (0, 0xffff_ffffu64),
            1 => (32, 0xffff_ffff_0000_0000u64),
            _ => return,
        };
        let v = (u64::from(value) << shift) & self.device_features;
        self.driver_features = (self.driver_features & !mask) | v;
    }

    /// The selected queue, if it exists.
    pub fn selected(&self) -> Option<&QueueConfig> {
        self.queues.get(usize::from(self.queue_select))
    }

    /// The selected queue for a configuration write: none when it does not
    /// exist or is already enabled (the driver must not change a live
    /// queue, 4.2.2.3 / 4.1.4.3.2), or the device is running.
    pub fn selected_for_write(&mut self) -> Option<&mut QueueConfig> {
        if self.status() & status::DRIVER_OK != 0 {
            return None;
        }
        self.queues
            .get_mut(usize::from(self.queue_select))
            .filter(|q| !q.ready)
    }

    /// Sets the selected queue's size if it is a valid one (a power of 2 no
    /// larger than the maximum; split rings, 2.7).
    pub fn set_queue_size(&mut self, size: u16) {
        if let Some(q) = self.selected_for_write() {
            if size != 0 && size <= q.max_size && size.is_power_of_two() {
                q.size = size;
            }
        }
    }

    /// Enables the selected queue (writing 0 does nothing: queues are
    /// disabled only by reset).
    pub fn set_queue_ready(&mut self, ready: bool) {
        if let Some(q) = self.selected_for_write() {
            if ready {
                q.ready = true;
            }
        }
    }

    /// Handles a status write: reset on 0, FEATURES_OK check, activation on
    /// DRIVER_OK. `interrupt` is what the device raises once active.
    pub fn write_status(
        &mut self,
        value: u8,
        device: &mut dyn VirtioDevice,
        interrupt: &Arc<dyn VirtioInterrupt>,
    ) {
        let old = self.status();
        if value == 0 {
            if old & status::DRIVER_OK != 0 || old & status::NEEDS_RESET != 0 {
                device.reset();
            }
            self.reset();
            return;
        }
        // The driver only ever adds bits (2.1.1); anything else is ignored.
        let required = old & !status::NEEDS_RESET;
        if value & required != required {
            return;
        }
        let mut new = value | (old & status::NEEDS_RESET);
        if new & status::FEATURES_OK != 0 && old & status::FEATURES_OK == 0 {
            let version_1 = 1u64 << VIRTIO_F_VERSION_1;
            if self.driver_features & version_1 == 0 {
                // Modern transports only: without VERSION_1 refuse (3.1.1).
                new &= !status::FEATURES_OK;
            }
        }
        let activate = new & status::DRIVER_OK != 0
            && old & status::DRIVER_OK == 0
            && new & status::FEATURES_OK != 0;
        if new & status::DRIVER_OK != 0 && new & status::FEATURES_OK == 0 {
            return;
        }
        self.status.store(new, Ordering::SeqCst);
        if activate {
            if let Err(e) = device.activate(self.driver_features, &self.queues, interrupt.clone()) {
                eprintln!("virtio: device activation failed: {e}");
                interrupt.set_needs_reset();
            }
        }
    }

    /// Back to the state after power-on (keeping the offered features).
    pub fn reset(&mut self) {
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.driver_features = 0;
        self.queue_select = 0;
        for q in &mut self.queues {
            *q = QueueConfig::new(q.max_size);
        }
        self.status.store(0, Ordering::SeqCst);
    }

    /// Whether the driver has set DRIVER_OK.
    pub fn driver_ok(&self) -> bool {
        self.status() & status::DRIVER_OK != 0
    }
}

/// Sets `reg`'s 32-bit half at `high` of a 64-bit address.
pub(crate) fn set_half(reg: &mut u64, high: bool, v: u32) {
    if high {
        *reg = (*reg & 0xffff_ffff) | (u64::from(v) << 32);
    } else {
        *reg = (*reg & !0xffff_ffff) | u64::from(v);
    }
}

/// Sets NEEDS_RESET in `status`.
pub(crate) fn mark_needs_reset(status: &AtomicU8) {
    status.fetch_or(status::NEEDS_RESET, Ordering::SeqCst);
}

#[cfg(test)]
pub(crate) mod testutil;
