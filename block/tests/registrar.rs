//! The RAM registrar with native io_uring: requests whose buffers lie in a
//! registered region go to the kernel as fixed-buffer operations (counted
//! in the node's stats), others take the ordinary path, and both return
//! the same data. Regions can come and go while the queue is open.

mod common;

use block::bounce::BouncePool;
use block::{BlockGraph, Completion, NodeQueue, Request};
use common::{pattern, Image};

fn run(q: &mut dyn NodeQueue, req: Request) -> Completion {
    q.submit(req).expect("submit");
    let mut out = Vec::new();
    while out.is_empty() {
        q.wait_completions(1, &mut out);
    }
    out.pop().unwrap()
}

fn iov(addr: *mut u8, off: usize, len: usize) -> libc::iovec {
    libc::iovec {
        // SAFETY: callers stay inside a pool buffer.
        iov_base: unsafe { addr.add(off) }.cast(),
        iov_len: len,
    }
}

fn check_registered_io(direct: &str) {
    let img = Image::new(8 << 20);
    let mut g = BlockGraph::new();
    let arg = format!(
        "file,filename={},aio=io_uring,{direct}node-name=f0",
        img.path()
    );
    let node = g.add(&qapi::parse_blockdev(&arg).unwrap()).unwrap();
    let mut q = node.open_queue().unwrap();
    let mut pool = BouncePool::new(4, 64 << 10, 4096).unwrap();
    let id = g.registrar().add(pool.region());
    let wbuf = pool.try_take().unwrap();
    let rbuf = pool.try_take().unwrap();
    let data = pattern(42, 16384);
    // SAFETY: `wbuf` holds 64 KiB.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), wbuf.addr, data.len()) };

    // One segment, then three segments in the same registered buffer.
    // SAFETY: the pool outlives every request (each is waited for).
    let c = run(q.as_mut(), unsafe {
        Request::write(4096, vec![iov(wbuf.addr, 0, 16384)], false)
    });
    assert_eq!(c.result, Ok(16384));
    let segs = vec![
        iov(rbuf.addr, 0, 4096),
        iov(rbuf.addr, 8192, 8192),
        iov(rbuf.addr, 32768, 4096),
    ];
    // SAFETY: as above.
    let c = run(q.as_mut(), unsafe { Request::read(4096, segs) });
    assert_eq!(c.result, Ok(16384));
    let mut got = vec![0u8; 16384];
    // SAFETY: the three ranges read lie inside `rbuf`.
    unsafe {
        std::ptr::copy_nonoverlapping(rbuf.addr, got.as_mut_ptr(), 4096);
        std::ptr::copy_nonoverlapping(rbuf.addr.add(8192), got.as_mut_ptr().add(4096), 8192);
        std::ptr::copy_nonoverlapping(rbuf.addr.add(32768), got.as_mut_ptr().add(12288), 4096);
    }
    assert!(got == data, "data through fixed buffers differs");
    let s = node.stats().snapshot();
    assert_eq!(
        s.registered_ops, 2,
        "both requests should use fixed buffers: {s:?}"
    );
    assert_eq!(s.region_map_failures, 0);

    // After the region goes away the same buffers take the ordinary path.
    g.registrar().remove(id);
    // SAFETY: as above.
    let c = run(q.as_mut(), unsafe {
        Request::read(4096, vec![iov(rbuf.addr, 0, 16384)])
    });
    assert_eq!(c.result, Ok(16384));
    assert_eq!(node.stats().snapshot().registered_ops, 2);
    // SAFETY: `rbuf` holds 64 KiB.
    let back = unsafe { std::slice::from_raw_parts(rbuf.addr, 16384) }.to_vec();
    assert!(back == data);
    pool.give_back(wbuf);
    pool.give_back(rbuf);
}

#[test]
fn registered_memory_uses_fixed_buffers_buffered() {
    check_registered_io("");
}

#[test]
fn registered_memory_uses_fixed_buffers_with_o_direct() {
    check_registered_io("cache.direct=on,");
}

#[test]
fn a_queue_opened_after_registration_sees_the_region() {
    let img = Image::new(1 << 20);
    let mut g = BlockGraph::new();
    let arg = format!("file,filename={},aio=io_uring,node-name=f0", img.path());
    let node = g.add(&qapi::parse_blockdev(&arg).unwrap()).unwrap();
    let mut pool = BouncePool::new(1, 4096, 4096).unwrap();
    g.registrar().add(pool.region());
    let mut q = node.open_queue().unwrap();
    let b = pool.try_take().unwrap();
    // SAFETY: the pool outlives the request.
    let c = run(q.as_mut(), unsafe {
        Request::read(0, vec![iov(b.addr, 0, 4096)])
    });
    assert_eq!(c.result, Ok(4096));
    assert_eq!(node.stats().snapshot().registered_ops, 1);
    pool.give_back(b);
}
