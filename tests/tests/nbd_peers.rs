//! `blkvm storage-daemon`'s NBD server against real NBD clients: QEMU's
//! (`qemu-img info/convert/compare`, `qemu-io`) and libnbd's (`nbdinfo`,
//! `nbdcopy`, which opens several connections: multi-conn), over a unix
//! socket and TCP; a read-only export; and a hand-written client that
//! sends what no real client would (a bad magic, an oversized write, a
//! read past the end, a write to a read-only export, a request cut off by
//! a disconnect), after which the daemon still serves, and 200
//! connections after which its open fds are what they were.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context, Result};
use tests::files::run;
use tests::{Backend, StorageDaemon};

/// A 64 MiB image whose first 16 MiB are random.
fn image(dir: &Path, name: &str) -> Result<PathBuf> {
    tests::files::data_image(dir, name, 16, 64, 0x9e37_79b9_7f4a_7c15)
}

fn daemon(img: &Path, sock: &Path, writable: bool) -> Result<StorageDaemon> {
    StorageDaemon::start_with_args(
        Backend::Blkvm,
        [
            "--blockdev".to_string(),
            format!("file,node-name=f0,filename={}", img.display()),
            "--nbd-server".into(),
            format!("addr.type=unix,addr.path={}", sock.display()),
            "--export".into(),
            format!(
                "type=nbd,id=e0,node-name=f0,name=disk,description=test disk,writable={}",
                if writable { "on" } else { "off" }
            ),
        ],
    )
}

#[test]
fn qemu_and_libnbd_tools_read_write_convert_and_copy_through_our_export() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let img = image(dir.path(), "disk.img")?;
    let src = image(dir.path(), "src.img")?;
    let sock = dir.path().join("nbd.sock");
    let d = daemon(&img, &sock, true)?;
    let uri = format!("nbd+unix:///disk?socket={}", sock.display());

    let info = run(Command::new("qemu-img").args(["info", &uri]))?;
    ensure!(
        info.contains("64 MiB (67108864 bytes)"),
        "qemu-img info: {info}"
    );
    // qemu-io exits 0 even when a pattern does not match: read its words.
    let io = |cmds: &[&str]| -> Result<String> {
        let mut c = Command::new("qemu-io");
        c.args(["-f", "raw"]);
        for x in cmds {
            c.args(["-c", x]);
        }
        let out = c.arg(&uri).output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr))
    };
    let good = io(&["write -P 0xab 1M 64k", "read -P 0xab 1M 64k"])?;
    ensure!(
        good.contains("read 65536/65536") && !good.contains("verification failed"),
        "qemu-io write/read -P: {good}"
    );
    let bad = io(&["read -P 0xcd 1M 4k"])?;
    ensure!(
        bad.contains("Pattern verification failed"),
        "qemu-io read -P did not check: {bad}"
    );
    // Into the export and back out, through QEMU's client.
    let src_s = src.display().to_string();
    run(Command::new("qemu-img").args(["convert", "-n", "-f", "raw", "-O", "raw", &src_s, &uri]))?;
    run(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw", &src_s, &uri]))?;
    let back = dir.path().join("back.qcow2");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2", &uri])
        .arg(&back))?;
    run(Command::new("qemu-img")
        .args(["compare", &src_s])
        .arg(&back))?;

    // libnbd: the export list, and nbdcopy (several connections) both ways.
    let list =
        run(Command::new("nbdinfo")
            .args(["--list", &format!("nbd+unix://?socket={}", sock.display())]))?;
    for want in [
        "export=\"disk\"",
        "export-size: 67108864",
        "can_multi_conn: true",
        "test disk",
    ] {
        ensure!(list.contains(want), "nbdinfo --list lacks {want}:\n{list}");
    }
    let copy = dir.path().join("copy.img");
    run(Command::new("nbdcopy").arg(&uri).arg(&copy))?;
    ensure!(
        std::fs::read(&copy)? == std::fs::read(&src)?,
        "nbdcopy out differs"
    );
    let other = image(dir.path(), "other.img")?;
    // Different data: the first MiB of `other` reversed.
    let mut o = std::fs::read(&other)?;
    o[..1 << 20].reverse();
    std::fs::write(&other, &o)?;
    run(Command::new("nbdcopy").arg(&other).arg(&uri))?;
    drop(d);
    ensure!(
        std::fs::read(&img)? == o,
        "the image does not hold what nbdcopy wrote"
    );
    Ok(())
}

