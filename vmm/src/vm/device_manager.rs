//! The VM's buses and the resources devices are placed with.
//!
//! [`DeviceManager`] owns the PIO and MMIO [`Bus`]es that vCPU exits
//! dispatch to, the allocator of MMIO windows for virtio-mmio devices, the
//! allocator of their interrupt lines (IOAPIC pins 5..=23), the record of
//! those devices (for the DSDT and the kernel command line), and the
//! [`KvmVmHooks`] devices use for ioeventfds, irqfds and MSI routes. The
//! PCI host bridge is given its resources by [`DeviceManager::pci_layout`].
//!
//! The buses are `Arc<RwLock<Bus>>`: vCPU threads take the read lock on
//! each exit; devices are inserted (write lock) before the vCPUs start. A
//! device handler runs under the read lock, so it must not insert into or
//! remove from the bus it is on (a PCI BAR move belongs to the host bridge,
//! which should own its whole window and dispatch within it).

use std::io::Write;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, RwLock};

use devices::bus::{Bus, BusDevice, BusError, VmHooks};
use vm_allocator::{AddressAllocator, AllocPolicy, IdAllocator};
use vm_superio::I8042Device;
use vmm_sys_util::eventfd::EventFd;

use super::irq::{KvmVmHooks, FIRST_DEVICE_GSI, IOAPIC_PINS, SERIAL_GSI};
use super::layout;
use super::legacy::{
    AcpiSleep, ExitTrigger, PowerButton, SerialDevice, VmExitReason, ACPI_SLEEP_PORT,
    ACPI_SLEEP_PORT_LEN, I8042, I8042_PORT, I8042_PORT_LEN, SERIAL_PORT, SERIAL_PORT_LEN,
};

/// A virtio-mmio device's place: its register window and interrupt line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioSlot {
    /// Guest physical base of the register window.
    pub base: u64,
    /// Window length.
    pub len: u64,
    /// The IOAPIC pin (GSI) of its interrupt; edge-triggered, active high.
    pub gsi: u32,
}

/// The PCI host bridge's resources (segment 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciLayout {
    /// ECAM base (MMIO bus).
    pub ecam_base: u64,
    /// ECAM size (bus 0 .. `last_bus`).
    pub ecam_size: u64,
    /// The last bus the ECAM decodes.
    pub last_bus: u8,
    /// The 32-bit window BARs are assigned from.
    pub mmio_window_base: u64,
    /// Its size.
    pub mmio_window_size: u64,
    /// The 0xcf8/0xcfc configuration mechanism's first port (PIO bus).
    pub config_io_port: u64,
    /// Its length (8).
    pub config_io_len: u64,
}

impl Default for PciLayout {
    fn default() -> Self {
        PciLayout {
            ecam_base: layout::PCI_ECAM_START,
            ecam_size: layout::PCI_ECAM_SIZE,
            last_bus: layout::PCI_ECAM_LAST_BUS,
            mmio_window_base: layout::PCI_MMIO_START,
            mmio_window_size: layout::PCI_MMIO_SIZE,
            config_io_port: layout::PCI_CONFIG_IO_PORT,
            config_io_len: layout::PCI_CONFIG_IO_LEN,
        }
    }
}

