//! One conformance suite, run against every driver and combination: `file`
//! with each engine, with and without `cache.direct`; `raw` over `file`
//! (inline child with a window, and a child by reference); `null-co`;
//! libblkio's `io_uring` with and without `cache.direct`; and
//! `virtio-blk-vhost-user` connected to a real qemu-storage-daemon
//! exporting a file (`cache.direct=on,aio=io_uring`) or `null-co`.
//! Data is checked byte by byte wherever the driver keeps data.

mod common;

use std::sync::Arc;

use block::{BlockGraph, BlockNode, RequestError, RequestOp};
use common::qsd::{NbdPeer, Qsd};
use common::{pattern, Disk, Image};

/// How to build the node under test.
struct Config {
    /// `--blockdev` arguments; `{img}` becomes the image path. The last one
    /// is the node under test.
    blockdevs: &'static [&'static str],
    /// Whether written data can be read back.
    persistent: bool,
    /// The node is a window starting this far into the image file.
    window_offset: u64,
    /// qemu-storage-daemon `--blockdev` arguments (`{img}` as above): the
    /// daemon exports the last one over vhost-user-blk, and `{sock}` in
    /// `blockdevs` becomes the export's socket.
    qsd: Option<&'static [&'static str]>,
    /// An NBD server to start (program and arguments; `{img}` and
    /// `{sock}` as above): the node under test is its client.
    nbd: Option<(&'static str, &'static [&'static str])>,
    /// Written data lands in the image file (not in a server's memory).
    in_image: bool,
}

/// Size of every test image.
const IMG_SIZE: u64 = 32 << 20;

impl Config {
    fn open_with(&self, img: &Image, extra: &str) -> (BlockGraph, Arc<dyn BlockNode>, Peer) {
        let qsd = self.qsd.map(|args| {
            let args: Vec<String> = args
                .iter()
                .map(|a| a.replace("{img}", img.path()))
                .collect();
            Qsd::start(&args, 1)
        });
        let nbd = self.nbd.map(|(program, args)| {
            let args: Vec<String> = args
                .iter()
                .map(|a| a.replace("{img}", img.path()))
                .collect();
            NbdPeer::start(program, &args)
        });
        let sock = qsd
            .as_ref()
            .map(|q| q.sock())
            .or(nbd.as_ref().map(|n| n.sock()))
            .unwrap_or("");
        let mut graph = BlockGraph::new();
        let mut node = None;
        let n = self.blockdevs.len();
        for (i, b) in self.blockdevs.iter().enumerate() {
            let mut arg = b.replace("{img}", img.path()).replace("{sock}", sock);
            if i == n - 1 {
                arg.push_str(extra);
            }
            let opts = qapi::parse_blockdev(&arg).unwrap_or_else(|e| panic!("{arg}: {e}"));
            node = Some(graph.add(&opts).unwrap_or_else(|e| panic!("{arg}: {e}")));
        }
        (graph, node.expect("at least one blockdev"), (qsd, nbd))
    }

    fn disk(&self, img: &Image) -> TestDisk {
        let (graph, node, qsd) = self.open_with(img, "");
        TestDisk {
            disk: Disk::new(graph, node),
            _qsd: qsd,
        }
    }
}

/// The server behind a node, if any.
type Peer = (Option<Qsd>, Option<NbdPeer>);

/// A disk and the daemon behind it, if any (dropped after the disk).
struct TestDisk {
    disk: Disk,
    _qsd: Peer,
}

impl std::ops::Deref for TestDisk {
    type Target = Disk;
    fn deref(&self) -> &Disk {
        &self.disk
    }
}

impl std::ops::DerefMut for TestDisk {
    fn deref_mut(&mut self) -> &mut Disk {
        &mut self.disk
    }
}

fn file_threads() -> Config {
    Config {
        blockdevs: &["file,filename={img},discard=unmap,node-name=t0"],
        persistent: true,
        window_offset: 0,
        qsd: None,
        nbd: None,
        in_image: true,
    }
}
fn file_threads_direct() -> Config {
    Config {
        blockdevs: &["file,filename={img},cache.direct=on,discard=unmap,node-name=t0"],
        persistent: true,
        window_offset: 0,
        qsd: None,
        nbd: None,
        in_image: true,
    }
}
fn file_io_uring() -> Config {
    Config {
        blockdevs: &["file,filename={img},aio=io_uring,discard=unmap,node-name=t0"],
        persistent: true,
        window_offset: 0,
        qsd: None,
        nbd: None,
        in_image: true,
    }
}
fn file_io_uring_direct() -> Config {
    Config {
        blockdevs: &["file,filename={img},aio=io_uring,cache.direct=on,discard=unmap,node-name=t0"],
        persistent: true,
        window_offset: 0,
        qsd: None,
        nbd: None,
        in_image: true,
    }
}
fn raw_window_over_file() -> Config {
    Config {
        blockdevs: &["raw,file.driver=file,file.filename={img},file.discard=unmap,discard=unmap,offset=1M,size=16M,node-name=t0"],
        persistent: true,
        window_offset: 1 << 20,
        qsd: None,
        nbd: None,
        in_image: true,
    }
}
fn raw_over_file_io_uring_direct_by_ref() -> Config {
    Config {
        blockdevs: &[
            "file,filename={img},aio=io_uring,cache.direct=on,discard=unmap,node-name=f0",
            "raw,file=f0,discard=unmap,node-name=t0",
        ],
        persistent: true,
        window_offset: 0,
        qsd: None,
        nbd: None,
        in_image: true,
    }
}
fn null_co() -> Config {
    Config {
        blockdevs: &["null-co,size=32M,read-zeroes=on,discard=unmap,node-name=t0"],
        persistent: false,
        window_offset: 0,
        qsd: None,
        nbd: None,
        in_image: true,
    }
}

fn blkio_io_uring() -> Config {
    Config {
        blockdevs: &["io_uring,filename={img},discard=unmap,node-name=t0"],
        persistent: true,
        window_offset: 0,
        qsd: None,
        nbd: None,
        in_image: true,
    }
}
fn blkio_io_uring_direct() -> Config {
    Config {
        blockdevs: &["io_uring,filename={img},cache.direct=on,discard=unmap,node-name=t0"],
        persistent: true,
        window_offset: 0,
        qsd: None,
        nbd: None,
        in_image: true,
    }
}
/// The daemon's side of the vhost-user configs over the image file.
const QSD_FILE: &[&str] = &[
    "driver=file,node-name=f0,filename={img},aio=io_uring,cache.direct=on,discard=unmap",
    "driver=raw,node-name=d0,file=f0,discard=unmap",
];
fn vhost_user_qsd_file() -> Config {
    Config {
        blockdevs: &["virtio-blk-vhost-user,path={sock},discard=unmap,node-name=t0"],
        persistent: true,
        window_offset: 0,
        qsd: Some(QSD_FILE),
        nbd: None,
        in_image: true,
    }
}
fn vhost_user_qsd_null_co() -> Config {
    Config {
        blockdevs: &["virtio-blk-vhost-user,path={sock},discard=unmap,node-name=t0"],
        persistent: false,
        window_offset: 0,
        qsd: Some(&["driver=null-co,node-name=d0,size=33554432,read-zeroes=on"]),
        nbd: None,
        in_image: true,
    }
}
fn raw_window_over_vhost_user_by_ref() -> Config {
    Config {
        blockdevs: &[
            "virtio-blk-vhost-user,path={sock},discard=unmap,node-name=v0",
            "raw,file=v0,discard=unmap,offset=1M,size=16M,node-name=t0",
        ],
        persistent: true,
        window_offset: 1 << 20,
        qsd: Some(QSD_FILE),
        nbd: None,
        in_image: true,
    }
}

/// qemu-nbd serving the image file (cache=none, io_uring, discard).
const QEMU_NBD_FILE: (&str, &[&str]) = (
    "qemu-nbd",
    &[
        "--socket={sock}",
        "--format=raw",
        "--export-name=disk",
        "--cache=none",
        "--aio=io_uring",
        "--discard=unmap",
        "--persistent",
        "--shared=8",
        "{img}",
    ],
);
fn nbd_qemu_nbd_file() -> Config {
    Config {
        blockdevs: &[
            "nbd,server.type=unix,server.path={sock},export=disk,discard=unmap,node-name=t0",
        ],
        persistent: true,
        window_offset: 0,
        qsd: None,
        nbd: Some(QEMU_NBD_FILE),
        in_image: true,
    }
}
fn nbd_nbdkit_memory() -> Config {
    Config {
        blockdevs: &["nbd,server.type=unix,server.path={sock},discard=unmap,node-name=t0"],
        persistent: true,
        window_offset: 0,
        qsd: None,
        nbd: Some((
            "nbdkit",
            &[
                "--foreground",
                "--unix",
                "{sock}",
                "memory",
                "size=33554432",
            ],
        )),
        in_image: false,
    }
}
fn raw_window_over_nbd_qemu_nbd() -> Config {
    Config {
        blockdevs: &[
            "nbd,server.type=unix,server.path={sock},export=disk,discard=unmap,node-name=n0",
            "raw,file=n0,discard=unmap,offset=1M,size=16M,node-name=t0",
        ],
        persistent: true,
        window_offset: 1 << 20,
        qsd: None,
        nbd: Some(QEMU_NBD_FILE),
        in_image: true,
    }
}

fn capacity_is_the_configured_size(cfg: &Config) {
    let img = Image::new(IMG_SIZE);
    let d = cfg.disk(&img);
    let expected = if cfg.window_offset > 0 {
        16 << 20
    } else {
        IMG_SIZE
    };
    assert_eq!(d.node.capacity(), expected);
}

fn data_at_both_ends_reads_back(cfg: &Config) {
    let img = Image::new(IMG_SIZE);
    let mut d = cfg.disk(&img);
    let cap = d.node.capacity();
    let head = pattern(1, 64 << 10);
    let tail = pattern(2, 64 << 10);
    assert_eq!(d.write(0, &head), Ok(head.len() as u64));
    assert_eq!(
        d.write(cap - tail.len() as u64, &tail),
        Ok(tail.len() as u64)
    );
    let got_head = d.read(0, head.len()).unwrap();
    let got_tail = d.read(cap - tail.len() as u64, tail.len()).unwrap();
    if cfg.persistent {
        assert!(got_head == head, "head data differs");
        assert!(got_tail == tail, "tail data differs");
        if cfg.in_image {
            let on_disk = img.contents();
            let off = cfg.window_offset as usize;
            assert!(
                on_disk[off..off + head.len()] == head[..],
                "image file differs at the head"
            );
        }
    } else {
        assert!(
            got_head.iter().all(|&b| b == 0),
            "read-zeroes node returned data"
        );
    }
}

fn requests_past_the_end_fail_cleanly(cfg: &Config) {
    let img = Image::new(IMG_SIZE);
    let mut d = cfg.disk(&img);
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
    // The queue still works afterwards.
    assert_eq!(d.write(0, &[7; 512]), Ok(512));
}

fn unaligned_requests_read_back(cfg: &Config) {
    let img = Image::new(IMG_SIZE);
    let mut d = cfg.disk(&img);
    let base = pattern(3, 16384);
    d.write(0, &base).unwrap();
    // Offsets, lengths and buffer addresses that break 512/4096 alignment.
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
        if cfg.persistent {
            assert!(got == data, "unaligned read at {off}+{len} differs");
        }
    }
    if cfg.persistent {
        assert!(
            d.read(0, 16384).unwrap() == expect,
            "neighbouring bytes were damaged"
        );
    }
}

