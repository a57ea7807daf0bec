//! The `nbd` client driver beyond the conformance suite: holes and large
//! reads from qemu-nbd, block status, multi-conn, clear errors for bad
//! options, lost connections (EIO, reconnection, `reconnect-delay`),
//! connections reused across queues (fds flat), and a hostile server.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use block::{BlockGraph, BlockNode, BlockStatus, RequestError};
use common::qsd::NbdPeer;
use common::{pattern, Disk, Image};

fn qemu_nbd(img: &Image, extra: &[&str]) -> NbdPeer {
    let mut args: Vec<String> = [
        "--socket={sock}",
        "--format=raw",
        "--export-name=disk",
        "--persistent",
        "--shared=8",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args.push(img.path().to_string());
    NbdPeer::start("qemu-nbd", &args)
}

fn open(arg: &str) -> Result<(BlockGraph, Arc<dyn BlockNode>), String> {
    let opts = qapi::parse_blockdev(arg).map_err(|e| e.to_string())?;
    let mut g = BlockGraph::new();
    let node = g.add(&opts).map_err(|e| {
        let mut s = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(x) = src {
            s += &format!(": {x}");
            src = x.source();
        }
        s
    })?;
    Ok((g, node))
}

fn open_err(arg: &str) -> String {
    match open(arg) {
        Ok(_) => panic!("{arg} opened"),
        Err(e) => e,
    }
}

fn disk(sock: &str, extra: &str) -> Disk {
    let (g, n) = open(&format!(
        "nbd,node-name=n0,server.type=unix,server.path={sock},export=disk{extra}"
    ))
    .unwrap_or_else(|e| panic!("open: {e}"));
    Disk::new(g, n)
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[test]
fn sparse_reads_get_holes_and_data_in_place() {
    // 8 MiB image: data at 1 MiB (64 KiB) and at 5 MiB (2 MiB), holes
    // elsewhere. qemu-nbd answers READs over holes with OFFSET_HOLE
    // chunks and data with OFFSET_DATA chunks.
    let img = Image::new(8 << 20);
    let a = pattern(1, 64 << 10);
    let b = pattern(2, 2 << 20);
    {
        use std::os::unix::fs::FileExt;
        img.file().write_all_at(&a, 1 << 20).unwrap();
        img.file().write_all_at(&b, 5 << 20).unwrap();
    }
    let peer = qemu_nbd(&img, &[]);
    let mut d = disk(peer.sock(), "");
    let all = d.read(0, 8 << 20).unwrap();
    assert_eq!(all, img.contents(), "whole-image read differs");
    // Small reads across a data/hole boundary, into poisoned buffers.
    for (off, len) in [((1 << 20) - 512, 4096), ((1 << 20) + (64 << 10) - 100, 300)] {
        let got = d.read(off, len).unwrap();
        assert_eq!(got[..], img.contents()[off as usize..off as usize + len]);
    }
    // Block status follows the holes.
    let node = d.node.clone();
    let (n, st) = node.block_status(0, 8 << 20).unwrap();
    assert_eq!((n, st), (1 << 20, BlockStatus::Hole));
    let (n, st) = node.block_status(1 << 20, 8 << 20).unwrap();
    assert_eq!(st, BlockStatus::Data);
    assert!((64 << 10..4 << 20).contains(&n), "data extent of {n}");
    let (_, st) = node.block_status(5 << 20, 4096).unwrap();
    assert_eq!(st, BlockStatus::Data);
}

#[test]
fn large_requests_and_many_in_flight_round_trip() {
    let img = Image::new(64 << 20);
    let peer = qemu_nbd(&img, &["--cache=none", "--aio=io_uring"]);
    let mut d = disk(peer.sock(), "");
    let big = pattern(9, 8 << 20);
    assert_eq!(d.writev(3 << 20, &big, &[1, 4095, 1 << 20]), Ok(8 << 20));
    let got = d.readv(3 << 20, 8 << 20, &[100, 1 << 20, 3]).unwrap();
    assert!(got == big, "8 MiB vectored read differs");
    assert_eq!(&img.contents()[3 << 20..11 << 20], &big[..]);
    // Beyond the server's maximum block size the request is refused, not
    // split behind the caller's back.
    let max = d.node.limits().max_transfer as usize;
    assert!(max > 0);
    assert_eq!(d.read(0, max + 4096), Err(RequestError::Limits));
}

#[test]
fn bad_options_and_unreachable_servers_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("none.sock");
    let e = open_err(&format!(
        "nbd,server.type=unix,server.path={}",
        missing.display()
    ));
    assert!(
        e.contains("none.sock") && e.contains("No such file"),
        "error: {e}"
    );
    let e = open_err("nbd,server.type=inet,server.host=127.0.0.1,server.port=1");
    assert!(
        e.contains("127.0.0.1:1") && e.contains("refused"),
        "error: {e}"
    );
    let e = open_err("nbd,server.type=inet,server.host=127.0.0.1,server.port=x");
    assert!(e.contains("bad port 'x'"), "error: {e}");
    let e = open_err("nbd,server.type=unix");
    assert!(e.contains("path"), "error: {e}");

    let img = Image::new(1 << 20);
    let peer = qemu_nbd(&img, &[]);
    let e = open_err(&format!(
        "nbd,server.type=unix,server.path={},export=nope",
        peer.sock()
    ));
    assert!(
        e.contains("'nope'") && e.contains("not present"),
        "error: {e}"
    );

    let ro = qemu_nbd(&img, &["--read-only"]);
    let base = format!("nbd,server.type=unix,server.path={},export=disk", ro.sock());
    let e = open_err(&base);
    assert!(e.contains("read-only"), "error: {e}");
    let (_g, n) = open(&format!("{base},auto-read-only=on")).unwrap();
    assert!(n.read_only());
    let (_g, n) = open(&format!("{base},read-only=on")).unwrap();
    assert!(n.read_only());
}

#[test]
fn queues_share_connections_as_the_server_allows() {
    let img = Image::new(4 << 20);
    // nbdkit's memory plugin advertises multi-conn.
    let kit = NbdPeer::start(
        "nbdkit",
        &[
            "--foreground".into(),
            "--unix".into(),
            "{sock}".into(),
            "memory".into(),
            "size=4194304".into(),
        ],
    );
    let (_g, n) = open(&format!("nbd,server.type=unix,server.path={}", kit.sock())).unwrap();
    let q1 = n.open_queue().unwrap();
    let q2 = n.open_queue().expect("multi-conn: a second connection");
    drop((q1, q2));

    let peer = qemu_nbd(&img, &[]);
    let (_g, n) = open(&format!(
        "nbd,server.type=unix,server.path={},export=disk",
        peer.sock()
    ))
    .unwrap();
    let multi = {
        let q1 = n.open_queue().unwrap();
        let second = n.open_queue();
        let multi = second.is_ok();
        if let Err(e) = second {
            assert!(e.to_string().contains("MULTI_CONN"), "error: {e}");
        }
        drop(q1);
        multi
    };
    // Closing a queue hands its connection back: opening and closing
    // queues many times leaves the fd count flat.
    let before = open_fds();
    for _ in 0..200 {
        let mut d = Disk::new(BlockGraph::new(), n.clone());
        assert_eq!(d.write(0, &[5; 512]), Ok(512));
    }
    let after = open_fds();
    assert!(
        after <= before + 2,
        "fds grew from {before} to {after} over 200 queues (multi-conn {multi})"
    );
}

#[test]
fn a_lost_connection_fails_with_eio_then_reconnects() {
    let img = Image::new(4 << 20);
    let mut peer = qemu_nbd(&img, &[]);
    let sock = peer.sock().to_string();
    let mut d = disk(&sock, "");
    assert_eq!(d.write(0, &pattern(1, 4096)), Ok(4096));
    peer.kill();
    // reconnect-delay=0: fails at once.
    let r = d.read(0, 4096);
    assert_eq!(r, Err(RequestError::Os(libc::EIO)));
    // A new server on the same socket: the client comes back by itself.
    let _ = std::fs::remove_file(&sock);
    let _peer2 = Reaped(restart(&img, &sock));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match d.read(0, 4096) {
            Ok(_) => break,
            Err(e) => {
                assert_eq!(e, RequestError::Os(libc::EIO));
                assert!(Instant::now() < deadline, "no reconnection in 10 s");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    assert!(d.read(0, 4096).unwrap() == pattern(1, 4096));
}

/// qemu-nbd again on `sock` (its own directory is kept by the first peer).
fn restart(img: &Image, sock: &str) -> std::process::Child {
    let child = std::process::Command::new("qemu-nbd")
        .args([
            &format!("--socket={sock}"),
            "--format=raw",
            "--export-name=disk",
            "--persistent",
            "--shared=8",
            img.path(),
        ])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(sock).is_err() {
        assert!(Instant::now() < deadline, "qemu-nbd did not come back");
        std::thread::sleep(Duration::from_millis(10));
    }
    child
}

struct Reaped(std::process::Child);
impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn with_reconnect_delay_requests_wait_for_the_server() {
    let img = Image::new(4 << 20);
    let mut peer = qemu_nbd(&img, &[]);
    let sock = peer.sock().to_string();
    let mut d = disk(&sock, ",reconnect-delay=20");
    assert_eq!(d.write(0, &pattern(1, 4096)), Ok(4096));
    peer.kill();
    let _ = std::fs::remove_file(&sock);
    // A write submitted now waits for the server, which comes back in 1 s.
    let writer = std::thread::spawn(move || {
        let r = d.write(8192, &pattern(2, 4096));
        (d, r)
    });
    std::thread::sleep(Duration::from_secs(1));
    assert!(!writer.is_finished(), "the write did not wait");
    let _p = Reaped(restart(&img, &sock));
    let (mut d, r) = writer.join().unwrap();
    assert_eq!(r, Ok(4096), "the write waited and went through");
    assert!(d.read(8192, 4096).unwrap() == pattern(2, 4096));
    use std::os::unix::fs::FileExt;
    let mut on_disk = vec![0u8; 4096];
    img.file().read_exact_at(&mut on_disk, 8192).unwrap();
    assert!(on_disk == pattern(2, 4096));
}

#[test]
fn requests_fail_when_reconnect_delay_runs_out() {
    let img = Image::new(4 << 20);
    let mut peer = qemu_nbd(&img, &[]);
    let mut d = disk(peer.sock(), ",reconnect-delay=1");
    assert_eq!(d.write(0, &[1; 512]), Ok(512));
    peer.kill();
    let t = Instant::now();
    assert_eq!(d.read(0, 512), Err(RequestError::Os(libc::EIO)));
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "failed after {waited:?}, not after the 1 s delay"
    );
    // Past the delay, requests fail at once until the server is back.
    let t = Instant::now();
    assert_eq!(d.read(0, 512), Err(RequestError::Os(libc::EIO)));
    assert!(t.elapsed() < Duration::from_millis(500));
}

/// A fake server: negotiates an export of 1 MiB with structured replies,
/// then answers the first request with `reply(cookie, offset)`.
fn hostile_server(reply: fn(u64, u64) -> Vec<u8>) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("evil.sock");
    let l = UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                let _ = serve_evil(&mut s, reply);
            });
        }
    });
    (dir, path.to_str().unwrap().to_string())
}

