//! Handler tests with mock guest memory and `MockSplitQueue`: each request
//! type, every way a chain can be bad, and a property test that arbitrary
//! chains never panic and every head is completed exactly once.

use std::sync::Arc;

use block::{BackendOptions, BlockBackend, BlockGraph};
use proptest::prelude::*;
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::handler::BlkHandlerError;
use super::{BlkOptions, BlkQueueHandler, GuestMem};

const QSIZE: u16 = 16;
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;

struct Rig {
    mem: Arc<GuestMem>,
    handler: BlkQueueHandler,
    _graph: BlockGraph,
    _img: tempfile::NamedTempFile,
}

fn rig(extra: &str, opts: BlkOptions) -> Rig {
    let img = tempfile::NamedTempFile::new().unwrap();
    img.as_file().set_len(1 << 20).unwrap();
    let mut graph = BlockGraph::new();
    let arg = format!(
        "file,filename={},discard=unmap{extra}",
        img.path().display()
    );
    let node = graph.add(&qapi::parse_blockdev(&arg).unwrap()).unwrap();
    let mem = Arc::new(GuestMem::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap());
    let backend = Arc::new(BlockBackend::new("test", node, opts.backend_options()));
    Rig {
        handler: BlkQueueHandler::new(backend, &opts).unwrap(),
        mem,
        _graph: graph,
        _img: img,
    }
}

fn desc(addr: u64, len: u32, write: bool) -> RawDescriptor {
    let flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
    RawDescriptor::from(Descriptor::new(addr, len, flags, 0))
}

fn header(mem: &GuestMem, at: u64, kind: u32, sector: u64) {
    mem.write_obj(kind.to_le(), GuestAddress(at)).unwrap();
    mem.write_obj(0u32, GuestAddress(at + 4)).unwrap();
    mem.write_obj(sector.to_le(), GuestAddress(at + 8)).unwrap();
}

/// Runs one chain through the handler; returns (status byte, used len).
fn run(r: &mut Rig, descs: &[RawDescriptor]) -> (u8, u32) {
    let mem = r.mem.clone();
    let mq = MockSplitQueue::new(mem.as_ref(), QSIZE);
    mq.build_desc_chain(descs).unwrap();
    let mut q: Queue = mq.create_queue().unwrap();
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    r.handler
        .process_queue(&mut q, &mem, true, &mut || {})
        .unwrap();
    r.handler.drain(&mut q, &mem);
    let used = mq.used_addr().0;
    assert_eq!(
        mem.read_obj::<u16>(GuestAddress(used + 2)).unwrap(),
        1,
        "exactly one used entry"
    );
    let len = mem.read_obj::<u32>(GuestAddress(used + 8)).unwrap();
    (mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), len)
}

fn rw(r: &mut Rig, kind: u32, sector: u64, len: u32) -> (u8, u32) {
    header(&r.mem, HDR, kind, sector);
    let write = kind == VIRTIO_BLK_T_IN;
    run(
        r,
        &[
            desc(HDR, 16, false),
            desc(DATA, len, write),
            desc(STATUS, 1, true),
        ],
    )
}

#[test]
fn write_then_read_round_trips_through_the_node() {
    let mut r = rig("", BlkOptions::default());
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
    r.mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    assert_eq!(rw(&mut r, VIRTIO_BLK_T_OUT, 8, 4096), (0, 1));
    r.mem.write_slice(&[0u8; 4096], GuestAddress(DATA)).unwrap();
    assert_eq!(rw(&mut r, VIRTIO_BLK_T_IN, 8, 4096), (0, 4097));
    let mut back = vec![0u8; 4096];
    r.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert_eq!(back, data);
    assert_eq!(r.handler.counters().requests, 2);
}

#[test]
fn header_split_across_descriptors_and_data_in_pieces_is_accepted() {
    let mut r = rig("", BlkOptions::default());
    header(&r.mem, HDR, VIRTIO_BLK_T_IN, 0);
    let descs = [
        desc(HDR, 10, false),
        desc(HDR + 10, 6, false),
        desc(DATA, 512, true),
        desc(DATA + 4096, 512, true),
        desc(STATUS, 1, true),
    ];
    assert_eq!(run(&mut r, &descs), (0, 1025));
}

