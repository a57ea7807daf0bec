//! The libblkio drivers beyond the conformance suite: open errors for
//! every driver (including those whose devices cannot exist here), queues
//! per thread, limits from libblkio's properties, registered memory
//! against a real qemu-storage-daemon, immediate completions on the
//! completion fd, and read-modify-write ordering.

mod common;

use std::sync::Arc;

use block::bounce::BouncePool;
use block::{BlockError, BlockGraph, BlockNode, Completion, MemoryRegion, NodeQueue, Request};
use common::qsd::Qsd;
use common::{pattern, Disk, Image};

fn add(graph: &mut BlockGraph, arg: &str) -> Result<Arc<dyn BlockNode>, BlockError> {
    graph.add(&qapi::parse_blockdev(arg).unwrap_or_else(|e| panic!("{arg}: {e}")))
}

/// The error and its sources, as the binary prints them.
fn chain(err: &dyn std::error::Error) -> String {
    let mut s = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        s += &format!(": {e}");
        cur = e.source();
    }
    s
}

/// qemu-storage-daemon exporting `img` (a file, O_DIRECT, io_uring).
fn qsd_file(img: &Image, num_queues: u32) -> Qsd {
    let args = [
        format!(
            "driver=file,node-name=f0,filename={},aio=io_uring,cache.direct=on,discard=unmap",
            img.path()
        ),
        "driver=raw,node-name=d0,file=f0,discard=unmap".to_string(),
    ];
    Qsd::start(&args, num_queues)
}

/// Submits `reqs` on `q` and waits for all; completions in any order.
fn run(q: &mut dyn NodeQueue, reqs: Vec<Request>) -> Vec<Completion> {
    let n = reqs.len();
    for r in reqs {
        q.submit(r).expect("submit");
    }
    let mut out = Vec::new();
    while out.len() < n {
        let got = q.wait_completions(n - out.len(), &mut out);
        assert!(got > 0 || q.in_flight() > 0, "queue lost requests");
    }
    out
}

fn iov(addr: *mut u8, len: usize) -> libc::iovec {
    libc::iovec {
        iov_base: addr.cast(),
        iov_len: len,
    }
}

#[test]
fn absent_devices_give_errors_naming_driver_and_path() {
    let cases = [
        ("io_uring", "filename", "/nonexistent/blkvm.img"),
        ("nvme-io_uring", "path", "/dev/ng-blkvm-nope"),
        ("virtio-blk-vhost-user", "path", "/nope.sock"),
        (
            "virtio-blk-vhost-vdpa",
            "path",
            "/dev/vhost-vdpa-blkvm-nope",
        ),
        (
            "virtio-blk-vfio-pci",
            "path",
            "/sys/bus/pci/devices/0000:ff:1f.7",
        ),
    ];
    for (driver, key, path) in cases {
        let mut g = BlockGraph::new();
        let err = add(&mut g, &format!("{driver},{key}={path},node-name=b0")).unwrap_err();
        let text = chain(&err);
        let head = format!("Could not open '{driver}' at '{path}': ");
        assert!(text.starts_with(&head), "{text}");
        assert!(text.len() > head.len() + 3, "no cause given: {text}");
        assert!(g.lookup("b0").is_err(), "{driver}: a failed node was added");
    }
}

#[test]
fn a_file_that_is_not_a_device_is_refused_by_nvme_io_uring() {
    let img = Image::new(1 << 20);
    let mut g = BlockGraph::new();
    let err = add(&mut g, &format!("nvme-io_uring,path={}", img.path())).unwrap_err();
    let text = chain(&err);
    assert!(text.contains("character device"), "{text}");
}

#[test]
fn zero_queues_is_refused() {
    let img = Image::new(1 << 20);
    let mut g = BlockGraph::new();
    let err = add(
        &mut g,
        &format!("io_uring,filename={},num-queues=0", img.path()),
    )
    .unwrap_err();
    assert!(
        chain(&err).contains("num-queues must be at least 1"),
        "{err}"
    );
}

