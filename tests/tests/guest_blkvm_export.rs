//! What a real Linux guest's virtio-blk driver does to `blkvm
//! storage-daemon` beyond reads and writes: the serial (GET_ID), a large
//! random write checked on both sides, flush (fsync of the block device),
//! discard, and write-zeroes (BLKZEROOUT), each confirmed by the daemon's
//! own counters in its exit report and by the bytes in the image.

use std::{fs, os::unix::fs::FileExt, path::Path};

use anyhow::{ensure, Context, Result};
use tests::{md5_hex, Backend, StorageDaemon, TestVm, VhostUserBlkExport};

const MIB: u64 = 1 << 20;

fn read_image(path: &Path, offset: u64, len: u64) -> Result<Vec<u8>> {
    let mut buf = vec![0; usize::try_from(len)?];
    fs::File::open(path)?.read_exact_at(&mut buf, offset)?;
    Ok(buf)
}

/// The value of `key=` in the daemon's `export e0 stats:` line.
fn stat(log: &str, key: &str) -> Result<u64> {
    let line = log
        .lines()
        .find(|l| l.contains("export e0 stats:"))
        .with_context(|| format!("no stats line in the daemon log:\n{log}"))?;
    let v = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .with_context(|| format!("no {key} in {line}"))?;
    Ok(v.parse()?)
}

#[test]
fn guest_flush_discard_write_zeroes_and_serial_reach_the_export() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let export = VhostUserBlkExport::new(dir.path().join("disk.img"), dir.path().join("s.sock"))
        .discard_unmap();
    fs::File::create(&export.image)?.set_len(64 * MIB)?;
    let daemon = StorageDaemon::start(Backend::Blkvm, [&export])?;

    let out = TestVm::new(
        r#"
        disk_info vda
        result serial "$(cat /sys/block/vda/serial)"
        dd if=/dev/urandom of=/tmp/r bs=1M count=32 2>/dev/null
        dd if=/tmp/r of=/dev/vda bs=1M oflag=direct conv=fsync 2>/dev/null
        result tail.md5 "$(dd if=/tmp/r bs=1M skip=2 count=30 2>/dev/null | md5sum | cut -d' ' -f1)"
        result tail.readback "$(md5 /dev/vda 2 30)"
        blkdiscard -o 0 -l 1048576 /dev/vda
        result discarded.md5 "$(md5 /dev/vda 0 1)"
        blkzero /dev/vda 1048576 1048576
        result zeroed.md5 "$(md5 /dev/vda 1 1)"
        "#,
    )
    .disk(export.disk())
    .run()?;

    let zeros = md5_hex(&vec![0u8; MIB as usize])?;
    let tail = out.result("tail.md5")?.to_string();
    let want = [
        ("serial", "e0".to_string()),
        ("tail.readback", tail.clone()),
        ("discarded.md5", zeros.clone()),
        ("zeroed.md5", zeros.clone()),
    ];
    for (key, value) in want {
        let got = out.result(key)?;
        ensure!(
            got == value,
            out.error(&format!("{key} is {got:?}, want {value:?}"))
        );
    }
    ensure!(
        read_image(&export.image, 0, 2 * MIB)?
            .iter()
            .all(|&b| b == 0),
        out.error("the discarded and zeroed range is not zero in the image")
    );
    ensure!(
        md5_hex(&read_image(&export.image, 2 * MIB, 30 * MIB)?)? == tail,
        out.error("the image does not hold the guest's random data")
    );

    let (status, log) = daemon.stop_with_log()?;
    ensure!(status.success(), "the daemon failed on SIGTERM:\n{log}");
    ensure!(
        stat(&log, "flush_ops")? >= 1,
        "no flush reached the node:\n{log}"
    );
    ensure!(
        stat(&log, "discard_ops")? >= 1,
        "no discard reached the node:\n{log}"
    );
    ensure!(
        stat(&log, "write_zeroes_ops")? >= 1,
        "no write-zeroes reached the node:\n{log}"
    );
    ensure!(
        stat(&log, "write_bytes")? >= 32 * MIB,
        "the writes are not counted:\n{log}"
    );
    ensure!(stat(&log, "errors")? == 0, "the node saw errors:\n{log}");
    ensure!(
        stat(&log, "registered_ops")? > 0,
        "guest RAM was not used as io_uring fixed buffers:\n{log}"
    );
    Ok(())
}