#[test]
fn a_read_only_export_over_tcp_refuses_writes() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let img = image(dir.path(), "disk.img")?;
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.port()
    };
    let _d = StorageDaemon::start_with_args(
        Backend::Blkvm,
        [
            "--blockdev".to_string(),
            format!("file,node-name=f0,filename={},read-only=on", img.display()),
            "--nbd-server".into(),
            format!("addr.type=inet,addr.host=127.0.0.1,addr.port={port}"),
            "--export".into(),
            "type=nbd,id=e0,node-name=f0".into(),
        ],
    )?;
    // The default name is the node name.
    let uri = format!("nbd://127.0.0.1:{port}/f0");
    let info = run(Command::new("nbdinfo").arg(&uri))?;
    ensure!(info.contains("is_read_only: true"), "{info}");
    run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&img)
        .arg(&uri))?;
    let w = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 1 0 4k", &uri])
        .output()?;
    let text =
        String::from_utf8_lossy(&w.stdout).into_owned() + &String::from_utf8_lossy(&w.stderr);
    ensure!(
        !w.status.success()
            || text.contains("failed")
            || text.contains("read-only")
            || text.contains("Operation not permitted"),
        "a write to the read-only export went through: {text}"
    );
    Ok(())
}

/// A minimal NBD client for what real clients do not send.
struct RawClient(UnixStream);

impl RawClient {
    /// Connects and negotiates `name` with NBD_OPT_GO; returns the size.
    fn connect(sock: &Path, name: &str) -> Result<(Self, u64)> {
        let mut s = UnixStream::connect(sock)?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
        let mut greet = [0u8; 18];
        s.read_exact(&mut greet)?;
        ensure!(&greet[..8] == b"NBDMAGIC" && &greet[8..16] == b"IHAVEOPT");
        s.write_all(&3u32.to_be_bytes())?;
        let mut opt = b"IHAVEOPT".to_vec();
        opt.extend_from_slice(&7u32.to_be_bytes());
        opt.extend_from_slice(&(4 + name.len() as u32 + 2).to_be_bytes());
        opt.extend_from_slice(&(name.len() as u32).to_be_bytes());
        opt.extend_from_slice(name.as_bytes());
        opt.extend_from_slice(&0u16.to_be_bytes());
        s.write_all(&opt)?;
        let mut size = 0;
        loop {
            let mut h = [0u8; 20];
            s.read_exact(&mut h)?;
            let kind = u32::from_be_bytes(h[12..16].try_into()?);
            let len = u32::from_be_bytes(h[16..20].try_into()?) as usize;
            let mut data = vec![0u8; len];
            s.read_exact(&mut data)?;
            match kind {
                1 => return Ok((RawClient(s), size)),
                3 if data.len() >= 10 && data[..2] == [0, 0] => {
                    size = u64::from_be_bytes(data[2..10].try_into()?)
                }
                3 => {}
                k => anyhow::bail!("OPT_GO refused: {k:#x} {}", String::from_utf8_lossy(&data)),
            }
        }
    }

    fn request(
        &mut self,
        kind: u16,
        cookie: u64,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> Result<()> {
        let mut r = 0x2560_9513u32.to_be_bytes().to_vec();
        r.extend_from_slice(&0u16.to_be_bytes());
        r.extend_from_slice(&kind.to_be_bytes());
        r.extend_from_slice(&cookie.to_be_bytes());
        r.extend_from_slice(&offset.to_be_bytes());
        r.extend_from_slice(&len.to_be_bytes());
        r.extend_from_slice(payload);
        self.0.write_all(&r)?;
        Ok(())
    }

    /// A simple reply: (error, cookie), then `data` bytes of payload.
    fn reply(&mut self, data: usize) -> Result<(u32, u64, Vec<u8>)> {
        let mut h = [0u8; 16];
        self.0.read_exact(&mut h)?;
        ensure!(h[..4] == 0x6744_6698u32.to_be_bytes(), "bad reply magic");
        let error = u32::from_be_bytes(h[4..8].try_into()?);
        let cookie = u64::from_be_bytes(h[8..16].try_into()?);
        let mut d = vec![0u8; if error == 0 { data } else { 0 }];
        self.0.read_exact(&mut d)?;
        Ok((error, cookie, d))
    }

    /// Whether the server closed the connection.
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.0.read(&mut b), Ok(0) | Err(_))
    }
}

