//! The VMM's vhost-user-blk device against our export, in one process:
//! the device negotiates with the export over its socket, hands it guest
//! RAM (a memfd) and the queue, and a read put on the ring by a test
//! driver is answered through the call fd the transport would give
//! (an irqfd, here a plain eventfd). Then the backend goes away and comes
//! back on the same socket, and the queue goes on.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use block::BlockGraph;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::device::{VhostUserBlk, VhostUserBlkDeviceOptions};
use super::tests::memfd_memory;
use super::{VhostUserBlkExport, VhostUserBlkExportConfig};
use crate::virtio::testutil::{
    push_read, ring, used_idx, used_len, wait_for, wait_signalled, DATA, QSIZE, STATUS,
};
use crate::virtio::{QueueConfig, VirtioDevice, VirtioInterrupt, VirtioIrq};
use crate::virtio_blk::BlkOptions;

/// A transport's interrupt as vhost-user sees it: each queue's notifier
/// is one eventfd the test reads.
struct DirectIrqs {
    call: EventFd,
    config: AtomicBool,
}

impl VirtioInterrupt for DirectIrqs {
    fn signal(&self, irq: VirtioIrq) -> std::io::Result<()> {
        if irq == VirtioIrq::Config {
            self.config.store(true, Ordering::SeqCst);
        }
        Ok(())
    }

    fn set_needs_reset(&self) {}

    fn queue_notifier(&self, _queue: u16) -> std::io::Result<Option<EventFd>> {
        self.call.try_clone().map(Some)
    }
}

/// A 1 MiB image whose sector n is filled with byte n, exported
/// (`num_queues` queues) at `sock`.
fn export(img: &std::path::Path, sock: &std::path::Path, num_queues: u16) -> VhostUserBlkExport {
    export_with(img, sock, num_queues, "")
}

/// As `export`, with `extra` options on the file node.
fn export_with(
    img: &std::path::Path,
    sock: &std::path::Path,
    num_queues: u16,
    extra: &str,
) -> VhostUserBlkExport {
    let mut graph = BlockGraph::new();
    let node = graph
        .add(
            &qapi::parse_blockdev(&format!(
                "driver=file,node-name=f0,filename={}{extra}",
                img.display()
            ))
            .unwrap(),
        )
        .unwrap();
    VhostUserBlkExport::start(VhostUserBlkExportConfig {
        id: "exp0".into(),
        node,
        opts: BlkOptions {
            num_queues,
            ..BlkOptions::default()
        },
        registrar: graph.registrar().clone(),
        iothread: None,
        path: sock.to_str().unwrap().to_string(),
        writethrough: false,
        io_error: None,
    })
    .unwrap()
}

fn options(sock: &std::path::Path, reconnect: Option<Duration>) -> VhostUserBlkDeviceOptions {
    VhostUserBlkDeviceOptions {
        id: "vu0".into(),
        path: sock.to_path_buf(),
        reconnect,
        num_queues: None,
        queue_size: QSIZE,
        config_wce: true,
    }
}

fn image(dir: &std::path::Path) -> std::path::PathBuf {
    let img = dir.join("disk.img");
    let data: Vec<u8> = (0..2048u32).flat_map(|s| [s as u8; 512]).collect();
    std::fs::write(&img, data).unwrap();
    img
}

