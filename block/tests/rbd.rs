//! The `rbd` driver against a real Ceph cluster (one monitor, one memstore
//! OSD, cephx; `resources/ceph/start.sh`): the conformance behaviours of
//! `conformance.rs` on an rbd node; images written by the `rbd` tool read
//! back through blkvm and the other way round; resize, snapshots, the
//! write-zeroes fallback, `server` and `auth-client-required`, two queues
//! on one image; a cluster that stops answering fails requests
//! with EIO after librados' timeout and serves again when it is back; bad
//! options are errors that say what is wrong.
//!
//! The cluster is the project's script's, shared by the tests of this
//! file (see `rbd_util/cluster.rs`); every test makes and removes its own
//! images. Without Ceph installed these tests fail.

#[path = "rbd_util/cluster.rs"]
mod cluster;
mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use block::rbd::Secret;
use block::{BlockGraph, BlockNode, Completion, Request, RequestError, RequestFlags, RequestOp};
use cluster::{Cluster, RbdTestImage};
use common::{pattern, Disk};

/// Size of the conformance images (as conformance.rs).
const IMG_SIZE: u64 = 32 << 20;

fn graph_with_secret(img: &RbdTestImage<'_>) -> BlockGraph {
    let mut graph = BlockGraph::new();
    let o = qapi::object::parse_object(&img.secret_object()).unwrap();
    let qapi::object::ObjectProperties::Secret(p) = o.properties else {
        unreachable!("a secret object");
    };
    graph.add_secret(o.id, Secret::load(&p).unwrap());
    graph
}

fn try_open(
    img: &RbdTestImage<'_>,
    extra: &str,
) -> Result<(BlockGraph, Arc<dyn BlockNode>), String> {
    let mut graph = graph_with_secret(img);
    let arg = img.blockdev(extra);
    let opts = qapi::parse_blockdev(&arg).map_err(|e| e.to_string())?;
    let node = graph.add(&opts).map_err(error_chain)?;
    Ok((graph, node))
}

fn open(img: &RbdTestImage<'_>, extra: &str) -> Disk {
    let (graph, node) = try_open(img, extra).unwrap_or_else(|e| panic!("{extra}: {e}"));
    Disk::new(graph, node)
}

/// An error and its sources, as the binary prints them.
fn error_chain(e: block::BlockError) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(c) = src {
        s += &format!(": {c}");
        src = c.source();
    }
    s
}

/// The conformance suite's behaviours (conformance.rs) on an rbd node
/// opened as client.blkvm with `discard=unmap`.
mod conformance {
    use super::*;

    fn disk(c: &Cluster) -> (RbdTestImage<'_>, Disk) {
        let img = c.image(IMG_SIZE);
        let d = open(&img, ",discard=unmap,node-name=t0");
        (img, d)
    }

    #[test]
    fn capacity_is_the_configured_size() {
        let c = Cluster::shared();
        let (_img, d) = disk(&c);
        assert_eq!(d.node.capacity(), IMG_SIZE);
        assert_eq!(d.node.driver(), "rbd");
    }

    #[test]
    fn data_at_both_ends_reads_back() {
        let c = Cluster::shared();
        let (img, mut d) = disk(&c);
        let cap = d.node.capacity();
        let head = pattern(1, 64 << 10);
        let tail = pattern(2, 64 << 10);
        assert_eq!(d.write(0, &head), Ok(head.len() as u64));
        assert_eq!(
            d.write(cap - tail.len() as u64, &tail),
            Ok(tail.len() as u64)
        );
        assert!(d.read(0, head.len()).unwrap() == head, "head data differs");
        assert!(
            d.read(cap - tail.len() as u64, tail.len()).unwrap() == tail,
            "tail data differs"
        );
        // In the image itself, as another client sees it.
        assert_eq!(d.op(RequestOp::Flush, 0, 0), Ok(0));
        let exported = export(&img);
        assert!(
            exported[..head.len()] == head[..],
            "image differs at the head"
        );
    }

