//! `blkvm storage-daemon` serving an `rbd` node (a Ceph image, through
//! librbd) with the seccomp sandbox on, as it runs by default: over NBD to
//! QEMU's tools, over vhost-user-blk to a real Linux guest (QEMU TCG), and
//! with the node added and removed over QMP (librados then starts its
//! threads inside the monitor's sandbox). What blkvm wrote is checked with
//! `rbd export`, outside blkvm.
//!
//! The cluster is `resources/ceph/start.sh`'s (shared by the rbd tests,
//! see `block/tests/rbd_util/cluster.rs`); without Ceph these tests fail.

#[path = "../../block/tests/rbd_util/cluster.rs"]
mod cluster;

use std::path::Path;
use std::process::Command;

use anyhow::{ensure, Context, Result};
use cluster::{Cluster, RbdTestImage};
use serde_json::json;
use tests::files::run;
use tests::qmp_client::Qmp;
use tests::{md5_hex, Backend, StorageDaemon, TestVm, VhostUserBlkDisk};

const MIB: u64 = 1 << 20;

/// The image's contents through `rbd export`.
fn export(img: &RbdTestImage<'_>, dir: &Path) -> Result<Vec<u8>> {
    let out = dir.join(format!("{}.export", img.name));
    img.cluster.rbd(&[
        "export",
        "--no-progress",
        &img.spec(),
        out.to_str().context("path")?,
    ]);
    Ok(std::fs::read(out)?)
}

fn nbd_daemon(img: &RbdTestImage<'_>, sock: &Path) -> Result<StorageDaemon> {
    StorageDaemon::start_with_args(
        Backend::Blkvm,
        [
            "--object".to_string(),
            img.secret_object(),
            "--blockdev".into(),
            img.blockdev(",node-name=r0,discard=unmap"),
            "--nbd-server".into(),
            format!("addr.type=unix,addr.path={}", sock.display()),
            "--export".into(),
            "type=nbd,id=e0,node-name=r0,name=disk,writable=on".into(),
        ],
    )
}

/// qemu-io's output (it exits 0 when a pattern does not match).
fn qemu_io(uri: &str, cmds: &[&str]) -> Result<String> {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for x in cmds {
        c.args(["-c", x]);
    }
    let out = c.arg(uri).output()?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
}

#[test]
fn an_nbd_export_of_an_rbd_node_serves_qemu_img_and_qemu_io() -> Result<()> {
    let c = Cluster::shared();
    let img = c.image(64 * MIB);
    let dir = tempfile::tempdir()?;
    let src = tests::files::data_image(dir.path(), "src.raw", 16, 64, 0x5eed_cefb)?;
    let sock = dir.path().join("nbd.sock");
    let d = nbd_daemon(&img, &sock)?;
    let uri = format!("nbd+unix:///disk?socket={}", sock.display());

    let info = run(Command::new("qemu-img").args(["info", &uri]))?;
    ensure!(
        info.contains("64 MiB (67108864 bytes)"),
        "qemu-img info: {info}"
    );
    let src_s = src.display().to_string();
    run(Command::new("qemu-img").args(["convert", "-n", "-f", "raw", "-O", "raw", &src_s, &uri]))?;
    run(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw", &src_s, &uri]))?;
    let io = qemu_io(
        &uri,
        &[
            "write -P 0xab 40M 64k",
            "read -P 0xab 40M 64k",
            "write -z 41M 1M",
            "read -P 0 41M 1M",
            "flush",
        ],
    )?;
    ensure!(
        io.matches("read ").count() == 2 && !io.contains("failed"),
        "qemu-io: {io}"
    );
    let (status, log) = d.stop_with_log()?;
    ensure!(status.success(), "daemon: {status}\n{log}");

    // What went through the export is in the image, as Ceph's tool reads it.
    let mut want = std::fs::read(&src)?;
    want[40 << 20..(40 << 20) + (64 << 10)].fill(0xab);
    want[41 << 20..42 << 20].fill(0);
    ensure!(export(&img, dir.path())? == want, "rbd export differs");
    Ok(())
}

#[test]
fn blockdev_add_of_an_rbd_node_over_qmp_works_in_the_sandbox() -> Result<()> {
    let c = Cluster::shared();
    let img = c.image(16 * MIB);
    let dir = tempfile::tempdir()?;
    let qmp_sock = dir.path().join("qmp.sock");
    let nbd_sock = dir.path().join("nbd.sock");
    let d = StorageDaemon::start_with_args(
        Backend::Blkvm,
        [
            "--object".to_string(),
            img.secret_object(),
            "--qmp".into(),
            format!("unix:{},server=on,wait=off", qmp_sock.display()),
            "--nbd-server".into(),
            format!("addr.type=unix,addr.path={}", nbd_sock.display()),
        ],
    )?;
    let mut q = Qmp::connect(&qmp_sock)?;
    let node = json!({"driver": "rbd", "node-name": "r1", "pool": "rbd", "image": img.name,
                      "conf": c.conf(), "user": "blkvm", "key-secret": "s0"});
    let uri = format!("nbd+unix:///disk?socket={}", nbd_sock.display());
    // Twice: librados starts (and on blockdev-del stops) its threads in the
    // monitor's sandbox each time.
    for (round, byte) in [(0, "0x5a"), (1, "0xa5")] {
        q.execute("blockdev-add", node.clone())
            .with_context(|| format!("round {round}\n{}", d.log()))?;
        q.execute(
            "block-export-add",
            json!({"type": "nbd", "id": "e1", "node-name": "r1", "name": "disk", "writable": true}),
        )?;
        let write = format!("write -P {byte} 1M 64k");
        let read = format!("read -P {byte} 1M 64k");
        let io = qemu_io(&uri, &[&write, &read, "flush"])?;
        ensure!(
            io.contains("read 65536/65536") && !io.contains("failed"),
            "round {round}: qemu-io: {io}\n{}",
            d.log()
        );
        q.execute("block-export-del", json!({"id": "e1"}))?;
        // The export lets go of the node once its clients are gone.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match q.execute("blockdev-del", json!({"node-name": "r1"})) {
                Ok(_) => break,
                Err(e) if std::time::Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(e) => return Err(e),
            }
        }
    }
    // Left open at quit: closed on the way out, inside the main thread's
    // sandbox.
    q.execute("blockdev-add", node)?;
    q.execute("quit", json!({}))?;
    let (status, log) = d.stop_with_log()?;
    ensure!(
        status.success() && !log.contains("seccomp"),
        "daemon: {status}\n{log}"
    );
    ensure!(
        export(&img, dir.path())?[MIB as usize] == 0xa5,
        "the last write is not in the image"
    );
    Ok(())
}

