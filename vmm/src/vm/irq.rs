//! Interrupts on KVM: the GSI routing table, and [`KvmVmHooks`], the
//! [`VmHooks`] the devices use (ioeventfds, irqfds, MSI routes).
//!
//! `KVM_SET_GSI_ROUTING` replaces the whole table, so the VMM keeps the
//! table itself ([`GsiRoutes`]): the legacy routes KVM installs by default
//! with the in-kernel irqchip (GSI n to IOAPIC pin n for n < 24, and to
//! PIC pin n for n < 16, as QEMU does without the cascade pin 2), plus one
//! MSI entry per GSI a device has routed. Every change rewrites the table
//! from that state, and a change KVM refuses is undone.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};

use devices::bus::{MsiMessage, VmHooks};
use kvm_bindings::{
    kvm_irq_routing_entry, kvm_irq_routing_irqchip, kvm_irq_routing_msi, KvmIrqRouting,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP,
    KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vm_allocator::IdAllocator;
use vmm_sys_util::eventfd::EventFd;

/// Pins of the in-kernel IOAPIC (GSIs 0..24 are legacy lines).
pub const IOAPIC_PINS: u32 = 24;
/// The serial port's line.
pub const SERIAL_GSI: u32 = 4;
/// First line handed to virtio-mmio devices (0-4 are the timer, keyboard,
/// cascade, COM2 and COM1).
pub const FIRST_DEVICE_GSI: u32 = 5;
/// Highest GSI an MSI route may use (KVM allows 4096 routes).
pub const MAX_MSI_GSI: u32 = 4095;

fn irqchip_entry(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip = kvm_irq_routing_irqchip { irqchip: chip, pin };
    e
}

fn msi_entry(gsi: u32, msg: MsiMessage) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        ..Default::default()
    };
    e.u.msi = kvm_irq_routing_msi {
        address_lo: msg.address as u32,
        address_hi: (msg.address >> 32) as u32,
        data: msg.data,
        ..Default::default()
    };
    e
}

/// The GSI routing table the VMM keeps and hands whole to KVM.
pub struct GsiRoutes {
    routes: BTreeMap<u32, Vec<kvm_irq_routing_entry>>,
    msi_gsis: IdAllocator,
}

impl Default for GsiRoutes {
    fn default() -> Self {
        Self::new()
    }
}

impl GsiRoutes {
    /// The legacy routes only.
    pub fn new() -> Self {
        let mut routes = BTreeMap::new();
        for gsi in 0..IOAPIC_PINS {
            let mut v = vec![irqchip_entry(gsi, KVM_IRQCHIP_IOAPIC, gsi)];
            if gsi < 8 && gsi != 2 {
                v.push(irqchip_entry(gsi, KVM_IRQCHIP_PIC_MASTER, gsi));
            } else if (8..16).contains(&gsi) {
                v.push(irqchip_entry(gsi, KVM_IRQCHIP_PIC_SLAVE, gsi - 8));
            }
            routes.insert(gsi, v);
        }
        GsiRoutes {
            routes,
            // The range is constant and valid.
            msi_gsis: IdAllocator::new(IOAPIC_PINS, MAX_MSI_GSI).expect("valid GSI range"),
        }
    }

    /// A GSI no route uses yet, for an MSI.
    pub fn allocate(&mut self) -> io::Result<u32> {
        self.msi_gsis
            .allocate_id()
            .map_err(|e| io::Error::other(format!("no free GSI for an MSI route: {e}")))
    }

    /// Routes an allocated `gsi` to `msg`, or removes its route. Returns
    /// what was there before, for [`GsiRoutes::restore`].
    pub fn set_msi(
        &mut self,
        gsi: u32,
        msg: Option<MsiMessage>,
    ) -> io::Result<Option<Vec<kvm_irq_routing_entry>>> {
        if gsi < IOAPIC_PINS || !self.msi_gsis.is_allocated(gsi) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("GSI {gsi} was not allocated for MSI"),
            ));
        }
        Ok(match msg {
            Some(m) => self.routes.insert(gsi, vec![msi_entry(gsi, m)]),
            None => self.routes.remove(&gsi),
        })
    }

    /// Puts back what [`GsiRoutes::set_msi`] replaced.
    pub fn restore(&mut self, gsi: u32, old: Option<Vec<kvm_irq_routing_entry>>) {
        match old {
            Some(v) => self.routes.insert(gsi, v),
            None => self.routes.remove(&gsi),
        };
    }

    /// Every entry, in GSI order.
    pub fn entries(&self) -> Vec<kvm_irq_routing_entry> {
        self.routes.values().flatten().copied().collect()
    }

    /// The table in KVM's form.
    pub fn to_kvm(&self) -> io::Result<KvmIrqRouting> {
        KvmIrqRouting::from_entries(&self.entries())
            .map_err(|e| io::Error::other(format!("GSI routing table too large: {e:?}")))
    }
}

fn kvm_err(e: kvm_ioctls::Error) -> io::Error {
    io::Error::from_raw_os_error(e.errno())
}

/// [`VmHooks`] on a KVM VM.
pub struct KvmVmHooks {
    vm: Arc<VmFd>,
    routes: Mutex<GsiRoutes>,
}