/// Each of two threads writes and reads back its own half of the disk on
/// its own queue, many requests at a time.
fn two_queues_at_once(node: &Arc<dyn BlockNode>) {
    let queues = [node.open_queue().unwrap(), node.open_queue().unwrap()];
    let err = node.open_queue().err().expect("a third queue");
    assert!(
        err.to_string()
            .contains("has no free queue (num-queues=2, all in use)"),
        "{err}"
    );
    let threads: Vec<_> = queues
        .into_iter()
        .enumerate()
        .map(|(t, mut q)| {
            std::thread::spawn(move || {
                let base = t as u64 * (4 << 20);
                let mut bufs: Vec<Vec<u8>> =
                    (0..64).map(|i| pattern(t as u8 * 64 + i, 8192)).collect();
                for round in 0..4u64 {
                    let off = |i: usize| base + (round * 64 + i as u64) * 8192;
                    let writes = bufs
                        .iter_mut()
                        .enumerate()
                        // SAFETY: `bufs` outlives `run`, which waits for all.
                        .map(|(i, b)| unsafe {
                            Request::write(off(i), vec![iov(b.as_mut_ptr(), 8192)], false)
                        })
                        .collect();
                    assert!(run(q.as_mut(), writes).iter().all(|c| c.result == Ok(8192)));
                    let mut back: Vec<Vec<u8>> = (0..64).map(|_| vec![0u8; 8192]).collect();
                    let reads = back
                        .iter_mut()
                        .enumerate()
                        // SAFETY: as above.
                        .map(|(i, b)| unsafe {
                            Request::read(off(i), vec![iov(b.as_mut_ptr(), 8192)])
                        })
                        .collect();
                    assert!(run(q.as_mut(), reads).iter().all(|c| c.result == Ok(8192)));
                    assert!(back == bufs, "thread {t} round {round} read other data");
                }
                q
            })
        })
        .collect();
    let queues: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    drop(queues);
    // Both went back to the node.
    let again = [node.open_queue().unwrap(), node.open_queue().unwrap()];
    drop(again);
}

#[test]
fn two_io_uring_queues_work_at_once() {
    let img = Image::new(16 << 20);
    let mut g = BlockGraph::new();
    let node = add(
        &mut g,
        &format!("io_uring,filename={},num-queues=2", img.path()),
    )
    .unwrap();
    two_queues_at_once(&node);
}

#[test]
fn two_vhost_user_queues_work_at_once() {
    let img = Image::new(16 << 20);
    let qsd = qsd_file(&img, 2);
    let mut g = BlockGraph::new();
    let arg = format!("virtio-blk-vhost-user,path={},num-queues=2", qsd.sock());
    let node = add(&mut g, &arg).unwrap();
    two_queues_at_once(&node);
    drop(node);
    drop(g);
}

#[test]
fn more_queues_than_the_server_has_are_refused() {
    let img = Image::new(1 << 20);
    let qsd = qsd_file(&img, 1);
    let mut g = BlockGraph::new();
    let arg = format!("virtio-blk-vhost-user,path={},num-queues=2", qsd.sock());
    let text = chain(&add(&mut g, &arg).unwrap_err());
    assert!(
        text.starts_with("Could not open 'virtio-blk-vhost-user'"),
        "{text}"
    );
    assert!(text.contains("num_queues"), "{text}");
}

#[test]
fn limits_come_from_libblkio() {
    let img = Image::new(8 << 20);
    let qsd = qsd_file(&img, 1);
    let mut g = BlockGraph::new();
    let vu = add(
        &mut g,
        &format!("virtio-blk-vhost-user,path={},node-name=v", qsd.sock()),
    )
    .unwrap();
    let l = vu.limits();
    assert_eq!(vu.capacity(), 8 << 20);
    assert_eq!(l.request_alignment, 512, "{l:?}");
    assert!(
        l.max_transfer > 0 && l.max_transfer <= 128 << 10,
        "bounce-sized: {l:?}"
    );
    assert!(l.max_segments >= 1 && l.discard_granularity >= 512, "{l:?}");
    assert_eq!(vu.driver(), "virtio-blk-vhost-user");
    assert!(!vu.read_only());

    let io = add(
        &mut g,
        &format!(
            "io_uring,filename={},cache.direct=on,node-name=i",
            img.path()
        ),
    )
    .unwrap();
    let l = io.limits();
    assert!(
        l.request_alignment >= 512 && l.buf_alignment >= 512,
        "{l:?}"
    );
    assert_eq!(l.max_transfer, 0, "the kernel splits: {l:?}");
    let ro = add(
        &mut g,
        &format!("io_uring,filename={},read-only=on,node-name=r", img.path()),
    )
    .unwrap();
    assert!(ro.read_only());
}

#[test]
fn a_grown_file_is_seen_by_io_uring() {
    let img = Image::new(1 << 20);
    let mut g = BlockGraph::new();
    let node = add(&mut g, &format!("io_uring,filename={}", img.path())).unwrap();
    img.file().set_len(2 << 20).unwrap();
    assert_eq!(node.refresh_capacity().unwrap(), 2 << 20);
    assert_eq!(node.capacity(), 2 << 20);
}