    #[test]
    fn requests_past_the_end_fail_cleanly() {
        let c = Cluster::shared();
        let (_img, mut d) = disk(&c);
        let cap = d.node.capacity();
        for (off, len) in [(cap - 512, 4096), (cap, 512), (u64::MAX - 511, 512)] {
            assert!(
                matches!(d.read(off, len), Err(RequestError::OutOfRange { .. })),
                "read at {off}+{len}"
            );
            assert!(
                matches!(
                    d.write(off, &vec![1; len]),
                    Err(RequestError::OutOfRange { .. })
                ),
                "write at {off}+{len}"
            );
        }
        assert!(matches!(
            d.op(RequestOp::Discard, cap, 4096),
            Err(RequestError::OutOfRange { .. })
        ));
        assert!(matches!(
            d.op(RequestOp::WriteZeroes, cap - 4096, 8192),
            Err(RequestError::OutOfRange { .. })
        ));
        assert_eq!(d.write(0, &[7; 512]), Ok(512));
    }

    #[test]
    fn unaligned_requests_read_back() {
        let c = Cluster::shared();
        let (_img, mut d) = disk(&c);
        let base = pattern(3, 16384);
        d.write(0, &base).unwrap();
        let cases = [(1u64, 1000usize), (511, 2), (4095, 4098), (700, 9000)];
        let mut expect = base.clone();
        for (i, &(off, len)) in cases.iter().enumerate() {
            let data = pattern(10 + i as u8, len);
            assert_eq!(
                d.write_misaligned(off, &data),
                Ok(len as u64),
                "write at {off}+{len}"
            );
            expect[off as usize..off as usize + len].copy_from_slice(&data);
            let got = d.read_misaligned(off, len).unwrap();
            assert!(got == data, "unaligned read at {off}+{len} differs");
        }
        assert!(
            d.read(0, 16384).unwrap() == expect,
            "neighbouring bytes were damaged"
        );
    }

    #[test]
    fn multi_segment_requests_keep_order() {
        let c = Cluster::shared();
        let (_img, mut d) = disk(&c);
        let data = pattern(4, 12288);
        assert_eq!(d.writev(8192, &data, &[512, 4096 - 512, 8192]), Ok(12288));
        let got = d.readv(8192, 12288, &[4096, 4096, 2048, 2048]).unwrap();
        assert!(got == data, "vectored data differs");
    }

    #[test]
    fn flush_and_fua_succeed() {
        let c = Cluster::shared();
        let (_img, mut d) = disk(&c);
        d.write(4096, &pattern(5, 4096)).unwrap();
        assert_eq!(d.op(RequestOp::Flush, 0, 0), Ok(0));
        assert_eq!(d.write_fua(8192, &pattern(6, 4096)), Ok(4096));
        assert!(d.read(8192, 4096).unwrap() == pattern(6, 4096));
        // A FUA write is a write and a flush.
        let s = d.node.stats().snapshot();
        assert_eq!(s.write.ops, 2, "{s:?}");
    }

    #[test]
    fn discard_and_write_zeroes_read_back_as_zeroes() {
        let c = Cluster::shared();
        let (_img, mut d) = disk(&c);
        discard_and_zeroes(&mut d);
    }

    #[test]
    fn read_only_node_refuses_modification() {
        let c = Cluster::shared();
        let img = c.image(IMG_SIZE);
        let mut d = open(&img, ",read-only=on");
        assert!(d.node.read_only());
        assert_eq!(d.write(0, &[1; 512]), Err(RequestError::ReadOnly));
        assert_eq!(
            d.op(RequestOp::Discard, 0, 4096),
            Err(RequestError::ReadOnly)
        );
        assert_eq!(d.write_zeroes(0, 4096, false), Err(RequestError::ReadOnly));
        assert!(d.read(0, 4096).is_ok());
        assert!(d.node.truncate(IMG_SIZE * 2).is_err());
        assert!(
            export(&img)[..512].iter().all(|&b| b == 0),
            "a refused write reached the image"
        );
    }