fn open_fds(pid: u32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

#[test]
fn bad_requests_get_errors_or_the_door_and_the_server_goes_on() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let img = image(dir.path(), "disk.img")?;
    let before = std::fs::read(&img)?;
    let sock = dir.path().join("nbd.sock");
    let d = daemon(&img, &sock, false)?;

    // An unknown export is refused with an error reply, not a hang.
    ensure!(RawClient::connect(&sock, "nope").is_err());

    let (mut c, size) = RawClient::connect(&sock, "disk")?;
    ensure!(size == 64 << 20, "size {size}");
    // A read: the image's first 4 KiB.
    c.request(0, 1, 0, 4096, &[])?;
    let (e, cookie, data) = c.reply(4096)?;
    ensure!(
        e == 0 && cookie == 1 && data == before[..4096],
        "read: error {e}"
    );
    // Past the end: EINVAL; a write to the read-only export: EPERM (its
    // payload is consumed, the stream stays in step); an unknown command:
    // EINVAL.
    c.request(0, 2, (64 << 20) - 512, 4096, &[])?;
    ensure!(c.reply(0)?.0 == 22, "read past the end not EINVAL");
    c.request(1, 3, 0, 512, &[0x55; 512])?;
    ensure!(c.reply(0)?.0 == 1, "write to a read-only export not EPERM");
    c.request(99, 4, 0, 0, &[])?;
    ensure!(c.reply(0)?.0 == 22, "unknown command not EINVAL");
    c.request(0, 5, 8192, 512, &[])?;
    let (e, cookie, data) = c.reply(512)?;
    ensure!(
        e == 0 && cookie == 5 && data == before[8192..8704],
        "read after errors"
    );
    // BLOCK_STATUS without base:allocation negotiated: EINVAL.
    c.request(7, 9, 0, 4096, &[])?;
    ensure!(c.reply(0)?.0 == 22, "unnegotiated BLOCK_STATUS not EINVAL");
    // A bad magic ends the connection.
    c.0.write_all(&[0xde; 28])?;
    ensure!(c.closed(), "garbage did not end the connection");

    // An oversized write header ends its connection too.
    let (mut c, _) = RawClient::connect(&sock, "disk")?;
    c.request(1, 6, 0, 64 << 20, &[])?;
    ensure!(c.closed(), "a 64 MiB write was not refused");
    // A request cut off by a disconnect.
    let (mut c, _) = RawClient::connect(&sock, "disk")?;
    c.0.write_all(&0x2560_9513u32.to_be_bytes())?;
    drop(c);

    // A client that asks for 16 x 32 MiB and reads nothing holds at most
    // the server's backlog (64 MiB of READ data) plus what is being sent,
    // not 512 MiB.
    let (mut c, _) = RawClient::connect(&sock, "disk")?;
    for i in 0..16u64 {
        c.request(0, 100 + i, 0, 32 << 20, &[])?;
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    let rss_kib: u64 = std::fs::read_to_string(format!("/proc/{}/status", d.pid()))?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS")?;
    ensure!(
        rss_kib < 320 << 10,
        "the daemon holds {rss_kib} KiB for a client that does not read"
    );
    drop(c);

    // The server goes on; 200 connections later its fds are back.
    let (mut c, _) = RawClient::connect(&sock, "disk")?;
    c.request(2, 0, 0, 0, &[])?; // DISC
    drop(c);
    std::thread::sleep(std::time::Duration::from_millis(200));
    let fds = open_fds(d.pid())?;
    for i in 0..200u64 {
        let (mut c, _) = RawClient::connect(&sock, "disk")?;
        c.request(0, i, i * 4096, 4096, &[])?;
        let (e, cookie, data) = c.reply(4096)?;
        let at = (i * 4096) as usize;
        ensure!(
            e == 0 && cookie == i && data == before[at..at + 4096],
            "read {i}"
        );
        c.request(2, 0, 0, 0, &[])?;
        ensure!(c.closed(), "DISC did not end connection {i}");
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    // One more accept reaps the last connection's spent worker.
    let (c, _) = RawClient::connect(&sock, "disk")?;
    drop(c);
    std::thread::sleep(std::time::Duration::from_millis(200));
    let after = open_fds(d.pid())?;
    ensure!(
        after <= fds,
        "open fds went from {fds} to {after} over 200 connections"
    );
    drop(d);
    ensure!(
        std::fs::read(&img)? == before,
        "the read-only image changed"
    );
    Ok(())
}

/// `base:allocation` over structured replies: `qemu-img map` through our
/// export shows the image's holes and data where `qemu-img map` of the
/// file itself does, and `nbdinfo --map` agrees.
#[test]
fn block_status_maps_the_images_holes() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let img = dir.path().join("sparse.img");
    std::fs::File::create(&img)?.set_len(64 << 20)?;
    // Data at 8-10 MiB and 40-41 MiB; holes elsewhere.
    for (at, mib) in [(8u64, 2usize), (40, 1)] {
        let f = std::fs::File::options().write(true).open(&img)?;
        std::os::unix::fs::FileExt::write_all_at(&f, &vec![0x5a; mib << 20], at << 20)?;
    }
    let sock = dir.path().join("nbd.sock");
    let _d = daemon(&img, &sock, false)?;
    let uri = format!("nbd+unix:///disk?socket={}", sock.display());
    let map = |target: &str| -> Result<Vec<(u64, u64, bool)>> {
        let out =
            run(Command::new("qemu-img").args(["map", "-f", "raw", "--output=json", target]))?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        Ok(v.as_array()
            .context("qemu-img map: not a list")?
            .iter()
            .map(|e| {
                (
                    e["start"].as_u64().unwrap_or(0),
                    e["length"].as_u64().unwrap_or(0),
                    e["data"].as_bool().unwrap_or(true),
                )
            })
            .collect())
    };
    let over_nbd = map(&uri)?;
    let direct = map(&img.display().to_string())?;
    ensure!(
        over_nbd == direct,
        "qemu-img map over NBD {over_nbd:?}\n  of the file {direct:?}"
    );
    ensure!(
        over_nbd.contains(&(8 << 20, 2 << 20, true)) && over_nbd.iter().any(|e| !e.2),
        "no holes or no data seen: {over_nbd:?}"
    );
    let nbd_map = run(Command::new("nbdinfo").args(["--map", &uri]))?;
    ensure!(
        nbd_map.contains("hole,zero") && nbd_map.contains("data"),
        "nbdinfo --map: {nbd_map}"
    );
    Ok(())
}

/// fio's `nbd` engine (libnbd) writes 16 MiB of random 4 KiB blocks at
/// iodepth 16 with crc32c checksums and reads them back verified.
#[test]
fn fio_nbd_engine_writes_and_verifies() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let img = dir.path().join("disk.img");
    std::fs::File::create(&img)?.set_len(64 << 20)?;
    let sock = dir.path().join("nbd.sock");
    let _d = daemon(&img, &sock, true)?;
    let out = run(Command::new("fio").args([
        "--name=verify",
        "--ioengine=nbd",
        &format!("--uri=nbd+unix:///disk?socket={}", sock.display()),
        "--rw=randwrite",
        "--bs=4k",
        "--size=16M",
        "--iodepth=16",
        "--verify=crc32c",
        "--do_verify=1",
        // No verify state file left in the working directory.
        "--verify_state_save=0",
        "--output-format=json",
    ]))?;
    let json = &out[out.find('{').context("no JSON from fio")?..];
    let v: serde_json::Value = serde_json::from_str(json)?;
    let job = &v["jobs"][0];
    ensure!(job["error"] == 0, "fio error: {}", job["error"]);
    ensure!(
        job["write"]["io_bytes"].as_u64() == Some(16 << 20)
            && job["read"]["io_bytes"].as_u64() == Some(16 << 20),
        "fio wrote {} and verified {} bytes",
        job["write"]["io_bytes"],
        job["read"]["io_bytes"]
    );
    Ok(())
}

