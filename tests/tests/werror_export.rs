//! `werror=stop` on a vhost-user-blk export: a client writing to an image
//! on a full filesystem is held, not failed; QMP sees `BLOCK_IO_ERROR`
//! with `action: stop`; once there is room again, `cont` sends the kept
//! writes and the client finishes without an error. With the default
//! (`enospc` for writes, no status to stop) and `werror=report` the
//! client gets the error. `rerror` on reads from an `nbd` node whose
//! server is gone (EIO, mostly at submission): `ignore` completes them,
//! `report` fails them, and QMP sees `BLOCK_IO_ERROR` with the action.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{ensure, Result};
use serde_json::{json, Value};
use tests::qmp_client::Qmp;
use tests::{Backend, StorageDaemon};

/// A tmpfs of `mib` MiB, unmounted on drop (needs root, as CI has).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, mib: u64) -> Result<Self> {
        std::fs::create_dir_all(at)?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}M"), "blkvm-test"])
            .arg(at)
            .status()?
            .success();
        ensure!(ok, "mounting a tmpfs (this test needs root)");
        Ok(Tmpfs(at.to_path_buf()))
    }

    fn grow(&self, mib: u64) -> Result<()> {
        let ok = Command::new("mount")
            .args(["-o", &format!("remount,size={mib}M")])
            .arg(&self.0)
            .status()?
            .success();
        ensure!(ok, "remounting the tmpfs");
        Ok(())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn daemon(img: &Path, sock: &Path, qmp: &Path, werror: Option<&str>) -> Result<StorageDaemon> {
    let mut export = format!(
        "vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={},writable=on",
        sock.display()
    );
    if let Some(w) = werror {
        export += &format!(",werror={w}");
    }
    StorageDaemon::start_with_args(
        Backend::Blkvm,
        [
            "--blockdev".to_string(),
            format!("file,node-name=f0,filename={}", img.display()),
            "--export".into(),
            export,
            "--qmp".into(),
            format!("unix:{},server=on,wait=off", qmp.display()),
        ],
    )
}

/// `blkvm bench` writing 16 MiB in 64 KiB writes through the export.
fn writer(sock: &Path) -> Result<std::process::Child> {
    Ok(Command::new(tests::blkvm_binary()?)
        .args(["bench", "--blockdev"])
        .arg(format!("virtio-blk-vhost-user,path={}", sock.display()))
        .args([
            "--rw",
            "write",
            "--bs",
            "64k",
            "--iodepth",
            "4",
            "--count",
            "256",
            "--json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?)
}

#[test]
fn werror_stop_holds_writes_until_cont_after_the_disk_has_room() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let fs = Tmpfs::mount(&dir.path().join("mnt"), 4)?;
    let img = fs.0.join("disk.img");
    std::fs::File::create(&img)?.set_len(16 << 20)?;
    let (sock, qmp_path) = (dir.path().join("e0.sock"), dir.path().join("qmp.sock"));
    let _d = daemon(&img, &sock, &qmp_path, Some("stop"))?;
    let mut qmp = Qmp::connect(&qmp_path)?;
    let mut w = writer(&sock)?;
    let ev = qmp.event("BLOCK_IO_ERROR")?;
    let data = &ev["data"];
    ensure!(
        data["action"] == "stop" && data["nospace"] == true && data["operation"] == "write",
        "{ev}"
    );
    // Held, not failed.
    std::thread::sleep(Duration::from_secs(1));
    ensure!(w.try_wait()?.is_none(), "the writer finished while stopped");
    fs.grow(64)?;
    qmp.execute("cont", json!({}))?;
    let out = w.wait_with_output()?;
    ensure!(
        out.status.success(),
        "the writer failed after cont: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout)?;
    ensure!(v["write"]["ios"] == 256, "{v}");
    let allocated = std::fs::metadata(&img)?.blocks() * 512;
    ensure!(
        allocated >= 16 << 20,
        "only {allocated} bytes reached the image"
    );
    Ok(())
}

#[test]
fn werror_report_fails_the_write_with_the_error() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let fs = Tmpfs::mount(&dir.path().join("mnt"), 4)?;
    let img = fs.0.join("disk.img");
    std::fs::File::create(&img)?.set_len(16 << 20)?;
    let (sock, qmp_path) = (dir.path().join("e0.sock"), dir.path().join("qmp.sock"));
    let _d = daemon(&img, &sock, &qmp_path, Some("report"))?;
    let mut qmp = Qmp::connect(&qmp_path)?;
    let w = writer(&sock)?;
    let ev = qmp.event("BLOCK_IO_ERROR")?;
    ensure!(ev["data"]["action"] == "report", "{ev}");
    let out = w.wait_with_output()?;
    ensure!(!out.status.success(), "the writer did not see the error");
    Ok(())
}

/// A storage daemon exporting an `nbd` node (over qemu-nbd serving a
/// 4 MiB image) with `rerror`, after qemu-nbd is killed: the node fails
/// every read with EIO, most of them when they are submitted. Returns
/// what a reader through the export got and the first `BLOCK_IO_ERROR`.
fn read_through_a_lost_nbd_server(rerror: &str) -> Result<(std::process::Output, Value)> {
    let dir = tempfile::tempdir()?;
    let img = dir.path().join("base.img");
    std::fs::File::create(&img)?.set_len(4 << 20)?;
    let nbd_sock = dir.path().join("nbd.sock");
    let mut nbd = Command::new("qemu-nbd")
        .args(["-t", "-r", "-f", "raw", "-x", "e", "-k"])
        .arg(&nbd_sock)
        .arg(&img)
        .stdout(Stdio::null())
        .spawn()?;
    for _ in 0..100 {
        if nbd_sock.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let (sock, qmp_path) = (dir.path().join("e0.sock"), dir.path().join("qmp.sock"));
    let _d = StorageDaemon::start_with_args(
        Backend::Blkvm,
        [
            "--blockdev".to_string(),
            format!(
                "nbd,node-name=n0,server.type=unix,server.path={},export=e,read-only=on",
                nbd_sock.display()
            ),
            "--export".into(),
            format!(
                "vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path={},rerror={rerror}",
                sock.display()
            ),
            "--qmp".into(),
            format!("unix:{},server=on,wait=off", qmp_path.display()),
        ],
    )?;
    let mut qmp = Qmp::connect(&qmp_path)?;
    nbd.kill()?;
    nbd.wait()?;
    let out = Command::new(tests::blkvm_binary()?)
        .args(["bench", "--blockdev"])
        .arg(format!(
            "virtio-blk-vhost-user,path={},read-only=on",
            sock.display()
        ))
        .args(["--rw", "randread", "--bs", "4k", "--iodepth", "4"])
        .args(["--count", "64", "--json"])
        .output()?;
    let ev = qmp.event("BLOCK_IO_ERROR")?;
    Ok((out, ev))
}

#[test]
fn rerror_ignore_completes_reads_the_host_failed() -> Result<()> {
    let (out, ev) = read_through_a_lost_nbd_server("ignore")?;
    let data = &ev["data"];
    ensure!(
        data["action"] == "ignore" && data["operation"] == "read" && data["node-name"] == "n0",
        "{ev}"
    );
    ensure!(
        out.status.success(),
        "the reader saw an error: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout)?;
    ensure!(v["read"]["ios"] == 64, "{v}");
    Ok(())
}

#[test]
fn rerror_report_hands_the_reader_the_error() -> Result<()> {
    let (out, ev) = read_through_a_lost_nbd_server("report")?;
    let data = &ev["data"];
    ensure!(
        data["action"] == "report" && data["operation"] == "read",
        "{ev}"
    );
    ensure!(!out.status.success(), "the reader did not see the error");
    Ok(())
}
