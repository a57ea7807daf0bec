//! virtio-pci as a driver sees it: through ECAM and the MMIO bus, walking
//! the capability list, sizing and moving BAR0, programming MSI-X, and
//! whole requests through a real IOThread.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::bus::{Bus, MsiMessage};
use crate::iothread::{IoThread, IoThreadConfig};
use crate::pci::{PciEcam, PciSegment};
use crate::virtio::status;
use crate::virtio::testutil::*;
use crate::virtio_blk::{BlkOptions, GuestMem, VirtioBlk};

type Dev = VirtioPciDevice<VirtioBlk>;

/// What a driver learns from the capability list.
#[derive(Default, Debug)]
struct Layout {
    caps: HashMap<u8, (u8, u32, u32)>,
    notify_mult: u32,
    msix_cap: usize,
    table: u32,
    pba: u32,
    table_size: u16,
}

struct Guest {
    seg: PciSegment,
    ecam: PciEcam,
    slot: u64,
    bus: Bus,
    bar: u64,
    dev: Arc<Mutex<Dev>>,
    hooks: Arc<RecordingHooks>,
    rig: BlkRig,
    lay: Layout,
}

impl Guest {
    fn new(opts: BlkOptions, iothreads: Vec<Arc<IoThread>>) -> Guest {
        let mut rig = BlkRig::new();
        let hooks = RecordingHooks::new();
        let seg = PciSegment::new(0xe000_0000, 0x1000_0000);
        let bar = seg.allocate_bar(BAR_SIZE).unwrap();
        let blk = rig.device(opts, iothreads);
        let dev = Arc::new(Mutex::new(Dev::new(blk, hooks.clone(), bar).unwrap()));
        let slot = u64::from(seg.add_device(dev.clone()).unwrap());
        let mut bus = Bus::new();
        let (at, len) = dev.lock().unwrap().bar_mapping().unwrap();
        assert_eq!(at, bar);
        bus.insert(at, len, dev.clone()).unwrap();
        let mut g = Guest {
            ecam: seg.ecam(),
            seg,
            slot,
            bus,
            bar,
            dev,
            hooks,
            rig,
            lay: Layout::default(),
        };
        g.lay = g.walk_caps();
        g
    }

    fn cfg_read(&mut self, reg: usize, len: usize) -> u32 {
        let mut b = [0u8; 4];
        self.ecam
            .read((self.slot << 15) | reg as u64, &mut b[..len]);
        u32::from_le_bytes(b)
    }

    fn cfg_write(&mut self, reg: usize, v: u32, len: usize) {
        self.ecam
            .write((self.slot << 15) | reg as u64, &v.to_le_bytes()[..len]);
        self.seg.apply_bar_reprograms(&mut self.bus).unwrap();
    }

    fn walk_caps(&mut self) -> Layout {
        let mut lay = Layout::default();
        assert_ne!(self.cfg_read(hdr::STATUS, 2) & 0x10, 0, "capability list");
        let mut at = self.cfg_read(hdr::CAP_PTR, 1) as usize;
        let mut seen = 0;
        while at != 0 {
            seen += 1;
            assert!(seen < 16, "capability list loops");
            assert!(at >= 0x40 && at.is_multiple_of(4));
            let id = self.cfg_read(at, 1) as u8;
            match id {
                0x09 => {
                    let ty = self.cfg_read(at + 3, 1) as u8;
                    let bar = self.cfg_read(at + 4, 1) as u8;
                    let off = self.cfg_read(at + 8, 4);
                    let len = self.cfg_read(at + 12, 4);
                    if ty == 2 {
                        lay.notify_mult = self.cfg_read(at + 16, 4);
                    }
                    lay.caps.entry(ty).or_insert((bar, off, len));
                    if ty == 5 {
                        lay.caps.insert(0x85, (0, at as u32, 0));
                    }
                }
                0x11 => {
                    lay.msix_cap = at;
                    lay.table_size = (self.cfg_read(at + 2, 2) & 0x7ff) as u16 + 1;
                    lay.table = self.cfg_read(at + 4, 4);
                    lay.pba = self.cfg_read(at + 8, 4);
                }
                other => panic!("unexpected capability {other:#x}"),
            }
            at = self.cfg_read(at + 1, 1) as usize;
        }
        lay
    }

