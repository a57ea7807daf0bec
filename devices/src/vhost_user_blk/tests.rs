//! One IOThread serving a VMM virtio-blk queue and a vhost-user-blk
//! export's queue together: the device is activated as a transport would,
//! the export is driven by an in-process vhost-user frontend (the `vhost`
//! crate's) over guest memory backed by a memfd, as QEMU's is.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use block::{BlockGraph, RamRegistrar};
use event_manager::{EventOps, Events, MutEventSubscriber};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserVirtioFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{VhostUserBlkExport, VhostUserBlkExportConfig};
use crate::iothread::{IoSubscriber, IoThread, IoThreadConfig};
use crate::virtio::testutil::{
    push_read, ring, used_idx, used_len, wait_for, wait_signalled, BlkRig, TestRing, DATA,
    MEM_SIZE, QSIZE, STATUS,
};
use crate::virtio::{QueueConfig, VirtioDevice, VirtioInterrupt, VirtioIrq};
use crate::virtio_blk::{BlkOptions, GuestMem};

fn gettid() -> i32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() }
}

/// The VMM device's interrupt: counts queue interrupts and notes the
/// thread that raised them.
#[derive(Default)]
struct Irqs {
    queue: AtomicU64,
    tid: AtomicI32,
    needs_reset: AtomicBool,
}

impl VirtioInterrupt for Irqs {
    fn signal(&self, irq: VirtioIrq) -> std::io::Result<()> {
        if irq == VirtioIrq::Queue(0) {
            self.tid.store(gettid(), Ordering::SeqCst);
            self.queue.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }

    fn set_needs_reset(&self) {
        self.needs_reset.store(true, Ordering::SeqCst);
    }
}

/// A subscriber that, when its eventfd fires, holds its IOThread until
/// released: while it holds, nothing else on that thread runs.
struct Gate {
    ev: EventFd,
    entered: mpsc::Sender<i32>,
    release: mpsc::Receiver<()>,
}

impl MutEventSubscriber for Gate {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.ev.read();
        let _ = self.entered.send(gettid());
        let _ = self.release.recv_timeout(Duration::from_secs(10));
    }

    fn init(&mut self, ops: &mut EventOps) {
        ops.add(Events::new(&self.ev, EventSet::IN)).unwrap();
    }
}

impl IoSubscriber for Gate {}