#[test]
fn immediate_completions_wake_the_completion_fd() {
    let img = Image::new(1 << 20);
    let mut g = BlockGraph::new();
    let node = add(
        &mut g,
        &format!("io_uring,filename={},cache.no-flush=on", img.path()),
    )
    .unwrap();
    let mut q = node.open_queue().unwrap();
    q.submit(Request::flush()).unwrap();
    let mut pfd = libc::pollfd {
        fd: q.completion_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, 5000) };
    assert_eq!(n, 1, "completion fd not readable");
    let mut out = Vec::new();
    assert_eq!(q.poll_completions(&mut out), 1);
    assert_eq!(out[0].result, Ok(0));
    assert_eq!(q.in_flight(), 0);
}

/// A vhost-user node on `img` and memory to do I/O from, in a memfd.
struct Mapped {
    _qsd: Qsd,
    g: BlockGraph,
    node: Arc<dyn BlockNode>,
    pool: BouncePool,
}

fn mapped(img: &Image) -> Mapped {
    let qsd = qsd_file(img, 1);
    let mut g = BlockGraph::new();
    let node = add(
        &mut g,
        &format!("virtio-blk-vhost-user,path={}", qsd.sock()),
    )
    .unwrap();
    let pool = BouncePool::new(4, 64 << 10, 4096).unwrap();
    Mapped {
        _qsd: qsd,
        g,
        node,
        pool,
    }
}

#[test]
fn registered_memfd_memory_goes_to_the_server_without_copies() {
    let img = Image::new(4 << 20);
    let mut m = mapped(&img);
    let id = m.g.registrar().add(m.pool.region());
    let mut q = m.node.open_queue().unwrap();
    let (w, r) = (m.pool.try_take().unwrap(), m.pool.try_take().unwrap());
    let data = pattern(9, 65536);
    // SAFETY: `w` holds 64 KiB.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), w.addr, data.len()) };
    // SAFETY: the pool outlives the requests (each is waited for).
    let c = run(
        q.as_mut(),
        vec![unsafe { Request::write(65536, vec![iov(w.addr, 65536)], false) }],
    );
    assert_eq!(c[0].result, Ok(65536));
    // SAFETY: as above; two segments inside `r` (64 KiB) with a gap.
    let segs = unsafe { vec![iov(r.addr, 4096), iov(r.addr.add(8192), 57344)] };
    // SAFETY: as above.
    let c = run(q.as_mut(), vec![unsafe { Request::read(65536, segs) }]);
    assert_eq!(c[0].result, Ok(61440));
    // SAFETY: `r` holds 64 KiB.
    let got = unsafe { std::slice::from_raw_parts(r.addr, 65536) };
    assert!(got[..4096] == data[..4096], "first segment differs");
    assert!(got[8192..] == data[4096..61440], "second segment differs");
    let s = m.node.stats().snapshot();
    assert_eq!(
        (s.registered_ops, s.bounced_ops, s.region_map_failures),
        (2, 0, 0),
        "{s:?}"
    );
    assert!(img.contents()[65536..131072] == data[..], "image differs");

    // Removed from the registrar, the same memory is bounced.
    m.g.registrar().remove(id);
    // SAFETY: as above.
    let c = run(
        q.as_mut(),
        vec![unsafe { Request::read(65536, vec![iov(r.addr, 65536)]) }],
    );
    assert_eq!(c[0].result, Ok(65536));
    assert_eq!(m.node.stats().snapshot().bounced_ops, 1);
    m.pool.give_back(w);
    m.pool.give_back(r);
}

#[test]
fn a_region_removed_with_requests_in_flight_stays_mapped_until_they_finish() {
    let img = Image::new(4 << 20);
    let mut m = mapped(&img);
    let id = m.g.registrar().add(m.pool.region());
    let mut q = m.node.open_queue().unwrap();
    let bufs: Vec<_> = (0..4).map(|_| m.pool.try_take().unwrap()).collect();
    for (i, b) in bufs.iter().enumerate() {
        let d = pattern(i as u8, 65536);
        // SAFETY: each buffer holds 64 KiB.
        unsafe { std::ptr::copy_nonoverlapping(d.as_ptr(), b.addr, d.len()) };
    }
    // Two writes in flight, then the region goes; the next submit sees
    // the removal while they are still in flight.
    for (i, b) in bufs[..2].iter().enumerate() {
        // SAFETY: the pool outlives the requests.
        q.submit(unsafe { Request::write(i as u64 * 65536, vec![iov(b.addr, 65536)], false) })
            .unwrap();
    }
    m.g.registrar().remove(id);
    for (i, b) in bufs[2..].iter().enumerate() {
        // SAFETY: as above.
        q.submit(unsafe {
            Request::write((i as u64 + 2) * 65536, vec![iov(b.addr, 65536)], false)
        })
        .unwrap();
    }
    let mut out = Vec::new();
    while out.len() < 4 {
        q.wait_completions(4 - out.len(), &mut out);
    }
    assert!(out.iter().all(|c| c.result == Ok(65536)), "{out:?}");
    let s = m.node.stats().snapshot();
    assert_eq!((s.registered_ops, s.bounced_ops), (2, 2), "{s:?}");
    let disk = img.contents();
    for i in 0..4 {
        assert!(
            disk[i * 65536..(i + 1) * 65536] == pattern(i as u8, 65536)[..],
            "chunk {i}"
        );
    }
    for b in bufs {
        m.pool.give_back(b);
    }
}

