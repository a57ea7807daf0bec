//! Test rigs for the transports: a `VmHooks` that records what it was
//! asked and plays KVM's part (doorbell writes signal the matching
//! ioeventfd), guest memory, a file-backed virtio-blk device, and a little
//! driver that puts read requests on a queue.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use block::BlockGraph;
use virtio_bindings::virtio_blk::VIRTIO_BLK_T_IN;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::{MsiMessage, VmHooks};
use crate::iothread::IoThread;
use crate::virtio_blk::{BlkOptions, GuestMem, VirtioBlk, VirtioBlkConfig};

/// A recording `VmHooks`.
#[derive(Default)]
pub struct RecordingHooks {
    pub ioevents: Mutex<Vec<(EventFd, u64, Option<u32>)>>,
    pub irqfds: Mutex<Vec<(EventFd, u32)>>,
    pub routes: Mutex<HashMap<u32, Option<MsiMessage>>>,
    pub next_gsi: AtomicU32,
}

impl RecordingHooks {
    pub fn new() -> Arc<Self> {
        Arc::new(RecordingHooks {
            next_gsi: AtomicU32::new(24),
            ..Default::default()
        })
    }

    /// What KVM does on a guest write of `value` at `addr`: signals every
    /// matching ioeventfd. Returns whether one matched.
    pub fn doorbell(&self, addr: u64, value: u32) -> bool {
        let evs = self.ioevents.lock().unwrap();
        let mut hit = false;
        for (fd, a, dm) in evs.iter() {
            if *a == addr && dm.is_none_or(|d| d == value) {
                fd.write(1).unwrap();
                hit = true;
            }
        }
        hit
    }

    /// The irqfd registered on `gsi` (a clone sharing its counter).
    pub fn irqfd(&self, gsi: u32) -> Option<EventFd> {
        let v = self.irqfds.lock().unwrap();
        v.iter()
            .find(|(_, g)| *g == gsi)
            .map(|(fd, _)| fd.try_clone().unwrap())
    }

    pub fn ioevent_addrs(&self) -> Vec<u64> {
        self.ioevents.lock().unwrap().iter().map(|e| e.1).collect()
    }

    pub fn route(&self, gsi: u32) -> Option<MsiMessage> {
        self.routes.lock().unwrap().get(&gsi).copied().flatten()
    }
}

impl VmHooks for RecordingHooks {
    fn register_ioevent(&self, fd: &EventFd, addr: u64, dm: Option<u32>) -> io::Result<()> {
        let mut v = self.ioevents.lock().unwrap();
        if v.iter().any(|(_, a, d)| *a == addr && *d == dm) {
            return Err(io::Error::from_raw_os_error(libc::EEXIST));
        }
        v.push((fd.try_clone()?, addr, dm));
        Ok(())
    }

    fn unregister_ioevent(&self, _fd: &EventFd, addr: u64, dm: Option<u32>) -> io::Result<()> {
        let mut v = self.ioevents.lock().unwrap();
        let n = v.len();
        v.retain(|(_, a, d)| !(*a == addr && *d == dm));
        if v.len() == n {
            return Err(io::Error::from_raw_os_error(libc::ENOENT));
        }
        Ok(())
    }

    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> io::Result<()> {
        self.irqfds.lock().unwrap().push((fd.try_clone()?, gsi));
        Ok(())
    }

    fn unregister_irqfd(&self, _fd: &EventFd, gsi: u32) -> io::Result<()> {
        self.irqfds.lock().unwrap().retain(|(_, g)| *g != gsi);
        Ok(())
    }

    fn set_msi_route(&self, gsi: u32, msg: Option<MsiMessage>) -> io::Result<()> {
        self.routes.lock().unwrap().insert(gsi, msg);
        Ok(())
    }

    fn allocate_gsi(&self) -> io::Result<u32> {
        Ok(self.next_gsi.fetch_add(1, Ordering::SeqCst))
    }
}

pub const MEM_SIZE: u64 = 0x40_0000;
pub const RING: u64 = 0x1_0000;
pub const HDR: u64 = 0x10_0000;
pub const DATA: u64 = 0x20_0000;
pub const STATUS: u64 = 0x30_0000;
pub const QSIZE: u16 = 16;

/// A virtio-blk device over a 1 MiB file whose sector `n` is filled with
/// byte `n`.
pub struct BlkRig {
    pub mem: Arc<GuestMem>,
    pub graph: BlockGraph,
    pub img: tempfile::NamedTempFile,
}