/// `MEM_SIZE` bytes of guest memory at 0 on a memfd (the fd the frontend
/// sends with SET_MEM_TABLE).
pub(super) fn memfd_memory() -> (GuestMem, File) {
    // SAFETY: the name is a NUL-terminated string; memfd_create returns a
    // new fd or -1 and touches no memory of ours.
    let fd = unsafe { libc::memfd_create(c"blkvm-test-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just created and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(MEM_SIZE).unwrap();
    let mem = GuestMem::from_ranges_with_files(&[(
        GuestAddress(0),
        MEM_SIZE as usize,
        Some(FileOffset::new(file.try_clone().unwrap(), 0)),
    )])
    .unwrap();
    (mem, file)
}

/// Hands vring 0 (laid out by `ring` in the frontend's memory at `host`,
/// backed by `memfd`) to the export the way QEMU's `vhost_dev_start` does:
/// the memory table, the ring's size, `base`, its addresses in the
/// frontend's own address space, the kick and call fds, enabled.
pub(super) fn start_vring(
    fe: &mut Frontend,
    host: u64,
    memfd: &File,
    r: &TestRing<'_>,
    base: u16,
    kick: &EventFd,
    call: &EventFd,
) {
    fe.set_mem_table(&[VhostUserMemoryRegionInfo {
        guest_phys_addr: 0,
        memory_size: MEM_SIZE,
        userspace_addr: host,
        mmap_offset: 0,
        mmap_handle: memfd.as_raw_fd(),
    }])
    .unwrap();
    fe.set_vring_num(0, QSIZE).unwrap();
    fe.set_vring_base(0, base).unwrap();
    fe.set_vring_addr(
        0,
        &VringConfigData {
            queue_max_size: QSIZE,
            queue_size: QSIZE,
            flags: 0,
            desc_table_addr: host + r.desc(),
            used_ring_addr: host + r.used,
            avail_ring_addr: host + r.avail(),
            log_addr: None,
        },
    )
    .unwrap();
    fe.set_vring_kick(0, kick).unwrap();
    fe.set_vring_call(0, call).unwrap();
    fe.set_vring_enable(0, true).unwrap();
}

#[test]
fn one_iothread_serves_a_vmm_queue_and_an_export_queue_together() {
    let io = IoThread::new("io0", IoThreadConfig::default()).unwrap();
    wait_for("the iothread started", || io.thread_id() != 0);

    // The VMM's device: a file whose sector n is filled with byte n.
    let mut rig = BlkRig::new();
    let vmem = rig.mem.clone();
    let mut dev = rig.device(BlkOptions::default(), vec![io.clone()]);
    let vr = ring(&vmem, 0);
    let irqs = Arc::new(Irqs::default());
    let qc = QueueConfig {
        max_size: QSIZE,
        size: QSIZE,
        ready: true,
        desc: vr.desc(),
        avail: vr.avail(),
        used: vr.used,
    };
    dev.activate(dev.features(), &[qc], irqs.clone()).unwrap();
    assert_eq!(dev.active_queues(), 1);

    // The export: a null-co node that reads zeroes, on the same IOThread.
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vhost-user-blk.sock");
    let mut graph = BlockGraph::new();
    let node = graph
        .add(
            &qapi::parse_blockdev("driver=null-co,node-name=n0,size=1048576,read-zeroes=on")
                .unwrap(),
        )
        .unwrap();
    let registrar: RamRegistrar = graph.registrar().clone();
    let mut export = VhostUserBlkExport::start(VhostUserBlkExportConfig {
        id: "exp0".into(),
        node,
        opts: BlkOptions::default(),
        registrar,
        iothread: Some(io.clone()),
        path: sock.to_str().unwrap().to_string(),
        writethrough: false,
        io_error: None,
    })
    .unwrap();

    // Both data planes were given the one IOThread and nothing else.
    assert_eq!(dev.iothreads().len(), 1);
    assert!(Arc::ptr_eq(&dev.iothreads()[0], &io));
    assert_eq!(export.iothreads().len(), 1);
    assert!(Arc::ptr_eq(&export.iothreads()[0], &io));

    // The frontend, in QEMU's order (vhost_user_backend_init, then
    // vhost_dev_start): protocol features are asked for after
    // GET_FEATURES offered PROTOCOL_FEATURES, before SET_FEATURES.
    let (fmem, memfd) = memfd_memory();
    let host = fmem.get_host_address(GuestAddress(0)).unwrap() as u64;
    let er = ring(&fmem, 0);
    let kick = EventFd::new(EFD_NONBLOCK).unwrap();
    let call = EventFd::new(EFD_NONBLOCK).unwrap();
    let mut fe = Frontend::connect(&sock, 1).unwrap();
    fe.set_owner().unwrap();
    let offered = fe.get_features().unwrap();
    let pf_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    assert_ne!(offered & pf_bit, 0, "PROTOCOL_FEATURES offered");
    let pf = fe.get_protocol_features().unwrap();
    let want = VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG;
    assert!(pf.contains(want), "offered protocol features {pf:?}");
    // With REPLY_ACK every refusal below comes back as an error.
    fe.set_protocol_features(want).unwrap();
    assert_eq!(fe.get_queue_num().unwrap(), 1);
    fe.set_features(offered).unwrap();
    start_vring(&mut fe, host, &memfd, &er, 0, &kick, &call);
    assert!(export.connected());

    // Hold the IOThread, put two reads on each queue and kick both: while
    // the one thread is held, neither queue moves, so no other thread
    // serves either of them.
    let (entered_tx, entered) = mpsc::channel();
    let (release, release_rx) = mpsc::channel();
    let gate_ev = EventFd::new(EFD_NONBLOCK).unwrap();
    let gate_id = io
        .add(Box::new(Gate {
            ev: gate_ev.try_clone().unwrap(),
            entered: entered_tx,
            release: release_rx,
        }))
        .unwrap();
    gate_ev.write(1).unwrap();
    let gate_tid = entered.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(gate_tid, io.thread_id());

    push_read(&vmem, &vr, 0, 5, 512);
    push_read(&vmem, &vr, 1, 9, 1024);
    // The export's buffers start non-zero so the zeroes are seen landing.
    fmem.write_slice(&[0xaa; 0x2000], GuestAddress(DATA))
        .unwrap();
    push_read(&fmem, &er, 0, 3, 512);
    push_read(&fmem, &er, 1, 100, 4096);
    dev.queue_events()[0].write(1).unwrap();
    kick.write(1).unwrap();

    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(used_idx(&vmem, &vr), 0, "the VMM queue moved while held");
    assert_eq!(used_idx(&fmem, &er), 0, "the export queue moved while held");
    assert_eq!(irqs.queue.load(Ordering::SeqCst), 0);
    assert!(call.read().is_err(), "the frontend was called while held");

    let start = Instant::now();
    release.send(()).unwrap();
    wait_for("both used rings advance", || {
        used_idx(&vmem, &vr) == 2 && used_idx(&fmem, &er) == 2
    });
    let both_done = start.elapsed();
    wait_for("the VMM device's interrupt", || {
        irqs.queue.load(Ordering::SeqCst) >= 1
    });
    wait_signalled(&call);
    assert!(!irqs.needs_reset.load(Ordering::SeqCst));
    // The VMM queue's interrupt was raised on the IOThread.
    assert_eq!(irqs.tid.load(Ordering::SeqCst), io.thread_id());

    // The VMM's reads: sector n is byte n; status OK; data + status byte.
    for n in 0..2u64 {
        assert_eq!(vmem.read_obj::<u8>(GuestAddress(STATUS + n)).unwrap(), 0);
    }
    let mut b = [0u8; 1024];
    vmem.read_slice(&mut b[..512], GuestAddress(DATA)).unwrap();
    assert!(b[..512].iter().all(|&x| x == 5));
    vmem.read_slice(&mut b, GuestAddress(DATA + 0x1000))
        .unwrap();
    assert!(b[..512].iter().all(|&x| x == 9) && b[512..].iter().all(|&x| x == 10));
    let mut lens = [used_len(&vmem, &vr, 0), used_len(&vmem, &vr, 1)];
    lens.sort_unstable();
    assert_eq!(lens, [513, 1025]);

    // The export's reads: zeroes over the 0xaa, status OK.
    for n in 0..2u64 {
        assert_eq!(fmem.read_obj::<u8>(GuestAddress(STATUS + n)).unwrap(), 0);
    }
    let mut b = [0xffu8; 0x2000];
    fmem.read_slice(&mut b, GuestAddress(DATA)).unwrap();
    assert!(b[..512].iter().all(|&x| x == 0), "export read 0");
    assert!(b[512..0x1000].iter().all(|&x| x == 0xaa), "beyond read 0");
    assert!(b[0x1000..].iter().all(|&x| x == 0), "export read 1");
    let mut lens = [used_len(&fmem, &er, 0), used_len(&fmem, &er, 1)];
    lens.sort_unstable();
    assert_eq!(lens, [513, 4097]);

    // Each side's worker counted its own work: a kick or a poll hit, and
    // an interrupt.
    let moved = |c: &crate::virtio_blk::WorkerCounters| {
        (
            c.kicks.load(Ordering::Relaxed) + c.poll_hits.load(Ordering::Relaxed),
            c.interrupts.load(Ordering::Relaxed),
        )
    };
    let (dev_work, dev_irqs) = moved(dev.counters());
    let (exp_work, exp_irqs) = moved(export.counters());
    assert!(dev_work > 0 && dev_irqs > 0, "device counters did not move");
    assert!(exp_work > 0 && exp_irqs > 0, "export counters did not move");

    // Stopping the export completes and disconnects its queue but leaves
    // the shared IOThread serving the VMM's queue.
    io.remove(gate_id).unwrap();
    export.stop().unwrap();
    assert!(!export.connected());
    assert_eq!(export.requests(), 2);
    assert!(!sock.exists(), "the socket was removed");
    push_read(&vmem, &vr, 2, 7, 512);
    dev.queue_events()[0].write(1).unwrap();
    wait_for("the VMM queue after the export stopped", || {
        used_idx(&vmem, &vr) == 3
    });
    vmem.read_slice(&mut b[..512], GuestAddress(DATA + 0x2000))
        .unwrap();
    assert!(b[..512].iter().all(|&x| x == 7));

    dev.reset();
    assert_eq!(dev.active_queues(), 0);
    drop(fe);
    io.stop();
    eprintln!("both queues completed {both_done:?} after the IOThread was released");
}