/// Why a device could not be placed.
#[derive(Debug, thiserror::Error)]
pub enum DeviceManagerError {
    /// No MMIO window of that size is left.
    #[error("no free MMIO window of {0:#x} bytes for a device")]
    NoMmioSpace(u64, #[source] vm_allocator::Error),
    /// All device interrupt lines are taken.
    #[error(
        "no free interrupt line for a virtio-mmio device (pins {FIRST_DEVICE_GSI}..{IOAPIC_PINS})"
    )]
    NoIrq(#[source] vm_allocator::Error),
    /// The bus refused the range.
    #[error("could not place a device on the bus")]
    Bus(#[source] BusError),
    /// An eventfd or KVM call failed.
    #[error("could not wire the {0} interrupt")]
    Irq(&'static str, #[source] std::io::Error),
}

/// A device shared between the bus and whoever else drives it.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// The VM's buses and device resources.
pub struct DeviceManager {
    hooks: Arc<KvmVmHooks>,
    pio_bus: Arc<RwLock<Bus>>,
    mmio_bus: Arc<RwLock<Bus>>,
    mmio_space: AddressAllocator,
    device_irqs: IdAllocator,
    mmio_devices: Vec<MmioSlot>,
    serial: Option<Arc<Mutex<SerialDevice>>>,
    power_button: Option<Arc<PowerButton>>,
}

fn write_bus(bus: &RwLock<Bus>) -> std::sync::RwLockWriteGuard<'_, Bus> {
    bus.write().unwrap_or_else(|p| p.into_inner())
}

impl DeviceManager {
    /// Empty buses for a VM whose hooks are `hooks`.
    pub fn new(hooks: Arc<KvmVmHooks>) -> Self {
        DeviceManager {
            hooks,
            pio_bus: Arc::default(),
            mmio_bus: Arc::default(),
            // Constant, valid ranges.
            mmio_space: AddressAllocator::new(
                layout::MMIO_DEVICES_START,
                layout::MMIO_DEVICES_SIZE,
            )
            .expect("valid MMIO device window"),
            device_irqs: IdAllocator::new(FIRST_DEVICE_GSI, IOAPIC_PINS - 1)
                .expect("valid IRQ range"),
            mmio_devices: Vec::new(),
            serial: None,
            power_button: None,
        }
    }

    /// What devices ask of KVM (ioeventfd, irqfd, MSI routes).
    pub fn hooks(&self) -> Arc<dyn VmHooks> {
        self.hooks.clone()
    }

    /// The KVM implementation of the hooks.
    pub fn kvm_hooks(&self) -> &Arc<KvmVmHooks> {
        &self.hooks
    }

    /// The port I/O bus.
    pub fn pio_bus(&self) -> &Arc<RwLock<Bus>> {
        &self.pio_bus
    }

    /// The MMIO bus.
    pub fn mmio_bus(&self) -> &Arc<RwLock<Bus>> {
        &self.mmio_bus
    }

    /// Reserves a `len`-byte MMIO window (page-aligned) and an interrupt
    /// line for a virtio-mmio device, and records it for the DSDT and the
    /// command line. The transport is built with the slot (it needs the
    /// base for its ioeventfds and the GSI for its irqfd), then placed with
    /// [`DeviceManager::insert_mmio_device`].
    pub fn add_mmio_device(&mut self, len: u64) -> Result<MmioSlot, DeviceManagerError> {
        let range = self
            .mmio_space
            .allocate(len, 0x1000, AllocPolicy::FirstMatch)
            .map_err(|e| DeviceManagerError::NoMmioSpace(len, e))?;
        let gsi = match self.device_irqs.allocate_id() {
            Ok(g) => g,
            Err(e) => {
                let _ = self.mmio_space.free(&range);
                return Err(DeviceManagerError::NoIrq(e));
            }
        };
        let slot = MmioSlot {
            base: range.start(),
            len,
            gsi,
        };
        self.mmio_devices.push(slot);
        Ok(slot)
    }

    /// Places `dev` at `slot` on the MMIO bus.
    pub fn insert_mmio_device(
        &self,
        slot: &MmioSlot,
        dev: SharedDevice,
    ) -> Result<(), DeviceManagerError> {
        write_bus(&self.mmio_bus)
            .insert(slot.base, slot.len, dev)
            .map_err(DeviceManagerError::Bus)
    }

    /// Every virtio-mmio device, in the order they were added.
    pub fn mmio_devices(&self) -> &[MmioSlot] {
        &self.mmio_devices
    }

    /// Where the PCI host bridge goes: its ECAM on the MMIO bus, its
    /// 0xcf8 ports on the PIO bus, and its BAR window.
    pub fn pci_layout(&self) -> PciLayout {
        PciLayout::default()
    }

    /// COM1, once [`DeviceManager::add_legacy_devices`] placed it.
    pub fn serial(&self) -> Option<&Arc<Mutex<SerialDevice>>> {
        self.serial.as_ref()
    }

    /// The power button (its GED's interrupt line), once
    /// [`DeviceManager::add_power_button`] wired it.
    pub fn power_button(&self) -> Option<&Arc<PowerButton>> {
        self.power_button.as_ref()
    }

    /// Wires the power button's Generic Event Device to an interrupt line
    /// of its own (an irqfd), for the DSDT and QMP `system_powerdown`.
    pub fn add_power_button(&mut self) -> Result<Arc<PowerButton>, DeviceManagerError> {
        let gsi = self
            .device_irqs
            .allocate_id()
            .map_err(DeviceManagerError::NoIrq)?;
        let irq = EventFd::new(libc::EFD_NONBLOCK)
            .map_err(|e| DeviceManagerError::Irq("power button", e))?;
        self.hooks
            .register_irqfd(&irq, gsi)
            .map_err(|e| DeviceManagerError::Irq("power button", e))?;
        let b = Arc::new(PowerButton::new(irq, gsi));
        self.power_button = Some(b.clone());
        Ok(b)
    }

    /// COM1 (output to `serial_out`, interrupt on GSI 4 by irqfd), the
    /// i8042 reset line and the ACPI sleep registers; the last two report
    /// on `exits`.
    pub fn add_legacy_devices(
        &mut self,
        serial_out: Box<dyn Write + Send>,
        exits: Sender<VmExitReason>,
    ) -> Result<(), DeviceManagerError> {
        let irq =
            EventFd::new(libc::EFD_NONBLOCK).map_err(|e| DeviceManagerError::Irq("serial", e))?;
        self.hooks
            .register_irqfd(&irq, SERIAL_GSI)
            .map_err(|e| DeviceManagerError::Irq("serial", e))?;
        let serial = Arc::new(Mutex::new(SerialDevice::new(irq, serial_out)));
        self.serial = Some(serial.clone());
        let i8042 = I8042(I8042Device::new(ExitTrigger::new(
            exits.clone(),
            VmExitReason::Reset,
        )));
        let sleep = AcpiSleep::new(ExitTrigger::new(exits, VmExitReason::PowerOff));
        let mut pio = write_bus(&self.pio_bus);
        pio.insert(SERIAL_PORT, SERIAL_PORT_LEN, serial)
            .map_err(DeviceManagerError::Bus)?;
        pio.insert(I8042_PORT, I8042_PORT_LEN, Arc::new(Mutex::new(i8042)))
            .map_err(DeviceManagerError::Bus)?;
        pio.insert(
            ACPI_SLEEP_PORT,
            ACPI_SLEEP_PORT_LEN,
            Arc::new(Mutex::new(sleep)),
        )
        .map_err(DeviceManagerError::Bus)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::channel;

    use devices::bus::MsiMessage;
    use kvm_ioctls::Kvm;

    use super::*;

    /// A VM with an in-kernel irqchip (needs /dev/kvm, as every vmm test
    /// of KVM itself does).
    fn manager() -> DeviceManager {
        let kvm = Kvm::new().expect("/dev/kvm");
        let vm = Arc::new(kvm.create_vm().unwrap());
        vm.create_irq_chip().unwrap();
        DeviceManager::new(Arc::new(KvmVmHooks::new(vm).unwrap()))
    }

    struct Ones;
    impl BusDevice for Ones {
        fn read(&mut self, _: u64, d: &mut [u8]) {
            d.fill(0x5a);
        }
        fn write(&mut self, _: u64, _: &[u8]) {}
    }

    #[test]
    fn mmio_devices_get_distinct_windows_and_lines_in_the_hole() {
        let mut dm = manager();
        let a = dm.add_mmio_device(0x1000).unwrap();
        let b = dm.add_mmio_device(0x200).unwrap();
        assert_eq!(
            a,
            MmioSlot {
                base: 0xc000_0000,
                len: 0x1000,
                gsi: 5
            }
        );
        assert_eq!((b.base, b.gsi), (0xc000_1000, 6));
        assert_eq!(dm.mmio_devices(), &[a, b]);
        dm.insert_mmio_device(&a, Arc::new(Mutex::new(Ones)))
            .unwrap();
        let mut buf = [0u8; 4];
        assert!(dm.mmio_bus().read().unwrap().read(a.base + 0x10, &mut buf));
        assert_eq!(buf, [0x5a; 4]);
    }

    #[test]
    fn device_lines_run_out_after_pin_23() {
        let mut dm = manager();
        let gsis: Vec<u32> = (0..19)
            .map(|_| dm.add_mmio_device(0x1000).unwrap().gsi)
            .collect();
        assert_eq!(gsis, (5..24).collect::<Vec<_>>());
        assert!(matches!(
            dm.add_mmio_device(0x1000),
            Err(DeviceManagerError::NoIrq(_))
        ));
        assert_eq!(dm.mmio_devices().len(), 19);
        // The window of the refused device was given back.
        let next = 0xc000_0000 + 19 * 0x1000;
        let r = dm
            .mmio_space
            .allocate(0x1000, 0x1000, AllocPolicy::ExactMatch(next))
            .unwrap();
        assert_eq!(r.start(), next);
    }

    #[test]
    fn legacy_devices_sit_on_their_ports() {
        let mut dm = manager();
        let (tx, rx) = channel();
        dm.add_legacy_devices(Box::new(std::io::sink()), tx)
            .unwrap();
        let pio = dm.pio_bus().read().unwrap();
        let mut b = [0u8];
        // COM1's LSR says the transmitter is empty.
        assert!(pio.read(0x3fd, &mut b));
        assert_ne!(b[0] & 0x20, 0);
        assert!(pio.write(0x64, &[0xfe]));
        assert_eq!(rx.try_recv(), Ok(VmExitReason::Reset));
        assert!(pio.write(0x600, &[0x34]));
        assert_eq!(rx.try_recv(), Ok(VmExitReason::PowerOff));
        // Nobody at 0xcf8 until a PCI host bridge is placed there.
        assert!(!pio.read(0xcf8, &mut b));
    }

    #[test]
    fn kvm_hooks_take_ioevents_irqfds_and_msi_routes() {
        let dm = manager();
        let hooks = dm.hooks();
        let fd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        hooks.register_ioevent(&fd, 0xc000_0050, None).unwrap();
        hooks.register_ioevent(&fd, 0xd000_3000, Some(3)).unwrap();
        // KVM refuses the same registration twice.
        assert!(hooks.register_ioevent(&fd, 0xc000_0050, None).is_err());
        hooks.unregister_ioevent(&fd, 0xc000_0050, None).unwrap();
        hooks.unregister_ioevent(&fd, 0xd000_3000, Some(3)).unwrap();

        let gsi = hooks.allocate_gsi().unwrap();
        assert!(gsi >= 24);
        let msg = MsiMessage {
            address: 0xfee0_0000,
            data: 0x4041,
        };
        hooks.set_msi_route(gsi, Some(msg)).unwrap();
        hooks.register_irqfd(&fd, gsi).unwrap();
        hooks.unregister_irqfd(&fd, gsi).unwrap();
        hooks.set_msi_route(gsi, None).unwrap();
        // A GSI nobody allocated is refused without touching KVM.
        let e = hooks.set_msi_route(gsi + 100, Some(msg)).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
        // Legacy lines keep working for irqfds.
        hooks.register_irqfd(&fd, 5).unwrap();
    }
}