    fn cap_addr(&self, ty: u8) -> u64 {
        let (bar, off, _) = self.lay.caps[&ty];
        assert_eq!(bar, 0);
        self.bar + u64::from(off)
    }

    fn mmio_read(&self, addr: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        assert!(self.bus.read(addr, &mut b[..len]), "nothing at {addr:#x}");
        u64::from_le_bytes(b)
    }

    fn mmio_write(&self, addr: u64, v: u64, len: usize) {
        assert!(self.bus.write(addr, &v.to_le_bytes()[..len]));
    }

    fn common(&self, off: u64, len: usize) -> u64 {
        self.mmio_read(self.cap_addr(1) + off, len)
    }

    fn set_common(&self, off: u64, v: u64, len: usize) {
        self.mmio_write(self.cap_addr(1) + off, v, len);
    }

    fn msix_entry(&self, v: u64) -> u64 {
        self.bar + u64::from(self.lay.table & !7) + 16 * v
    }

    fn msix_enable(&mut self) {
        let at = self.lay.msix_cap + 2;
        let ctrl = self.cfg_read(at, 2);
        self.cfg_write(at, ctrl | 0x8000, 2);
    }

    fn program_vector(&self, v: u16, unmask: bool) -> MsiMessage {
        let msg = MsiMessage {
            address: 0xfee0_0000 | (u64::from(v) << 12),
            data: 0x40 + u32::from(v),
        };
        let e = self.msix_entry(u64::from(v));
        self.mmio_write(e, msg.address & 0xffff_ffff, 4);
        self.mmio_write(e + 4, msg.address >> 32, 4);
        self.mmio_write(e + 8, u64::from(msg.data), 4);
        self.mmio_write(e + 12, u64::from(!unmask), 4);
        msg
    }

    fn gsi(&self, v: u16) -> u32 {
        self.dev.lock().unwrap().vector_gsi(v).unwrap()
    }

    /// The driver's init sequence with queue `q` on MSI-X vector `q + 1`.
    fn setup(&mut self, queues: &[u16]) {
        use super::cc::*;
        self.set_common(STATUS, 0, 1);
        self.set_common(STATUS, u64::from(status::ACKNOWLEDGE | status::DRIVER), 1);
        for page in 0..2 {
            self.set_common(DFSELECT, page, 4);
            let f = self.common(DF, 4);
            self.set_common(GFSELECT, page, 4);
            self.set_common(GF, f, 4);
        }
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        self.set_common(STATUS, u64::from(s), 1);
        assert_eq!(self.common(STATUS, 1) as u8, s);
        self.set_common(MSIX, 0, 2);
        assert_eq!(self.common(MSIX, 2), 0);
        for &q in queues {
            let mem = self.rig.mem.clone();
            let mq = ring(&mem, q);
            self.set_common(Q_SELECT, u64::from(q), 2);
            assert_eq!(self.common(Q_SIZE, 2), u64::from(QSIZE));
            assert_eq!(self.common(Q_NOFF, 2), u64::from(q));
            self.set_common(Q_MSIX, u64::from(q) + 1, 2);
            assert_eq!(self.common(Q_MSIX, 2), u64::from(q) + 1);
            // Two 32-bit halves, as Linux writes them.
            self.set_common(Q_DESC, mq.desc(), 4);
            self.set_common(Q_DESC + 4, 0, 4);
            self.set_common(Q_AVAIL, mq.avail(), 8);
            self.set_common(Q_USED, mq.used, 4);
            self.set_common(Q_USED + 4, 0, 4);
            assert_eq!(self.common(Q_AVAIL, 8), mq.avail());
            self.set_common(Q_ENABLE, 1, 2);
            assert_eq!(self.common(Q_ENABLE, 2), 1);
        }
        self.set_common(STATUS, u64::from(s | status::DRIVER_OK), 1);
        assert_eq!(self.common(STATUS, 1) as u8, s | status::DRIVER_OK);
    }