#[test]
fn bad_requests_complete_with_an_error_status() {
    let mut r = rig("", BlkOptions::default());
    // Data length not a multiple of 512.
    assert_eq!(
        rw(&mut r, VIRTIO_BLK_T_IN, 0, 100).0,
        VIRTIO_BLK_S_IOERR as u8
    );
    // Past the end of the 1 MiB disk.
    assert_eq!(
        rw(&mut r, VIRTIO_BLK_T_IN, 2048, 512).0,
        VIRTIO_BLK_S_IOERR as u8
    );
    // Sector so large that the byte offset overflows.
    assert_eq!(
        rw(&mut r, VIRTIO_BLK_T_OUT, u64::MAX / 2, 512).0,
        VIRTIO_BLK_S_IOERR as u8
    );
    // Unknown type.
    assert_eq!(rw(&mut r, 0x77, 0, 512).0, VIRTIO_BLK_S_UNSUPP as u8);
    // Header shorter than 16 bytes.
    header(&r.mem, HDR, VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        run(&mut r, &[desc(HDR, 8, false), desc(STATUS, 1, true)]).0,
        VIRTIO_BLK_S_IOERR as u8
    );
    // Readable data after writable data.
    let descs = [
        desc(HDR, 16, false),
        desc(DATA, 512, true),
        desc(DATA, 512, false),
        desc(STATUS, 1, true),
    ];
    assert_eq!(run(&mut r, &descs).0, VIRTIO_BLK_S_IOERR as u8);
    // The queue still serves good requests.
    assert_eq!(rw(&mut r, VIRTIO_BLK_T_IN, 0, 512), (0, 513));
    assert_eq!(r.handler.counters().errors, 6);
}

#[test]
fn chain_without_a_status_byte_is_returned_with_zero_length() {
    let mut r = rig("", BlkOptions::default());
    header(&r.mem, HDR, VIRTIO_BLK_T_OUT, 0);
    let (_, len) = run(&mut r, &[desc(HDR, 16, false), desc(DATA, 512, false)]);
    assert_eq!(len, 0);
}

#[test]
fn read_only_device_refuses_writes_and_discards() {
    let opts = BlkOptions {
        read_only: true,
        ..BlkOptions::default()
    };
    let mut r = rig("", opts);
    assert_eq!(
        rw(&mut r, VIRTIO_BLK_T_OUT, 0, 512).0,
        VIRTIO_BLK_S_IOERR as u8
    );
    assert_eq!(rw(&mut r, VIRTIO_BLK_T_IN, 0, 512).0, 0);
}

#[test]
fn get_id_writes_the_serial() {
    let opts = BlkOptions {
        serial: "disk-serial-1".into(),
        ..BlkOptions::default()
    };
    let mut r = rig("", opts);
    header(&r.mem, HDR, VIRTIO_BLK_T_GET_ID, 0);
    let (status, len) = run(
        &mut r,
        &[
            desc(HDR, 16, false),
            desc(DATA, 20, true),
            desc(STATUS, 1, true),
        ],
    );
    assert_eq!((status, len), (0, 21));
    let mut id = [0u8; 20];
    r.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..13], b"disk-serial-1");
    assert!(id[13..].iter().all(|&b| b == 0));
}

