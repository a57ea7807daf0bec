//! The `qcow2` driver writing: random writes, write-zeroes, discards and
//! flushes through blkvm (alone and several in flight), on images of both
//! versions and several cluster sizes, over nothing or over a backing
//! chain; then `qemu-img check` must find no corruption and `qemu-img
//! compare` must find the image equal to a raw reference that got the same
//! operations. Also growth (`block_resize`) with and without a new L1
//! table, and refcount table growth on small clusters; allocating writes
//! in flight together (on one queue, and left behind by a dropped one);
//! stale bytes in reused clusters; and the on-disk state after a
//! simulated crash (the node leaked, so no close writes metadata back)
//! following a flush and unflushed allocating writes.

mod common;
mod qcow2_util;

use common::Disk;
use qcow2_util::{check, open, qemu_img, qemu_io, raw_of, read_all, Scratch};

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// An image under test and the raw model of what it must hold.
struct Case {
    s: Scratch,
    img: String,
    size: u64,
    cluster: u64,
    v3: bool,
    /// What discarded clusters read as (the backing data, for v2).
    under: Vec<u8>,
    model: Vec<u8>,
}

impl Case {
    /// A new image; with `base` data, over a raw backing file holding it.
    fn new(opts: &str, size: u64, cluster: u64, base: Option<Vec<u8>>) -> Case {
        let s = Scratch::new();
        let img = s.path("t.qcow2");
        let o = format!("{opts},cluster_size={cluster}");
        match &base {
            Some(data) => {
                std::fs::write(s.path("base.raw"), data).unwrap();
                qemu_img(&[
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-o",
                    &o,
                    "-b",
                    "base.raw",
                    "-F",
                    "raw",
                    &img,
                    &size.to_string(),
                ]);
            }
            None => {
                qemu_img(&[
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-o",
                    &o,
                    &img,
                    &size.to_string(),
                ]);
            }
        }
        let model = base.unwrap_or_else(|| vec![0u8; size as usize]);
        Case {
            v3: !opts.contains("compat=0.10"),
            under: model.clone(),
            model,
            s,
            img,
            size,
            cluster,
        }
    }

    fn disk(&self, extra: &str) -> Disk {
        open(&format!(
            "qcow2,node-name=q0,discard=unmap{extra},file.driver=file,file.filename={}",
            self.img
        ))
    }

    fn range(&self, rng: &mut Rng, max: u64) -> (u64, u64) {
        let off = rng.below(self.size);
        let off = if rng.below(2) == 0 {
            off / 512 * 512
        } else {
            off
        };
        let len = (1 + rng.below(max)).min(self.size - off);
        (off, len)
    }

    /// Runs `n` random operations through blkvm and on the model.
    fn random_ops(&mut self, d: &mut Disk, seed: u64, n: usize) {
        let mut rng = Rng(seed | 1);
        for i in 0..n {
            let cs = self.cluster;
            match rng.below(20) {
                0..=8 => {
                    let (off, len) = self.range(&mut rng, 3 * cs);
                    let data = common::pattern(i as u8, len as usize);
                    d.write(off, &data)
                        .unwrap_or_else(|e| panic!("write {off}+{len}: {e}"));
                    self.model[off as usize..(off + len) as usize].copy_from_slice(&data);
                }
                9..=10 => {
                    // Several writes to different clusters in flight at once.
                    let writes: Vec<(u64, Vec<u8>)> = (0..4)
                        .map(|k| {
                            let off =
                                (rng.below(self.size / cs / 4) * 4 + k) * cs + rng.below(cs / 2);
                            let len = (1 + rng.below(cs / 2)).min(self.size - off);
                            (off, common::pattern((i * 4) as u8 + k as u8, len as usize))
                        })
                        .collect();
                    let refs: Vec<(u64, &[u8])> =
                        writes.iter().map(|(o, d)| (*o, &d[..])).collect();
                    for r in d.write_many(&refs) {
                        r.unwrap();
                    }
                    for (off, data) in &writes {
                        self.model[*off as usize..*off as usize + data.len()].copy_from_slice(data);
                    }
                }
                11..=13 => {
                    let (off, len) = self.range(&mut rng, 4 * cs);
                    d.write_zeroes(off, len, rng.below(2) == 0)
                        .unwrap_or_else(|e| panic!("write-zeroes {off}+{len}: {e}"));
                    self.model[off as usize..(off + len) as usize].fill(0);
                }
                14..=16 => {
                    let (off, len) = self.range(&mut rng, 4 * cs);
                    d.op(block::RequestOp::Discard, off, len)
                        .unwrap_or_else(|e| panic!("discard {off}+{len}: {e}"));
                    // Only whole clusters are discarded.
                    let (a, b) = (off.div_ceil(cs) * cs, (off + len) / cs * cs);
                    if a < b {
                        let (a, b) = (a as usize, b as usize);
                        if self.v3 {
                            self.model[a..b].fill(0);
                        } else {
                            self.model[a..b].copy_from_slice(&self.under[a..b]);
                        }
                    }
                }
                17 => {
                    d.op(block::RequestOp::Flush, 0, 0).unwrap();
                }
                _ => {
                    let (off, len) = self.range(&mut rng, 2 * cs);
                    let got = d.read(off, len as usize).unwrap();
                    assert!(
                        got == self.model[off as usize..(off + len) as usize],
                        "op {i}: read {off}+{len} differs from the model"
                    );
                }
            }
        }
    }