    fn doorbell(&self, q: u16) -> bool {
        let addr = self.cap_addr(2) + u64::from(self.lay.notify_mult) * u64::from(q);
        self.hooks.doorbell(addr, u32::from(q))
    }
}

fn data(mem: &GuestMem, n: u16, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    mem.read_slice(&mut v, GuestAddress(DATA + u64::from(n) * 0x1000))
        .unwrap();
    v
}

#[test]
fn header_identifies_a_modern_virtio_block_device() {
    let mut g = Guest::new(BlkOptions::default(), vec![]);
    assert_eq!(g.cfg_read(0, 4), 0x1042_1af4);
    assert_eq!(g.cfg_read(8, 4), 0x0180_0001, "class 01 80 00, revision 1");
    assert_eq!(g.cfg_read(hdr::SUBSYS_VENDOR, 2), 0x1af4);
    assert_eq!(g.cfg_read(hdr::INT_PIN, 1), 0, "no INTx");
    assert_eq!(g.cfg_read(hdr::HEADER_TYPE, 1), 0);
    // Ids are read-only.
    g.cfg_write(0, 0, 4);
    assert_eq!(g.cfg_read(0, 4), 0x1042_1af4);
}

#[test]
fn capabilities_describe_every_structure_in_bar0() {
    let g = Guest::new(BlkOptions::default(), vec![]);
    for ty in 1..=5u8 {
        assert!(g.lay.caps.contains_key(&ty), "capability type {ty}");
    }
    assert_eq!(g.lay.notify_mult, 4);
    assert!(g.lay.caps[&1].2 >= 0x38, "common config length");
    assert_eq!(g.lay.table_size, 2, "one vector per queue plus config");
    assert_eq!(g.lay.table & 7, 0, "table in BAR0");
    assert_eq!(g.lay.pba & 7, 0, "PBA in BAR0");
    for (&ty, &(_, off, len)) in &g.lay.caps {
        if ty <= 4 {
            assert!(u64::from(off) + u64::from(len) <= BAR_SIZE);
        }
    }
    assert_eq!(g.common(super::cc::NUMQ, 2), 1);
}

#[test]
fn bar_sizing_reports_the_size_and_restoring_maps_the_bar_again() {
    let mut g = Guest::new(BlkOptions::default(), vec![]);
    let cmd = g.cfg_read(hdr::COMMAND, 2);
    assert_ne!(cmd & 2, 0, "memory decoding starts on");
    g.cfg_write(hdr::COMMAND, cmd & !2, 2);
    assert!(
        g.hooks.ioevent_addrs().is_empty(),
        "doorbells follow decoding"
    );
    let mut b = [0u8; 4];
    assert!(!g.bus.read(g.bar, &mut b), "BAR left the bus");
    let lo = g.cfg_read(hdr::BAR0, 4);
    let hi = g.cfg_read(hdr::BAR0 + 4, 4);
    assert_eq!(lo & 0xf, 0x4, "64-bit memory BAR");
    g.cfg_write(hdr::BAR0, u32::MAX, 4);
    g.cfg_write(hdr::BAR0 + 4, u32::MAX, 4);
    let mask = u64::from(g.cfg_read(hdr::BAR0, 4) & !0xf)
        | (u64::from(g.cfg_read(hdr::BAR0 + 4, 4)) << 32);
    assert_eq!(!mask + 1, BAR_SIZE);
    g.cfg_write(hdr::BAR0, lo, 4);
    g.cfg_write(hdr::BAR0 + 4, hi, 4);
    g.cfg_write(hdr::COMMAND, cmd, 2);
    assert_eq!(g.hooks.ioevent_addrs(), vec![g.cap_addr(2)]);
    assert_eq!(g.common(super::cc::NUMQ, 2), 1, "BAR back on the bus");
}

