//! What the register fuzz targets share: a `VmHooks` that plays KVM's
//! part (a doorbell write signals its ioeventfd instead of reaching the
//! device), one IOThread and one null-co node for every input, guest
//! memory, and a reader for the operation stream.

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use block::{BlockGraph, BlockNode};
use devices::bus::{MsiMessage, VmHooks};
use devices::iothread::{IoThread, IoThreadConfig};
use devices::virtio_blk::{BlkOptions, GuestMem, VirtioBlk, VirtioBlkConfig};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

/// Guest RAM of every input.
pub const MEM_SIZE: usize = 1 << 20;
/// Queues of the device and the size of each.
pub const NUM_QUEUES: u16 = 2;
pub const QUEUE_SIZE: u16 = 16;

/// Registered ioeventfds and irqfds, as KVM would hold them.
#[derive(Default)]
pub struct FuzzHooks {
    ioevents: Mutex<Vec<(EventFd, u64, Option<u32>)>>,
    irqfds: Mutex<Vec<(EventFd, u32)>>,
    next_gsi: AtomicU32,
}

impl FuzzHooks {
    pub fn new() -> Arc<Self> {
        Arc::new(FuzzHooks {
            next_gsi: AtomicU32::new(24),
            ..Default::default()
        })
    }

    /// A guest write of `data` at `addr`: signals the matching ioeventfds
    /// as KVM does and returns whether one matched (then the write never
    /// reaches the device).
    pub fn doorbell(&self, addr: u64, data: &[u8]) -> bool {
        let value = (data.len() == 4).then(|| u32::from_le_bytes(data.try_into().unwrap()));
        let evs = self.ioevents.lock().unwrap();
        let mut hit = false;
        for (fd, a, dm) in evs.iter() {
            let matches = match dm {
                None => true,
                Some(d) => value == Some(*d),
            };
            if *a == addr && matches {
                fd.write(1).unwrap();
                hit = true;
            }
        }
        hit
    }

    /// Registrations still held (none once the device is gone).
    pub fn registrations(&self) -> (usize, usize) {
        (
            self.ioevents.lock().unwrap().len(),
            self.irqfds.lock().unwrap().len(),
        )
    }
}

impl VmHooks for FuzzHooks {
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

    fn set_msi_route(&self, _gsi: u32, _msg: Option<MsiMessage>) -> io::Result<()> {
        Ok(())
    }

    fn allocate_gsi(&self) -> io::Result<u32> {
        Ok(self.next_gsi.fetch_add(1, Ordering::SeqCst))
    }
}

struct Shared {
    node: Arc<dyn BlockNode>,
    iothread: Arc<IoThread>,
    _graph: BlockGraph,
}

fn shared() -> &'static Shared {
    static SHARED: OnceLock<Shared> = OnceLock::new();
    SHARED.get_or_init(|| {
        let mut graph = BlockGraph::new();
        let opts = qapi::parse_blockdev("null-co,node-name=n0,size=1M,read-zeroes=on").unwrap();
        let node = graph.add(&opts).unwrap();
        let iothread = IoThread::new(
            "fuzz-io",
            IoThreadConfig {
                poll_max_ns: 0,
                ..IoThreadConfig::default()
            },
        )
        .unwrap();
        Shared {
            node,
            iothread,
            _graph: graph,
        }
    })
}

/// Fresh guest memory and a virtio-blk device over it, its queues on the
/// shared IOThread.
pub fn device() -> (Arc<GuestMem>, VirtioBlk) {
    let s = shared();
    let mem = Arc::new(GuestMem::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap());
    let dev = VirtioBlk::new(
        VirtioBlkConfig {
            id: "fuzz".into(),
            node: s.node.clone(),
            opts: BlkOptions {
                num_queues: NUM_QUEUES,
                queue_size: QUEUE_SIZE,
                ..BlkOptions::default()
            },
            iothreads: vec![s.iothread.clone()],
        },
        mem.clone(),
    )
    .unwrap();
    (mem, dev)
}

/// Writes a guest-memory operation's bytes: an address in 16-byte units,
/// a length and the data.
pub fn mem_write(mem: &GuestMem, input: &mut Input<'_>) {
    let at = u64::from(input.u16()) * 16;
    let len = usize::from(input.u8());
    let data = input.bytes(len);
    let _ = mem.write_slice(data, GuestAddress(at));
}

/// The operation stream; reads past its end give zeroes.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Input { data }
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (a, b) = self.data.split_at(n.min(self.data.len()));
        self.data = b;
        a
    }

    pub fn u8(&mut self) -> u8 {
        self.bytes(1).first().copied().unwrap_or(0)
    }

    pub fn u16(&mut self) -> u16 {
        let mut b = [0u8; 2];
        let s = self.bytes(2);
        b[..s.len()].copy_from_slice(s);
        u16::from_le_bytes(b)
    }

    /// A little-endian value of `len` bytes (1, 2, 4 or 8).
    pub fn value(&mut self, len: usize) -> [u8; 8] {
        let mut b = [0u8; 8];
        let s = self.bytes(len);
        b[..s.len()].copy_from_slice(s);
        b
    }
}