/// Runs qemu-io with `cmds` and QEMU's NBD client trace; returns stdout
/// and stderr (the trace) together. qemu-io exits 0 even when a command
/// fails: callers read its words.
fn qemu_io_traced(pre: &[&str], target: &str, cmds: &[&str]) -> Result<String> {
    let mut c = Command::new("qemu-io");
    c.args(pre).args(["--trace", "nbd_*"]);
    for x in cmds {
        c.args(["-c", x]);
    }
    let out = c.arg(target).output()?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
}

/// QEMU 8.2+ negotiates NBD_OPT_EXTENDED_HEADERS with our server (its
/// trace shows the option acknowledged), then writes, reads, zeroes with
/// NBD_CMD_FLAG_FAST_ZERO and maps the export over 32-byte requests and
/// extended reply chunks (block status as BLOCK_STATUS_EXT).
#[test]
fn qemu_negotiates_extended_headers_and_reads_writes_zeroes_and_maps() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let img = image(dir.path(), "disk.img")?;
    let sock = dir.path().join("nbd.sock");
    let _d = daemon(&img, &sock, true)?;
    let uri = format!("nbd+unix:///disk?socket={}", sock.display());
    let out = qemu_io_traced(
        &["-f", "raw"],
        &uri,
        &[
            "write -P 0x3c 32M 1M",
            "read -P 0x3c 32M 1M",
            // FAST_ZERO (-n) and NO_HOLE: a file zeroes a range with one
            // fallocate, so the fast zero is served.
            "write -z -n 32M 256k",
            "read -P 0 32M 256k",
            "read -P 0x3c 33024k 768k",
        ],
    )?;
    for want in [
        "option request 11 (extended headers)",
        "option reply 11 (extended headers), type 1 (ack)",
        "flags = 0x1, type = 0 (none)",
        "read 262144/262144 bytes at offset 33554432",
        "read 786432/786432 bytes at offset 33816576",
    ] {
        ensure!(out.contains(want), "qemu-io lacks {want:?}:\n{out}");
    }
    ensure!(!out.contains("failed"), "a qemu-io command failed:\n{out}");
    // The flags QEMU saw: FAST_ZERO and DF on offer.
    let flags = out
        .lines()
        .find_map(|l| l.split("export flags 0x").nth(1))
        .and_then(|f| u16::from_str_radix(f.trim(), 16).ok())
        .context("no export flags in the trace")?;
    ensure!(
        flags & (1 << 11) != 0 && flags & (1 << 7) != 0,
        "flags {flags:#x}"
    );
    // Block status over extended headers: 64-bit descriptors.
    let map = Command::new("qemu-img")
        .args(["--trace", "nbd_*", "map", "-f", "raw", "--output=json"])
        .arg(&uri)
        .output()?;
    let trace = String::from_utf8_lossy(&map.stderr);
    ensure!(
        map.status.success() && trace.contains("type = 6"),
        "qemu-img map did not get BLOCK_STATUS_EXT:\n{trace}"
    );
    Ok(())
}