    /// Reads everything back, then checks the closed image with QEMU.
    fn verify(&self, d: &mut Disk) {
        assert!(
            read_all(d, self.size) == self.model,
            "blkvm reads differ from the model"
        );
        d.op(block::RequestOp::Flush, 0, 0).unwrap();
        let (code, text) = check(&self.img);
        assert_eq!(code, 0, "qemu-img check: {text}");
        assert!(!text.contains("leaked"), "qemu-img check: {text}");
        assert!(
            raw_of(&self.s, &self.img) == self.model,
            "QEMU reads differ from the model"
        );
        let reference = self.s.path("reference.raw");
        std::fs::write(&reference, &self.model).unwrap();
        qemu_img(&[
            "compare", "-U", "-q", "-f", "qcow2", "-F", "raw", &self.img, &reference,
        ]);
    }
}

fn random_run(opts: &str, size: u64, cluster: u64, base: bool, seed: u64) {
    let base = base.then(|| common::pattern(0x5c, size as usize));
    let mut c = Case::new(opts, size, cluster, base);
    let mut d = c.disk("");
    c.random_ops(&mut d, seed, 300);
    c.verify(&mut d);
    drop(d);
    // And again after reopening.
    let mut d = c.disk("");
    c.random_ops(&mut d, seed ^ 0xabcdef, 100);
    c.verify(&mut d);
}

#[test]
fn random_ops_on_v3_64k_pass_qemu_check_and_compare() {
    random_run("compat=1.1", 8 << 20, 65536, false, 1);
}

#[test]
fn random_ops_on_v3_4k_over_a_backing_file_pass_qemu_check_and_compare() {
    random_run("compat=1.1", 4 << 20, 4096, true, 2);
}

#[test]
fn random_ops_on_v2_pass_qemu_check_and_compare() {
    random_run("compat=0.10", 4 << 20, 4096, false, 3);
    random_run("compat=0.10", 2 << 20, 65536, true, 4);
}

#[test]
fn small_clusters_grow_the_refcount_table_and_pass_qemu_check() {
    // 512-byte clusters: one refcount table cluster covers 8 MiB.
    let size = 12u64 << 20;
    let mut c = Case::new("compat=1.1", size, 512, None);
    let before = std::fs::read(&c.img).unwrap()[48..56].to_vec();
    let mut d = c.disk("");
    let data = common::pattern(9, size as usize);
    for off in (0..size).step_by(1 << 20) {
        d.write(off, &data[off as usize..(off + (1 << 20)) as usize])
            .unwrap();
    }
    c.model.copy_from_slice(&data);
    let reftable = |img: &str| std::fs::read(img).unwrap()[48..56].to_vec();
    assert_ne!(reftable(&c.img), before, "the refcount table moved");
    c.random_ops(&mut d, 5, 100);
    c.verify(&mut d);
}

#[test]
fn writes_over_compressed_clusters_reallocate_them() {
    let s = Scratch::new();
    let raw = s.path("src.raw");
    let data = common::pattern(3, 1 << 20);
    std::fs::write(&raw, &data).unwrap();
    let mut c = Case::new("compat=1.1", 1 << 20, 65536, None);
    qemu_img(&[
        "convert", "-q", "-c", "-f", "raw", "-O", "qcow2", &raw, &c.img,
    ]);
    c.model = data;
    let mut d = c.disk("");
    c.random_ops(&mut d, 6, 150);
    c.verify(&mut d);
}

