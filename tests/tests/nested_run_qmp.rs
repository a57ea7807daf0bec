//! `blkvm run`'s QMP monitor against a real guest, through the nested
//! harness (resources/nested/README.md): what the tiny guest of
//! `run_qmp.rs` cannot show. One L2 boot, driven from L1 with
//! `qmp-send` (resources/nested/qmp-send.c):
//!
//! 1. `block_resize` of the file node under a virtio-blk-pci disk's raw
//!    node: the config-change interrupt makes L2's kernel see the new
//!    capacity in /sys/block/vda/size.
//! 2. A write L2 makes to a disk whose image sits on a full tmpfs in L1
//!    fails with ENOSPC on the host. The device's `werror` is QEMU's
//!    default (`enospc`): the request is kept and the VM stops:
//!    `BLOCK_IO_ERROR` (action stop, nospace) names the device and the
//!    node, then `STOP`; `query-block` shows `io-status: nospace`. L1
//!    makes room (the tmpfs grows), `cont`: `RESUME`, the kept write goes
//!    through, and L2 reads back what it wrote.
//! 3. `system_powerdown`: the GED interrupt, the power button's
//!    notification, KEY_POWER, busybox `acpid` in L2 runs `poweroff`:
//!    POWERDOWN, then SHUTDOWN (guest, guest-shutdown), and blkvm exits 0.

use anyhow::{ensure, Result};
use tests::{NestedOutput, NestedVm};

