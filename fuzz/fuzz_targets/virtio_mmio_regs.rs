//! Fuzzes a virtio-blk device's virtio-mmio transport the way a guest
//! reaches it: loads and stores of 1, 2, 4 or 8 bytes anywhere in its
//! register window through the MMIO bus (a store to QueueNotify that
//! matches an ioeventfd signals it, as KVM does), stores into guest
//! memory (rings the device may start serving on its IOThread), and
//! configuration changes (a resize).
//!
//! No sequence may panic or hang. The identification registers never
//! change, the device is never running without FEATURES_OK, a status
//! write of 0 resets it, and dropping the transport leaves no ioeventfd
//! or irqfd registered.
//!
//! Operation format, repeated: an op byte (bits 0-1 the kind: read,
//! write, guest memory write, config change; bits 2-3 log2 of the
//! width), then for reads and writes the offset (u16 LE, mod 0x1000) and
//! for writes the value.

#![no_main]

mod common;

use std::sync::{Arc, Mutex};

use common::{FuzzHooks, Input};
use devices::bus::{Bus, BusDevice};
use devices::virtio::mmio::{MmioTransport, MMIO_LEN};
use devices::virtio::status;
use libfuzzer_sys::fuzz_target;

const BASE: u64 = 0xd000_0000;
const GSI: u32 = 5;
const STATUS_REG: u64 = 0x70;

fn read(bus: &Bus, off: u64, len: usize) -> u64 {
    let mut b = [0u8; 8];
    bus.read(BASE + off, &mut b[..len]);
    u64::from_le_bytes(b)
}

fn check_identity(bus: &Bus) {
    assert_eq!(read(bus, 0x0, 4), 0x7472_6976, "MagicValue");
    assert_eq!(read(bus, 0x4, 4), 2, "Version");
    assert_eq!(read(bus, 0x8, 4), 2, "DeviceID (block)");
}

fn check_status(bus: &Bus) {
    let s = read(bus, STATUS_REG, 4) as u8;
    if s & status::DRIVER_OK != 0 {
        assert_ne!(
            s & status::FEATURES_OK,
            0,
            "running without FEATURES_OK: {s:#x}"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let (mem, dev) = common::device();
    let hooks = FuzzHooks::new();
    let transport = MmioTransport::new(dev, hooks.clone(), BASE, GSI).unwrap();
    let transport = Arc::new(Mutex::new(transport));
    let mut bus = Bus::new();
    bus.insert(
        BASE,
        MMIO_LEN,
        transport.clone() as Arc<Mutex<dyn BusDevice>>,
    )
    .unwrap();
    let mut input = Input::new(data);
    while !input.is_empty() {
        let op = input.u8();
        let len = 1usize << ((op >> 2) & 3);
        match op & 3 {
            0 => {
                let off = u64::from(input.u16()) % MMIO_LEN;
                let _ = read(&bus, off, len);
            }
            1 => {
                let off = u64::from(input.u16()) % MMIO_LEN;
                let v = input.value(len);
                if !hooks.doorbell(BASE + off, &v[..len]) {
                    bus.write(BASE + off, &v[..len]);
                }
                if off == STATUS_REG && len == 4 && v[..4] == [0; 4] {
                    assert_eq!(read(&bus, STATUS_REG, 4), 0, "status after reset");
                }
            }
            2 => common::mem_write(&mem, &mut input),
            _ => transport.lock().unwrap().config_changed(),
        }
        check_status(&bus);
    }
    check_identity(&bus);
    drop(bus);
    let transport = Arc::into_inner(transport).expect("the bus let go of the transport");
    drop(transport);
    assert_eq!(hooks.registrations(), (0, 0), "registrations left behind");
});
