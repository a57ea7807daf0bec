//! Soaks of `blkvm storage-daemon` at a size CI affords; the scripts in
//! `resources/soak/` run them at full size (environment variables below)
//! and print the same figures.
//!
//! - QMP churn (`BLKVM_SOAK_QMP`, default 100; full 1000): connections,
//!   each with valid and invalid commands (bad JSON, unknown commands,
//!   missing and wrong arguments) whose answers are checked, and a
//!   `blockdev-add`/`block-export-add`/`-del` cycle; the daemon's fds and
//!   RSS after the last connection are within 5% of after the first.
//! - kill -9 (`BLKVM_SOAK_KILLS`, default 10; full 100): a writer through
//!   our `nbd` client records each flush the daemon acknowledged; the
//!   daemon is killed at a random moment, restarted on the same image,
//!   and every write before an acknowledged flush must be there.

#[path = "../../block/tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use block::{BlockGraph, RequestError, RequestOp};
use common::Disk;
use serde_json::{json, Value};
use tests::qmp_client::Qmp;
use tests::{Backend, StorageDaemon};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn fds(pid: u32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

/// What each open fd of `pid` is (its /proc link), for a failure message.
fn fd_list(pid: u32) -> String {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return String::new();
    };
    let mut v: Vec<String> = dir
        .flatten()
        .map(|e| {
            let target = std::fs::read_link(e.path()).unwrap_or_default();
            format!("{}->{}", e.file_name().to_string_lossy(), target.display())
        })
        .collect();
    v.sort();
    let mut threads: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.flatten()
                .map(|t| {
                    let read =
                        |f: &str| std::fs::read_to_string(t.path().join(f)).unwrap_or_default();
                    format!("{}({})", read("comm").trim(), read("wchan").trim())
                })
                .collect()
        })
        .unwrap_or_default();
    threads.sort();
    format!("{}; threads: {}", v.join(" "), threads.join(" "))
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .context("VmRSS")?;
    Ok(kb.trim().trim_end_matches("kB").trim().parse()?)
}

/// A small deterministic generator (no dependency for randomness).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn class(reply: &Value) -> Option<&str> {
    reply["error"]["class"].as_str()
}

/// One QMP session: checks every answer.
fn qmp_session(path: &Path, dir: &Path, i: usize, rng: &mut Rng) -> Result<()> {
    let mut q = Qmp::connect(path)?;
    for _ in 0..6 {
        match rng.below(7) {
            0 => {
                let v = q.execute("query-named-block-nodes", json!({}))?;
                ensure!(
                    v.as_array()
                        .is_some_and(|a| a.iter().any(|n| n["node-name"] == "n0")),
                    "{v}"
                );
            }
            1 => {
                let v = q.execute("query-block-exports", json!({}))?;
                ensure!(
                    v.as_array()
                        .is_some_and(|a| a.iter().any(|e| e["id"] == "e0")),
                    "{v}"
                );
            }
            2 => {
                let r = q.raw("{\"execute\": \"query-version\", oops}")?;
                ensure!(class(&r) == Some("GenericError"), "bad JSON: {r}");
            }
            3 => {
                let r = q.raw(&json!({"execute": format!("no-such-{i}")}).to_string())?;
                ensure!(class(&r) == Some("CommandNotFound"), "{r}");
            }
            4 => {
                let r = q.raw(&json!({"execute": "blockdev-del"}).to_string())?;
                ensure!(class(&r) == Some("GenericError"), "missing argument: {r}");
            }
            5 => {
                let r = q.raw(
                    &json!({"execute": "block_resize", "arguments": {"node-name": 5, "size": 1}})
                        .to_string(),
                )?;
                ensure!(class(&r) == Some("GenericError"), "wrong type: {r}");
            }
            _ => {
                let v = q.execute("query-version", json!({}))?;
                ensure!(v["qemu"]["major"].is_u64(), "{v}");
            }
        }
    }
    // A node and an export come and go.
    let node = format!("t{i}");
    q.execute(
        "blockdev-add",
        json!({"driver": "null-co", "node-name": node, "size": 1048576}),
    )?;
    let sock = dir.join(format!("x{}.sock", i % 4));
    q.execute(
        "block-export-add",
        json!({"type": "vhost-user-blk", "id": format!("x{i}"), "node-name": node,
               "addr": {"type": "unix", "path": sock.display().to_string()}}),
    )?;
    let r =
        q.raw(&json!({"execute": "blockdev-del", "arguments": {"node-name": node}}).to_string())?;
    ensure!(
        class(&r) == Some("GenericError"),
        "deleting a node in use: {r}"
    );
    q.execute("block-export-del", json!({"id": format!("x{i}")}))?;
    q.event("BLOCK_EXPORT_DELETED")?;
    q.execute("blockdev-del", json!({"node-name": node}))?;
    Ok(())
}