impl BlkRig {
    pub fn new() -> Self {
        let img = tempfile::NamedTempFile::new().unwrap();
        let data: Vec<u8> = (0..2048u32).flat_map(|s| [s as u8; 512]).collect();
        std::fs::write(img.path(), &data).unwrap();
        let mem = Arc::new(GuestMem::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap());
        BlkRig {
            mem,
            graph: BlockGraph::new(),
            img,
        }
    }

    pub fn device(&mut self, opts: BlkOptions, iothreads: Vec<Arc<IoThread>>) -> VirtioBlk {
        let arg = format!("file,filename={}", self.img.path().display());
        let name = format!("n{}", self.graph.nodes().count());
        let arg = format!("{arg},node-name={name}");
        let node = self
            .graph
            .add(&qapi::parse_blockdev(&arg).unwrap())
            .unwrap();
        VirtioBlk::new(
            VirtioBlkConfig {
                id: "vblk0".into(),
                node,
                opts: BlkOptions {
                    queue_size: QSIZE,
                    ..opts
                },
                iothreads,
            },
            self.mem.clone(),
        )
        .unwrap()
    }
}

/// A queue as a driver lays it out in the page at `RING + 0x1000 * q`:
/// descriptors and avail ring from `MockSplitQueue`, the used ring at
/// +0x800 (the mock's own used ring overlaps the avail ring's
/// `used_event`, which EVENT_IDX needs).
pub struct TestRing<'a> {
    pub mq: MockSplitQueue<'a, GuestMem>,
    pub used: u64,
}

impl TestRing<'_> {
    pub fn desc(&self) -> u64 {
        self.mq.desc_table_addr().0
    }

    pub fn avail(&self) -> u64 {
        self.mq.avail_addr().0
    }

    /// The driver's `used_event` (EVENT_IDX).
    pub fn set_used_event(&self, mem: &GuestMem, v: u16) {
        let at = self.avail() + 4 + 2 * u64::from(QSIZE);
        mem.write_obj(v.to_le(), GuestAddress(at)).unwrap();
    }
}

/// Lays out (and zeroes) queue `q`'s rings.
pub fn ring(mem: &GuestMem, q: u16) -> TestRing<'_> {
    let page = RING + 0x1000 * u64::from(q);
    mem.write_slice(&[0u8; 0x1000], GuestAddress(page)).unwrap();
    TestRing {
        mq: MockSplitQueue::create(mem, GuestAddress(page), QSIZE),
        used: page + 0x800,
    }
}

/// Puts a read of `len` bytes at `sector` on `r` as chain number `n`
/// (descriptors 3n..3n+2); data lands at `DATA + n * 0x1000`.
pub fn push_read(mem: &GuestMem, r: &TestRing<'_>, n: u16, sector: u64, len: u32) {
    let hdr = HDR + u64::from(n) * 16;
    mem.write_obj(VIRTIO_BLK_T_IN.to_le(), GuestAddress(hdr))
        .unwrap();
    mem.write_obj(0u32, GuestAddress(hdr + 4)).unwrap();
    mem.write_obj(sector.to_le(), GuestAddress(hdr + 8))
        .unwrap();
    mem.write_obj(0xffu8, GuestAddress(STATUS + u64::from(n)))
        .unwrap();
    let next = VRING_DESC_F_NEXT as u16;
    let w = VRING_DESC_F_WRITE as u16;
    let d = 3 * n;
    let descs = [
        RawDescriptor::from(Descriptor::new(hdr, 16, next, d + 1)),
        RawDescriptor::from(Descriptor::new(
            DATA + u64::from(n) * 0x1000,
            len,
            next | w,
            d + 2,
        )),
        RawDescriptor::from(Descriptor::new(STATUS + u64::from(n), 1, w, 0)),
    ];
    r.mq.add_desc_chains(&descs, d).unwrap();
}

/// The used ring's index.
pub fn used_idx(mem: &GuestMem, r: &TestRing<'_>) -> u16 {
    mem.read_obj::<u16>(GuestAddress(r.used + 2)).unwrap()
}

/// Length of used element `i`.
pub fn used_len(mem: &GuestMem, r: &TestRing<'_>, i: u64) -> u32 {
    mem.read_obj::<u32>(GuestAddress(r.used + 4 + 8 * i + 4))
        .unwrap()
}

/// Waits until `f` holds (or fails the test after 5 s).
pub fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "timed out: {what}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Waits for `fd` to be signalled and consumes the signal.
pub fn wait_signalled(fd: &EventFd) {
    wait_for("interrupt eventfd", || fd.read().is_ok());
}