#[test]
fn a_linux_guest_writes_an_rbd_image_through_the_vhost_user_export() -> Result<()> {
    let c = Cluster::shared();
    let img = c.image(64 * MIB);
    let dir = tempfile::tempdir()?;
    let sock = dir.path().join("vhost.sock");
    let d = StorageDaemon::start_with_args(
        Backend::Blkvm,
        [
            "--object".to_string(),
            img.secret_object(),
            "--blockdev".into(),
            img.blockdev(",node-name=r0,discard=unmap"),
            "--export".into(),
            format!(
                "type=vhost-user-blk,id=e0,node-name=r0,addr.type=unix,addr.path={},writable=on",
                sock.display()
            ),
        ],
    )?;
    let out = TestVm::new(
        r#"
        disk_info vda
        dd if=/dev/urandom of=/tmp/r bs=1M count=16 2>/dev/null
        dd if=/tmp/r of=/dev/vda bs=1M seek=4 oflag=direct conv=fsync 2>/dev/null
        result written.md5 "$(md5sum < /tmp/r | cut -d' ' -f1)"
        result readback.md5 "$(md5 /dev/vda 4 16)"
        blkzero /dev/vda 4194304 1048576
        result zeroed.md5 "$(md5 /dev/vda 4 1)"
        result tail.md5 "$(md5 /dev/vda 5 15)"
        "#,
    )
    .disk(VhostUserBlkDisk::new(&sock))
    .run()?;
    ensure!(out.result("vda.size")? == "131072", out.error("size"));
    let written = out.result("written.md5")?.to_string();
    ensure!(
        out.result("readback.md5")? == written,
        out.error("read back differs")
    );
    let zeros = md5_hex(&vec![0u8; MIB as usize])?;
    ensure!(out.result("zeroed.md5")? == zeros, out.error("zeroes"));
    let (status, log) = d.stop_with_log()?;
    ensure!(status.success(), "daemon: {status}\n{log}");

    let image = export(&img, dir.path())?;
    ensure!(
        image[4 << 20..5 << 20].iter().all(|&b| b == 0),
        "zeroed MiB in the image"
    );
    // The guest's data beyond the zeroed MiB, as Ceph holds it.
    let tail = out.result("tail.md5")?;
    ensure!(
        md5_hex(&image[5 << 20..20 << 20])? == tail,
        "rbd export differs from the guest's view"
    );
    Ok(())
}