impl KvmVmHooks {
    /// Hooks for `vm`, whose in-kernel irqchip must exist. Installs the
    /// legacy routing table, the same KVM starts with.
    pub fn new(vm: Arc<VmFd>) -> io::Result<Self> {
        let routes = GsiRoutes::new();
        vm.set_gsi_routing(&routes.to_kvm()?).map_err(kvm_err)?;
        Ok(KvmVmHooks {
            vm,
            routes: Mutex::new(routes),
        })
    }

    /// The VM.
    pub fn vm(&self) -> &Arc<VmFd> {
        &self.vm
    }

    fn routes(&self) -> std::sync::MutexGuard<'_, GsiRoutes> {
        self.routes.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl VmHooks for KvmVmHooks {
    fn register_ioevent(&self, fd: &EventFd, addr: u64, datamatch: Option<u32>) -> io::Result<()> {
        let a = IoEventAddress::Mmio(addr);
        match datamatch {
            Some(v) => self.vm.register_ioevent(fd, &a, v),
            None => self.vm.register_ioevent(fd, &a, NoDatamatch),
        }
        .map_err(kvm_err)
    }

    fn unregister_ioevent(
        &self,
        fd: &EventFd,
        addr: u64,
        datamatch: Option<u32>,
    ) -> io::Result<()> {
        let a = IoEventAddress::Mmio(addr);
        match datamatch {
            Some(v) => self.vm.unregister_ioevent(fd, &a, v),
            None => self.vm.unregister_ioevent(fd, &a, NoDatamatch),
        }
        .map_err(kvm_err)
    }

    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> io::Result<()> {
        self.vm.register_irqfd(fd, gsi).map_err(kvm_err)
    }

    fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> io::Result<()> {
        self.vm.unregister_irqfd(fd, gsi).map_err(kvm_err)
    }

    fn set_msi_route(&self, gsi: u32, msg: Option<MsiMessage>) -> io::Result<()> {
        let mut routes = self.routes();
        let old = routes.set_msi(gsi, msg)?;
        let result = routes
            .to_kvm()
            .and_then(|t| self.vm.set_gsi_routing(&t).map_err(kvm_err));
        if result.is_err() {
            routes.restore(gsi, old);
        }
        result
    }

    fn allocate_gsi(&self) -> io::Result<u32> {
        self.routes().allocate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn describe(e: &kvm_irq_routing_entry) -> (u32, u32, u32, u32) {
        if e.type_ == KVM_IRQ_ROUTING_MSI {
            // SAFETY: the type says the union holds an MSI route.
            let m = unsafe { e.u.msi };
            (e.gsi, e.type_, m.address_lo, m.data)
        } else {
            // SAFETY: every other entry this module makes is an irqchip route.
            let c = unsafe { e.u.irqchip };
            (e.gsi, e.type_, c.irqchip, c.pin)
        }
    }

    #[test]
    fn legacy_table_routes_ioapic_and_pic_lines() {
        let r = GsiRoutes::new();
        let e: Vec<_> = r.entries().iter().map(describe).collect();
        // 24 IOAPIC pins + 15 PIC pins (no cascade).
        assert_eq!(e.len(), 24 + 15);
        assert!(e.contains(&(4, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQCHIP_IOAPIC, 4)));
        assert!(e.contains(&(4, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQCHIP_PIC_MASTER, 4)));
        assert!(e.contains(&(12, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQCHIP_PIC_SLAVE, 4)));
        assert!(!e.contains(&(2, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQCHIP_PIC_MASTER, 2)));
        assert!(e.contains(&(23, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQCHIP_IOAPIC, 23)));
    }

    #[test]
    fn msi_routes_are_added_replaced_and_removed_keeping_legacy_ones() {
        let mut r = GsiRoutes::new();
        let a = r.allocate().unwrap();
        let b = r.allocate().unwrap();
        assert_eq!((a, b), (24, 25));
        let m = |data| MsiMessage {
            address: 0xfee0_0000,
            data,
        };
        r.set_msi(a, Some(m(0x41))).unwrap();
        r.set_msi(b, Some(m(0x42))).unwrap();
        r.set_msi(a, Some(m(0x43))).unwrap();
        let e: Vec<_> = r.entries().iter().map(describe).collect();
        assert_eq!(e.len(), 39 + 2);
        assert!(e.contains(&(24, KVM_IRQ_ROUTING_MSI, 0xfee0_0000, 0x43)));
        assert!(e.contains(&(25, KVM_IRQ_ROUTING_MSI, 0xfee0_0000, 0x42)));
        let old = r.set_msi(b, None).unwrap();
        assert_eq!(r.entries().len(), 39 + 1);
        r.restore(b, old);
        assert_eq!(r.entries().len(), 39 + 2);
    }

    #[test]
    fn unallocated_or_legacy_gsi_is_refused() {
        let mut r = GsiRoutes::new();
        let msg = Some(MsiMessage::default());
        assert!(r.set_msi(4, msg).is_err());
        assert!(r.set_msi(30, msg).is_err());
        assert_eq!(r.entries().len(), 39);
    }

    #[test]
    fn msi_address_high_half_is_kept() {
        let mut r = GsiRoutes::new();
        let g = r.allocate().unwrap();
        r.set_msi(
            g,
            Some(MsiMessage {
                address: 0x1_fee0_1000,
                data: 7,
            }),
        )
        .unwrap();
        let e = r.entries().into_iter().find(|e| e.gsi == g).unwrap();
        // SAFETY: the entry was made by `set_msi`.
        let m = unsafe { e.u.msi };
        assert_eq!((m.address_hi, m.address_lo, m.data), (1, 0xfee0_1000, 7));
    }
}