fn serve_evil(
    s: &mut std::os::unix::net::UnixStream,
    reply: fn(u64, u64) -> Vec<u8>,
) -> std::io::Result<()> {
    s.write_all(b"NBDMAGICIHAVEOPT\x00\x03")?;
    let mut b4 = [0u8; 4];
    s.read_exact(&mut b4)?;
    loop {
        let mut h = [0u8; 16];
        s.read_exact(&mut h)?;
        let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data)?;
        let rep = |kind: u32, d: &[u8]| {
            let mut m = 0x0003_e889_0455_65a9u64.to_be_bytes().to_vec();
            m.extend_from_slice(&opt.to_be_bytes());
            m.extend_from_slice(&kind.to_be_bytes());
            m.extend_from_slice(&(d.len() as u32).to_be_bytes());
            m.extend_from_slice(d);
            m
        };
        if opt == 7 {
            let mut info = vec![0u8, 0];
            info.extend_from_slice(&(1u64 << 20).to_be_bytes());
            info.extend_from_slice(&(1u16 | 4).to_be_bytes());
            s.write_all(&rep(3, &info))?;
            s.write_all(&rep(1, &[]))?;
            break;
        }
        s.write_all(&rep(1, &[]))?;
    }
    loop {
        let mut h = [0u8; 28];
        s.read_exact(&mut h)?;
        let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
        let offset = u64::from_be_bytes(h[16..24].try_into().unwrap());
        s.write_all(&reply(cookie, offset))?;
    }
}