/// Unmounts a ramfs when dropped.
struct Ramfs(PathBuf);

impl Ramfs {
    /// ramfs has no fallocate at all: a file there cannot zero a range
    /// but by writing zeroes (this needs root, as the tests have).
    fn mount(at: &Path) -> Result<Self> {
        std::fs::create_dir_all(at)?;
        run(Command::new("mount")
            .args(["-t", "ramfs", "blkvm-test"])
            .arg(at))
        .context("mounting a ramfs (the fast-zero test needs root)")?;
        Ok(Ramfs(at.to_path_buf()))
    }
}

impl Drop for Ramfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// NBD_CMD_FLAG_FAST_ZERO where zeroing is not fast: a file on ramfs
/// (no fallocate) refuses the fast zero at once with ENOTSUP, and zeroes
/// the same range by hand when the client allows it.
#[test]
fn fast_zero_is_refused_where_the_node_would_zero_by_hand() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ram = Ramfs::mount(&dir.path().join("ram"))?;
    let img = image(&ram.0, "disk.img")?;
    let sock = dir.path().join("nbd.sock");
    let d = daemon(&img, &sock, true)?;
    let uri = format!("nbd+unix:///disk?socket={}", sock.display());
    let out = qemu_io_traced(
        &["-f", "raw"],
        &uri,
        &[
            "write -z -n 0 64k",
            "read -v 0 16",
            "write -z 0 64k",
            "read -P 0 0 64k",
        ],
    )?;
    ensure!(
        out.contains("Operation not supported"),
        "the fast zero was not refused:\n{out}"
    );
    ensure!(
        out.contains("read 65536/65536 bytes at offset 0")
            && !out.contains("Pattern verification failed"),
        "the slow zero did not zero:\n{out}"
    );
    drop(d);
    drop(ram);
    Ok(())
}