    #[test]
    fn hundreds_of_requests_in_flight() {
        let c = Cluster::shared();
        let (_img, mut d) = disk(&c);
        let n = 600;
        let chunks: Vec<Vec<u8>> = (0..n).map(|i| pattern(i as u8, 4096)).collect();
        let block = |i: usize| ((i * 7919) % 4096) as u64 * 4096;
        let writes: Vec<(u64, &[u8])> = (0..n).map(|i| (block(i), &chunks[i][..])).collect();
        for r in d.write_many(&writes) {
            assert_eq!(r, Ok(4096));
        }
        let offsets: Vec<u64> = (0..n).map(block).collect();
        for (i, r) in d.read_many(&offsets, 4096).into_iter().enumerate() {
            assert!(
                r.unwrap() == chunks[i],
                "request {i} at {} differs",
                block(i)
            );
        }
        let s = d.node.stats().snapshot();
        assert!(s.write.ops >= n as u64 && s.read.ops >= n as u64, "{s:?}");
        assert!(s.read.bytes >= 4096 * n as u64);
    }
}

/// Discards 1 MiB and zeroes the next, and 4 KiB at an odd offset after
/// them: all read back as zeroes, the bytes around them unchanged.
fn discard_and_zeroes(d: &mut Disk) {
    let mb = 1 << 20;
    d.write(0, &pattern(7, 3 * mb)).unwrap();
    assert_eq!(d.op(RequestOp::Discard, 0, mb as u64), Ok(mb as u64));
    assert_eq!(d.write_zeroes(mb as u64, mb as u64, false), Ok(mb as u64));
    assert_eq!(d.write_zeroes(2 * mb as u64 + 512, 4096, true), Ok(4096));
    let got = d.read(0, 3 * mb).unwrap();
    assert!(
        got[..2 * mb].iter().all(|&b| b == 0),
        "discarded/zeroed range is not zero"
    );
    assert!(
        got[2 * mb + 512..2 * mb + 4608].iter().all(|&b| b == 0),
        "unaligned zeroes"
    );
    let p = pattern(7, 3 * mb);
    assert_eq!(
        got[2 * mb..2 * mb + 512],
        p[2 * mb..2 * mb + 512],
        "bytes before the range"
    );
    assert_eq!(
        got[2 * mb + 4608..],
        p[2 * mb + 4608..],
        "bytes after the range"
    );
}

/// The image's contents, as `rbd export` writes them.
fn export(img: &RbdTestImage<'_>) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("export.raw");
    img.cluster.rbd(&[
        "export",
        "--no-progress",
        &img.spec(),
        out.to_str().unwrap(),
    ]);
    std::fs::read(out).unwrap()
}

#[test]
fn an_image_written_by_rbd_import_reads_back_through_blkvm() {
    let c = Cluster::shared();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let data = pattern(42, 8 << 20);
    std::fs::write(&src, &data).unwrap();
    let name = format!("import{}", std::process::id());
    c.rbd(&[
        "import",
        "--no-progress",
        src.to_str().unwrap(),
        &format!("rbd/{name}"),
    ]);
    let img = RbdTestImage { cluster: &c, name };
    let mut d = open(&img, ",read-only=on");
    assert_eq!(d.node.capacity(), data.len() as u64);
    assert!(
        d.read(0, data.len()).unwrap() == data,
        "imported data differs"
    );
}

#[test]
fn an_image_written_by_blkvm_reads_back_with_rbd_export() {
    let c = Cluster::shared();
    let img = c.image(8 << 20);
    let data = pattern(43, 8 << 20);
    {
        let mut d = open(&img, "");
        // In 1 MiB writes at once, as a guest would.
        let chunks: Vec<(u64, &[u8])> = data
            .chunks(1 << 20)
            .enumerate()
            .map(|(i, c)| ((i as u64) << 20, c))
            .collect();
        for r in d.write_many(&chunks) {
            assert_eq!(r, Ok(1 << 20));
        }
        assert_eq!(d.op(RequestOp::Flush, 0, 0), Ok(0));
    }
    assert!(
        export(&img) == data,
        "rbd export differs from what blkvm wrote"
    );
}

#[test]
fn resize_grows_the_image_and_outside_resizes_are_seen() {
    let c = Cluster::shared();
    let img = c.image(4 << 20);
    let mut d = open(&img, "");
    d.node.truncate(16 << 20).unwrap();
    assert_eq!(d.node.capacity(), 16 << 20);
    assert!(c.rbd(&["info", &img.spec()]).contains("size 16 MiB"));
    let tail = pattern(9, 4096);
    assert_eq!(d.write((16 << 20) - 4096, &tail), Ok(4096));
    c.rbd(&["resize", "--no-progress", "--size", "32M", &img.spec()]);
    assert_eq!(d.node.refresh_capacity().unwrap(), 32 << 20);
    assert!(d.read((16 << 20) - 4096, 4096).unwrap() == tail);
}

