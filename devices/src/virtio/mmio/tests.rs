//! virtio-mmio register semantics, and whole requests through a real
//! IOThread against a file node.

use std::sync::Arc;

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::iothread::{IoThread, IoThreadConfig};
use crate::virtio::status;
use crate::virtio::testutil::*;
use crate::virtio_blk::{BlkOptions, GuestMem, VirtioBlk};

const BASE: u64 = 0xd000_0000;
const GSI: u32 = 5;

fn rd(t: &mut MmioTransport<VirtioBlk>, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

fn wr(t: &mut MmioTransport<VirtioBlk>, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

struct Fixture {
    rig: BlkRig,
    hooks: Arc<RecordingHooks>,
    t: MmioTransport<VirtioBlk>,
}

fn fixture(opts: BlkOptions, iothreads: Vec<Arc<IoThread>>) -> Fixture {
    let mut rig = BlkRig::new();
    let hooks = RecordingHooks::new();
    let dev = rig.device(opts, iothreads);
    let t = MmioTransport::new(dev, hooks.clone(), BASE, GSI).unwrap();
    Fixture { rig, hooks, t }
}

/// Negotiates features (all offered) and sets up `queues` as a driver would.
fn setup(t: &mut MmioTransport<VirtioBlk>, mem: &GuestMem, queues: &[u16]) {
    wr(t, reg::STATUS, 0);
    wr(t, reg::STATUS, u32::from(status::ACKNOWLEDGE));
    wr(
        t,
        reg::STATUS,
        u32::from(status::ACKNOWLEDGE | status::DRIVER),
    );
    for page in 0..2 {
        wr(t, reg::DEVICE_FEATURES_SEL, page);
        let f = rd(t, reg::DEVICE_FEATURES);
        wr(t, reg::DRIVER_FEATURES_SEL, page);
        wr(t, reg::DRIVER_FEATURES, f);
    }
    let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
    wr(t, reg::STATUS, u32::from(s));
    assert_eq!(rd(t, reg::STATUS) as u8, s);
    for &q in queues {
        let mq = ring(mem, q);
        wr(t, reg::QUEUE_SEL, u32::from(q));
        assert_eq!(rd(t, reg::QUEUE_READY), 0);
        assert_eq!(rd(t, reg::QUEUE_NUM_MAX), u32::from(QSIZE));
        wr(t, reg::QUEUE_NUM, u32::from(QSIZE));
        wr(t, reg::QUEUE_DESC_LOW, mq.desc() as u32);
        wr(t, reg::QUEUE_DESC_HIGH, 0);
        wr(t, reg::QUEUE_DRIVER_LOW, mq.avail() as u32);
        wr(t, reg::QUEUE_DRIVER_HIGH, 0);
        wr(t, reg::QUEUE_DEVICE_LOW, mq.used as u32);
        wr(t, reg::QUEUE_DEVICE_HIGH, 0);
        wr(t, reg::QUEUE_READY, 1);
        assert_eq!(rd(t, reg::QUEUE_READY), 1);
    }
    wr(t, reg::STATUS, u32::from(s | status::DRIVER_OK));
    assert_eq!(rd(t, reg::STATUS) as u8, s | status::DRIVER_OK);
}

#[test]
fn identification_registers_describe_a_version_2_block_device() {
    let mut f = fixture(BlkOptions::default(), vec![]);
    assert_eq!(rd(&mut f.t, reg::MAGIC), 0x7472_6976);
    assert_eq!(rd(&mut f.t, reg::VERSION), 2);
    assert_eq!(rd(&mut f.t, reg::DEVICE_ID), 2);
    assert_eq!(rd(&mut f.t, reg::VENDOR_ID), VENDOR_ID);
    assert_eq!(rd(&mut f.t, reg::SHM_LEN_LOW), u32::MAX);
    // Registered: one irqfd on the GSI, one ioeventfd at QueueNotify.
    assert!(f.hooks.irqfd(GSI).is_some());
    assert_eq!(f.hooks.ioevent_addrs(), vec![BASE + reg::QUEUE_NOTIFY]);
}

#[test]
fn feature_banks_select_each_half_and_unknown_pages_read_zero() {
    let mut f = fixture(BlkOptions::default(), vec![]);
    let offered = f.t.device().features();
    wr(&mut f.t, reg::DEVICE_FEATURES_SEL, 0);
    assert_eq!(rd(&mut f.t, reg::DEVICE_FEATURES), offered as u32);
    wr(&mut f.t, reg::DEVICE_FEATURES_SEL, 1);
    let high = rd(&mut f.t, reg::DEVICE_FEATURES);
    assert_eq!(high, (offered >> 32) as u32);
    assert_ne!(high & (1 << (VIRTIO_F_VERSION_1 - 32)), 0);
    wr(&mut f.t, reg::DEVICE_FEATURES_SEL, 7);
    assert_eq!(rd(&mut f.t, reg::DEVICE_FEATURES), 0);
    // Driver features keep only offered bits.
    wr(&mut f.t, reg::DRIVER_FEATURES_SEL, 0);
    wr(&mut f.t, reg::DRIVER_FEATURES, u32::MAX);
    assert_eq!(f.t.common.driver_features, offered & 0xffff_ffff);
}

#[test]
fn features_ok_needs_version_1_and_status_bits_cannot_be_cleared() {
    let mut f = fixture(BlkOptions::default(), vec![]);
    let ad = status::ACKNOWLEDGE | status::DRIVER;
    wr(&mut f.t, reg::STATUS, u32::from(status::ACKNOWLEDGE));
    wr(&mut f.t, reg::STATUS, u32::from(ad));
    wr(&mut f.t, reg::STATUS, u32::from(ad | status::FEATURES_OK));
    assert_eq!(rd(&mut f.t, reg::STATUS) as u8, ad, "legacy driver refused");
    wr(&mut f.t, reg::DRIVER_FEATURES_SEL, 1);
    wr(
        &mut f.t,
        reg::DRIVER_FEATURES,
        1 << (VIRTIO_F_VERSION_1 - 32),
    );
    wr(&mut f.t, reg::STATUS, u32::from(ad | status::FEATURES_OK));
    assert_eq!(rd(&mut f.t, reg::STATUS) as u8, ad | status::FEATURES_OK);
    // Features are frozen after FEATURES_OK.
    wr(&mut f.t, reg::DRIVER_FEATURES, 0);
    assert_ne!(f.t.common.driver_features, 0);
    // Clearing a bit is ignored; 0 resets.
    wr(&mut f.t, reg::STATUS, u32::from(status::ACKNOWLEDGE));
    assert_eq!(rd(&mut f.t, reg::STATUS) as u8, ad | status::FEATURES_OK);
    wr(&mut f.t, reg::STATUS, 0);
    assert_eq!(rd(&mut f.t, reg::STATUS), 0);
    assert_eq!(f.t.common.driver_features, 0);
}

#[test]
fn read_only_registers_bad_widths_and_misalignment_are_ignored() {
    let mut f = fixture(BlkOptions::default(), vec![]);
    wr(&mut f.t, reg::MAGIC, 0);
    wr(&mut f.t, reg::VERSION, 1);
    wr(&mut f.t, reg::QUEUE_NUM_MAX, 1);
    assert_eq!(rd(&mut f.t, reg::MAGIC), 0x7472_6976);
    assert_eq!(rd(&mut f.t, reg::VERSION), 2);
    assert_eq!(rd(&mut f.t, reg::QUEUE_NUM_MAX), u32::from(QSIZE));
    let mut two = [0xaau8; 2];
    f.t.read(reg::MAGIC, &mut two);
    assert_eq!(two, [0, 0]);
    let mut eight = [0xaau8; 8];
    f.t.read(reg::MAGIC, &mut eight);
    assert_eq!(eight, [0; 8]);
    let mut four = [0xaau8; 4];
    f.t.read(reg::MAGIC + 1, &mut four);
    assert_eq!(four, [0; 4]);
    f.t.write(reg::STATUS, &[1, 0]);
    f.t.write(reg::STATUS + 1, &[1, 0, 0, 0]);
    f.t.write(reg::STATUS, &[1]);
    assert_eq!(rd(&mut f.t, reg::STATUS), 0);
    // Past the config space: zeroes, and nothing breaks.
    let mut b = [0xaau8; 4];
    f.t.read(MMIO_LEN - 4, &mut b);
    assert_eq!(b, [0; 4]);
    f.t.write(MMIO_LEN - 4, &[1, 2, 3, 4]);
}

#[test]
fn queue_fields_are_validated_and_frozen_once_ready() {
    let mut f = fixture(BlkOptions::default(), vec![]);
    wr(&mut f.t, reg::QUEUE_SEL, 0);
    wr(&mut f.t, reg::QUEUE_NUM, 12); // not a power of two
    assert_eq!(f.t.common.queues[0].size, QSIZE);
    wr(&mut f.t, reg::QUEUE_NUM, u32::from(QSIZE) * 2); // above the max
    assert_eq!(f.t.common.queues[0].size, QSIZE);
    wr(&mut f.t, reg::QUEUE_NUM, 8);
    wr(&mut f.t, reg::QUEUE_DESC_LOW, 0x1000);
    wr(&mut f.t, reg::QUEUE_DESC_HIGH, 0x1);
    assert_eq!(f.t.common.queues[0].desc, 0x1_0000_1000);
    wr(&mut f.t, reg::QUEUE_READY, 1);
    wr(&mut f.t, reg::QUEUE_NUM, 4);
    wr(&mut f.t, reg::QUEUE_DESC_LOW, 0x2000);
    wr(&mut f.t, reg::QUEUE_READY, 0);
    let q = f.t.common.queues[0];
    assert_eq!((q.size, q.desc, q.ready), (8, 0x1_0000_1000, true));
    // A queue that does not exist.
    wr(&mut f.t, reg::QUEUE_SEL, 5);
    assert_eq!(rd(&mut f.t, reg::QUEUE_NUM_MAX), 0);
    assert_eq!(rd(&mut f.t, reg::QUEUE_READY), 0);
    wr(&mut f.t, reg::QUEUE_READY, 1);
    wr(&mut f.t, reg::QUEUE_SEL, u32::MAX);
    wr(&mut f.t, reg::QUEUE_NUM, 4);
}

#[test]
fn config_space_reads_capacity_and_takes_writeback() {
    let mut f = fixture(BlkOptions::default(), vec![]);
    let mut cap = [0u8; 8];
    f.t.read(reg::CONFIG, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 2048);
    let mut lo = [0u8; 4];
    f.t.read(reg::CONFIG + 4, &mut lo);
    assert_eq!(lo, [0; 4]);
    let mut wb = [0u8; 1];
    f.t.read(reg::CONFIG + 32, &mut wb);
    assert_eq!(wb, [1]);
    f.t.write(reg::CONFIG + 32, &[0]);
    f.t.read(reg::CONFIG + 32, &mut wb);
    assert_eq!(wb, [0]);
    // Capacity is read-only.
    f.t.write(reg::CONFIG, &[0; 8]);
    f.t.read(reg::CONFIG, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 2048);
}

fn read_data(mem: &GuestMem, n: u16, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    mem.read_slice(&mut v, GuestAddress(DATA + u64::from(n) * 0x1000))
        .unwrap();
    v
}

#[test]
fn read_request_runs_on_an_iothread_and_raises_the_interrupt() {
    let io = IoThread::new(
        "io0",
        IoThreadConfig {
            poll_max_ns: 0,
            ..Default::default()
        },
    )
    .unwrap();
    let mut f = fixture(BlkOptions::default(), vec![io.clone()]);
    let mem = f.rig.mem.clone();
    let irq = f.hooks.irqfd(GSI).unwrap();
    setup(&mut f.t, &mem, &[0]);
    assert_eq!(f.t.device().active_queues(), 1);
    let mq = ring(&mem, 0);
    push_read(&mem, &mq, 0, 3, 1024);
    // KVM's side of the ioeventfd: Linux writes the queue index.
    assert!(f.hooks.doorbell(BASE + reg::QUEUE_NOTIFY, 0));
    wait_signalled(&irq);
    assert_eq!(used_idx(&mem, &mq), 1);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0);
    let d = read_data(&mem, 0, 1024);
    assert!(d[..512].iter().all(|&b| b == 3) && d[512..].iter().all(|&b| b == 4));
    assert_eq!(used_len(&mem, &mq, 0), 1025);
    assert_eq!(rd(&mut f.t, reg::INTERRUPT_STATUS), INT_VRING);
    wr(&mut f.t, reg::INTERRUPT_ACK, INT_VRING);
    assert_eq!(rd(&mut f.t, reg::INTERRUPT_STATUS), 0);

    // Reset, then a fresh activation on fresh rings serves again.
    wr(&mut f.t, reg::STATUS, 0);
    assert_eq!(rd(&mut f.t, reg::STATUS), 0);
    assert_eq!(f.t.device().active_queues(), 0);
    setup(&mut f.t, &mem, &[0]);
    let mq = ring(&mem, 0);
    push_read(&mem, &mq, 0, 7, 512);
    // A write that reached the bus (no ioeventfd matched) kicks too.
    wr(&mut f.t, reg::QUEUE_NOTIFY, 0);
    wait_signalled(&irq);
    assert_eq!(used_idx(&mem, &mq), 1);
    assert!(read_data(&mem, 0, 512).iter().all(|&b| b == 7));
    io.stop();
}

#[test]
fn two_queues_on_two_iothreads_each_have_their_own_doorbell() {
    let cfg = IoThreadConfig {
        poll_max_ns: 0,
        ..Default::default()
    };
    let io0 = IoThread::new("io0", cfg).unwrap();
    let io1 = IoThread::new("io1", cfg).unwrap();
    let opts = BlkOptions {
        num_queues: 2,
        ..BlkOptions::default()
    };
    let mut f = fixture(opts, vec![io0, io1]);
    let evs = f.hooks.ioevents.lock().unwrap().len();
    assert_eq!(evs, 2);
    let mem = f.rig.mem.clone();
    let irq = f.hooks.irqfd(GSI).unwrap();
    setup(&mut f.t, &mem, &[0, 1]);
    let mq0 = ring(&mem, 0);
    let mq1 = ring(&mem, 1);
    push_read(&mem, &mq1, 1, 9, 512);
    // Datamatch 0 does not kick queue 1.
    assert!(f.hooks.doorbell(BASE + reg::QUEUE_NOTIFY, 1));
    wait_signalled(&irq);
    assert_eq!(used_idx(&mem, &mq1), 1);
    assert_eq!(used_idx(&mem, &mq0), 0);
    assert!(read_data(&mem, 1, 512).iter().all(|&b| b == 9));
}

#[test]
fn a_broken_queue_sets_needs_reset_and_raises_the_config_interrupt() {
    let mut f = fixture(BlkOptions::default(), vec![]);
    let mem = f.rig.mem.clone();
    let irq = f.hooks.irqfd(GSI).unwrap();
    setup(&mut f.t, &mem, &[0]);
    let mq = ring(&mem, 0);
    // The avail index runs more than a queue ahead.
    mq.mq.avail().idx().store(u16::to_le(QSIZE + 3));
    f.hooks.doorbell(BASE + reg::QUEUE_NOTIFY, 0);
    wait_signalled(&irq);
    assert_ne!(rd(&mut f.t, reg::STATUS) as u8 & status::NEEDS_RESET, 0);
    assert_eq!(rd(&mut f.t, reg::INTERRUPT_STATUS), INT_CONFIG);
    // The driver's reset recovers the device.
    wr(&mut f.t, reg::STATUS, 0);
    assert_eq!(rd(&mut f.t, reg::STATUS), 0);
    setup(&mut f.t, &mem, &[0]);
    let mq = ring(&mem, 0);
    push_read(&mem, &mq, 0, 1, 512);
    f.hooks.doorbell(BASE + reg::QUEUE_NOTIFY, 0);
    wait_signalled(&irq);
    assert_eq!(used_idx(&mem, &mq), 1);
}

#[test]
fn rings_outside_memory_fail_activation_with_needs_reset() {
    let mut f = fixture(BlkOptions::default(), vec![]);
    let irq = f.hooks.irqfd(GSI).unwrap();
    let s = status::ACKNOWLEDGE | status::DRIVER;
    wr(&mut f.t, reg::STATUS, u32::from(s));
    wr(&mut f.t, reg::DRIVER_FEATURES_SEL, 1);
    wr(&mut f.t, reg::DRIVER_FEATURES, 1);
    wr(&mut f.t, reg::STATUS, u32::from(s | status::FEATURES_OK));
    wr(&mut f.t, reg::QUEUE_DESC_LOW, 0xffff_0000);
    wr(&mut f.t, reg::QUEUE_READY, 1);
    wr(
        &mut f.t,
        reg::STATUS,
        u32::from(s | status::FEATURES_OK | status::DRIVER_OK),
    );
    wait_signalled(&irq);
    assert_ne!(rd(&mut f.t, reg::STATUS) as u8 & status::NEEDS_RESET, 0);
    assert_eq!(f.t.device().active_queues(), 0);
}

#[test]
fn config_changed_bumps_the_generation_and_interrupts_a_running_driver() {
    let mut f = fixture(BlkOptions::default(), vec![]);
    let irq = f.hooks.irqfd(GSI).unwrap();
    let g0 = rd(&mut f.t, reg::CONFIG_GENERATION);
    f.t.config_changed();
    assert_ne!(rd(&mut f.t, reg::CONFIG_GENERATION), g0);
    assert!(irq.read().is_err(), "no interrupt before DRIVER_OK");
    let mem = f.rig.mem.clone();
    setup(&mut f.t, &mem, &[0]);
    f.t.config_changed();
    wait_signalled(&irq);
    assert_eq!(rd(&mut f.t, reg::INTERRUPT_STATUS), INT_CONFIG);
}

#[test]
fn dropping_the_transport_unregisters_its_eventfds() {
    let f = fixture(BlkOptions::default(), vec![]);
    let hooks = f.hooks.clone();
    drop(f);
    assert!(hooks.ioevents.lock().unwrap().is_empty());
    assert!(hooks.irqfds.lock().unwrap().is_empty());
}

#[test]
fn a_polling_iothread_serves_requests_without_a_doorbell() {
    let io = IoThread::new(
        "io0",
        IoThreadConfig {
            poll_max_ns: 200_000_000,
            poll_grow: 1000,
            poll_shrink: 0,
        },
    )
    .unwrap();
    let mut f = fixture(BlkOptions::default(), vec![io.clone()]);
    let mem = f.rig.mem.clone();
    let irq = f.hooks.irqfd(GSI).unwrap();
    setup(&mut f.t, &mem, &[0]);
    let mq = ring(&mem, 0);
    // Kicked requests, each after a 10 ms pause that outlasts the poll,
    // until the poll time has grown (4 us, 4 ms, then the 200 ms cap): a
    // poll window far longer than a busy machine keeps this thread off
    // its CPU, so the request below cannot miss it.
    let mut n = 0u16;
    while io.poll_ns() < 100_000_000 {
        assert!(n < QSIZE / 3 - 1, "poll time did not grow");
        mq.set_used_event(&mem, n);
        std::thread::sleep(std::time::Duration::from_millis(10));
        push_read(&mem, &mq, n, u64::from(n), 512);
        f.hooks.doorbell(BASE + reg::QUEUE_NOTIFY, 0);
        n += 1;
        wait_for("used entry", || used_idx(&mem, &mq) == n);
        wait_signalled(&irq);
    }
    // No doorbell: only the poll hook can see this one.
    let hits = io.poll_hits();
    mq.set_used_event(&mem, n);
    push_read(&mem, &mq, n, 42, 512);
    wait_for("polled request", || used_idx(&mem, &mq) == n + 1);
    assert!(io.poll_hits() > hits);
    assert!(read_data(&mem, n, 512).iter().all(|&b| b == 42));
    wait_signalled(&irq);
    io.stop();
}

#[test]
fn event_idx_suppresses_interrupts_the_driver_did_not_ask_for() {
    let mut f = fixture(BlkOptions::default(), vec![]);
    let mem = f.rig.mem.clone();
    let irq = f.hooks.irqfd(GSI).unwrap();
    setup(&mut f.t, &mem, &[0]);
    let mq = ring(&mem, 0);
    // The driver wants an interrupt only after the third used entry.
    mq.set_used_event(&mem, 2);
    push_read(&mem, &mq, 0, 0, 512);
    f.hooks.doorbell(BASE + reg::QUEUE_NOTIFY, 0);
    wait_for("first used entry", || used_idx(&mem, &mq) == 1);
    push_read(&mem, &mq, 1, 1, 512);
    f.hooks.doorbell(BASE + reg::QUEUE_NOTIFY, 0);
    wait_for("second used entry", || used_idx(&mem, &mq) == 2);
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert!(irq.read().is_err(), "interrupt before used_event");
    push_read(&mem, &mq, 2, 2, 512);
    f.hooks.doorbell(BASE + reg::QUEUE_NOTIFY, 0);
    wait_signalled(&irq);
    assert_eq!(used_idx(&mem, &mq), 3);
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
    /// Arbitrary register traffic (any offset, width, value) never panics
    /// and leaves the identification registers intact.
    #[test]
    fn arbitrary_register_traffic_is_harmless(
        ops in proptest::collection::vec(
            (0u64..0x200, proptest::sample::select(vec![1usize, 2, 3, 4, 8]), proptest::prelude::any::<u64>(), proptest::prelude::any::<bool>()),
            1..200),
    ) {
        let mut f = fixture(BlkOptions::default(), vec![]);
        for (off, len, v, is_write) in ops {
            // Bias towards the registers that matter.
            let off = if off < 0x100 { (off & !3) | ((off & 1) * (v & 3)) } else { off };
            if is_write {
                f.t.write(off, &v.to_le_bytes()[..len]);
            } else {
                let mut b = [0u8; 8];
                f.t.read(off, &mut b[..len]);
            }
        }
        proptest::prop_assert_eq!(rd(&mut f.t, reg::MAGIC), 0x7472_6976);
        proptest::prop_assert_eq!(rd(&mut f.t, reg::VERSION), 2);
        wr(&mut f.t, reg::STATUS, 0);
        proptest::prop_assert_eq!(rd(&mut f.t, reg::STATUS), 0);
        proptest::prop_assert_eq!(f.t.device().active_queues(), 0);
    }
}