#[test]
fn the_device_takes_features_queues_and_config_from_the_backend() {
    let dir = tempfile::tempdir().unwrap();
    let (img, sock) = (image(dir.path()), dir.path().join("vu.sock"));
    let _exp = export(&img, &sock, 2);
    let (mem, _f) = memfd_memory();
    let dev = VhostUserBlk::new(options(&sock, None), Arc::new(mem)).unwrap();
    let f = dev.features();
    for b in [VIRTIO_F_VERSION_1, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ] {
        assert_ne!(f & (1 << b), 0, "feature {b} passed on");
    }
    assert_eq!(f & (1 << VIRTIO_BLK_F_RO), 0);
    // num-queues defaults to the backend's; the config space is the
    // backend's: 2048 sectors.
    assert_eq!(dev.queue_max_sizes(), vec![QSIZE; 2]);
    let mut cap = [0u8; 8];
    dev.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 2048);
    let mut nq = [0u8; 2];
    dev.read_config(34, &mut nq);
    assert_eq!(u16::from_le_bytes(nq), 2);
    // Out of range reads as zeroes rather than failing.
    let mut far = [0xffu8; 4];
    dev.read_config(200, &mut far);
    assert_eq!(far, [0; 4]);

    // The export serves one frontend at a time.
    drop(dev);
    drop(_exp);
    // A read-only backend makes a read-only disk; config-wce=off hides the
    // writeback toggle the backend offers.
    let _exp = export_with(&img, &sock, 2, ",read-only=on");
    let (mem, _f) = memfd_memory();
    let mut o = options(&sock, None);
    o.config_wce = false;
    let ro = VhostUserBlk::new(o, Arc::new(mem)).unwrap();
    assert_ne!(ro.features() & (1 << VIRTIO_BLK_F_RO), 0, "RO passed on");
    assert_eq!(ro.features() & (1 << VIRTIO_BLK_F_CONFIG_WCE), 0);
    drop(ro);
    // More queues than the backend has is an error at start, naming both.
    let (mem, _f) = memfd_memory();
    let mut o = options(&sock, None);
    o.num_queues = Some(4);
    let e = VhostUserBlk::new(o, Arc::new(mem)).err().unwrap();
    assert!(
        e.to_string()
            .contains("num-queues 4 is more than the backend's 2"),
        "{e}"
    );

    // No backend: a clear error naming the socket.
    let (mem, _f) = memfd_memory();
    let e = VhostUserBlk::new(options(&dir.path().join("none.sock"), None), Arc::new(mem))
        .err()
        .unwrap();
    assert!(e.to_string().contains("none.sock"), "{e}");
}

/// Puts a read of sector `sector` as chain `n` on the ring, kicks, waits
/// for the call and checks the data.
fn read_through(
    mem: &crate::virtio_blk::GuestMem,
    r: &crate::virtio::testutil::TestRing<'_>,
    kick: &EventFd,
    call: &EventFd,
    n: u16,
    sector: u64,
) {
    let before = used_idx(mem, r);
    mem.write_slice(&[0xaa; 512], GuestAddress(DATA + u64::from(n) * 0x1000))
        .unwrap();
    push_read(mem, r, n, sector, 512);
    kick.write(1).unwrap();
    wait_signalled(call);
    wait_for("the used ring advances", || used_idx(mem, r) == before + 1);
    assert_eq!(used_len(mem, r, u64::from(before % QSIZE)), 513);
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(STATUS + u64::from(n)))
            .unwrap(),
        0
    );
    let mut b = [0u8; 512];
    mem.read_slice(&mut b, GuestAddress(DATA + u64::from(n) * 0x1000))
        .unwrap();
    assert!(
        b.iter().all(|&x| x == sector as u8),
        "sector {sector} read back"
    );
}