/// The TLS server (`tls-creds`): QEMU's client and libnbd's start TLS and
/// read, write and copy through it (QEMU with extended headers, over
/// TLS); a client without TLS is refused naming TLS; a client without a
/// certificate fails the handshake (verify-peer is on by default).
#[test]
fn tls_clients_are_served_and_others_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = dir.path().join("pki");
    let anon = dir.path().join("anon");
    std::fs::create_dir_all(&pki)?;
    tests::tls::make_certs(&pki, &anon)?;
    let img = image(dir.path(), "disk.img")?;
    let src = image(dir.path(), "src.img")?;
    let sock = dir.path().join("nbd.sock");
    let _d = tests::tls::tls_daemon(
        &img,
        &pki,
        &format!("addr.type=unix,addr.path={}", sock.display()),
    )?;

    // QEMU's client: a unix socket needs tls-hostname to check the name.
    let creds = format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=client",
        pki.display()
    );
    let target = format!(
        "driver=nbd,server.type=unix,server.path={},export=disk,tls-creds=tls0,tls-hostname=localhost",
        sock.display()
    );
    let out = qemu_io_traced(
        &["--object", &creds, "--image-opts"],
        &target,
        &["write -P 0x77 8M 2M", "read -P 0x77 8M 2M"],
    )?;
    for want in [
        "option reply 5 (starttls), type 1 (ack)",
        "option reply 11 (extended headers), type 1 (ack)",
        "read 2097152/2097152 bytes at offset 8388608",
    ] {
        ensure!(
            out.contains(want),
            "qemu-io over TLS lacks {want:?}:\n{out}"
        );
    }
    ensure!(!out.contains("failed"), "qemu-io over TLS:\n{out}");
    // A whole image in and out: 64 MiB through the TLS stream both ways.
    run(Command::new("qemu-img")
        .args(["convert", "-n", "--object", &creds, "-f", "raw"])
        .arg(&src)
        .args(["--target-image-opts", &target]))?;
    let tls_uri = format!(
        "nbds+unix:///disk?socket={}&tls-certificates={}",
        sock.display(),
        pki.display()
    );
    let back = dir.path().join("back.img");
    run(Command::new("nbdcopy").arg(&tls_uri).arg(&back))?;
    ensure!(
        std::fs::read(&back)? == std::fs::read(&src)?,
        "what came back over TLS differs"
    );
    let info = run(Command::new("nbdinfo").arg(&tls_uri))?;
    ensure!(
        info.contains("with TLS") && info.contains("can_fast_zero: true"),
        "nbdinfo over TLS: {info}"
    );

    // Without TLS: refused, and the error says why.
    let plain = Command::new("qemu-img")
        .args([
            "info",
            &format!("nbd+unix:///disk?socket={}", sock.display()),
        ])
        .output()?;
    let text = String::from_utf8_lossy(&plain.stderr);
    ensure!(
        !plain.status.success() && text.contains("TLS"),
        "a plain client was not refused for TLS: {text}"
    );
    // A client with the CA but no certificate of its own.
    let anon_uri = format!(
        "nbds+unix:///disk?socket={}&tls-certificates={}",
        sock.display(),
        anon.display()
    );
    ensure!(
        !Command::new("nbdinfo")
            .arg(&anon_uri)
            .output()?
            .status
            .success(),
        "a client without a certificate was served"
    );
    // The server goes on.
    run(Command::new("nbdinfo").arg(&tls_uri))?;
    Ok(())
}

/// TLS over TCP, where QEMU checks the certificate against the host it
/// connects to (the certificate names 127.0.0.1).
#[test]
fn tls_over_tcp_checks_the_server_name() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = dir.path().join("pki");
    std::fs::create_dir_all(&pki)?;
    tests::tls::make_certs(&pki, &dir.path().join("anon"))?;
    let img = image(dir.path(), "disk.img")?;
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.port()
    };
    let _d = tests::tls::tls_daemon(
        &img,
        &pki,
        &format!("addr.type=inet,addr.host=127.0.0.1,addr.port={port}"),
    )?;
    let creds = format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=client",
        pki.display()
    );
    let target = format!(
        "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export=disk,tls-creds=tls0"
    );
    run(Command::new("qemu-img")
        .args(["compare", "--object", &creds, "--image-opts"])
        .arg(format!(
            "driver=raw,file.driver=file,file.filename={}",
            img.display()
        ))
        .arg(&target))?;
    Ok(())
}