#[test]
fn a_snapshot_opens_read_only_with_the_data_of_its_time() {
    let c = Cluster::shared();
    let img = c.image(4 << 20);
    let before = pattern(11, 64 << 10);
    {
        let mut d = open(&img, "");
        d.write(0, &before).unwrap();
        d.op(RequestOp::Flush, 0, 0).unwrap();
    }
    c.rbd(&["snap", "create", &format!("{}@s1", img.spec())]);
    let mut d = open(&img, "");
    d.write(0, &pattern(12, 64 << 10)).unwrap();

    let err = try_open(&img, ",snapshot=s1")
        .err()
        .expect("a writable snapshot");
    assert!(err.contains("rbd snapshots are read-only"), "{err}");
    let mut snap = open(&img, ",snapshot=s1,read-only=on");
    assert!(snap.node.read_only());
    assert!(
        snap.read(0, before.len()).unwrap() == before,
        "snapshot data differs"
    );
    assert_eq!(snap.write(0, &[1; 512]), Err(RequestError::ReadOnly));
    // auto-read-only takes a snapshot read-only without being told.
    let auto = open(&img, ",snapshot=s1,auto-read-only=on");
    assert!(auto.node.read_only());
    assert!(d.read(0, 512).unwrap() == pattern(12, 64 << 10)[..512]);
}

#[test]
fn write_zeroes_without_librbd_support_writes_zero_buffers() {
    // The hook is read when the node opens; this test runs in a process of
    // its own (nextest), so nothing else sees it.
    std::env::set_var(block::rbd::TEST_NO_WRITE_ZEROES_ENV, "1");
    let c = Cluster::shared();
    let img = c.image(IMG_SIZE);
    let mut d = open(&img, ",discard=unmap");
    discard_and_zeroes(&mut d);
    // 80 MiB needs two writes of IOV_MAX zero-buffer iovecs.
    d.node.truncate(96 << 20).unwrap();
    d.write((90 << 20) - 4096, &pattern(13, 8192)).unwrap();
    assert_eq!(d.write_zeroes(4 << 20, 86 << 20, false), Ok(86 << 20));
    let got = d.read((90 << 20) - 4096, 8192).unwrap();
    assert!(got[..4096].iter().all(|&b| b == 0), "zeroed tail differs");
    assert!(
        got[4096..] == pattern(13, 8192)[4096..],
        "bytes after the range"
    );
    // A caller that wants no fallback is refused at once.
    let flags = RequestFlags {
        no_fallback: true,
        ..Default::default()
    };
    let r = d.queue.submit(Request::write_zeroes_with(0, 4096, flags));
    assert_eq!(r.err().map(|e| e.error), Some(RequestError::Unsupported));
}

#[test]
fn bad_options_are_clear_errors() {
    let c = Cluster::shared();
    let img = c.image(1 << 20);
    let conf = c.conf();
    let parse_err = |a: &str| qapi::parse_blockdev(a).unwrap_err().to_string();
    assert_eq!(parse_err("rbd,image=x"), "Parameter 'pool' is missing");
    assert_eq!(parse_err("rbd,pool=rbd"), "Parameter 'image' is missing");

    let err = |arg: String| -> String {
        let mut graph = graph_with_secret(&img);
        match graph.add(&qapi::parse_blockdev(&arg).unwrap()) {
            Ok(_) => panic!("{arg} opened"),
            Err(e) => error_chain(e),
        }
    };
    let e = err(format!("rbd,pool=rbd,image=nope,conf={conf}"));
    assert!(
        e.contains("error opening image nope") && e.contains("No such file"),
        "{e}"
    );
    let e = err(format!("rbd,pool=nopool,image=x,conf={conf}"));
    assert!(e.contains("error opening pool nopool"), "{e}");
    let e = err(format!(
        "rbd,pool=rbd,image={},conf=/nonexistent.conf",
        img.name
    ));
    assert!(
        e.contains("error reading conf file /nonexistent.conf"),
        "{e}"
    );
    let e = err(format!(
        "rbd,pool=rbd,image={},conf={conf},snapshot=nosnap,read-only=on",
        img.name
    ));
    assert!(
        e.contains("at snapshot nosnap") && e.contains("No such file"),
        "{e}"
    );

    // A key that is not client.blkvm's.
    let mut graph = BlockGraph::new();
    graph.add_secret(
        "s0".into(),
        Secret::from_bytes(b"0123456789abcdef0123456789abcdef".to_vec()),
    );
    let start = Instant::now();
    let e = graph
        .add(&qapi::parse_blockdev(&img.blockdev("")).unwrap())
        .map(|_| ())
        .map_err(error_chain)
        .unwrap_err();
    assert!(e.contains("error connecting to the cluster"), "{e}");
    assert!(e.contains("rbd/"), "the error names the image: {e}");
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "a wrong key took {:?}",
        start.elapsed()
    );
}