#[test]
fn a_region_the_driver_cannot_map_is_counted_and_bounced() {
    let img = Image::new(4 << 20);
    let m = mapped(&img);
    // Heap memory has no fd: vhost-user cannot share it with the server.
    let mut heap = vec![0u8; 65536];
    m.g.registrar().add(MemoryRegion {
        host_addr: heap.as_mut_ptr() as u64,
        len: heap.len() as u64,
        fd: None,
        fd_offset: 0,
    });
    let mut d = Disk::new(m.g, m.node.clone());
    let data = pattern(3, 8192);
    assert_eq!(d.write(4096, &data), Ok(8192));
    assert!(d.read(4096, 8192).unwrap() == data);
    let s = m.node.stats().snapshot();
    assert_eq!(s.region_map_failures, 1, "{s:?}");
    assert_eq!(s.registered_ops, 0, "{s:?}");
    assert!(s.bounced_ops >= 2, "{s:?}");
}

#[test]
fn a_write_after_an_unaligned_write_lands_after_it() {
    let img = Image::new(1 << 20);
    let qsd = qsd_file(&img, 1);
    let mut g = BlockGraph::new();
    let node = add(
        &mut g,
        &format!("virtio-blk-vhost-user,path={}", qsd.sock()),
    )
    .unwrap();
    let mut q = node.open_queue().unwrap();
    let mut small = pattern(1, 10);
    let mut whole = pattern(2, 4096);
    // SAFETY: both buffers outlive `run`.
    let reqs = unsafe {
        vec![
            Request::write(100, vec![iov(small.as_mut_ptr(), 10)], false),
            Request::write(0, vec![iov(whole.as_mut_ptr(), 4096)], false),
        ]
    };
    assert!(run(q.as_mut(), reqs).iter().all(|c| c.result.is_ok()));
    assert!(
        img.contents()[..4096] == whole[..],
        "the read-modify-write overtook the later write"
    );
}

#[test]
fn unaligned_write_zeroes_and_discard_on_vhost_user() {
    let img = Image::new(1 << 20);
    let qsd = qsd_file(&img, 1);
    let mut g = BlockGraph::new();
    let arg = format!("virtio-blk-vhost-user,path={},discard=unmap", qsd.sock());
    let node = add(&mut g, &arg).unwrap();
    let mut d = Disk::new(g, node);
    let data = pattern(5, 8192);
    d.write(0, &data).unwrap();
    assert_eq!(d.write_zeroes(100, 3000, false), Ok(3000));
    let got = d.read(0, 8192).unwrap();
    assert!(
        got[..100] == data[..100] && got[3100..] == data[3100..],
        "neighbours damaged"
    );
    assert!(got[100..3100].iter().all(|&b| b == 0), "not zeroed");
    // An unaligned discard shrinks to whole blocks; one inside a block does nothing.
    assert_eq!(d.op(block::RequestOp::Discard, 10, 20), Ok(20));
    assert_eq!(d.op(block::RequestOp::Discard, 4000, 5000), Ok(5000));
    assert!(d.read(0, 100).unwrap() == data[..100]);
}

#[test]
fn write_zeroes_the_file_system_refuses_are_written_by_hand() {
    // tmpfs punches holes but has no FALLOC_FL_ZERO_RANGE, which libblkio
    // uses for write-zeroes that must not unmap.
    let file = tempfile::Builder::new()
        .suffix(".img")
        .tempfile_in("/dev/shm")
        .unwrap();
    file.as_file().set_len(1 << 20).unwrap();
    let path = file.path().to_str().unwrap();
    let mut g = BlockGraph::new();
    let node = add(&mut g, &format!("io_uring,filename={path}")).unwrap();
    let mut d = Disk::new(g, node);
    let data = pattern(6, 65536);
    d.write(0, &data).unwrap();
    for _ in 0..2 {
        assert_eq!(d.write_zeroes(4096, 8192, false), Ok(8192));
        assert_eq!(d.write_zeroes(20000, 300, false), Ok(300));
    }
    let got = d.read(0, 65536).unwrap();
    assert!(got[4096..12288].iter().all(|&b| b == 0), "not zeroed");
    assert!(got[20000..20300].iter().all(|&b| b == 0), "not zeroed");
    assert!(got[..4096] == data[..4096] && got[12288..20000] == data[12288..20000]);
    assert!(got[20300..] == data[20300..], "neighbours damaged");
}