#[test]
fn requests_go_to_the_backend_and_the_queue_survives_a_backend_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (img, sock) = (image(dir.path()), dir.path().join("vu.sock"));
    let mut exp = export(&img, &sock, 1);
    let (mem, _f) = memfd_memory();
    let mem = Arc::new(mem);
    let mut dev =
        VhostUserBlk::new(options(&sock, Some(Duration::from_millis(20))), mem.clone()).unwrap();
    let r = ring(&mem, 0);
    let irqs = Arc::new(DirectIrqs {
        call: EventFd::new(EFD_NONBLOCK).unwrap(),
        config: AtomicBool::new(false),
    });
    let qc = QueueConfig {
        max_size: QSIZE,
        size: QSIZE,
        ready: true,
        desc: r.desc(),
        avail: r.avail(),
        used: r.used,
    };
    // The test driver does not move used_event: no EVENT_IDX.
    let features = dev.features() & !(1 << VIRTIO_RING_F_EVENT_IDX);
    dev.activate(features, &[qc], irqs.clone()).unwrap();
    wait_for("the export has a frontend", || exp.connected());
    let kick = dev.queue_events()[0].try_clone().unwrap();
    read_through(&mem, &r, &kick, &irqs.call, 0, 7);
    read_through(&mem, &r, &kick, &irqs.call, 1, 300);

    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let s = seen.clone();
    dev.set_event_hook(Some(Arc::new(move |e| s.lock().unwrap().push(e))));
    // The backend goes away: the device sees it and keeps the queue.
    exp.stop().unwrap();
    drop(exp);
    wait_for("the device notices", || !dev.connected());
    // The guest puts a request on the ring meanwhile; it waits.
    mem.write_slice(&[0xaa; 512], GuestAddress(DATA + 2 * 0x1000))
        .unwrap();
    push_read(&mem, &r, 2, 42, 512);
    kick.write(1).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(used_idx(&mem, &r), 2, "no backend, no progress");

    // A new backend on the same socket: the device reconnects, restarts
    // the queue at the used index, and the waiting request is served.
    let exp = export(&img, &sock, 1);
    wait_for("the device reconnects", || dev.connected());
    assert_eq!(dev.reconnects(), 1);
    wait_for("both events", || seen.lock().unwrap().len() == 2);
    assert_eq!(
        *seen.lock().unwrap(),
        [
            super::device::BackendEvent::Disconnected { reconnecting: true },
            super::device::BackendEvent::Reconnected
        ]
    );
    wait_for("the waiting request completes", || used_idx(&mem, &r) == 3);
    let mut b = [0u8; 512];
    mem.read_slice(&mut b, GuestAddress(DATA + 2 * 0x1000))
        .unwrap();
    assert!(b.iter().all(|&x| x == 42));
    wait_signalled(&irqs.call);
    read_through(&mem, &r, &kick, &irqs.call, 3, 1000);

    // A guest reset takes the queue back from the backend; activating
    // again starts over from empty rings.
    dev.reset();
    let r = ring(&mem, 0);
    let qc = QueueConfig {
        desc: r.desc(),
        avail: r.avail(),
        used: r.used,
        ..qc
    };
    dev.activate(features, &[qc], irqs.clone()).unwrap();
    read_through(&mem, &r, &kick, &irqs.call, 0, 11);
    drop(dev);
    wait_for("the export sees the frontend go", || !exp.connected());
}