#[test]
fn writes_to_an_overlay_of_a_qcow2_chain_leave_the_base_alone() {
    let s = Scratch::new();
    let base = s.path("base.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &base, "2M"]);
    qemu_io(&base, &["write -P 0x21 0 2M"]);
    let top = s.path("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        &top,
    ]);
    let mut d = open(&format!(
        "qcow2,node-name=q0,file.driver=file,file.filename={top}"
    ));
    d.write(1000, &[0xee; 3000]).unwrap();
    d.write_zeroes(65536 * 3, 65536, true).unwrap();
    d.op(block::RequestOp::Flush, 0, 0).unwrap();
    drop(d);
    let mut expected = vec![0x21u8; 2 << 20];
    expected[1000..4000].fill(0xee);
    expected[65536 * 3..65536 * 4].fill(0);
    assert!(raw_of(&s, &top) == expected);
    assert!(
        raw_of(&s, &base).iter().all(|b| *b == 0x21),
        "the base changed"
    );
    assert_eq!(check(&top).0, 0, "{}", check(&top).1);
    assert_eq!(check(&base).0, 0);
}

#[test]
fn block_resize_grows_the_image_with_and_without_a_new_l1_table() {
    for (cluster, grow_to) in [(65536u64, 3u64 << 20), (512, 64 << 20)] {
        let mut c = Case::new("compat=1.1", 1 << 20, cluster, None);
        let mut d = c.disk("");
        d.write(1000, &[1; 5000]).unwrap();
        c.model[1000..6000].fill(1);
        d.node.truncate(grow_to).unwrap();
        assert_eq!(d.node.capacity(), grow_to);
        c.size = grow_to;
        c.model.resize(grow_to as usize, 0);
        d.write(grow_to - 7000, &[2; 7000]).unwrap();
        c.model[(grow_to - 7000) as usize..].fill(2);
        c.verify(&mut d);
        assert!(d.node.truncate(1 << 20).is_err(), "shrinking is refused");
    }
}

#[test]
fn discard_no_unref_keeps_clusters_allocated_reading_zeroes() {
    let mut c = Case::new("compat=1.1", 1 << 20, 65536, None);
    let mut d = c.disk(",discard-no-unref=on");
    d.write(0, &[7; 4 * 65536]).unwrap();
    d.op(block::RequestOp::Discard, 65536, 2 * 65536).unwrap();
    c.model[..65536].fill(7);
    c.model[3 * 65536..4 * 65536].fill(7);
    d.op(block::RequestOp::Flush, 0, 0).unwrap();
    let map = qemu_img(&["map", "-U", "--output=json", &c.img]);
    let map = String::from_utf8_lossy(&map.stdout).to_string();
    // The discarded clusters read as zeroes and keep their host offset.
    let entry = map
        .lines()
        .find(|l| l.contains("\"start\": 65536"))
        .unwrap_or_else(|| panic!("{map}"));
    assert!(
        entry.contains("\"zero\": true") && entry.contains("\"offset\""),
        "{map}"
    );
    c.verify(&mut d);
}

#[test]
fn read_only_and_corrupt_images_refuse_writes_clearly() {
    let c = Case::new("compat=1.1", 1 << 20, 65536, None);
    // Set the corrupt bit (incompatible feature bit 1, byte 79).
    let mut bytes = std::fs::read(&c.img).unwrap();
    bytes[79] |= 2;
    std::fs::write(&c.img, &bytes).unwrap();
    let mut g = block::BlockGraph::new();
    let rw = format!("qcow2,file.driver=file,file.filename={}", c.img);
    let e = g
        .add(&qapi::parse_blockdev(&rw).unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("marked corrupt"), "{e}");
    let mut d = open(&format!("{rw},read-only=on"));
    assert_eq!(d.read(0, 512).unwrap(), vec![0; 512]);
    assert!(d.write(0, &[1; 512]).is_err());
}

/// Writes `data` at `off` on `q` and waits for it.
fn write_on(q: &mut dyn block::NodeQueue, off: u64, data: &[u8]) {
    let mut buf = data.to_vec();
    let iov = vec![libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }];
    // SAFETY: `buf` outlives the wait below, which takes the request back.
    q.submit(unsafe { block::Request::write(off, iov, false) })
        .unwrap_or_else(|e| panic!("write {off}: {}", e.error));
    let mut out = Vec::new();
    while out.is_empty() {
        q.wait_completions(1, &mut out);
    }
    out[0].result.unwrap_or_else(|e| panic!("write {off}: {e}"));
}

