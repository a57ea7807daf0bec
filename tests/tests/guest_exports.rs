//! A real Linux guest (QEMU TCG, `vhost-user-blk-pci`) against a
//! vhost-user-blk export: every test runs against qemu-storage-daemon,
//! which proves the fixture with a known-good backend, and against
//! `blkvm storage-daemon`, which is what the tests are for.

use std::{fs, os::unix::fs::FileExt, path::Path, time::Duration};

use anyhow::{ensure, Result};
use tests::{md5_hex, yes_pattern, Backend, StorageDaemon, TestVm, VhostUserBlkExport};

const MIB: u64 = 1 << 20;

fn create_image(path: &Path, size: u64) -> Result<()> {
    fs::File::create(path)?.set_len(size)?;
    Ok(())
}

fn read_image(path: &Path, offset: u64, len: u64) -> Result<Vec<u8>> {
    let mut buf = vec![0; usize::try_from(len)?];
    fs::File::open(path)?.read_exact_at(&mut buf, offset)?;
    Ok(buf)
}

/// Geometry, and data both ways: the host's bytes read in the guest, the
/// guest's bytes (a known pattern and 4 MiB of random data) on the host.
#[test]
fn qsd_guest_reads_and_writes_a_file_export() -> Result<()> {
    guest_reads_and_writes_a_file_export(Backend::QemuStorageDaemon)
}

#[test]
fn blkvm_guest_reads_and_writes_a_file_export() -> Result<()> {
    guest_reads_and_writes_a_file_export(Backend::Blkvm)
}

fn guest_reads_and_writes_a_file_export(backend: Backend) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let export =
        VhostUserBlkExport::new(dir.path().join("disk.img"), dir.path().join("vhost.sock"));
    create_image(&export.image, 64 * MIB)?;
    let host_bytes = yes_pattern("host-pattern", MIB as usize);
    fs::OpenOptions::new()
        .write(true)
        .open(&export.image)?
        .write_all_at(&host_bytes, MIB)?;
    let daemon = StorageDaemon::start(backend, [&export])?;

    let out = TestVm::new(
        r#"
        disk_info vda
        result host.md5 "$(md5 /dev/vda 1 1)"
        yes guest-pattern | head -c 1048576 |
            dd of=/dev/vda bs=1M seek=8 iflag=fullblock oflag=direct 2>/dev/null
        dd if=/dev/urandom of=/tmp/random bs=1M count=4 2>/dev/null
        result random.md5 "$(md5sum </tmp/random | cut -d' ' -f1)"
        dd if=/tmp/random of=/dev/vda bs=1M seek=16 oflag=direct 2>/dev/null
        result random.readback.md5 "$(md5 /dev/vda 16 4)"
        "#,
    )
    .disk(export.disk())
    .run()?;

    let check = |key: &str, want: &str| -> Result<()> {
        let got = out.result(key)?;
        ensure!(
            got == want,
            out.error(&format!("{key} is {got:?}, want {want:?}"))
        );
        Ok(())
    };
    check("vda.size", &(64 * MIB / 512).to_string())?;
    check("vda.logical_block_size", "512")?;
    check("vda.ro", "0")?;
    check("host.md5", &md5_hex(&host_bytes)?)?;
    let random_md5 = out.result("random.md5")?;
    check("random.readback.md5", random_md5)?;
    ensure!(
        read_image(&export.image, 8 * MIB, MIB)? == yes_pattern("guest-pattern", MIB as usize),
        out.error("the guest's pattern is not at 8 MiB in the image")
    );
    let on_host = md5_hex(&read_image(&export.image, 16 * MIB, 4 * MIB)?)?;
    ensure!(
        on_host == random_md5,
        out.error(&format!(
            "the image holds {on_host} at 16 MiB, the guest wrote {random_md5}"
        ))
    );
    ensure!(daemon.stop()?.success(), "the daemon failed on SIGTERM");
    Ok(())
}

/// Two exports at once (one read-only with 4 KiB blocks, one with two
/// queues); a guest killed mid-run (as a QEMU crash would) and a second
/// guest that connects to the same sockets and finds the first one's data.
#[test]
fn qsd_second_guest_reaches_the_exports_after_the_first_is_killed() -> Result<()> {
    second_guest_reaches_the_exports_after_the_first_is_killed(Backend::QemuStorageDaemon)
}

#[test]
fn blkvm_second_guest_reaches_the_exports_after_the_first_is_killed() -> Result<()> {
    second_guest_reaches_the_exports_after_the_first_is_killed(Backend::Blkvm)
}

fn second_guest_reaches_the_exports_after_the_first_is_killed(backend: Backend) -> Result<()> {
    let dir = tempfile::tempdir()?;
    // Two queues on one busy-polling iothread: the poller must serve both
    // and hand the guest's kicks back when it sleeps.
    let rw = VhostUserBlkExport::new(dir.path().join("rw.img"), dir.path().join("rw.sock"))
        .num_queues(2)
        .iothread(32768);
    let ro = VhostUserBlkExport::new(dir.path().join("ro.img"), dir.path().join("ro.sock"))
        .read_only()
        .logical_block_size(4096);
    create_image(&rw.image, 32 * MIB)?;
    create_image(&ro.image, 16 * MIB)?;
    let _daemon = StorageDaemon::start(backend, [&rw, &ro])?;

    let mut first = TestVm::new(
        r#"
        yes first-guest | head -c 1048576 |
            dd of=/dev/vda bs=1M iflag=fullblock oflag=direct 2>/dev/null
        result ready 1
        sleep 3600
        "#,
    )
    .disk(rw.disk())
    .disk(ro.disk())
    .spawn()?;
    first.wait_for("BLKVM-RESULT ready=1", Duration::from_secs(120))?;
    first.kill();

    let out = TestVm::new(
        r#"
        disk_info vda
        disk_info vdb
        result first.md5 "$(md5 /dev/vda 0 1)"
        if dd if=/dev/zero of=/dev/vdb bs=4096 count=1 oflag=direct 2>/dev/null; then
            result vdb.write accepted
        else
            result vdb.write refused
        fi
        "#,
    )
    .cpus(2)
    .disk(rw.disk())
    .disk(ro.disk())
    .run()?;

    let want = [
        ("vda.size", (32 * MIB / 512).to_string()),
        ("vda.queues", "2".to_owned()),
        ("vda.ro", "0".to_owned()),
        ("vdb.size", (16 * MIB / 512).to_string()),
        ("vdb.logical_block_size", "4096".to_owned()),
        ("vdb.ro", "1".to_owned()),
        ("vdb.write", "refused".to_owned()),
        (
            "first.md5",
            md5_hex(&yes_pattern("first-guest", MIB as usize))?,
        ),
    ];
    for (key, value) in want {
        let got = out.result(key)?;
        ensure!(
            got == value,
            out.error(&format!("{key} is {got:?}, want {value:?}"))
        );
    }
    ensure!(
        read_image(&ro.image, 0, MIB)?.iter().all(|&b| b == 0),
        out.error("the read-only image was written")
    );
    Ok(())
}
