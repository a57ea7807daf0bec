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
use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO};
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
    let mut graph = BlockGraph::new();
    let node = graph
        .add(
            &qapi::parse_blockdev(&format!(
                "driver=file,node-name=f0,filename={}",
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
