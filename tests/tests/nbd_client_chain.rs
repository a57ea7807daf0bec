//! The `nbd` client driver inside `blkvm storage-daemon`: a chain
//! qemu-img → our NBD server → our `nbd` node → qemu-nbd → image, with
//! data checked by `qemu-img compare` on both ends and `nbdcopy`; and
//! `blkvm bench` (mixed reads and writes at iodepth 16) through an `nbd`
//! node against our own NBD export.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use tests::files::run;
use tests::{Backend, StorageDaemon};

/// A 32 MiB image: 8 MiB of random bytes, then a hole.
fn image(dir: &Path, name: &str, seed: u64) -> Result<PathBuf> {
    tests::files::data_image(dir, name, 8, 32, seed)
}

/// qemu-nbd serving `img` as export `back` on `sock`, killed on drop.
struct QemuNbd(Child);

impl QemuNbd {
    fn start(img: &Path, sock: &Path) -> Result<Self> {
        let child = Command::new("qemu-nbd")
            .arg(format!("--socket={}", sock.display()))
            .args([
                "--format=raw",
                "--export-name=back",
                "--persistent",
                "--shared=4",
            ])
            .arg(img)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawn qemu-nbd")?;
        let q = QemuNbd(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(sock).is_err() {
            ensure!(Instant::now() < deadline, "qemu-nbd did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(q)
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn qemu_img_through_our_server_and_our_client_to_qemu_nbd() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let back = image(dir.path(), "back.img", 7)?;
    let src = image(dir.path(), "src.img", 99)?;
    let back_sock = dir.path().join("back.sock");
    let front_sock = dir.path().join("front.sock");
    let _q = QemuNbd::start(&back, &back_sock)?;
    let d = StorageDaemon::start_with_args(
        Backend::Blkvm,
        [
            "--blockdev".to_string(),
            format!(
                "driver=nbd,node-name=n0,server.type=unix,server.path={},export=back",
                back_sock.display()
            ),
            "--nbd-server".into(),
            format!("addr.type=unix,addr.path={}", front_sock.display()),
            "--export".into(),
            "type=nbd,id=e0,node-name=n0,name=front,writable=on".into(),
        ],
    )?;
    let uri = format!("nbd+unix:///front?socket={}", front_sock.display());
    let info = run(Command::new("qemu-img").args(["info", "--output=json", &uri]))?;
    ensure!(info.contains("\"virtual-size\": 33554432"), "{info}");
    // What qemu-nbd serves, seen through two hops, equals the image.
    run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&back)
        .arg(&uri))?;
    // Writes go all the way down.
    let src_s = src.display().to_string();
    run(Command::new("qemu-img").args(["convert", "-n", "-f", "raw", "-O", "raw", &src_s, &uri]))?;
    run(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw", &src_s, &uri]))?;
    // One connection: each connection to our server opens a queue of the
    // client node, and a second needs multi-conn from qemu-nbd.
    let copy = dir.path().join("copy.img");
    run(Command::new("nbdcopy")
        .args(["--connections=1", &uri])
        .arg(&copy))?;
    drop(d);
    ensure!(
        std::fs::read(&back)? == std::fs::read(&src)?,
        "the image behind qemu-nbd does not hold what was written"
    );
    ensure!(
        std::fs::read(&copy)? == std::fs::read(&src)?,
        "nbdcopy out differs"
    );
    Ok(())
}

#[test]
fn bench_through_an_nbd_node_against_our_export() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let img = image(dir.path(), "disk.img", 3)?;
    let sock = dir.path().join("nbd.sock");
    let _d = StorageDaemon::start_with_args(
        Backend::Blkvm,
        [
            "--blockdev".to_string(),
            format!("file,node-name=f0,filename={}", img.display()),
            "--object".into(),
            "iothread,id=io0".into(),
            "--nbd-server".into(),
            format!("addr.type=unix,addr.path={}", sock.display()),
            "--export".into(),
            "type=nbd,id=e0,node-name=f0,name=disk,writable=on,iothread=io0".into(),
        ],
    )?;
    let blkvm = tests::blkvm_binary()?;
    let out = run(Command::new(&blkvm).args([
        "bench",
        "--blockdev",
        &format!(
            "driver=nbd,server.type=unix,server.path={},export=disk",
            sock.display()
        ),
        "--rw",
        "randrw",
        "--bs",
        "4k",
        "--iodepth",
        "16",
        "--runtime",
        "1",
        "--json",
    ]))?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    ensure!(v["driver"] == "nbd", "{out}");
    let ios = v["ios"].as_u64().unwrap_or(0);
    ensure!(ios > 1000, "only {ios} requests in 1 s: {out}");
    Ok(())
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// A daemon whose `nbd` node reaches `server` (keyval) over TLS with the
/// client credentials in `pki`, and re-exports it plainly on `front`.
fn tls_client_daemon(pki: &Path, server: &str, front: &Path) -> Result<StorageDaemon> {
    StorageDaemon::start_with_args(
        Backend::Blkvm,
        [
            "--object".to_string(),
            format!("tls-creds-x509,id=c0,dir={},endpoint=client", pki.display()),
            "--blockdev".into(),
            format!("driver=nbd,node-name=n0,{server},tls-creds=c0"),
            "--nbd-server".into(),
            format!("addr.type=unix,addr.path={}", front.display()),
            "--export".into(),
            "type=nbd,id=e0,node-name=n0,name=front,writable=on".into(),
        ],
    )
}

#[test]
fn our_client_speaks_tls_to_qemu_nbd_and_to_our_server() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = dir.path().join("pki");
    std::fs::create_dir_all(&pki)?;
    tests::tls::make_certs(&pki, &dir.path().join("anon"))?;
    let src = image(dir.path(), "src.img", 5)?;
    let src_s = src.display().to_string();

    // qemu-nbd with TLS on TCP: its certificate names 127.0.0.1, which our
    // client checks.
    let back = image(dir.path(), "back.img", 11)?;
    let port = free_port()?;
    let mut q = Command::new("qemu-nbd")
        .arg("--object")
        .arg(format!(
            "tls-creds-x509,id=t0,dir={},endpoint=server",
            pki.display()
        ))
        .args([
            "--tls-creds=t0",
            "--bind=127.0.0.1",
            &format!("--port={port}"),
        ])
        .args([
            "--format=raw",
            "--export-name=back",
            "--persistent",
            "--shared=4",
        ])
        .arg(&back)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let _q = scopeguard(&mut q);
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        ensure!(Instant::now() < deadline, "qemu-nbd did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    let server = format!("server.type=inet,server.host=127.0.0.1,server.port={port},export=back");
    let front = dir.path().join("front.sock");
    let d = tls_client_daemon(&pki, &server, &front)?;
    let uri = format!("nbd+unix:///front?socket={}", front.display());
    run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&back)
        .arg(&uri))?;
    run(Command::new("qemu-img").args(["convert", "-n", "-f", "raw", "-O", "raw", &src_s, &uri]))?;
    drop(d);
    ensure!(
        std::fs::read(&back)? == std::fs::read(&src)?,
        "writes over TLS did not reach qemu-nbd's image"
    );

    // Without tls-creds the client is told the server wants TLS.
    let plain = Command::new(tests::blkvm_binary()?)
        .args([
            "bench",
            "--blockdev",
            &format!("driver=nbd,{server}"),
            "--runtime",
            "1",
        ])
        .output()?;
    let err = String::from_utf8_lossy(&plain.stderr);
    ensure!(
        !plain.status.success() && err.contains("requires TLS"),
        "a plain client was not told about TLS: {err}"
    );

    // Our own TLS server, over a unix socket (no host name to check: the
    // chain is), through bench with mixed I/O.
    let img = image(dir.path(), "ours.img", 13)?;
    let sock = dir.path().join("tls.sock");
    let _ours = tests::tls::tls_daemon(
        &img,
        &pki,
        &format!("addr.type=unix,addr.path={}", sock.display()),
    )?;
    let front2 = dir.path().join("front2.sock");
    let d2 = tls_client_daemon(
        &pki,
        &format!(
            "server.type=unix,server.path={},export=disk",
            sock.display()
        ),
        &front2,
    )?;
    let uri2 = format!("nbd+unix:///front?socket={}", front2.display());
    run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&img)
        .arg(&uri2))?;
    run(Command::new("qemu-img").args(["convert", "-n", "-f", "raw", "-O", "raw", &src_s, &uri2]))?;
    run(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw", &src_s, &uri2]))?;
    drop(d2);
    ensure!(
        std::fs::read(&img)? == std::fs::read(&src)?,
        "writes over TLS to our server were lost"
    );
    Ok(())
}

/// Kills and reaps a child on drop.
struct Guard<'a>(&'a mut Child);

fn scopeguard(c: &mut Child) -> Guard<'_> {
    Guard(c)
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
