//! ECAM and 0xCF8/0xCFC accesses to present and absent functions, BAR
//! allocation and the BAR-move queue.

use super::*;

/// A function with a fixed header and a scratch dword at 0x40; a write to
/// 0x44 reports a BAR move.
struct Dummy {
    config: ConfigSpace,
}

impl Dummy {
    fn new() -> Arc<Mutex<Self>> {
        let mut config = ConfigSpace::type0(0x1234, 0x5678, 0x0180, 3);
        config.set_writable(0x40, 4, 0xff);
        Arc::new(Mutex::new(Dummy { config }))
    }
}

impl PciDevice for Dummy {
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        self.config.read(offset, data);
    }
    fn config_write(&mut self, offset: usize, data: &[u8]) -> Option<BarChange> {
        self.config.write(offset, data);
        (offset == 0x44).then_some(BarChange {
            old: Some(0x1000),
            new: Some(0x2000),
            len: 0x1000,
        })
    }
}

impl BusDevice for Dummy {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0x5a);
    }
    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

fn ecam_off(dev: u64, func: u64, reg: u64) -> u64 {
    (dev << 15) | (func << 12) | reg
}

fn ecam_read32(e: &mut PciEcam, dev: u64, func: u64, reg: u64) -> u32 {
    let mut b = [0u8; 4];
    e.read(ecam_off(dev, func, reg), &mut b);
    u32::from_le_bytes(b)
}

fn cf8_read(io: &mut PciConfigIo, bus: u32, dev: u32, func: u32, reg: u32, len: usize) -> u32 {
    let addr = 0x8000_0000 | (bus << 16) | (dev << 11) | (func << 8) | (reg & 0xfc);
    io.write(0, &addr.to_le_bytes());
    let mut b = [0u8; 4];
    io.read(4 + u64::from(reg & 3), &mut b[..len]);
    u32::from_le_bytes(b)
}

#[test]
fn host_bridge_answers_at_00_0_and_absent_functions_read_all_ones() {
    let seg = PciSegment::new(0xe000_0000, 0x1000_0000);
    let mut e = seg.ecam();
    assert_eq!(ecam_read32(&mut e, 0, 0, 0), 0x0d57_8086);
    assert_eq!(ecam_read32(&mut e, 0, 0, 8) >> 16, 0x0600);
    // Empty slot, other function, other bus.
    assert_eq!(ecam_read32(&mut e, 1, 0, 0), u32::MAX);
    assert_eq!(ecam_read32(&mut e, 0, 1, 0), u32::MAX);
    let mut b = [0u8; 4];
    e.read((1 << 20) | ecam_off(0, 0, 0), &mut b);
    assert_eq!(u32::from_le_bytes(b), u32::MAX);
    // The host bridge's ids are read-only.
    e.write(0, &[0, 0, 0, 0]);
    assert_eq!(ecam_read32(&mut e, 0, 0, 0), 0x0d57_8086);
    // Extended space of a present function reads 0 (no capabilities).
    assert_eq!(ecam_read32(&mut e, 0, 0, 0x100), 0);
}

#[test]
fn devices_take_free_slots_and_are_reachable_through_both_mechanisms() {
    let seg = PciSegment::new(0xe000_0000, 0x1000_0000);
    let slot = seg.add_device(Dummy::new()).unwrap();
    assert_eq!(slot, 1);
    let mut e = seg.ecam();
    let mut io = seg.config_io();
    assert_eq!(ecam_read32(&mut e, 1, 0, 0), 0x5678_1234);
    assert_eq!(cf8_read(&mut io, 0, 1, 0, 0, 4), 0x5678_1234);
    assert_eq!(cf8_read(&mut io, 0, 1, 0, 2, 2), 0x5678);
    assert_eq!(cf8_read(&mut io, 0, 1, 0, 3, 1), 0x56);
    assert_eq!(cf8_read(&mut io, 0, 1, 0, 8, 1), 3);
    // Writes through 0xcfc land; through ECAM they read back.
    io.write(0, &(0x8000_0000u32 | (1 << 11) | 0x40).to_le_bytes());
    io.write(4 + 2, &[0xbe, 0xba]);
    assert_eq!(ecam_read32(&mut e, 1, 0, 0x40), 0xbabe_0000);
    e.write(ecam_off(1, 0, 0x40), &[1]);
    assert_eq!(cf8_read(&mut io, 0, 1, 0, 0x40, 4), 0xbabe_0001);
    // Absent functions through 0xcfc.
    assert_eq!(cf8_read(&mut io, 0, 2, 0, 0, 4), u32::MAX);
    assert_eq!(cf8_read(&mut io, 1, 0, 0, 0, 4), u32::MAX);
    assert_eq!(cf8_read(&mut io, 0, 1, 1, 0, 2), 0xffff);
}