fn chunk(flags: u16, kind: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
    let mut m = 0x668e_33efu32.to_be_bytes().to_vec();
    m.extend_from_slice(&flags.to_be_bytes());
    m.extend_from_slice(&kind.to_be_bytes());
    m.extend_from_slice(&cookie.to_be_bytes());
    m.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    m.extend_from_slice(payload);
    m
}

#[test]
fn a_hostile_server_cannot_write_outside_the_request() {
    let replies: [fn(u64, u64) -> Vec<u8>; 5] = [
        // Data before the request's offset.
        |c, off| {
            let mut p = (off - 4096).to_be_bytes().to_vec();
            p.extend_from_slice(&[0xaa; 8192]);
            chunk(1, 1, c, &p)
        },
        // Data running past the request's end.
        |c, off| {
            let mut p = off.to_be_bytes().to_vec();
            p.extend_from_slice(&[0xaa; 8192]);
            chunk(1, 1, c, &p)
        },
        // A cookie nobody sent.
        |c, _| chunk(1, 0, c + 1000, &[]),
        // An oversized error chunk.
        |c, _| chunk(1, 0x8001, c, &vec![0u8; 1 << 20]),
        // Garbage.
        |_, _| b"this is not an NBD reply at all".to_vec(),
    ];
    for (i, r) in replies.into_iter().enumerate() {
        let (_dir, sock) = hostile_server(r);
        let (g, n) = open(&format!("nbd,server.type=unix,server.path={sock}")).unwrap();
        let mut d = Disk::new(g, n);
        // A read of 4 KiB at 8 KiB into a buffer guarded on both sides.
        let mut guard = vec![0x55u8; 3 * 4096];
        let iov = vec![libc::iovec {
            iov_base: guard[4096..].as_mut_ptr().cast(),
            iov_len: 4096,
        }];
        // SAFETY: the iovec is inside `guard`, alive until the request
        // completes below.
        let req = unsafe { block::Request::read(8192, iov) };
        d.queue.submit(req).unwrap();
        let mut out = Vec::new();
        while out.is_empty() {
            d.queue.wait_completions(1, &mut out);
        }
        assert_eq!(
            out[0].result,
            Err(RequestError::Os(libc::EIO)),
            "case {i}: the request must fail"
        );
        assert!(
            guard[..4096].iter().all(|&b| b == 0x55) && guard[8192..].iter().all(|&b| b == 0x55),
            "case {i}: bytes outside the request were written"
        );
    }
}