/// Submits `req` and waits up to `limit` for its completion.
fn complete_within(d: &mut Disk, req: Request, limit: Duration) -> Option<Completion> {
    d.queue.submit(req).expect("submit");
    d.queue.kick();
    let deadline = Instant::now() + limit;
    let mut out = Vec::new();
    while Instant::now() < deadline {
        if d.queue.poll_completions(&mut out) > 0 {
            return out.pop();
        }
        let mut p = libc::pollfd {
            fd: d.queue.completion_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe { libc::poll(&mut p, 1, 100) };
    }
    None
}

#[test]
fn a_cluster_that_stops_answering_fails_requests_with_eio_and_serves_again() {
    let c = Cluster::private();
    let img = c.image(4 << 20);
    // What a QEMU user puts in ceph.conf so I/O cannot hang forever.
    let conf = c.dir().join("timeouts.conf");
    let base = std::fs::read_to_string(c.conf()).unwrap();
    std::fs::write(
        &conf,
        base.replace(
            "[global]\n",
            "[global]\nrados osd op timeout = 5\nrados mon op timeout = 5\nclient mount timeout = 5\n",
        ),
    )
    .unwrap();
    let mut graph = graph_with_secret(&img);
    let arg = format!(
        "rbd,pool=rbd,image={},conf={},user=blkvm,key-secret=s0",
        img.name,
        conf.display()
    );
    let node = graph.add(&qapi::parse_blockdev(&arg).unwrap()).unwrap();
    let mut d = Disk::new(graph, node);
    let data = pattern(21, 4096);
    assert_eq!(d.write(0, &data), Ok(4096));

    // Only the monitor stopped: the OSD still serves what librbd sends it.
    let (mon, osd) = (c.pid("mon.a"), c.pid("osd.0"));
    // SAFETY: signals to the daemons of this test's own cluster.
    unsafe { libc::kill(mon, libc::SIGSTOP) };
    assert!(
        d.read(0, 4096).unwrap() == data,
        "I/O stopped with the monitor"
    );

    // The OSD too: nothing answers. Requests fail after the timeout, the
    // queue keeps working.
    // SAFETY: as above.
    unsafe { libc::kill(osd, libc::SIGSTOP) };
    let mut buf = vec![0u8; 4096];
    let iov = vec![libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }];
    let start = Instant::now();
    // SAFETY: `buf` outlives the request, which completes (or the queue,
    // dropped at the end of the test, waits for it) before `buf` goes.
    let req = unsafe { Request::read(4096, iov) };
    let c1 = complete_within(&mut d, req, Duration::from_secs(30));
    let waited = start.elapsed();
    // SAFETY: as above.
    unsafe {
        libc::kill(osd, libc::SIGCONT);
        libc::kill(mon, libc::SIGCONT);
    }
    let c1 = c1.expect("the request did not fail within 30 s: the timeout did not apply");
    assert_eq!(
        c1.result,
        Err(RequestError::Os(libc::EIO)),
        "after {waited:?}"
    );
    assert!(
        waited >= Duration::from_secs(4),
        "failed too early: {waited:?}"
    );

    // Back: the same queue serves again.
    let again = pattern(22, 4096);
    assert_eq!(d.write(8192, &again), Ok(4096));
    assert!(d.read(8192, 4096).unwrap() == again);
    assert!(d.read(0, 4096).unwrap() == data);
    drop(d);
    drop(buf);
}

