//! A real Linux guest (QEMU TCG, `vhost-user-blk-pci`) on a qcow2 overlay
//! over a qcow2 base, the backing chain opened from the overlay's header
//! by the storage daemon: the guest reads the base's data through the
//! overlay, writes over holes of the base and over its data (partial
//! clusters, so copy-on-write from the backing file), and reads it all
//! back. On the host afterwards `qemu-img check` finds nothing wrong,
//! `qemu-img compare` finds the overlay equal to a raw image given the
//! same writes, and the base is byte for byte what it was.
//!
//! As in guest_exports.rs, qemu-storage-daemon runs the same test to prove
//! the fixture.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use anyhow::{ensure, Result};
use tests::files::{data_image, run};
use tests::{md5_hex, yes_pattern, Backend, StorageDaemon, TestVm, VhostUserBlkExport};

const MIB: u64 = 1 << 20;
const KIB: u64 = 1 << 10;
/// The base's size and the span of its first-MiBs of data.
const DISK_MIB: u64 = 64;
const BASE_DATA_MIB: u64 = 4;

/// The guest's writes: (what the guest pipes into dd, dd's block size,
/// offset, length). Offsets are in bytes; each is a multiple of the block
/// size.
struct GuestWrite {
    source: &'static str,
    bs: u64,
    offset: u64,
    len: u64,
}

const WRITES: [GuestWrite; 3] = [
    // Whole clusters over a hole of the base.
    GuestWrite {
        source: "yes guest-pattern",
        bs: MIB,
        offset: 8 * MIB,
        len: MIB,
    },
    // 4 KiB inside a 64 KiB cluster of the base's data: the rest of the
    // cluster is copied from the base.
    GuestWrite {
        source: "yes cow-pattern",
        bs: 4 * KIB,
        offset: MIB + 12 * KIB,
        len: 4 * KIB,
    },
    // Half clusters at both ends, across the end of the base's data.
    GuestWrite {
        source: "seq 1 1000000",
        bs: 32 * KIB,
        offset: 3 * MIB + 32 * KIB,
        len: 2 * MIB,
    },
];

/// What `source | head -c len` gives in the guest.
fn source_bytes(source: &str, len: u64) -> Vec<u8> {
    let len = len as usize;
    match source.strip_prefix("yes ") {
        Some(text) => yes_pattern(text, len),
        None => (1u64..)
            .flat_map(|i| format!("{i}\n").into_bytes())
            .take(len)
            .collect(),
    }
}

fn qemu_img(args: &[&str]) -> Result<String> {
    run(Command::new("qemu-img").args(args))
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

#[test]
fn qsd_guest_reads_and_writes_a_qcow2_overlay() -> Result<()> {
    guest_reads_and_writes_a_qcow2_overlay(Backend::QemuStorageDaemon)
}

#[test]
fn blkvm_guest_reads_and_writes_a_qcow2_overlay() -> Result<()> {
    guest_reads_and_writes_a_qcow2_overlay(Backend::Blkvm)
}

fn guest_reads_and_writes_a_qcow2_overlay(backend: Backend) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let base_raw = data_image(dir.path(), "base.raw", BASE_DATA_MIB, DISK_MIB, 15)?;
    let base = dir.path().join("base.qcow2");
    let overlay = dir.path().join("overlay.qcow2");
    qemu_img(&[
        "convert",
        "-q",
        "-O",
        "qcow2",
        &path(&base_raw),
        &path(&base),
    ])?;
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        &path(&overlay),
    ])?;
    let base_before = fs::read(&base)?;

    // The raw image the overlay must equal afterwards.
    let expected = dir.path().join("expected.raw");
    fs::copy(&base_raw, &expected)?;
    let expected_file = fs::OpenOptions::new().write(true).open(&expected)?;
    let mut script = String::from(
        r#"
        disk_info vda
        result before.md5 "$(md5 /dev/vda)"
        "#,
    );
    for w in &WRITES {
        expected_file.write_all_at(&source_bytes(w.source, w.len), w.offset)?;
        script += &format!(
            "{} | head -c {} | dd of=/dev/vda bs={} seek={} iflag=fullblock oflag=direct \
             2>/dev/null\n",
            w.source,
            w.len,
            w.bs,
            w.offset / w.bs
        );
    }
    script += r#"
        result after.md5 "$(md5 /dev/vda)"
        "#;
    drop(expected_file);

    let export = VhostUserBlkExport::new(&overlay, dir.path().join("vhost.sock")).format("qcow2");
    let daemon = StorageDaemon::start(backend, [&export])?;
    let out = TestVm::new(script).disk(export.disk()).run()?;
    let check = |key: &str, want: &str| -> Result<()> {
        let got = out.result(key)?;
        ensure!(
            got == want,
            out.error(&format!("{key} is {got:?}, want {want:?}"))
        );
        Ok(())
    };
    check("vda.size", &(DISK_MIB * MIB / 512).to_string())?;
    check("vda.ro", "0")?;
    check("before.md5", &md5_hex(&fs::read(&base_raw)?)?)?;
    check("after.md5", &md5_hex(&fs::read(&expected)?)?)?;
    let (status, log) = daemon.stop_with_log()?;
    ensure!(status.success(), "the daemon failed on SIGTERM:\n{log}");

    let checked = qemu_img(&["check", "-f", "qcow2", &path(&overlay)])?;
    ensure!(
        checked.contains("No errors were found"),
        "qemu-img check of the overlay:\n{checked}"
    );
    qemu_img(&[
        "compare",
        "-f",
        "qcow2",
        "-F",
        "raw",
        &path(&overlay),
        &path(&expected),
    ])?;
    ensure!(
        fs::read(&base)? == base_before,
        "the base image changed under the overlay"
    );
    Ok(())
}