#[test]
fn threads_writing_parts_of_the_same_new_clusters_lose_nothing() {
    // Four threads, each with its own queue, write their quarter of every
    // cluster of an empty image over a backing file at once: each cluster
    // is allocated by one of them and the others' quarters must survive.
    const THREADS: u64 = 4;
    let cs = 65536u64;
    let size = 4u64 << 20;
    let mut c = Case::new(
        "compat=1.1",
        size,
        cs,
        Some(common::pattern(0x42, size as usize)),
    );
    let mut d = c.disk("");
    let node = d.node.clone();
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let node = node.clone();
            s.spawn(move || {
                let mut q = node.open_queue().unwrap();
                for gc in 0..size / cs {
                    let off = gc * cs + t * cs / THREADS;
                    write_on(q.as_mut(), off, &[t as u8 + 1; 4096]);
                }
            });
        }
    });
    for gc in 0..size / cs {
        for t in 0..THREADS {
            let off = (gc * cs + t * cs / THREADS) as usize;
            c.model[off..off + 4096].fill(t as u8 + 1);
        }
    }
    c.verify(&mut d);
}

#[test]
fn writes_into_preallocated_zero_clusters_reallocate_without_leaks() {
    let mut c = Case::new("compat=1.1", 1 << 20, 65536, None);
    // Without -u QEMU keeps the clusters allocated and marks them zero.
    qemu_io(&c.img, &["write -P 9 0 256k", "write -z 0 256k"]);
    let map = qemu_img(&["map", "--output=json", &c.img]);
    let map = String::from_utf8_lossy(&map.stdout).to_string();
    assert!(
        map.contains("\"zero\": true") && map.contains("\"offset\""),
        "{map}"
    );
    let mut d = c.disk("");
    d.write(1000, &[5; 70_000]).unwrap();
    c.model[1000..71_000].fill(5);
    c.verify(&mut d);
}

#[test]
fn a_clean_close_without_a_flush_keeps_the_writes() {
    let mut c = Case::new("compat=1.1", 1 << 20, 65536, None);
    let mut d = c.disk("");
    d.write(5000, &[3; 200_000]).unwrap();
    d.write_zeroes(65536 * 2, 65536, true).unwrap();
    drop(d);
    c.model[5000..205_000].fill(3);
    c.model[65536 * 2..65536 * 3].fill(0);
    let mut d = c.disk("");
    c.verify(&mut d);
}

#[test]
fn writes_in_flight_to_one_new_cluster_on_one_queue_all_land() {
    // Sixteen writes into the quarters of four new clusters, all in flight
    // on one queue: the first of each cluster allocates it, the others
    // wait for that (deferred on the same queue, which must not block
    // itself) and then write in place.
    let cs = 65536u64;
    let mut c = Case::new(
        "compat=1.1",
        1 << 20,
        cs,
        Some(common::pattern(0x17, 1 << 20)),
    );
    let mut d = c.disk("");
    let writes: Vec<(u64, Vec<u8>)> = (0..16u64)
        .map(|k| {
            (
                (k % 4) * cs + (k / 4) * cs / 4 + 512,
                vec![k as u8 + 1; 8192],
            )
        })
        .collect();
    let refs: Vec<(u64, &[u8])> = writes.iter().map(|(o, b)| (*o, &b[..])).collect();
    for r in d.write_many(&refs) {
        r.unwrap();
    }
    for (off, data) in &writes {
        c.model[*off as usize..*off as usize + data.len()].copy_from_slice(data);
    }
    c.verify(&mut d);
}