#[test]
fn without_librbd_opening_an_rbd_node_says_so() {
    // A process of its own with a library path where librbd cannot be:
    // the dynamic loader searches LD_LIBRARY_PATH first, and the real
    // libraries are found only through the system's paths, so this child
    // shadows librbd with an empty file.
    if std::env::var_os("BLKVM_TEST_NO_LIBRBD_CHILD").is_some() {
        let mut graph = BlockGraph::new();
        let e = graph
            .add(&qapi::parse_blockdev("rbd,pool=p,image=i").unwrap())
            .map(|_| ())
            .map_err(error_chain)
            .unwrap_err();
        println!("ERROR: {e}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for lib in ["librbd.so.1", "librados.so.2"] {
        std::fs::write(dir.path().join(lib), b"not a library").unwrap();
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "without_librbd_opening_an_rbd_node_says_so",
            "--nocapture",
        ])
        .env("BLKVM_TEST_NO_LIBRBD_CHILD", "1")
        .env("LD_LIBRARY_PATH", dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("ERROR: Could not open 'rbd' at 'p/i': librbd (librbd.so.1) was not found"),
        "{stdout}"
    );
}

#[test]
fn server_and_auth_client_required_reach_librados() {
    let c = Cluster::shared();
    let img = c.image(1 << 20);
    // A ceph.conf that names no monitor: `server` does.
    let conf = std::fs::read_to_string(c.conf()).unwrap();
    let mon = conf
        .lines()
        .find_map(|l| l.strip_prefix("mon host = v2:"))
        .expect("start.sh's mon host line")
        .to_string();
    let (host, port) = mon.rsplit_once(':').unwrap();
    let dir = tempfile::tempdir().unwrap();
    let bare = dir.path().join("no-mon.conf");
    let without: Vec<&str> = conf
        .lines()
        .filter(|l| !l.starts_with("mon host"))
        .collect();
    std::fs::write(&bare, without.join("\n") + "\n").unwrap();
    let arg = format!(
        "rbd,pool=rbd,image={},conf={},user=blkvm,key-secret=s0,\
         server.0.host={host},server.0.port={port},auth-client-required.0=cephx",
        img.name,
        bare.display()
    );
    let mut graph = graph_with_secret(&img);
    let node = graph.add(&qapi::parse_blockdev(&arg).unwrap()).unwrap();
    let mut d = Disk::new(graph, node);
    assert_eq!(d.write(0, &pattern(30, 4096)), Ok(4096));

    // The cluster wants cephx: a client that accepts only `none` is refused.
    let mut graph = graph_with_secret(&img);
    let arg = img.blockdev(",auth-client-required.0=none");
    let e = graph
        .add(&qapi::parse_blockdev(&arg).unwrap())
        .map(|_| ())
        .map_err(error_chain)
        .unwrap_err();
    assert!(e.contains("error connecting to the cluster"), "{e}");
}

#[test]
fn two_queues_of_one_node_share_the_image() {
    let c = Cluster::shared();
    let img = c.image(4 << 20);
    let mut d = open(&img, "");
    let mut other = Disk::new(BlockGraph::new(), d.node.clone());
    let a = pattern(31, 8192);
    let b = pattern(32, 8192);
    let writes_a: Vec<(u64, &[u8])> = vec![(0, &a[..4096]), (8192, &a[4096..])];
    let writes_b: Vec<(u64, &[u8])> = vec![(4096, &b[..4096]), (12288, &b[4096..])];
    for r in d
        .write_many(&writes_a)
        .into_iter()
        .chain(other.write_many(&writes_b))
    {
        assert_eq!(r, Ok(4096));
    }
    let got = other.read(0, 16384).unwrap();
    assert!(
        got[..4096] == a[..4096] && got[8192..12288] == a[4096..],
        "queue 1's data"
    );
    assert!(
        got[4096..8192] == b[..4096] && got[12288..] == b[4096..],
        "queue 2's data"
    );
    let s = d.node.stats().snapshot();
    assert_eq!((s.write.ops, s.read.ops), (4, 1), "{s:?}");
}
