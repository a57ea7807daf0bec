//! qcow2 images served by `blkvm storage-daemon` over NBD, against real
//! peers: `qemu-img map` over our export must say what it says over
//! qemu-storage-daemon's export of the same backing chain; and a kill -9
//! soak: a writer with flushes (our NBD client, several requests in
//! flight) against the daemon on a qcow2 image, killed at random points,
//! after which `qemu-img check` finds no corruption (leaks allowed) and
//! every write acknowledged before an acknowledged flush reads back.
//! `QCOW2_SOAK_CYCLES` sets the number of kills (default 12). A second
//! kill test aims at the lazy metadata of allocation: many allocating
//! writes in flight and unflushed when the daemon dies, with a small L2
//! cache so that checkpoints run among them (`QCOW2_ALLOC_KILL_CYCLES`,
//! default 4).

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use block::{BlockGraph, BlockNode, Completion, NodeQueue, Request};
use tests::files::run;
use tests::{Backend, StorageDaemon};

fn daemon(backend: Backend, blockdev: &str, sock: &Path, writable: bool) -> Result<StorageDaemon> {
    StorageDaemon::start_with_args(
        backend,
        [
            "--blockdev".to_string(),
            blockdev.to_string(),
            "--nbd-server".into(),
            format!("addr.type=unix,addr.path={}", sock.display()),
            "--export".into(),
            format!(
                "type=nbd,id=e0,node-name=q0,name=disk,writable={}",
                if writable { "on" } else { "off" }
            ),
        ],
    )
}

fn qemu_img(args: &[&str]) -> Result<String> {
    run(Command::new("qemu-img").args(args))
}

fn qemu_io(img: &str, cmds: &[&str]) -> Result<()> {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "qcow2"]);
    for x in cmds {
        c.args(["-c", x]);
    }
    run(c.arg(img)).map(|_| ())
}

#[test]
fn qemu_img_map_over_our_export_matches_qemu_storage_daemon() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let p = |n: &str| dir.path().join(n).display().to_string();
    qemu_img(&["create", "-q", "-f", "qcow2", &p("base.qcow2"), "16M"])?;
    qemu_io(
        &p("base.qcow2"),
        &["write -P 1 0 1M", "write -P 2 4M 64k", "write -z 8M 1M"],
    )?;
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        &p("top.qcow2"),
    ])?;
    qemu_io(
        &p("top.qcow2"),
        &[
            "write -P 3 512k 8k",
            "write -z 0 4k",
            "write -P 4 12M 100k",
            "discard 4M 8k",
        ],
    )?;
    let blockdev = format!(
        "driver=qcow2,node-name=q0,read-only=on,file.driver=file,file.filename={}",
        p("top.qcow2")
    );
    let map_of = |backend: Backend, name: &str| -> Result<String> {
        let sock = dir.path().join(name);
        let _d = daemon(backend, &blockdev, &sock, false)?;
        let uri = format!("nbd+unix:///disk?socket={}", sock.display());
        let map = qemu_img(&["map", "--output=json", "-f", "raw", &uri])?;
        let data = qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &uri,
            &p(&format!("{name}.raw")),
        ]);
        data?;
        Ok(map)
    };
    let ours = map_of(Backend::Blkvm, "ours.sock")?;
    let qemu = map_of(Backend::QemuStorageDaemon, "qemu.sock")?;
    ensure!(
        ours == qemu,
        "qemu-img map differs:\nours:\n{ours}\nqemu:\n{qemu}"
    );
    ensure!(
        std::fs::read(p("ours.sock.raw"))? == std::fs::read(p("qemu.sock.raw"))?,
        "the data read over the two exports differs"
    );
    Ok(())
}

/// A synchronous client of one node queue.
struct Client {
    _graph: BlockGraph,
    _node: Arc<dyn BlockNode>,
    queue: Box<dyn NodeQueue>,
}

impl Client {
    fn connect(sock: &Path) -> Result<Client> {
        let mut graph = BlockGraph::new();
        let opts = qapi::parse_blockdev(&format!(
            "nbd,node-name=n0,server.type=unix,server.path={},export=disk",
            sock.display()
        ))?;
        let node = graph.add(&opts)?;
        let queue = node.open_queue()?;
        Ok(Client {
            _graph: graph,
            _node: node,
            queue,
        })
    }