#[test]
fn discard_and_write_zeroes_ranges_zero_the_data() {
    let mut r = rig("", BlkOptions::default());
    r.mem
        .write_slice(&[0xabu8; 8192], GuestAddress(DATA))
        .unwrap();
    assert_eq!(rw(&mut r, VIRTIO_BLK_T_OUT, 0, 8192).0, 0);
    // Two write-zeroes ranges: sectors 0..1 (unmap) and 8..9.
    let seg = |sector: u64, n: u32, flags: u32| {
        let mut v = sector.to_le_bytes().to_vec();
        v.extend(n.to_le_bytes());
        v.extend(flags.to_le_bytes());
        v
    };
    let mut payload = seg(0, 1, 1);
    payload.extend(seg(8, 1, 0));
    r.mem
        .write_slice(&payload, GuestAddress(DATA + 0x10000))
        .unwrap();
    header(&r.mem, HDR, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    let descs = [
        desc(HDR, 16, false),
        desc(DATA + 0x10000, 32, false),
        desc(STATUS, 1, true),
    ];
    assert_eq!(run(&mut r, &descs), (0, 1));
    // A malformed payload (flags other than unmap) fails.
    r.mem
        .write_slice(&seg(0, 1, 6), GuestAddress(DATA + 0x10000))
        .unwrap();
    let descs = [
        desc(HDR, 16, false),
        desc(DATA + 0x10000, 16, false),
        desc(STATUS, 1, true),
    ];
    assert_eq!(run(&mut r, &descs).0, VIRTIO_BLK_S_IOERR as u8);
    r.mem
        .write_slice(&[0xffu8; 8192], GuestAddress(DATA))
        .unwrap();
    assert_eq!(rw(&mut r, VIRTIO_BLK_T_IN, 0, 8192).0, 0);
    let mut back = vec![0u8; 8192];
    r.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert!(back[..512].iter().all(|&b| b == 0));
    assert!(back[512..4096].iter().all(|&b| b == 0xab));
    assert!(back[4096..4608].iter().all(|&b| b == 0));
}

#[test]
fn avail_index_running_ahead_marks_the_queue_broken() {
    let r = rig("", BlkOptions::default());
    let mut r = r;
    let mem = r.mem.clone();
    let mq = MockSplitQueue::new(mem.as_ref(), QSIZE);
    let mut q: Queue = mq.create_queue().unwrap();
    mq.avail().idx().store(u16::to_le(QSIZE + 5));
    assert!(matches!(
        r.handler.process_queue(&mut q, &mem, true, &mut || {}),
        Err(BlkHandlerError::AvailRunaway)
    ));
}

#[test]
fn an_avail_ring_whose_entries_cannot_be_popped_breaks_the_queue_instead_of_spinning() {
    // Found by the virtio-pci fuzz target: a driver that puts its avail
    // ring at guest address 0 and publishes an entry. virtio-queue pops
    // nothing from a ring at 0, the avail index kept saying there was
    // more, and the IOThread (and the vCPU activating the device, which
    // waits for it) spun forever.
    for rearm in [true, false] {
        let r = rig("", BlkOptions::default());
        let (mut handler, mem) = (r.handler, r.mem.clone());
        let mut q = Queue::new(QSIZE).unwrap();
        q.set_desc_table_address(Some(0x1000), Some(0));
        q.set_avail_ring_address(Some(0), Some(0));
        q.set_used_ring_address(Some(0x2000), Some(0));
        q.set_ready(true);
        assert!(q.is_valid(mem.as_ref()));
        mem.write_obj(1u16.to_le(), GuestAddress(2)).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let res = handler.process_queue(&mut q, &mem, rearm, &mut || {});
            let _ = tx.send(matches!(res, Err(BlkHandlerError::AvailUnreadable)));
        });
        let refused = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("process_queue spins (rearm: {rearm})"));
        assert!(refused, "the queue is reported broken (rearm: {rearm})");
    }
}

#[test]
fn process_queue_without_rearm_leaves_the_kick_state_to_the_poller() {
    let mut r = rig("", BlkOptions::default());
    let mem = r.mem.clone();
    let mq = MockSplitQueue::new(mem.as_ref(), QSIZE);
    let mut q: Queue = mq.create_queue().unwrap();
    let used = mq.used_addr().0;
    // The poller turned kicks off.
    q.disable_notification(mem.as_ref()).unwrap();
    header(&mem, HDR, VIRTIO_BLK_T_OUT, 1);
    mem.write_slice(&[0x5a; 512], GuestAddress(DATA)).unwrap();
    mq.build_desc_chain(&[
        desc(HDR, 16, false),
        desc(DATA, 512, false),
        desc(STATUS, 1, true),
    ])
    .unwrap();
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    r.handler
        .process_queue(&mut q, &mem, false, &mut || {})
        .unwrap();
    let flags = mem.read_obj::<u16>(GuestAddress(used)).unwrap();
    assert_eq!(flags & 1, 1, "VRING_USED_F_NO_NOTIFY stays while polling");
    r.handler.drain(&mut q, &mem);
    assert_eq!(mem.read_obj::<u16>(GuestAddress(used + 2)).unwrap(), 1);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0);
    // With rearm, kicks come back on after the pop.
    r.handler
        .process_queue(&mut q, &mem, true, &mut || {})
        .unwrap();
    let flags = mem.read_obj::<u16>(GuestAddress(used)).unwrap();
    assert_eq!(flags & 1, 0);
}

