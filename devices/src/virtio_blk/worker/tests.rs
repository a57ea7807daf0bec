//! The queue worker's busy-poll contract: kicks off while polling, back on
//! (with one last look) before sleeping, and no request lost by a driver
//! that only kicks when the device asks for kicks.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;
use crate::iothread::{IoThread, IoThreadConfig};
use crate::virtio::testutil::{push_read, ring, used_idx, wait_for, BlkRig, TestRing, QSIZE};
use crate::virtio_blk::BlkOptions;
use block::{BackendOptions, BlockBackend};

/// Records what the worker raised.
#[derive(Default)]
struct Irqs {
    signals: AtomicU64,
    needs_reset: AtomicBool,
}

impl VirtioInterrupt for Irqs {
    fn signal(&self, _irq: VirtioIrq) -> std::io::Result<()> {
        self.signals.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn set_needs_reset(&self) {
        self.needs_reset.store(true, Ordering::SeqCst);
    }
}

/// VRING_USED_F_NO_NOTIFY in the used ring's flags.
fn no_notify(mem: &GuestMem, r: &TestRing<'_>) -> bool {
    mem.read_obj::<u16>(GuestAddress(r.used)).unwrap() & 1 == 1
}

fn worker(
    rig: &mut BlkRig,
    r: &TestRing<'_>,
    event_idx: bool,
) -> (QueueWorker, EventFd, Arc<Irqs>) {
    let node = rig
        .graph
        .add(&qapi::parse_blockdev(&format!("file,filename={}", rig.img.path().display())).unwrap())
        .unwrap();
    let handler = BlkQueueHandler::new(
        Arc::new(BlockBackend::new(
            "test",
            node.clone(),
            BackendOptions::default(),
        )),
        &BlkOptions::default(),
    )
    .unwrap();
    let mut queue = Queue::new(QSIZE).unwrap();
    queue.set_size(QSIZE);
    queue
        .try_set_desc_table_address(GuestAddress(r.desc()))
        .unwrap();
    queue
        .try_set_avail_ring_address(GuestAddress(r.avail()))
        .unwrap();
    queue
        .try_set_used_ring_address(GuestAddress(r.used))
        .unwrap();
    queue.set_event_idx(event_idx);
    queue.set_ready(true);
    let kick = EventFd::new(EFD_NONBLOCK).unwrap();
    let irqs = Arc::new(Irqs::default());
    let w = QueueWorker::new(QueueWorkerConfig {
        id: "test: queue 0".into(),
        index: 0,
        queue,
        handler,
        mem: rig.mem.clone(),
        kick: kick.try_clone().unwrap(),
        interrupt: irqs.clone(),
        writethrough: Arc::default(),
        counters: Arc::default(),
        resubmit: Vec::new(),
    });
    (w, kick, irqs)
}

#[test]
fn poll_end_serves_an_entry_the_driver_added_while_kicks_were_off() {
    let mut rig = BlkRig::new();
    let mem = rig.mem.clone();
    let r = ring(&mem, 0);
    let (mut w, _kick, irqs) = worker(&mut rig, &r, false);
    w.poll_begin();
    assert!(no_notify(&mem, &r), "kicks are off while polling");
    // The driver adds a request and, told not to, does not kick.
    push_read(&mem, &r, 0, 5, 512);
    assert!(w.poll_end(), "the last look found the entry");
    assert!(!no_notify(&mem, &r), "kicks are back on");
    assert_eq!(w.counters.late_entries.load(Ordering::SeqCst), 1);
    wait_for("the read completes", || {
        w.poll();
        used_idx(&mem, &r) == 1
    });
    assert!(irqs.signals.load(Ordering::SeqCst) >= 1);
    assert!(!irqs.needs_reset.load(Ordering::SeqCst));
}

#[test]
fn a_kick_on_a_polling_queue_leaves_kicks_off() {
    let mut rig = BlkRig::new();
    let mem = rig.mem.clone();
    let r = ring(&mem, 0);
    let (mut w, _kick, _irqs) = worker(&mut rig, &r, false);
    w.poll_begin();
    push_read(&mem, &r, 0, 1, 512);
    // A kick served while the thread polls must not turn kicks back on
    // behind the poller's back.
    w.run_queue();
    assert!(no_notify(&mem, &r));
    assert!(!w.poll_end(), "nothing new since the kick");
    assert!(!no_notify(&mem, &r));
}

/// [`push_read`]'s chain `n`, made available at the ring's index modulo
/// its size (the mock's own avail writes do not wrap).
fn push_read_wrapping(mem: &GuestMem, r: &TestRing<'_>, n: u16, sector: u64) {
    let scratch = ring(mem, 1);
    push_read(mem, &scratch, n, sector, 512);
    // Copy the three descriptors into the real table, then publish.
    let mut d = [0u8; 48];
    mem.read_slice(&mut d, GuestAddress(scratch.desc() + 48 * u64::from(n)))
        .unwrap();
    mem.write_slice(&d, GuestAddress(r.desc() + 48 * u64::from(n)))
        .unwrap();
    let idx = mem.read_obj::<u16>(GuestAddress(r.avail() + 2)).unwrap();
    let slot = r.avail() + 4 + 2 * u64::from(idx % QSIZE);
    mem.write_obj(3 * n, GuestAddress(slot)).unwrap();
    std::sync::atomic::fence(Ordering::Release);
    mem.write_obj(idx.wrapping_add(1), GuestAddress(r.avail() + 2))
        .unwrap();
}

/// A driver on another thread that kicks only when the device asks for
/// it (VRING_USED_F_NO_NOTIFY clear, or with EVENT_IDX `avail_event`
/// crossed, virtio 1.2 2.7.10), against a worker on an IOThread that polls
/// with kicks off: every request completes, whatever the interleaving.
fn obeying_driver_loses_nothing(event_idx: bool, poll_max_ns: u64) {
    let mut rig = BlkRig::new();
    let mem = rig.mem.clone();
    let r = ring(&mem, 0);
    let (w, kick, _irqs) = worker(&mut rig, &r, event_idx);
    let counters = w.counters.clone();
    let io = IoThread::new(
        "io-obey",
        IoThreadConfig {
            poll_max_ns,
            ..IoThreadConfig::default()
        },
    )
    .unwrap();
    let id = io.add(Box::new(w)).unwrap();
    let avail_event = r.used + 4 + 8 * u64::from(QSIZE);
    const BATCHES: u16 = 300;
    const PER_BATCH: u16 = 4;
    let mut seed = 0x2545_f491_u32;
    for b in 0..BATCHES {
        let old = mem.read_obj::<u16>(GuestAddress(r.avail() + 2)).unwrap();
        for n in 0..PER_BATCH {
            push_read_wrapping(&mem, &r, n, u64::from(b % 64));
            // Vary the gap so some entries land mid-poll, some at the
            // poll's end and some after the thread sleeps.
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            for _ in 0..(seed % 4096) {
                std::hint::spin_loop();
            }
            if seed.is_multiple_of(7) {
                std::thread::sleep(std::time::Duration::from_micros(u64::from(seed % 200)));
            }
        }
        std::sync::atomic::fence(Ordering::SeqCst);
        let new = old.wrapping_add(PER_BATCH);
        let kick_now = if event_idx {
            let e = mem.read_obj::<u16>(GuestAddress(avail_event)).unwrap();
            new.wrapping_sub(e).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            !no_notify(&mem, &r)
        };
        if kick_now {
            kick.write(1).unwrap();
        }
        let want = (b + 1) * PER_BATCH;
        // Spin, as a polling driver would: a sleeping test would make
        // every wait longer than the poll window and polling would stop.
        let start = std::time::Instant::now();
        while used_idx(&mem, &r) != want {
            assert!(
                start.elapsed() < std::time::Duration::from_secs(5),
                "batch {b} stalled: used {} of {want}, avail {}, avail_event {}, flags {}, kicked {kick_now}, {:?}",
                used_idx(&mem, &r),
                mem.read_obj::<u16>(GuestAddress(r.avail() + 2)).unwrap(),
                mem.read_obj::<u16>(GuestAddress(avail_event)).unwrap(),
                mem.read_obj::<u16>(GuestAddress(r.used)).unwrap(),
                counters
            );
            std::hint::spin_loop();
        }
    }
    let w = io.remove_as::<QueueWorker>(id).unwrap();
    assert!(!w.is_broken());
    if poll_max_ns >= LONG_POLL_NS {
        // Polling really ran: work was found without a wake-up.
        assert!(
            counters.poll_hits.load(Ordering::SeqCst) > 0,
            "{counters:?}"
        );
    }
    io.stop();
}

/// A poll window every wait of the test fits in, so the adaptive poll
/// time grows at each wait and the thread soon polls with kicks off
/// whatever the host's wake-up latency (with QEMU's 32 µs, a slow host
/// may never start polling).
const LONG_POLL_NS: u64 = 1_000_000_000;

#[test]
fn a_driver_obeying_no_notify_loses_no_request_on_a_polling_iothread() {
    obeying_driver_loses_nothing(false, LONG_POLL_NS);
}

#[test]
fn a_driver_obeying_event_idx_loses_no_request_on_a_polling_iothread() {
    obeying_driver_loses_nothing(true, LONG_POLL_NS);
}

#[test]
fn a_driver_obeying_either_rule_loses_no_request_at_qemus_poll_window() {
    obeying_driver_loses_nothing(false, crate::iothread::DEFAULT_POLL_MAX_NS);
    obeying_driver_loses_nothing(true, crate::iothread::DEFAULT_POLL_MAX_NS);
}

#[test]
fn a_driver_obeying_no_notify_loses_no_request_without_polling() {
    obeying_driver_loses_nothing(false, 0);
}

#[test]
fn the_resolved_avail_index_follows_the_driver_and_unmapped_rings_fall_back() {
    let rig = BlkRig::new();
    let mem = rig.mem.clone();
    let r = ring(&mem, 0);
    let mut queue = Queue::new(QSIZE).unwrap();
    queue
        .try_set_avail_ring_address(GuestAddress(r.avail()))
        .unwrap();
    let idx = crate::virtio_blk::ring::AvailIdx::resolve(&queue, mem.clone());
    assert_eq!(idx.load(), Some(0));
    push_read(&mem, &r, 0, 1, 512);
    push_read(&mem, &r, 1, 2, 512);
    assert_eq!(idx.load(), Some(2));
    // A ring outside guest memory is left to vm-memory's checked reads.
    queue
        .try_set_avail_ring_address(GuestAddress(0x1000_0000))
        .unwrap();
    let outside = crate::virtio_blk::ring::AvailIdx::resolve(&queue, mem);
    assert_eq!(outside.load(), None);
}