/// L2: reports the disk's size, arms busybox acpid for the power button
/// (`power_button_poweroff`), says it is ready, waits for the
/// size to change and reports it, writes to the 16 MiB disk (which fails
/// on the host), then waits for the power button. Reaching the end of the
/// script (no button) is a failure.
const L2_SCRIPT: &str = r#"
for d in /sys/block/vd*; do
    case $(cat "$d/size") in
        131072) resized=${d##*/} ;;
        32768) full=${d##*/} ;;
    esac
done
result disk.size.before "$(cat /sys/block/$resized/size)"
result input.devices "$(cat /sys/class/input/*/name 2>/dev/null | tr '\n' ',')"
power_button_poweroff
result l2.ready 1
i=0
while [ "$(cat /sys/block/$resized/size)" = 131072 ] && [ $i -lt 600 ]; do
    sleep 0.1
    i=$((i + 1))
done
result disk.size.after "$(cat /sys/block/$resized/size)"
dd if=/dev/urandom of=/tmp/pattern bs=1M count=4 2>/dev/null
if dd if=/tmp/pattern of=/dev/$full bs=1M count=4 oflag=direct 2>/dev/null; then
    result full.write ok
else
    result full.write failed
fi
want=$(md5sum < /tmp/pattern)
got=$(dd if=/dev/$full bs=1M count=4 iflag=direct 2>/dev/null | md5sum)
if [ "$want" = "$got" ]; then result full.data same; else result full.data differs; fi
await_power_button
"#;

/// L1: `blkvm run` with QMP in the background, its console also in
/// /tmp/l2.out; a QMP client that waits for BLOCK_IO_ERROR; the resize
/// once L2 is ready; the power button once L2 waits for it; then blkvm's
/// exit.
const L1_SCRIPT: &str = r#"
img=$(image disk 64)
mkdir /tmp/full
mount -t tmpfs -o size=1m tmpfs /tmp/full
truncate -s 16M /tmp/full/full.img
sock=/tmp/qmp.sock
{ l2_boot \
    --object iothread,id=io0 \
    --blockdev "file,node-name=f0,filename=$img" \
    --blockdev raw,node-name=d0,file=f0 \
    --blockdev file,node-name=full0,filename=/tmp/full/full.img \
    --device virtio-blk-pci,id=disk0,drive=d0,iothread=io0 \
    --device virtio-blk-pci,id=full,drive=full0 \
    --qmp "unix:$sock,server=on,wait=off" || true; } | tee /tmp/l2.out &
wait_line "L2| BLKVM-RESULT l2.ready" /tmp/l2.out
QMP_SEND_TIMEOUT=300 qmp-send "$sock" wait:BLOCK_IO_ERROR wait:STOP >/tmp/ioerr.out 2>&1 &
wait_line '"return"' /tmp/ioerr.out
qmp-send "$sock" \
    '{"execute":"query-block"}' \
    '{"execute":"block_resize","arguments":{"node-name":"f0","size":134217728}}' \
    '{"execute":"query-block"}' | sed 's/^/QMP| /'
wait_line '"STOP"' /tmp/ioerr.out
result ioerr.event "$(grep BLOCK_IO_ERROR /tmp/ioerr.out)"
result stop.event "$(grep -c '"STOP"' /tmp/ioerr.out)"
qmp-send "$sock" '{"execute":"query-block"}' | sed 's/^/STOPPED| /'
mount -o remount,size=64m /tmp/full
qmp-send "$sock" '{"execute":"cont"}' wait:RESUME | sed 's/^/QMP| /'
wait_line "L2| BLKVM-RESULT l2.waiting" /tmp/l2.out
qmp-send "$sock" '{"execute":"system_powerdown"}' wait:POWERDOWN wait:SHUTDOWN | sed 's/^/QMP| /'
wait
result image.size "$(stat -c %s "$img")"
"#;

#[test]
fn resize_io_error_and_powerdown_reach_a_real_guest_over_qmp() -> Result<()> {
    let out = NestedVm::new()
        .l2_script(L2_SCRIPT)
        .l1_script(L1_SCRIPT)
        .run()?;
    check(&out)
}

fn check(out: &NestedOutput) -> Result<()> {
    if std::env::var_os("BLKVM_SHOW_CONSOLE").is_some() {
        eprintln!("{}", out.console);
    }
    eprintln!(
        "L1 boot {:?}; L2 run {} s (L1's clock)",
        out.boot_time,
        out.result("l2.seconds")?
    );
    ensure!(out.result("l2.rc")? == "0", out.error("blkvm run failed"));
    // The resize: blkvm's node, the image, and what L2's kernel saw.
    ensure!(
        out.l2_result("disk.size.before")? == "131072",
        out.error("the disk did not start at 64 MiB")
    );
    ensure!(
        out.l2_result("disk.size.after")? == "262144",
        out.error("L2 did not see the disk grow to 128 MiB")
    );
    ensure!(
        out.result("image.size")? == (128u64 << 20).to_string(),
        out.error("the image file was not grown")
    );
    let qmp: Vec<&str> = out
        .l1_lines()
        .filter_map(|l| l.strip_prefix("QMP| "))
        .collect();
    ensure!(
        qmp.iter()
            .any(|l| l.contains("\"virtual-size\":134217728") && l.contains("\"qdev\":\"disk0\"")),
        out.error("query-block did not show the new size")
    );
    // The write to the full disk: kept, the VM stopped, then resumed
    // once there was room, and the data is there.
    ensure!(
        out.l2_result("full.write")? == "ok",
        out.error("the write to the full image did not complete after cont")
    );
    ensure!(
        out.l2_result("full.data")? == "same",
        out.error("L2 did not read back what it wrote")
    );
    ensure!(
        out.result("stop.event")? == "1",
        out.error("no STOP after BLOCK_IO_ERROR")
    );
    ensure!(
        out.l1_lines()
            .filter_map(|l| l.strip_prefix("STOPPED| "))
            .any(|l| l.contains("\"qdev\":\"full\"") && l.contains("\"io-status\":\"nospace\"")),
        out.error("query-block did not show io-status nospace while stopped")
    );
    ensure!(
        qmp.iter().any(|l| l.contains("\"event\":\"RESUME\"")),
        out.error("no RESUME after cont")
    );
    let ioerr = out.result("ioerr.event")?;
    for want in [
        "\"qdev\":\"full\"",
        "\"node-name\":\"full0\"",
        "\"nospace\":true",
        "\"operation\":\"write\"",
        "\"action\":\"stop\"",
    ] {
        ensure!(
            ioerr.contains(want),
            out.error(&format!("BLOCK_IO_ERROR lacks {want}: {ioerr}"))
        );
    }
    // The power button: acpid in L2 ran its action, the script never got
    // to its end, and QMP saw POWERDOWN then the guest's SHUTDOWN.
    ensure!(
        out.l2_result("power.button")? == "acpid",
        out.error("L2's acpid did not see the power button")
    );
    ensure!(
        out.l2.rc.is_none(),
        out.error("L2's script ended instead of being powered off")
    );
    let powerdown = qmp
        .iter()
        .position(|l| l.contains("\"event\":\"POWERDOWN\""));
    let shutdown = qmp.iter().position(|l| {
        l.contains("\"event\":\"SHUTDOWN\"")
            && l.contains("\"guest\":true")
            && l.contains("\"reason\":\"guest-shutdown\"")
    });
    ensure!(
        matches!((powerdown, shutdown), (Some(p), Some(s)) if p < s),
        out.error("no POWERDOWN followed by the guest's SHUTDOWN")
    );
    Ok(())
}