#[test]
fn flush_node_flushes_through_the_handlers_own_queue() {
    let mut r = rig("", BlkOptions::default());
    let before = r.handler.node().stats().snapshot().flush.ops;
    r.handler.flush_node().unwrap();
    assert_eq!(r.handler.node().stats().snapshot().flush.ops, before + 1);
    let mut ro = rig(
        "",
        BlkOptions {
            read_only: true,
            ..BlkOptions::default()
        },
    );
    ro.handler.flush_node().unwrap();
    assert_eq!(ro.handler.node().stats().snapshot().flush.ops, 0);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn arbitrary_chains_complete_every_head_once(
        chains in proptest::collection::vec(
            proptest::collection::vec((0u64..0x3f_0000, 0u32..0x2000, any::<bool>()), 1..5), 1..8),
        kinds in proptest::collection::vec(prop_oneof![Just(0u32), Just(1), Just(4), Just(8), Just(11), Just(13), any::<u32>()], 8),
        sectors in proptest::collection::vec(any::<u64>(), 8),
    ) {
        let mut r = rig("", BlkOptions::default());
        let mem = r.mem.clone();
        let mq = MockSplitQueue::new(mem.as_ref(), 64);
        let mut all = Vec::new();
        let mut heads = Vec::new();
        for (i, chain) in chains.iter().enumerate() {
            let at = HDR + i as u64 * 64;
            header(&mem, at, kinds[i], sectors[i]);
            heads.push(all.len() as u16);
            let n = chain.len() + 1;
            for (j, &(addr, len, w)) in std::iter::once(&(at, 16, false)).chain(chain.iter()).enumerate() {
                let next = if j + 1 < n { (all.len() + 1) as u16 } else { 0 };
                let flags = (if w { VRING_DESC_F_WRITE as u16 } else { 0 }) | if j + 1 < n { 1 } else { 0 };
                all.push(RawDescriptor::from(Descriptor::new(addr, len.min(0x40_0000 - addr as u32), flags, next)));
            }
        }
        mq.add_desc_chains(&all, 0).unwrap();
        let mut q: Queue = mq.create_queue().unwrap();
        r.handler.process_queue(&mut q, &mem, true, &mut || {}).unwrap();
        r.handler.drain(&mut q, &mem);
        let used = mq.used_addr().0;
        let n = mem.read_obj::<u16>(GuestAddress(used + 2)).unwrap();
        prop_assert_eq!(n as usize, chains.len());
        let mut seen: Vec<u16> = (0..n)
            .map(|i| mem.read_obj::<u32>(GuestAddress(used + 4 + 8 * u64::from(i))).unwrap() as u16)
            .collect();
        seen.sort_unstable();
        prop_assert_eq!(seen, heads);
        prop_assert_eq!(r.handler.in_flight(), 0);
    }
}