    /// Submits every write at once and waits for all; `Err` if any failed.
    fn write_all(&mut self, writes: &[(u64, Vec<u8>)]) -> Result<()> {
        let mut bufs: Vec<Vec<u8>> = writes.iter().map(|(_, d)| d.clone()).collect();
        let mut waiting = 0;
        let mut failed = false;
        for ((off, _), b) in writes.iter().zip(bufs.iter_mut()) {
            let iov = vec![libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            }];
            // SAFETY: `bufs` outlives the loop below, which waits for
            // every request that was accepted.
            let req = unsafe { Request::write(*off, iov, false) };
            match self.queue.submit(req) {
                Ok(()) => waiting += 1,
                Err(_) => failed = true,
            }
        }
        failed |= self.wait(waiting);
        ensure!(!failed, "a write failed");
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        ensure!(self.queue.submit(Request::flush()).is_ok(), "flush refused");
        ensure!(!self.wait(1), "flush failed");
        Ok(())
    }

    /// Waits for `n` completions; whether any failed.
    fn wait(&mut self, mut n: usize) -> bool {
        let mut failed = false;
        let mut out: Vec<Completion> = Vec::new();
        while n > 0 && self.queue.in_flight() > 0 {
            self.queue.wait_completions(1, &mut out);
            for c in out.drain(..) {
                failed |= c.result.is_err();
                n -= 1;
            }
        }
        failed || n > 0
    }
}

/// xorshift64.
fn next(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// After a kill: `qemu-img check` must find no corruption (exit 0, or 3
/// for leaked clusters only, which a crash may leave: `Ok(false)`), and
/// every byte not `unknown` must read as `model` has it; unknown bytes
/// (written without a flush since) take what the image holds. Returns
/// whether the check was clean and how many bytes were verified.
fn check_and_verify(
    dir: &Path,
    img: &str,
    model: &mut [u8],
    unknown: &[bool],
    cycle: usize,
) -> Result<(bool, u64)> {
    let out = Command::new("qemu-img").args(["check", img]).output()?;
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let clean = match out.status.code() {
        Some(0) => true,
        Some(3) => false,
        _ => anyhow::bail!("cycle {cycle}: qemu-img check: {text}"),
    };
    let raw = dir.join("now.raw").display().to_string();
    qemu_img(&["convert", "-O", "raw", img, &raw])?;
    let now = std::fs::read(&raw).context("reading the converted image")?;
    ensure!(
        now.len() == model.len(),
        "cycle {cycle}: the image changed size"
    );
    let mut verified = 0;
    for i in 0..model.len() {
        if unknown[i] {
            model[i] = now[i];
        } else if now[i] != model[i] {
            anyhow::bail!(
                "cycle {cycle}: byte {i} is {:#x}, flushed {:#x}",
                now[i],
                model[i]
            );
        } else {
            verified += 1;
        }
    }
    Ok((clean, verified))
}

#[test]
fn kill9_soak_leaves_a_clean_image_with_every_flushed_write() -> Result<()> {
    let cycles: usize = std::env::var("QCOW2_SOAK_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12);
    const SIZE: u64 = 32 << 20;
    let dir = tempfile::tempdir()?;
    let img = dir.path().join("soak.qcow2").display().to_string();
    let base = dir.path().join("base.raw").display().to_string();
    std::fs::write(&base, vec![0x5au8; SIZE as usize])?;
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=64k",
        "-b",
        "base.raw",
        "-F",
        "raw",
        &img,
    ])?;
    let blockdev = format!("driver=qcow2,node-name=q0,file.driver=file,file.filename={img}");
    // What the image must hold, and which bytes an unflushed write may
    // have changed.
    let mut model = vec![0x5au8; SIZE as usize];
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let (mut clean, mut leaky, mut verified) = (0, 0, 0u64);
    for cycle in 0..cycles {
        let sock = dir.path().join(format!("c{cycle}.sock"));
        let mut d = daemon(Backend::Blkvm, &blockdev, &sock, true)?;
        let mut c = Client::connect(&sock)?;
        let mut unknown = vec![false; SIZE as usize];
        // Acknowledged writes waiting for a flush.
        let mut pending: Vec<(u64, Vec<u8>)> = Vec::new();
        let rounds = 1 + next(&mut rng) % 6;
        for round in 0..rounds {
            let writes: Vec<(u64, Vec<u8>)> = (0..8)
                .map(|k| {
                    // One region each: writes in flight together never overlap.
                    let region = SIZE / 8;
                    let off = k * region + next(&mut rng) % (region - 70_000) / 512 * 512;
                    let len = (1 + next(&mut rng) % 128) as usize * 512;
                    let tag = (cycle as u64 * 64 + round * 8 + k) as u8 | 1;
                    (off, vec![tag; len])
                })
                .collect();
            for (off, data) in &writes {
                unknown[*off as usize..*off as usize + data.len()].fill(true);
            }
            let last = round + 1 == rounds;
            if last {
                // Killed with these in flight (or just after).
                let mut bufs = writes.clone();
                for ((off, _), b) in writes.iter().zip(bufs.iter_mut()) {
                    let iov = vec![libc::iovec {
                        iov_base: b.1.as_mut_ptr().cast(),
                        iov_len: b.1.len(),
                    }];
                    // SAFETY: `bufs` lives until the client is dropped
                    // below, which ends every request.
                    let _ = c.queue.submit(unsafe { Request::write(*off, iov, false) });
                }
                // And a flush, so that some kills land in the middle of
                // a metadata checkpoint.
                let _ = c.queue.submit(Request::flush());
                c.queue.kick();
                std::thread::sleep(Duration::from_micros(next(&mut rng) % 3000));
                d.kill9();
                drop(c);
                drop(bufs);
                break;
            }
            c.write_all(&writes)?;
            pending.extend(writes);
            if next(&mut rng).is_multiple_of(2) {
                c.flush()?;
                for (off, data) in pending.drain(..) {
                    model[off as usize..off as usize + data.len()].copy_from_slice(&data);
                }
                unknown.fill(false);
            }
        }
        let (ok, n) = check_and_verify(dir.path(), &img, &mut model, &unknown, cycle)?;
        if ok {
            clean += 1;
        } else {
            leaky += 1;
        }
        verified += n;
    }
    eprintln!(
        "qcow2 kill -9 soak: {cycles} cycles, {clean} checks clean, {leaky} with leaks only, \
         {verified} flushed bytes verified"
    );
    Ok(())
}