fn multi_segment_requests_keep_order(cfg: &Config) {
    let img = Image::new(IMG_SIZE);
    let mut d = cfg.disk(&img);
    let data = pattern(4, 12288);
    assert_eq!(d.writev(8192, &data, &[512, 4096 - 512, 8192]), Ok(12288));
    let got = d.readv(8192, 12288, &[4096, 4096, 2048, 2048]).unwrap();
    if cfg.persistent {
        assert!(got == data, "vectored data differs");
    }
}

fn flush_and_fua_succeed(cfg: &Config) {
    let img = Image::new(IMG_SIZE);
    let mut d = cfg.disk(&img);
    d.write(4096, &pattern(5, 4096)).unwrap();
    assert_eq!(d.op(RequestOp::Flush, 0, 0), Ok(0));
    assert_eq!(d.write_fua(8192, &pattern(6, 4096)), Ok(4096));
    if cfg.persistent {
        assert!(d.read(8192, 4096).unwrap() == pattern(6, 4096));
    }
}

fn discard_and_write_zeroes_read_back_as_zeroes(cfg: &Config) {
    let img = Image::new(IMG_SIZE);
    let mut d = cfg.disk(&img);
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
    if cfg.persistent {
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
}

fn read_only_node_refuses_modification(cfg: &Config) {
    let img = Image::new(IMG_SIZE);
    let (graph, node, _qsd) = cfg.open_with(&img, ",read-only=on");
    assert!(node.read_only());
    let mut d = Disk::new(graph, node);
    assert_eq!(d.write(0, &[1; 512]), Err(RequestError::ReadOnly));
    assert_eq!(
        d.op(RequestOp::Discard, 0, 4096),
        Err(RequestError::ReadOnly)
    );
    assert_eq!(d.write_zeroes(0, 4096, false), Err(RequestError::ReadOnly));
    assert!(d.read(0, 4096).is_ok());
    if cfg.in_image && cfg.persistent {
        assert!(
            img.contents()[..512].iter().all(|&b| b == 0),
            "a refused write reached the image"
        );
    }
}

fn hundreds_of_requests_in_flight(cfg: &Config) {
    let img = Image::new(IMG_SIZE);
    let mut d = cfg.disk(&img);
    let n = 600;
    let chunks: Vec<Vec<u8>> = (0..n).map(|i| pattern(i as u8, 4096)).collect();
    // Scatter: request i goes to block (i * 7919) mod 4096 (a permutation).
    let block = |i: usize| ((i * 7919) % 4096) as u64 * 4096;
    let writes: Vec<(u64, &[u8])> = (0..n).map(|i| (block(i), &chunks[i][..])).collect();
    for r in d.write_many(&writes) {
        assert_eq!(r, Ok(4096));
    }
    let offsets: Vec<u64> = (0..n).map(block).collect();
    let got = d.read_many(&offsets, 4096);
    for (i, r) in got.into_iter().enumerate() {
        let data = r.unwrap();
        if cfg.persistent {
            assert!(data == chunks[i], "request {i} at {} differs", block(i));
        }
    }
    let s = d.node.stats().snapshot();
    assert!(
        s.write.ops >= n as u64 && s.read.ops >= n as u64,
        "stats did not move: {s:?}"
    );
    assert!(s.read.bytes >= 4096 * n as u64);
}

macro_rules! conformance {
    ($($cfg:ident),* $(,)?) => {$(
        mod $cfg {
            #[test] fn capacity_is_the_configured_size() { super::capacity_is_the_configured_size(&super::$cfg()) }
            #[test] fn data_at_both_ends_reads_back() { super::data_at_both_ends_reads_back(&super::$cfg()) }
            #[test] fn requests_past_the_end_fail_cleanly() { super::requests_past_the_end_fail_cleanly(&super::$cfg()) }
            #[test] fn unaligned_requests_read_back() { super::unaligned_requests_read_back(&super::$cfg()) }
            #[test] fn multi_segment_requests_keep_order() { super::multi_segment_requests_keep_order(&super::$cfg()) }
            #[test] fn flush_and_fua_succeed() { super::flush_and_fua_succeed(&super::$cfg()) }
            #[test] fn discard_and_write_zeroes_read_back_as_zeroes() { super::discard_and_write_zeroes_read_back_as_zeroes(&super::$cfg()) }
            #[test] fn read_only_node_refuses_modification() { super::read_only_node_refuses_modification(&super::$cfg()) }
            #[test] fn hundreds_of_requests_in_flight() { super::hundreds_of_requests_in_flight(&super::$cfg()) }
        }
    )*};
}

conformance!(
    file_threads,
    file_threads_direct,
    file_io_uring,
    file_io_uring_direct,
    raw_window_over_file,
    raw_over_file_io_uring_direct_by_ref,
    null_co,
    blkio_io_uring,
    blkio_io_uring_direct,
    vhost_user_qsd_file,
    vhost_user_qsd_null_co,
    raw_window_over_vhost_user_by_ref,
    nbd_qemu_nbd_file,
    nbd_nbdkit_memory,
    raw_window_over_nbd_qemu_nbd,
);