#[test]
fn a_large_batch_is_announced_every_submit_chunk_when_the_node_finishes_inline() {
    let mut graph = BlockGraph::new();
    let node = graph
        .add(&qapi::parse_blockdev("null-co,node-name=n0,size=1M").unwrap())
        .unwrap();
    let mut handler = BlkQueueHandler::new(
        Arc::new(BlockBackend::new(
            "test",
            node.clone(),
            BackendOptions::default(),
        )),
        &BlkOptions::default(),
    )
    .unwrap();
    let mem = Arc::new(GuestMem::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap());
    let mq = MockSplitQueue::new(mem.as_ref(), 64);
    let chains = 2 * super::handler::SUBMIT_CHUNK;
    let mut descs = Vec::new();
    for i in 0..chains as u64 {
        header(&mem, HDR + 16 * i, VIRTIO_BLK_T_FLUSH, 0);
        let d = descs.len() as u16;
        descs.push(RawDescriptor::from(Descriptor::new(
            HDR + 16 * i,
            16,
            1,
            d + 1,
        )));
        descs.push(RawDescriptor::from(Descriptor::new(
            STATUS + i,
            1,
            VRING_DESC_F_WRITE as u16,
            0,
        )));
    }
    mq.add_desc_chains(&descs, 0).unwrap();
    let mut q: Queue = mq.create_queue().unwrap();
    let mut announced = 0;
    let last = handler
        .process_queue(&mut q, &mem, true, &mut || announced += 1)
        .unwrap();
    // Each chunk was completed and announced while the batch was served;
    // nothing was left for the end.
    assert_eq!(announced, 2);
    assert!(!last);
    let used = mq.used_addr().0;
    assert_eq!(
        mem.read_obj::<u16>(GuestAddress(used + 2)).unwrap(),
        chains as u16
    );
    assert_eq!(handler.in_flight(), 0);
}

#[test]
fn a_driver_refilling_as_fast_as_chunks_complete_gets_one_ring_per_call() {
    const SIZE: u16 = 64;
    const DESC: u64 = 0x1_0000;
    const AVAIL: u64 = 0x1_0400;
    const USED: u64 = 0x1_1000;
    let mut graph = BlockGraph::new();
    let node = graph
        .add(&qapi::parse_blockdev("null-co,node-name=n0,size=1M").unwrap())
        .unwrap();
    let mut handler = BlkQueueHandler::new(
        Arc::new(BlockBackend::new(
            "test",
            node.clone(),
            BackendOptions::default(),
        )),
        &BlkOptions::default(),
    )
    .unwrap();
    let mem = Arc::new(GuestMem::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap());
    // A flush chain (header, status) in descriptors 2i, 2i+1 (mod the
    // table), made available at the ring's index modulo its size.
    let push = |i: u64| {
        let d = 2 * (i % u64::from(SIZE / 2));
        header(&mem, HDR + 16 * d, VIRTIO_BLK_T_FLUSH, 0);
        let put = |n: u64, addr: u64, len: u32, flags: u16, next: u16| {
            let raw = RawDescriptor::from(Descriptor::new(addr, len, flags, next));
            mem.write_obj(raw, GuestAddress(DESC + 16 * n)).unwrap();
        };
        put(d, HDR + 16 * d, 16, 1, (d + 1) as u16);
        put(d + 1, STATUS + d, 1, VRING_DESC_F_WRITE as u16, 0);
        let idx = mem.read_obj::<u16>(GuestAddress(AVAIL + 2)).unwrap();
        let slot = AVAIL + 4 + 2 * u64::from(idx % SIZE);
        mem.write_obj(d as u16, GuestAddress(slot)).unwrap();
        mem.write_obj(idx.wrapping_add(1), GuestAddress(AVAIL + 2))
            .unwrap();
    };
    let mut q = Queue::new(SIZE).unwrap();
    q.set_size(SIZE);
    q.try_set_desc_table_address(GuestAddress(DESC)).unwrap();
    q.try_set_avail_ring_address(GuestAddress(AVAIL)).unwrap();
    q.try_set_used_ring_address(GuestAddress(USED)).unwrap();
    q.set_ready(true);
    let mut pushed = 0;
    while pushed < 16 {
        push(pushed);
        pushed += 1;
    }
    // Each announcement makes the driver put a chunk's worth back.
    handler
        .process_queue(&mut q, &mem, true, &mut || {
            assert!(pushed < 1000, "the handler never went back to its loop");
            for _ in 0..super::handler::SUBMIT_CHUNK {
                push(pushed);
                pushed += 1;
            }
        })
        .unwrap();
    assert_eq!(
        q.next_avail(),
        SIZE,
        "one ring's worth, then back to the loop"
    );
    let avail = mem.read_obj::<u16>(GuestAddress(AVAIL + 2)).unwrap();
    assert!(avail > SIZE, "the driver had more ready");
    assert_eq!(mem.read_obj::<u16>(GuestAddress(USED + 2)).unwrap(), SIZE);
}
