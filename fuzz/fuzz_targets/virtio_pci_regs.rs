//! Fuzzes a virtio-blk device's virtio-pci transport the way a guest
//! reaches it: configuration space through ECAM and through the 0xcf8
//! ports (BAR sizing and moves, the command register, the MSI-X and
//! VIRTIO_PCI_CAP_PCI_CFG capabilities), loads and stores of 1, 2, 4 or 8
//! bytes in BAR0 wherever it decodes (common configuration, ISR, device
//! configuration, doorbells that signal their ioeventfd as KVM does, the
//! MSI-X table and PBA), stores into guest memory and configuration
//! changes.
//!
//! No sequence may panic or hang. The device keeps its identity, is never
//! running without FEATURES_OK, and dropping it leaves no ioeventfd
//! registered.
//!
//! Operation format, repeated: an op byte (bits 0-2 the kind: config
//! read, config write, BAR read, BAR write, guest memory write, config
//! change, port write, port read; bits 3-4 log2 of the width), then its
//! operands: config accesses a slot byte (bit 7 clear: the device's slot,
//! else slot `& 31`) and a register (u16 LE, mod 4096); BAR accesses an
//! offset (u16 LE, mod the BAR size); port accesses an offset byte (mod
//! 8); writes their value.

#![no_main]

mod common;

use std::sync::{Arc, Mutex};

use common::{FuzzHooks, Input};
use devices::bus::{Bus, BusDevice};
use devices::pci::{hdr, PciDevice, PciSegment, CONFIG_SPACE_LEN};
use devices::virtio::pci::{VirtioPciDevice, BAR_SIZE, VIRTIO_PCI_VENDOR};
use devices::virtio::status;
use devices::virtio_blk::VirtioBlk;
use libfuzzer_sys::fuzz_target;

type Dev = VirtioPciDevice<VirtioBlk>;

fn check(dev: &Mutex<Dev>) {
    let mut d = dev.lock().unwrap();
    let s = d.status();
    if s & status::DRIVER_OK != 0 {
        assert_ne!(
            s & status::FEATURES_OK,
            0,
            "running without FEATURES_OK: {s:#x}"
        );
    }
    let mut v = [0u8; 2];
    d.config_read(hdr::VENDOR, &mut v);
    assert_eq!(u16::from_le_bytes(v), VIRTIO_PCI_VENDOR);
}

fuzz_target!(|data: &[u8]| {
    let (mem, blk) = common::device();
    let hooks = FuzzHooks::new();
    let seg = PciSegment::new(0xe000_0000, 0x1000_0000);
    let bar = seg.allocate_bar(BAR_SIZE).unwrap();
    let dev = Arc::new(Mutex::new(Dev::new(blk, hooks.clone(), bar).unwrap()));
    let slot = u64::from(seg.add_device(dev.clone()).unwrap());
    let mut ecam = seg.ecam();
    let mut ports = seg.config_io();
    let mut bars = Bus::new();
    bars.insert(bar, BAR_SIZE, dev.clone() as Arc<Mutex<dyn BusDevice>>)
        .unwrap();
    let mut base = bar;
    let mut input = Input::new(data);
    while !input.is_empty() {
        let op = input.u8();
        let len = 1usize << ((op >> 3) & 3);
        match op & 7 {
            k @ (0 | 1) => {
                let sel = input.u8();
                let s = if sel & 0x80 == 0 {
                    slot
                } else {
                    u64::from(sel & 31)
                };
                let reg = u64::from(input.u16()) % CONFIG_SPACE_LEN as u64;
                let at = (s << 15) | reg;
                if k == 0 {
                    let mut b = [0u8; 8];
                    ecam.read(at, &mut b[..len]);
                } else {
                    let v = input.value(len);
                    ecam.write(at, &v[..len]);
                    // The VMM applies BAR moves after every exit.
                    if let Err(e) = seg.apply_bar_reprograms(&mut bars) {
                        eprintln!("BAR move refused: {e}");
                    }
                    if let Some((b, _)) = dev.lock().unwrap().bar_mapping() {
                        base = b;
                    }
                }
            }
            2 => {
                let off = u64::from(input.u16()) % BAR_SIZE;
                let mut b = [0u8; 8];
                bars.read(base + off, &mut b[..len]);
            }
            3 => {
                let off = u64::from(input.u16()) % BAR_SIZE;
                let v = input.value(len);
                if !hooks.doorbell(base + off, &v[..len]) {
                    bars.write(base + off, &v[..len]);
                }
            }
            4 => common::mem_write(&mem, &mut input),
            5 => dev.lock().unwrap().config_changed(),
            6 => {
                let off = u64::from(input.u8() % 8);
                let v = input.value(len);
                ports.write(off, &v[..len]);
                if let Err(e) = seg.apply_bar_reprograms(&mut bars) {
                    eprintln!("BAR move refused: {e}");
                }
                if let Some((b, _)) = dev.lock().unwrap().bar_mapping() {
                    base = b;
                }
            }
            _ => {
                let off = u64::from(input.u8() % 8);
                let mut b = [0u8; 8];
                ports.read(off, &mut b[..len]);
            }
        }
        check(&dev);
    }
    drop(bars);
    drop(seg);
    drop(ecam);
    drop(ports);
    let dev = Arc::into_inner(dev).expect("nothing else holds the device");
    drop(dev);
    assert_eq!(hooks.registrations().0, 0, "doorbells left registered");
});