#[test]
fn moving_the_bar_moves_the_bus_range_and_the_doorbells() {
    let io = IoThread::new(
        "io0",
        IoThreadConfig {
            poll_max_ns: 0,
            ..Default::default()
        },
    )
    .unwrap();
    let mut g = Guest::new(BlkOptions::default(), vec![io]);
    let old = g.bar;
    let new = 0xe800_0000u64;
    // As Linux does: decoding off, both halves, decoding on.
    let cmd = g.cfg_read(hdr::COMMAND, 2);
    g.cfg_write(hdr::COMMAND, cmd & !2, 2);
    g.cfg_write(hdr::BAR0, new as u32, 4);
    g.cfg_write(hdr::BAR0 + 4, 0, 4);
    g.cfg_write(hdr::COMMAND, cmd, 2);
    g.bar = new;
    let mut b = [0u8; 4];
    assert!(!g.bus.read(old, &mut b));
    assert_eq!(g.dev.lock().unwrap().bar_mapping(), Some((new, BAR_SIZE)));
    assert_eq!(g.hooks.ioevent_addrs(), vec![new + 0x3000]);
    // Moving with decoding on works too (one event per write).
    g.cfg_write(hdr::BAR0 + 4, 1, 4);
    assert_eq!(g.hooks.ioevent_addrs(), vec![(1 << 32) + new + 0x3000]);
    g.cfg_write(hdr::BAR0 + 4, 0, 4);
    // The device works at the new address.
    g.msix_enable();
    g.program_vector(0, true);
    g.program_vector(1, true);
    g.setup(&[0]);
    let irq = g.hooks.irqfd(g.gsi(1)).unwrap();
    let mem = g.rig.mem.clone();
    let mq = ring(&mem, 0);
    push_read(&mem, &mq, 0, 5, 512);
    assert!(g.doorbell(0));
    wait_signalled(&irq);
    assert_eq!(used_idx(&mem, &mq), 1);
    assert!(data(&mem, 0, 512).iter().all(|&b| b == 5));
}

#[test]
fn msix_routes_follow_the_table_and_masked_vectors_collect_pending_bits() {
    let io = IoThread::new(
        "io0",
        IoThreadConfig {
            poll_max_ns: 0,
            ..Default::default()
        },
    )
    .unwrap();
    let mut g = Guest::new(BlkOptions::default(), vec![io]);
    let gsi1 = g.gsi(1);
    assert_ne!(g.gsi(0), gsi1);
    // Vectors start masked with no route, even once programmed.
    let msg1 = g.program_vector(1, false);
    assert_eq!(g.hooks.route(gsi1), None);
    g.msix_enable();
    assert_eq!(g.hooks.route(gsi1), None);
    g.program_vector(1, true);
    assert_eq!(g.hooks.route(gsi1), Some(msg1));
    g.program_vector(0, true);
    // Function mask removes every route; clearing it restores them.
    let at = g.lay.msix_cap + 2;
    let ctrl = g.cfg_read(at, 2);
    g.cfg_write(at, ctrl | 0x4000, 2);
    assert_eq!(g.hooks.route(gsi1), None);
    g.cfg_write(at, ctrl, 2);
    assert_eq!(g.hooks.route(gsi1), Some(msg1));

    g.setup(&[0]);
    let irq = g.hooks.irqfd(gsi1).unwrap();
    let mem = g.rig.mem.clone();
    let mq = ring(&mem, 0);
    push_read(&mem, &mq, 0, 1, 512);
    assert!(g.doorbell(0));
    wait_signalled(&irq);
    assert_eq!(used_idx(&mem, &mq), 1);

    // Masked: the request completes, the PBA bit is set, nothing fires.
    g.mmio_write(g.msix_entry(1) + 12, 1, 4);
    assert_eq!(g.hooks.route(gsi1), None);
    // EVENT_IDX: the driver asks to hear about the next used entry.
    mq.set_used_event(&mem, 1);
    push_read(&mem, &mq, 1, 2, 512);
    assert!(g.doorbell(0));
    wait_for("second used entry", || used_idx(&mem, &mq) == 2);
    let pba = g.bar + u64::from(g.lay.pba);
    wait_for("pending bit", || g.mmio_read(pba, 8) & 2 != 0);
    assert!(irq.read().is_err(), "masked vector fired");
    // Unmasking routes the vector and delivers the pending interrupt.
    g.mmio_write(g.msix_entry(1) + 12, 0, 4);
    assert_eq!(g.hooks.route(gsi1), Some(msg1));
    assert!(irq.read().is_ok(), "pending interrupt delivered");
    assert_eq!(g.mmio_read(pba, 8), 0);
    // Table reads back what was written; bad widths read zero.
    assert_eq!(g.mmio_read(g.msix_entry(1), 8), msg1.address);
    assert_eq!(g.mmio_read(g.msix_entry(1) + 8, 4), u64::from(msg1.data));
    assert_eq!(g.mmio_read(g.msix_entry(1) + 8, 2), 0);
}

