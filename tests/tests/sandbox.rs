//! The seccomp sandbox of `blkvm storage-daemon` (`--sandbox on|off`): a
//! forbidden call in an IOThread ends the process with a message naming
//! it; every thread of a daemon that serves exports and QMP is confined,
//! and keeps working; `--sandbox off` confines nothing.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;
use tests::qmp_client::Qmp;

/// `sandbox::FORBIDDEN_CALL_EXIT_CODE`: 128 + SIGSYS.
const FORBIDDEN_CALL_EXIT_CODE: i32 = 128 + libc::SIGSYS;
const TIMEOUT: Duration = Duration::from_secs(20);

fn daemon(args: &[&str], hook: Option<&str>) -> Result<Child> {
    let mut cmd = Command::new(tests::blkvm_binary()?);
    cmd.arg("storage-daemon").args(args);
    cmd.env_remove("BLKVM_TEST_FORBIDDEN_SYSCALL");
    if let Some(kind) = hook {
        cmd.env("BLKVM_TEST_FORBIDDEN_SYSCALL", kind);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    Ok(cmd.spawn()?)
}

fn wait(child: &mut Child) -> Result<ExitStatus> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(s) = child.try_wait()? {
            return Ok(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("the daemon did not exit within {TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stderr(child: &mut Child) -> String {
    use std::io::Read;
    let mut s = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut s);
    }
    s
}

/// Each thread's name and its `Seccomp:` mode (0 none, 2 filter).
fn seccomp_modes(pid: u32) -> Result<Vec<(String, u32)>> {
    let mut out = Vec::new();
    for task in fs::read_dir(format!("/proc/{pid}/task"))? {
        let dir = task?.path();
        let Ok(status) = fs::read_to_string(dir.join("status")) else {
            continue; // the thread ended
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
        };
        let name = field("Name:").unwrap_or_default();
        let mode = field("Seccomp:").context("no Seccomp: line")?.parse()?;
        out.push((name, mode));
    }
    Ok(out)
}

/// Waits until every thread is in `mode`; returns them.
fn wait_all_in_mode(pid: u32, mode: u32) -> Result<Vec<(String, u32)>> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let modes = seccomp_modes(pid)?;
        if modes.iter().all(|(_, m)| *m == mode) {
            return Ok(modes);
        }
        if Instant::now() > deadline {
            bail!("not every thread in seccomp mode {mode}: {modes:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

struct Dir {
    _tmp: tempfile::TempDir,
    path: PathBuf,
}

fn dir() -> Dir {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().to_path_buf();
    Dir { _tmp: tmp, path }
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

#[test]
fn a_forbidden_call_in_an_iothread_ends_the_daemon_with_a_message_naming_it() {
    let mut child = daemon(
        &[
            "--object",
            "iothread,id=io0",
            "--blockdev",
            "null-co,node-name=n0",
        ],
        Some("iothread"),
    )
    .unwrap();
    let status = wait(&mut child).unwrap();
    let err = stderr(&mut child);
    assert_eq!(status.code(), Some(FORBIDDEN_CALL_EXIT_CODE), "{err}");
    assert!(
        err.contains(
            "blkvm: seccomp: thread 'iothread-io0' made a forbidden system call: fchmod (91)"
        ),
        "{err}"
    );
}

#[test]
fn every_thread_of_a_serving_daemon_is_confined_and_qmp_still_works() {
    let d = dir();
    let image = d.path.join("disk.img");
    fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let qmp_path = d.path.join("qmp.sock");
    let mut child = daemon(
        &[
            "--object",
            "iothread,id=io0",
            "--blockdev",
            &format!("driver=file,node-name=f0,filename={}", s(&image)),
            "--blockdev",
            "driver=raw,node-name=d0,file=f0",
            "--export",
            &format!(
                "type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path={},iothread=io0",
                s(&d.path.join("vu.sock"))
            ),
            "--nbd-server",
            &format!("addr.type=unix,addr.path={}", s(&d.path.join("nbd.sock"))),
            "--export",
            "type=nbd,id=n0,node-name=d0,iothread=io0",
            "--qmp",
            &format!("unix:{},server=on,wait=off", s(&qmp_path)),
        ],
        None,
    )
    .unwrap();
    let mut qmp = Qmp::connect(&qmp_path).unwrap();
    // The QMP session opens files, starts and stops an export (its
    // listener thread) under its own filter.
    qmp.execute(
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "z0", "size": 1048576}),
    )
    .unwrap();
    let vu2 = s(&d.path.join("vu2.sock"));
    qmp.execute(
        "block-export-add",
        json!({"type": "vhost-user-blk", "id": "e1", "node-name": "z0",
               "addr": {"type": "unix", "path": vu2}}),
    )
    .unwrap();
    let modes = wait_all_in_mode(child.id(), 2).unwrap();
    assert!(modes.len() >= 5, "{modes:?}");
    qmp.execute("block-export-del", json!({"id": "e1"}))
        .unwrap();
    qmp.execute("blockdev-del", json!({"node-name": "z0"}))
        .unwrap();
    let _ = qmp.execute("quit", json!({}));
    let status = wait(&mut child).unwrap();
    let err = stderr(&mut child);
    assert!(status.success(), "{status}: {err}");
    assert!(!err.contains("seccomp"), "{err}");
}

#[test]
fn sandbox_off_confines_no_thread_and_ignores_the_test_hook() {
    let d = dir();
    let qmp_path = d.path.join("qmp.sock");
    let mut child = daemon(
        &[
            "--sandbox",
            "off",
            "--object",
            "iothread,id=io0",
            "--blockdev",
            "null-co,node-name=n0",
            "--qmp",
            &format!("unix:{},server=on,wait=off", s(&qmp_path)),
        ],
        Some("iothread"),
    )
    .unwrap();
    let mut qmp = Qmp::connect(&qmp_path).unwrap();
    let modes = wait_all_in_mode(child.id(), 0).unwrap();
    assert!(modes.len() >= 3, "{modes:?}");
    let _ = qmp.execute("quit", json!({}));
    let status = wait(&mut child).unwrap();
    assert!(status.success(), "{status}: {}", stderr(&mut child));
}

#[test]
fn sandbox_takes_only_on_or_off() {
    let mut child = daemon(&["--sandbox", "maybe"], None).unwrap();
    let status = wait(&mut child).unwrap();
    let err = stderr(&mut child);
    assert!(!status.success());
    assert!(err.contains("--sandbox"), "{err}");
}

/// qemu-nbd serving `img` as export `back` on `sock`.
fn qemu_nbd(img: &Path, sock: &Path) -> Result<Child> {
    let _ = fs::remove_file(sock);
    let child = Command::new("qemu-nbd")
        .arg(format!("--socket={}", sock.display()))
        .args(["--format=raw", "--export-name=back", "--persistent"])
        .arg(img)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("spawn qemu-nbd")?;
    let deadline = Instant::now() + TIMEOUT;
    while std::os::unix::net::UnixStream::connect(sock).is_err() {
        if Instant::now() > deadline {
            bail!("qemu-nbd did not start");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(child)
}

/// qemu-io's output for `cmds` on `uri` (it exits 0 even when a pattern
/// does not match: callers read its words).
fn qemu_io(uri: &str, cmds: &[&str]) -> Result<String> {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for x in cmds {
        c.args(["-c", x]);
    }
    let out = c.arg(uri).output()?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
}

/// The NBD client's reconnect thread connects under its own filter (and
/// the IOThread's, which starts it): qemu-nbd behind our `nbd` node is
/// killed and restarted, and I/O through our NBD export goes on.
#[test]
fn the_nbd_client_reconnects_inside_the_sandbox() {
    let d = dir();
    let img = d.path.join("back.img");
    fs::write(&img, vec![0u8; 4 << 20]).unwrap();
    let back = d.path.join("back.sock");
    let front = d.path.join("front.sock");
    let mut peer = qemu_nbd(&img, &back).unwrap();
    let mut child = daemon(
        &[
            "--object",
            "iothread,id=io0",
            "--blockdev",
            &format!(
                "driver=nbd,node-name=n0,server.type=unix,server.path={},export=back,reconnect-delay=10",
                s(&back)
            ),
            "--nbd-server",
            &format!("addr.type=unix,addr.path={}", s(&front)),
            "--export",
            "type=nbd,id=e0,node-name=n0,writable=on,iothread=io0",
        ],
        None,
    )
    .unwrap();
    let uri = format!("nbd+unix:///n0?socket={}", s(&front));
    let deadline = Instant::now() + TIMEOUT;
    while std::os::unix::net::UnixStream::connect(&front).is_err() {
        assert!(Instant::now() < deadline, "the daemon did not listen");
        std::thread::sleep(Duration::from_millis(10));
    }
    let io = qemu_io(&uri, &["write -P 0x5a 0 64k", "read -P 0x5a 0 64k"]).unwrap();
    assert!(
        io.contains("read 65536/65536") && !io.contains("failed"),
        "{io}"
    );

    // One session across the restart: its queue's connection to qemu-nbd
    // is lost while qemu-io sleeps, and the reconnect thread makes a new
    // one.
    let session = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "sleep 1500", "-c", "read -P 0x5a 0 64k"])
        .args(["-c", "write -P 0xa5 64k 4k", &uri])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let _ = peer.kill();
    let _ = peer.wait();
    let mut peer = qemu_nbd(&img, &back).unwrap();
    let out = session.wait_with_output().unwrap();
    let io =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        io.contains("read 65536/65536") && io.contains("wrote 4096/4096") && !io.contains("failed"),
        "{io}"
    );
    assert!(
        child.try_wait().unwrap().is_none(),
        "{}",
        stderr(&mut child)
    );

    let _ = child.kill();
    let _ = child.wait();
    let err = stderr(&mut child);
    let _ = peer.kill();
    let _ = peer.wait();
    assert!(err.contains("reconnected to"), "{err}");
    assert!(!err.contains("seccomp"), "{err}");
}