#[test]
fn qmp_churn_answers_right_and_leaks_nothing() -> Result<()> {
    let n = env("BLKVM_SOAK_QMP", 100);
    let dir = tempfile::tempdir()?;
    let qmp = dir.path().join("qmp.sock");
    let d = StorageDaemon::start_with_args(
        Backend::Blkvm,
        [
            "--blockdev".to_string(),
            "null-co,node-name=n0".into(),
            "--export".into(),
            format!(
                "vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path={}",
                dir.path().join("e0.sock").display()
            ),
            "--qmp".into(),
            format!("unix:{},server=on,wait=off", qmp.display()),
        ],
    )?;
    let pid = d.pid();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let start = Instant::now();
    // The baseline: after the first sessions (the allocator's per-thread
    // arenas and the thread stacks it keeps come in the first few), once
    // the last one's socket is closed (the fd count holds still for
    // 300 ms).
    let warm = 10.min(n);
    for i in 0..warm {
        qmp_session(&qmp, dir.path(), i, &mut rng)?;
    }
    let mut fd0 = fds(pid)?;
    let mut still = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(5);
    while still.elapsed() < Duration::from_millis(300) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        let n = fds(pid)?;
        if n != fd0 {
            fd0 = n;
            still = Instant::now();
        }
    }
    let rss0 = rss_kib(pid)?;
    for i in warm..n {
        qmp_session(&qmp, dir.path(), i, &mut rng).with_context(|| format!("session {i}"))?;
    }
    // The daemon closes the last session's socket when it sees the
    // hang-up: wait for that (up to 5 s) rather than a fixed time.
    let deadline = Instant::now() + Duration::from_secs(5);
    while fds(pid)? != fd0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let (fd1, rss1) = (fds(pid)?, rss_kib(pid)?);
    eprintln!(
        "QMP churn: {n} sessions in {:?}; fds {fd0} -> {fd1}, RSS {rss0} -> {rss1} KiB",
        start.elapsed()
    );
    ensure!(fd1 == fd0, "fds went from {fd0} to {fd1}: {}", fd_list(pid));
    ensure!(
        rss1 <= rss0 + rss0 / 20,
        "RSS went from {rss0} to {rss1} KiB"
    );
    Ok(())
}

/// The daemon serving `img` over NBD on `sock`.
fn nbd_daemon(img: &Path, sock: &Path) -> Result<StorageDaemon> {
    StorageDaemon::start_with_args(
        Backend::Blkvm,
        [
            "--blockdev".to_string(),
            format!("file,node-name=f0,filename={}", img.display()),
            "--nbd-server".into(),
            format!("addr.type=unix,addr.path={}", sock.display()),
            "--export".into(),
            "type=nbd,id=e0,node-name=f0,name=disk,writable=on".into(),
        ],
    )
}

/// Block `i`'s contents in cycle `c`.
fn block_data(c: usize, i: u64) -> Vec<u8> {
    let mut v = vec![0u8; 4096];
    for (k, b) in v.iter_mut().enumerate() {
        *b = (c as u64 * 131 + i * 7 + k as u64 / 8) as u8 | 1;
    }
    v[..8].copy_from_slice(&i.to_le_bytes());
    v
}

const BLOCKS: u64 = 8192;

#[test]
fn kill_9_loses_no_acknowledged_write() -> Result<()> {
    let kills = env("BLKVM_SOAK_KILLS", 10);
    let dir = tempfile::tempdir()?;
    let img = dir.path().join("disk.img");
    std::fs::File::create(&img)?.set_len(BLOCKS * 4096)?;
    let sock = dir.path().join("nbd.sock");
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let mut total_acked = 0u64;
    for c in 0..kills {
        let mut d = nbd_daemon(&img, &sock)?;
        let (g, n) = {
            let mut g = BlockGraph::new();
            let arg = format!(
                "nbd,node-name=c0,server.type=unix,server.path={},export=disk",
                sock.display()
            );
            let n = g.add(&qapi::parse_blockdev(&arg)?)?;
            (g, n)
        };
        let writer = std::thread::spawn(move || -> u64 {
            let mut disk = Disk::new(g, n);
            let mut acked = 0u64;
            for i in 0..BLOCKS {
                if disk.write(i * 4096, &block_data(c, i)).is_err() {
                    break;
                }
                if i % 8 == 7 {
                    match disk.op(RequestOp::Flush, 0, 0) {
                        Ok(_) => acked = i + 1,
                        Err(RequestError::Os(_)) | Err(_) => break,
                    }
                }
            }
            acked
        });
        std::thread::sleep(Duration::from_millis(50 + rng.below(400)));
        d.kill9();
        let acked = writer.join().expect("writer");
        total_acked += acked;
        // What a flush acknowledged is in the image.
        let image = std::fs::read(&img)?;
        for i in 0..acked {
            let at = (i * 4096) as usize;
            ensure!(
                image[at..at + 4096] == block_data(c, i)[..],
                "cycle {c}: block {i} of {acked} acknowledged is not in the image"
            );
        }
        let _ = std::fs::remove_file(&sock);
    }
    eprintln!("kill -9: {kills} kills, {total_acked} acknowledged writes verified");
    ensure!(total_acked > 0, "no flush was ever acknowledged");
    Ok(())
}