#[test]
fn vectors_beyond_the_table_read_back_as_no_vector() {
    let g = Guest::new(BlkOptions::default(), vec![]);
    use super::cc::*;
    g.set_common(MSIX, 7, 2);
    assert_eq!(g.common(MSIX, 2), u64::from(NO_VECTOR));
    g.set_common(Q_SELECT, 0, 2);
    g.set_common(Q_MSIX, 2, 2);
    assert_eq!(g.common(Q_MSIX, 2), u64::from(NO_VECTOR));
    g.set_common(Q_MSIX, 1, 2);
    assert_eq!(g.common(Q_MSIX, 2), 1);
    // Wrong widths and read-only fields are ignored.
    g.set_common(NUMQ, 9, 2);
    assert_eq!(g.common(NUMQ, 2), 1);
    g.set_common(Q_SELECT, 0, 4);
    g.set_common(STATUS, 1, 4);
    assert_eq!(g.common(STATUS, 1), 0);
    assert_eq!(g.common(STATUS, 4), 0);
    // A queue that does not exist.
    g.set_common(Q_SELECT, 3, 2);
    assert_eq!(g.common(Q_SIZE, 2), 0);
    g.set_common(Q_ENABLE, 1, 2);
    assert_eq!(g.common(Q_ENABLE, 2), 0);
    let _ = VIRTIO_F_VERSION_1;
}

#[test]
fn reset_then_reactivation_serves_again_and_isr_clears_on_read() {
    let mut g = Guest::new(BlkOptions::default(), vec![]);
    g.msix_enable();
    g.program_vector(0, true);
    g.program_vector(1, true);
    g.setup(&[0]);
    let irq = g.hooks.irqfd(g.gsi(1)).unwrap();
    let mem = g.rig.mem.clone();
    let mq = ring(&mem, 0);
    push_read(&mem, &mq, 0, 8, 512);
    assert!(g.doorbell(0));
    wait_signalled(&irq);
    let isr = g.cap_addr(3);
    assert_eq!(g.mmio_read(isr, 1), 1);
    assert_eq!(g.mmio_read(isr, 1), 0);
    g.set_common(super::cc::STATUS, 0, 1);
    assert_eq!(g.common(super::cc::STATUS, 1), 0);
    assert_eq!(g.common(super::cc::MSIX, 2), u64::from(NO_VECTOR));
    assert_eq!(g.dev.lock().unwrap().device().active_queues(), 0);
    g.setup(&[0]);
    let mq = ring(&mem, 0);
    push_read(&mem, &mq, 0, 9, 512);
    assert!(g.doorbell(0));
    wait_signalled(&irq);
    assert_eq!(used_idx(&mem, &mq), 1);
    assert!(data(&mem, 0, 512).iter().all(|&b| b == 9));
}

