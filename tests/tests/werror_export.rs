//! `werror=stop` on a vhost-user-blk export: a client writing to an image
//! on a full filesystem is held, not failed; QMP sees `BLOCK_IO_ERROR`
//! with `action: stop`; once there is room again, `cont` sends the kept
//! writes and the client finishes without an error. With the default
//! (`enospc` for writes, no status to stop) and `werror=report` the
//! client gets the error.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
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

/// A bare QMP client: commands in, replies and events out.
struct Qmp {
    w: UnixStream,
    r: BufReader<UnixStream>,
    events: Vec<Value>,
}

impl Qmp {
    fn connect(path: &Path) -> Result<Self> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => return Err(e).context("QMP socket"),
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut q = Qmp {
            r: BufReader::new(s.try_clone()?),
            w: s,
            events: Vec::new(),
        };
        q.line()?; // greeting
        q.execute("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn line(&mut self) -> Result<Value> {
        let mut l = String::new();
        ensure!(self.r.read_line(&mut l)? > 0, "QMP closed");
        Ok(serde_json::from_str(&l)?)
    }

    fn execute(&mut self, cmd: &str, args: Value) -> Result<Value> {
        writeln!(self.w, "{}", json!({"execute": cmd, "arguments": args}))?;
        loop {
            let v = self.line()?;
            if v.get("event").is_some() {
                self.events.push(v);
                continue;
            }
            if let Some(e) = v.get("error") {
                bail!("{cmd}: {e}");
            }
            return Ok(v["return"].clone());
        }
    }

    /// Waits for an event named `name`.
    fn event(&mut self, name: &str) -> Result<Value> {
        loop {
            if let Some(i) = self.events.iter().position(|e| e["event"] == name) {
                return Ok(self.events.remove(i));
            }
            let v = self.line().with_context(|| format!("waiting for {name}"))?;
            if v.get("event").is_some() {
                self.events.push(v);
            }
        }
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