/// `n` 4 KiB writes at random 4 KiB-aligned offsets of an image of `size`
/// bytes, one in each of `n` equal regions (so none overlap), tagged
/// `tag`: mostly inside clusters not yet allocated, so each allocates
/// one with copy-on-write on both sides.
fn spread_writes(rng: &mut u64, size: u64, n: u64, tag: u8) -> Vec<(u64, Vec<u8>)> {
    let region = size / n;
    (0..n)
        .map(|k| {
            let off = k * region + next(rng) % (region / 4096) * 4096;
            (off, vec![tag.wrapping_add(k as u8) | 1; 4096])
        })
        .collect()
}

#[test]
fn kill9_amid_many_allocating_writes_corrupts_nothing_and_keeps_flushed_ones() -> Result<()> {
    // Allocation is lazy as QEMU's: between flushes, L2 entries and
    // refcounts change only in the cache, and a checkpoint writes them in
    // the order refcounts, flush, L2 tables, flush. Here many allocating
    // writes are in flight when the daemon is killed, with a small L2
    // cache so that checkpoints happen among them too: the image must
    // stay free of corruption, keep every write a flush acknowledged,
    // and read zeroes around the writes in reused clusters (a killed
    // allocation leaves its data in a cluster whose refcount never
    // reached the disk; the next run hands it out again).
    let cycles: usize = std::env::var("QCOW2_ALLOC_KILL_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    const SIZE: u64 = 64 << 20;
    const GROUP: u64 = 32;
    let dir = tempfile::tempdir()?;
    let img = dir.path().join("alloc.qcow2").display().to_string();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=64k",
        &img,
        &SIZE.to_string(),
    ])?;
    let blockdev =
        format!("driver=qcow2,node-name=q0,l2-cache-size=16k,file.driver=file,file.filename={img}");
    let mut model = vec![0u8; SIZE as usize];
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let (mut clean, mut leaky, mut verified) = (0, 0, 0u64);
    for cycle in 0..cycles {
        let sock = dir.path().join(format!("a{cycle}.sock"));
        let mut d = daemon(Backend::Blkvm, &blockdev, &sock, true)?;
        let mut c = Client::connect(&sock)?;
        let mut unknown = vec![false; SIZE as usize];
        // Acknowledged, then flushed.
        for g in 0..4 {
            let tag = (cycle * 8 + g) as u8;
            let writes = spread_writes(&mut rng, SIZE, GROUP, tag);
            c.write_all(&writes)?;
            for (off, data) in &writes {
                model[*off as usize..*off as usize + data.len()].copy_from_slice(data);
            }
        }
        c.flush()?;
        // Acknowledged or in flight, never flushed, then a kill.
        let mut bufs = Vec::new();
        for g in 4..8 {
            let tag = (cycle * 8 + g) as u8;
            let writes = spread_writes(&mut rng, SIZE, GROUP, tag);
            for (off, data) in &writes {
                unknown[*off as usize..*off as usize + data.len()].fill(true);
            }
            if g < 6 {
                c.write_all(&writes)?;
                continue;
            }
            for (off, mut data) in writes {
                let iov = vec![libc::iovec {
                    iov_base: data.as_mut_ptr().cast(),
                    iov_len: data.len(),
                }];
                // SAFETY: the buffer moves into `bufs` (its heap block
                // stays put), which lives until the client is dropped
                // below, which ends every request.
                let _ = c.queue.submit(unsafe { Request::write(off, iov, false) });
                bufs.push(data);
            }
        }
        c.queue.kick();
        std::thread::sleep(Duration::from_micros(next(&mut rng) % 4000));
        d.kill9();
        drop(c);
        drop(bufs);
        let (ok, n) = check_and_verify(dir.path(), &img, &mut model, &unknown, cycle)?;
        if ok {
            clean += 1;
        } else {
            leaky += 1;
        }
        verified += n;
    }
    eprintln!(
        "qcow2 kill -9 amid allocating writes: {cycles} cycles, {clean} checks clean, \
         {leaky} with leaks only, {verified} bytes verified"
    );
    Ok(())
}