#[test]
fn a_crash_after_a_flush_keeps_every_acknowledged_write_and_no_corruption() {
    // Many allocating writes in flight at once, a flush, then as many
    // again with no flush; then the process "dies": the node is leaked,
    // so no close writes the metadata back. What the file holds then must
    // pass `qemu-img check` (leaks allowed: the second batch's refcounts
    // may be on disk without its L2 entries) and hold the first batch.
    // A small L2 cache makes checkpoints happen in the middle of batches.
    let cs = 65536u64;
    let size = 64u64 << 20;
    let mut c = Case::new("compat=1.1", size, cs, None);
    let mut d = c.disk(",l2-cache-size=8192");
    let batch = |seed: u8| -> Vec<(u64, Vec<u8>)> {
        (0..size / cs / 2)
            .map(|k| {
                let gc = k * 2 + u64::from(seed & 1);
                let off = gc * cs + (k * 4096) % cs;
                (off, common::pattern(seed ^ k as u8, 4096))
            })
            .collect()
    };
    let first = batch(0x20);
    let refs: Vec<(u64, &[u8])> = first.iter().map(|(o, b)| (*o, &b[..])).collect();
    for r in d.write_many(&refs) {
        r.unwrap();
    }
    d.op(block::RequestOp::Flush, 0, 0).unwrap();
    let second = batch(0x31);
    let refs: Vec<(u64, &[u8])> = second.iter().map(|(o, b)| (*o, &b[..])).collect();
    for r in d.write_many(&refs) {
        r.unwrap();
    }
    std::mem::forget(d);
    let (code, text) = check(&c.img);
    assert!(code == 0 || code == 3, "qemu-img check: {text}");
    assert!(!text.contains("ERROR"), "{text}");
    let now = raw_of(&c.s, &c.img);
    for (off, data) in &first {
        c.model[*off as usize..*off as usize + data.len()].copy_from_slice(data);
    }
    // The second batch is all there or not at all, write by write (each
    // fills part of one cluster whose L2 entry is linked or not).
    for (off, data) in &second {
        let r = *off as usize..*off as usize + data.len();
        if now[r.clone()] == data[..] {
            c.model[r].copy_from_slice(data);
        }
    }
    assert!(now == c.model, "the image differs from the flushed writes");
}

#[test]
fn new_clusters_over_stale_bytes_in_the_file_read_zeroes_around_the_write() {
    // Free clusters inside the file (here: garbage appended past the last
    // used cluster, as a crash leaves the data of unlinked clusters) hold
    // old bytes: a write allocating one must write zeroes around it.
    // Clusters past the end of the file as opened need no such copy.
    let cs = 65536u64;
    let mut c = Case::new("compat=1.1", 4 << 20, cs, None);
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&c.img)
            .unwrap();
        f.write_all(&vec![0xaa; 4 * cs as usize]).unwrap();
    }
    let mut d = c.disk("");
    let writes: Vec<(u64, Vec<u8>)> = (0..8u64)
        .map(|k| (k * cs + 8192, vec![k as u8 + 1; 4096]))
        .collect();
    let refs: Vec<(u64, &[u8])> = writes.iter().map(|(o, b)| (*o, &b[..])).collect();
    for r in d.write_many(&refs) {
        r.unwrap();
    }
    for (off, data) in &writes {
        c.model[*off as usize..*off as usize + data.len()].copy_from_slice(data);
    }
    c.verify(&mut d);
}

#[test]
fn a_queue_dropped_with_allocations_in_flight_leaves_their_clusters_writable() {
    // Allocating writes hold their guest clusters busy until they
    // complete; a queue dropped before reaping them must still let the
    // node's other queues write those clusters (and lose no data).
    let cs = 65536u64;
    let mut c = Case::new("compat=1.1", 1 << 20, cs, None);
    let mut d = c.disk("");
    let mut first = d.node.open_queue().unwrap();
    let mut bufs: Vec<Vec<u8>> = (0..8u8).map(|k| vec![k + 1; 4096]).collect();
    for (k, b) in bufs.iter_mut().enumerate() {
        let iov = vec![libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        }];
        // SAFETY: `bufs` outlives `first`, whose drop ends every request.
        let req = unsafe { block::Request::write(k as u64 * cs, iov, false) };
        first.submit(req).unwrap_or_else(|e| panic!("{}", e.error));
    }
    first.kick();
    drop(first);
    let writes: Vec<(u64, Vec<u8>)> = (0..8u64)
        .map(|k| (k * cs + 8192, vec![0x40 + k as u8; 4096]))
        .collect();
    // On another thread, so that a write waiting forever fails the test.
    let node = d.node.clone();
    let to_write = writes.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut q = node.open_queue().unwrap();
        for (off, data) in &to_write {
            write_on(q.as_mut(), *off, data);
        }
        tx.send(()).unwrap();
    });
    rx.recv_timeout(std::time::Duration::from_secs(60))
        .expect("writes to the dropped queue's clusters finish");
    for (k, b) in bufs.iter().enumerate() {
        let off = k * cs as usize;
        // Each dropped write landed whole or not at all.
        let now = d.read(off as u64, 4096).unwrap();
        assert!(now == *b || now == vec![0; 4096], "cluster {k}");
        c.model[off..off + 4096].copy_from_slice(&now);
    }
    for (off, data) in &writes {
        c.model[*off as usize..*off as usize + data.len()].copy_from_slice(data);
    }
    c.verify(&mut d);
}