/// A backend restarted after a crash, given the frontend's inflight area
/// (INFLIGHT_SHMFD), runs the heads its predecessor took and did not
/// return, in the order it took them, then resumes the avail ring after
/// them: nothing the guest is waiting for is lost, nothing finished is
/// redone.
#[test]
fn a_restarted_export_resubmits_what_the_last_one_had_in_flight() {
    use std::os::fd::{AsFd, AsRawFd};
    use vhost::vhost_user::message::{VhostUserInflight, VhostUserProtocolFeatures};
    use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserVirtioFeatures};
    use vhost::VhostBackend;
    use vm_memory::GuestMemoryBackend;

    use crate::virtio_blk::inflight::InflightMap;

    let dir = tempfile::tempdir().unwrap();
    let (img, sock) = (image(dir.path()), dir.path().join("vu.sock"));
    let exp = export(&img, &sock, 1);
    let (mem, memfd) = memfd_memory();
    let host = mem.get_host_address(GuestAddress(0)).unwrap() as u64;
    let r = ring(&mem, 0);
    // The guest made four reads available (chains 0-3, heads 0, 3, 6, 9);
    // the dead backend returned head 0 and had taken 6, then 3.
    for (n, sector) in [(0u16, 1u64), (1, 20), (2, 30), (3, 40)] {
        mem.write_slice(&[0xaa; 512], GuestAddress(DATA + u64::from(n) * 0x1000))
            .unwrap();
        push_read(&mem, &r, n, sector, 512);
    }
    mem.write_obj(0u32, GuestAddress(r.used + 4)).unwrap();
    mem.write_obj(513u32, GuestAddress(r.used + 8)).unwrap();
    mem.write_obj(1u16, GuestAddress(r.used + 2)).unwrap();

    let want = VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD;
    let connect = || {
        let mut fe = Frontend::connect(&sock, 1).unwrap();
        fe.set_owner().unwrap();
        let features = fe.get_features().unwrap();
        assert!(fe.get_protocol_features().unwrap().contains(want));
        fe.set_protocol_features(want).unwrap();
        (fe, features)
    };
    // An area for more queues than the export has is refused, and since
    // the request needs an answer the connection ends (rather than the
    // frontend waiting for a reply that never comes).
    let (mut fe, _) = connect();
    assert!(fe
        .get_inflight_fd(&VhostUserInflight::new(0, 0, 9, QSIZE))
        .is_err());
    drop(fe);
    wait_for("the export drops the connection", || !exp.connected());
    let (mut fe, features) = connect();
    let (info, file) = fe
        .get_inflight_fd(&VhostUserInflight::new(0, 0, 1, QSIZE))
        .unwrap();
    // What the dead backend left in the area.
    {
        let map = Arc::new(InflightMap::map(file.as_fd(), 0, info.mmap_size as usize).unwrap());
        let mut q = map.queue(0, QSIZE).unwrap();
        assert!(q.recover(0, QSIZE).is_none());
        q.begin(0);
        q.begin(6);
        q.begin(3);
        q.pre_put(0);
        q.post_put(0, 1);
    }
    // A file smaller than the area it claims is refused (mapping it would
    // fault on first access), and the connection goes on.
    // (REPLY_ACK: the refusal comes back as an error.)
    fe.set_hdr_flags(vhost::vhost_user::message::VhostUserHeaderFlag::NEED_REPLY);
    let short = tempfile::tempfile().unwrap();
    short.set_len(64).unwrap();
    assert!(fe.set_inflight_fd(&info, short.as_raw_fd()).is_err());
    fe.set_inflight_fd(&info, file.as_raw_fd()).unwrap();
    fe.set_features(
        (features & !(1 << VIRTIO_RING_F_EVENT_IDX))
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
    )
    .unwrap();
    let kick = EventFd::new(EFD_NONBLOCK).unwrap();
    let call = EventFd::new(EFD_NONBLOCK).unwrap();
    // The frontend's base (the used index) is overridden by the record.
    super::tests::start_vring(&mut fe, host, &memfd, &r, 1, &kick, &call);

    wait_for("heads 6, 3 and 9 complete", || used_idx(&mem, &r) == 4);
    let mut heads: Vec<u32> = (1..4u64)
        .map(|i| {
            mem.read_obj::<u32>(GuestAddress(r.used + 4 + 8 * i))
                .unwrap()
        })
        .collect();
    heads.sort_unstable();
    assert_eq!(
        heads,
        [3, 6, 9],
        "each taken head once, the returned one not again"
    );
    for (n, sector) in [(1u64, 20u8), (2, 30), (3, 40)] {
        let mut b = [0u8; 512];
        mem.read_slice(&mut b, GuestAddress(DATA + n * 0x1000))
            .unwrap();
        assert!(
            b.iter().all(|&x| x == sector),
            "chain {n} read sector {sector}"
        );
    }
    // Chain 0's buffer was not read again.
    let mut b = [0u8; 512];
    mem.read_slice(&mut b, GuestAddress(DATA)).unwrap();
    assert!(b.iter().all(|&x| x == 0xaa));
    drop(fe);
    wait_for("the export sees the frontend go", || !exp.connected());
    // Three chains ran: the two resubmitted and the one after them.
    assert_eq!(exp.requests(), 3);
}

#[test]
fn without_reconnect_a_lost_backend_is_reported_and_the_device_stays() {
    use super::device::BackendEvent;
    let dir = tempfile::tempdir().unwrap();
    let (img, sock) = (image(dir.path()), dir.path().join("vu.sock"));
    let mut exp = export(&img, &sock, 1);
    let (mem, _f) = memfd_memory();
    let dev = VhostUserBlk::new(options(&sock, None), Arc::new(mem)).unwrap();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let s = seen.clone();
    dev.set_event_hook(Some(Arc::new(move |e| s.lock().unwrap().push(e))));
    exp.stop().unwrap();
    drop(exp);
    wait_for("the loss is reported", || !seen.lock().unwrap().is_empty());
    assert_eq!(
        *seen.lock().unwrap(),
        [BackendEvent::Disconnected {
            reconnecting: false
        }]
    );
    assert!(!dev.connected());
    // Without reconnect-ms a new backend is not picked up; the device
    // (and its configuration space) stays.
    let _exp = export(&img, &sock, 1);
    std::thread::sleep(Duration::from_millis(100));
    assert!(!dev.connected());
    assert_eq!(dev.reconnects(), 0);
    let mut cap = [0u8; 8];
    dev.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 2048);
}
