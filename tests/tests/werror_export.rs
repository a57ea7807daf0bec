//! `werror=stop` on a vhost-user-blk export: a client writing to an image
//! on a full filesystem is held, not failed; QMP sees `BLOCK_IO_ERROR`
//! with `action: stop`; once there is room again, `cont` sends the kept
//! writes and the client finishes without an error. With the default
//! (`enospc` for writes, no status to stop) and `werror=report` the
//! client gets the error.

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