/// Bad TLS input: STARTTLS with a payload, then bytes that are not a TLS
/// handshake after STARTTLS is acknowledged, each end their own
/// connection while a good client is still served.
#[test]
fn garbage_where_tls_is_due_ends_only_that_connection() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = dir.path().join("pki");
    std::fs::create_dir_all(&pki)?;
    tests::tls::make_certs(&pki, &dir.path().join("anon"))?;
    let img = image(dir.path(), "disk.img")?;
    let sock = dir.path().join("nbd.sock");
    let _d = tests::tls::tls_daemon(
        &img,
        &pki,
        &format!("addr.type=unix,addr.path={}", sock.display()),
    )?;
    let option = |s: &mut UnixStream, opt: u32, data: &[u8]| -> Result<(u32, Vec<u8>)> {
        let mut o = b"IHAVEOPT".to_vec();
        o.extend_from_slice(&opt.to_be_bytes());
        o.extend_from_slice(&(data.len() as u32).to_be_bytes());
        o.extend_from_slice(data);
        s.write_all(&o)?;
        let mut h = [0u8; 20];
        s.read_exact(&mut h)?;
        let mut d = vec![0u8; u32::from_be_bytes(h[16..20].try_into()?) as usize];
        s.read_exact(&mut d)?;
        Ok((u32::from_be_bytes(h[12..16].try_into()?), d))
    };
    let greet = |s: &mut UnixStream| -> Result<()> {
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
        let mut g = [0u8; 18];
        s.read_exact(&mut g)?;
        s.write_all(&3u32.to_be_bytes())?;
        Ok(())
    };
    const STARTTLS: u32 = 5;
    const TLS_REQD: u32 = (1 << 31) | 5;
    // Any option but STARTTLS first: NBD_REP_ERR_TLS_REQD.
    let mut s = UnixStream::connect(&sock)?;
    greet(&mut s)?;
    let (reply, msg) = option(&mut s, 3, &[])?;
    ensure!(
        reply == TLS_REQD,
        "LIST before TLS: {reply:#x} {}",
        String::from_utf8_lossy(&msg)
    );
    // STARTTLS with a payload: refused, then the door.
    let (reply, _) = option(&mut s, STARTTLS, b"junk")?;
    ensure!(reply == (1 << 31) | 3, "STARTTLS with data: {reply:#x}");
    let mut b = [0u8; 1];
    ensure!(matches!(s.read(&mut b), Ok(0) | Err(_)), "not dropped");
    // Acknowledged, then garbage instead of a ClientHello.
    let mut s = UnixStream::connect(&sock)?;
    greet(&mut s)?;
    let (reply, _) = option(&mut s, STARTTLS, &[])?;
    ensure!(reply == 1, "STARTTLS not acknowledged: {reply:#x}");
    // The server may hang up after the first bytes: a failed write is
    // what it should do, not a failure of the test.
    let _ = s.write_all(&[0x16, 3, 1, 0xff, 0xff, 0xde, 0xad, 0xbe, 0xef]);
    let _ = s.write_all(&[0u8; 512]);
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    // The server goes on.
    let tls_uri = format!(
        "nbds+unix:///disk?socket={}&tls-certificates={}",
        sock.display(),
        pki.display()
    );
    run(Command::new("nbdinfo").arg(&tls_uri))?;
    Ok(())
}

/// A `tls-creds-x509` directory without the server's key: the daemon
/// does not start, and says which file is missing.
#[test]
fn a_bad_certificate_directory_names_the_missing_file() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = dir.path().join("pki");
    std::fs::create_dir_all(&pki)?;
    tests::tls::make_certs(&pki, &dir.path().join("anon"))?;
    std::fs::remove_file(pki.join("server-key.pem"))?;
    let img = image(dir.path(), "disk.img")?;
    let sock = dir.path().join("nbd.sock");
    let e = match tests::tls::tls_daemon(
        &img,
        &pki,
        &format!("addr.type=unix,addr.path={}", sock.display()),
    ) {
        Ok(_) => anyhow::bail!("the daemon started without server-key.pem"),
        Err(e) => format!("{e:#}"),
    };
    ensure!(
        e.contains(&format!(
            "Unable to access credentials {}",
            pki.join("server-key.pem").display()
        )),
        "{e}"
    );
    Ok(())
}