#[test]
fn config_address_register_rules() {
    let seg = PciSegment::new(0xe000_0000, 0x1000_0000);
    let mut io = seg.config_io();
    io.write(0, &0x8000_0803u32.to_le_bytes());
    let mut b = [0u8; 4];
    io.read(0, &mut b);
    assert_eq!(u32::from_le_bytes(b), 0x8000_0800, "bits 1:0 read as 0");
    // Narrow accesses to 0xcf8..0xcfb (e.g. the 0xcf9 reset port) do not
    // touch the address register.
    io.write(1, &[6]);
    io.write(0, &[0, 0]);
    io.read(0, &mut b);
    assert_eq!(u32::from_le_bytes(b), 0x8000_0800);
    // Without the enable bit the data window reads all ones.
    io.write(0, &0u32.to_le_bytes());
    io.read(4, &mut b);
    assert_eq!(b, [0xff; 4]);
    // A data access running past 0xcff is refused.
    io.write(0, &0x8000_0000u32.to_le_bytes());
    io.read(6, &mut b);
    assert_eq!(b, [0xff; 4]);
}

#[test]
fn misaligned_and_odd_sized_config_accesses_are_refused() {
    let seg = PciSegment::new(0xe000_0000, 0x1000_0000);
    let mut e = seg.ecam();
    let mut b = [0u8; 4];
    e.read(1, &mut b);
    assert_eq!(b, [0xff; 4]);
    let mut b3 = [0u8; 3];
    e.read(0, &mut b3);
    assert_eq!(b3, [0xff; 3]);
    let mut b2 = [0u8; 2];
    e.read(2, &mut b2);
    assert_eq!(u16::from_le_bytes(b2), 0x0d57);
}

#[test]
fn bar_allocation_is_aligned_and_bounded() {
    let seg = PciSegment::new(0xe000_1000, 0x4_0000);
    assert_eq!(seg.allocate_bar(0x8000), Some(0xe000_8000));
    assert_eq!(seg.allocate_bar(0x1000), Some(0xe001_0000));
    assert_eq!(seg.allocate_bar(0x3000), None, "not a power of two");
    assert_eq!(seg.allocate_bar(0x10_0000), None, "does not fit");
    assert_eq!(seg.allocate_bar(0x2_0000), Some(0xe002_0000));
    assert_eq!(seg.allocate_bar(0x1000), Some(0xe004_0000));
    assert_eq!(seg.allocate_bar(0x1000), None, "window used up");
}

#[test]
fn bar_moves_are_queued_and_applied_to_the_bus() {
    let seg = PciSegment::new(0xe000_0000, 0x1000_0000);
    let dev = Dummy::new();
    seg.add_device(dev.clone()).unwrap();
    let mut bus = Bus::new();
    bus.insert(0x1000, 0x1000, dev).unwrap();
    assert!(!seg.has_bar_reprograms());
    seg.ecam().write(ecam_off(1, 0, 0x44), &[0; 4]);
    assert!(seg.has_bar_reprograms());
    seg.apply_bar_reprograms(&mut bus).unwrap();
    assert!(!seg.has_bar_reprograms());
    let mut b = [0u8; 1];
    assert!(!bus.read(0x1000, &mut b));
    assert!(bus.read(0x2000, &mut b));
    assert_eq!(b, [0x5a]);
    assert!(seg.take_bar_reprograms().is_empty());
}
