//! Fuzzes the whole virtio-blk queue handler: the input becomes a
//! descriptor table, an avail ring and request headers in mock guest
//! memory; the handler serves it against a null-co node. It must never
//! panic, never loop, and complete every chain it popped.

#![no_main]

use std::sync::Arc;

use devices::virtio_blk::{BlkOptions, BlkQueueHandler, GuestMem};
use libfuzzer_sys::fuzz_target;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Address, Bytes, GuestAddress};

const QSIZE: u16 = 16;
const MEM: u64 = 0x10_0000;

fuzz_target!(|data: &[u8]| {
    let mut graph = block::BlockGraph::new();
    let node = graph
        .add(&qapi::parse_blockdev("null-co,size=1M,read-zeroes=on,discard=unmap").unwrap())
        .unwrap();
    let backend = block::BlockBackend::new("fuzz", node, block::BackendOptions::default());
    let mut handler = BlkQueueHandler::new(Arc::new(backend), &BlkOptions::default()).unwrap();
    let mem = Arc::new(GuestMem::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap());
    let mq = MockSplitQueue::new(mem.as_ref(), QSIZE);
    let mut q: Queue = mq.create_queue().unwrap();
    // Descriptor table (16 bytes each), then the avail ring's entries and
    // index, then anything else as request payload at 0x1000.
    let table = 16 * usize::from(QSIZE);
    let (desc, rest) = data.split_at(data.len().min(table));
    mem.write_slice(desc, mq.desc_table_addr()).unwrap();
    let (avail, rest) = rest.split_at(rest.len().min(2 * usize::from(QSIZE) + 2));
    if avail.len() >= 2 {
        mem.write_slice(&avail[2..], mq.avail_addr().unchecked_add(4)).unwrap();
        mem.write_slice(&avail[..2], mq.avail_addr().unchecked_add(2)).unwrap();
    }
    let payload = &rest[..rest.len().min((MEM - 0x1000) as usize)];
    mem.write_slice(payload, GuestAddress(0x1000)).unwrap();
    if handler.process_queue(&mut q, &mem, true, &mut || {}).is_ok() {
        handler.drain(&mut q, &mem);
        assert_eq!(handler.in_flight(), 0);
    }
});