#[test]
fn config_changed_raises_the_config_vector() {
    let mut g = Guest::new(BlkOptions::default(), vec![]);
    g.msix_enable();
    g.program_vector(0, true);
    g.setup(&[]);
    let irq = g.hooks.irqfd(g.gsi(0)).unwrap();
    let gen = g.common(super::cc::CFGGEN, 1);
    g.dev.lock().unwrap().config_changed();
    wait_signalled(&irq);
    assert_ne!(g.common(super::cc::CFGGEN, 1), gen);
    // Capacity through the device config structure.
    assert_eq!(g.mmio_read(g.cap_addr(4), 8), 2048);
}

#[test]
fn pci_cfg_window_reaches_bar0_through_config_space() {
    let mut g = Guest::new(BlkOptions::default(), vec![]);
    let at = g.lay.caps[&0x85].1 as usize;
    let dev_cfg = g.lay.caps[&4].1;
    // bar 0, offset of the device config, 4 bytes: capacity's low dword.
    g.cfg_write(at + 4, 0, 1);
    g.cfg_write(at + 8, dev_cfg, 4);
    g.cfg_write(at + 12, 4, 4);
    assert_eq!(g.cfg_read(at + 16, 4), 2048);
    // Writes go through too: device_feature_select = 1 via the window.
    g.cfg_write(at + 8, g.lay.caps[&1].1, 4);
    g.cfg_write(at + 16, 1, 4);
    assert_eq!(g.common(super::cc::DFSELECT, 4), 1);
    // A length the window cannot do reads zero.
    g.cfg_write(at + 12, 3, 4);
    assert_eq!(g.cfg_read(at + 16, 4), 0);
}

#[test]
fn dropping_the_device_unregisters_doorbells_and_irqfds() {
    let g = Guest::new(BlkOptions::default(), vec![]);
    let hooks = g.hooks.clone();
    assert_eq!(hooks.irqfds.lock().unwrap().len(), 2);
    drop(g);
    assert!(hooks.ioevents.lock().unwrap().is_empty());
    assert!(hooks.irqfds.lock().unwrap().is_empty());
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
    /// Arbitrary configuration-space and BAR traffic never panics; the ids
    /// stay, and a reset always brings the device back.
    #[test]
    fn arbitrary_config_and_bar_traffic_is_harmless(
        ops in proptest::collection::vec(
            (proptest::prelude::any::<bool>(), 0u64..0x8000, proptest::sample::select(vec![1usize, 2, 4, 8]), proptest::prelude::any::<u64>(), proptest::prelude::any::<bool>()),
            1..200),
    ) {
        let g = Guest::new(BlkOptions::default(), vec![]);
        let mut dev = g.dev.lock().unwrap();
        for (cfg, off, len, v, is_write) in ops {
            let bytes = v.to_le_bytes();
            if cfg {
                let off = (off % 0x1000) as usize;
                if is_write {
                    let _ = dev.config_write(off, &bytes[..len]);
                } else {
                    let mut b = [0u8; 8];
                    dev.config_read(off, &mut b[..len]);
                }
            } else if is_write {
                dev.write(off, &bytes[..len]);
            } else {
                let mut b = [0u8; 8];
                dev.read(off, &mut b[..len]);
            }
        }
        let mut id = [0u8; 4];
        dev.config_read(0, &mut id);
        proptest::prop_assert_eq!(u32::from_le_bytes(id), 0x1042_1af4);
        dev.write(super::cc::STATUS, &[0]);
        proptest::prop_assert_eq!(dev.status(), 0);
        proptest::prop_assert_eq!(dev.device().active_queues(), 0);
    }
}
