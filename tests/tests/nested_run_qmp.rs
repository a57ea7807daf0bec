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
//! 3. `rerror` on reads the host fails: two disks on `nbd` nodes whose
//!    server (a `blkvm storage-daemon` in L1) is killed once L2 is up, so
//!    their reads fail with EIO. `rerror=report` hands L2 the error (its
//!    `dd` fails); `rerror=ignore` completes the read (its `dd`
//!    succeeds); QMP sees `BLOCK_IO_ERROR` with `action: report` and
//!    `action: ignore` naming each device.
//! 4. `system_powerdown`: the GED interrupt, the power button's
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
        16384) rep=${d##*/} ;;
        8192) ign=${d##*/} ;;
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
if dd if=/dev/$rep of=/dev/null bs=4k count=1 iflag=direct 2>/dev/null; then
    result rerror.report ok
else
    result rerror.report failed
fi
if dd if=/dev/$ign of=/dev/null bs=4k count=1 iflag=direct 2>/dev/null; then
    result rerror.ignore ok
else
    result rerror.ignore failed
fi
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
blkvm storage-daemon \
    --blockdev null-co,node-name=n8,size=8M,read-zeroes=on \
    --blockdev null-co,node-name=n4,size=4M,read-zeroes=on \
    --nbd-server addr.type=unix,addr.path=/tmp/nbd.sock \
    --export type=nbd,id=e8,node-name=n8 \
    --export type=nbd,id=e4,node-name=n4 >/tmp/nbd.log 2>&1 &
nbd_pid=$!
i=0
until [ -S /tmp/nbd.sock ] || [ $i -ge 100 ]; do sleep 0.1; i=$((i + 1)); done
{ l2_boot \
    --object iothread,id=io0 \
    --blockdev "file,node-name=f0,filename=$img" \
    --blockdev raw,node-name=d0,file=f0 \
    --blockdev file,node-name=full0,filename=/tmp/full/full.img \
    --device virtio-blk-pci,id=disk0,drive=d0,iothread=io0 \
    --device virtio-blk-pci,id=full,drive=full0 \
    --blockdev nbd,node-name=rep0,server.type=unix,server.path=/tmp/nbd.sock,export=n8,read-only=on \
    --blockdev nbd,node-name=ign0,server.type=unix,server.path=/tmp/nbd.sock,export=n4,read-only=on \
    --device virtio-blk-pci,id=rep,drive=rep0,rerror=report \
    --device virtio-blk-pci,id=ign,drive=ign0,rerror=ignore \
    --qmp "unix:$sock,server=on,wait=off" || true; } | tee /tmp/l2.out &
wait_line "L2| BLKVM-RESULT l2.ready" /tmp/l2.out
kill $nbd_pid
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
QMP_SEND_TIMEOUT=300 qmp-send "$sock" wait:SHUTDOWN >/tmp/rerr.out 2>&1 &
rerr_pid=$!
wait_line '"return"' /tmp/rerr.out
mount -o remount,size=64m /tmp/full
qmp-send "$sock" '{"execute":"cont"}' wait:RESUME | sed 's/^/QMP| /'
wait_line "L2| BLKVM-RESULT l2.waiting" /tmp/l2.out
kill $rerr_pid
grep BLOCK_IO_ERROR /tmp/rerr.out | sed 's/^/RERR| /'
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
    // Reads the host failed: reported to L2 on one disk, hidden on the
    // other, and each told to QMP with its action.
    ensure!(
        out.l2_result("rerror.report")? == "failed",
        out.error("rerror=report did not hand L2 the read error")
    );
    ensure!(
        out.l2_result("rerror.ignore")? == "ok",
        out.error("rerror=ignore did not complete the read")
    );
    let rerr: Vec<&str> = out
        .l1_lines()
        .filter_map(|l| l.strip_prefix("RERR| "))
        .collect();
    for (qdev, action) in [("rep", "report"), ("ign", "ignore")] {
        ensure!(
            rerr.iter()
                .any(|l| l.contains(&format!("\"qdev\":\"{qdev}\""))
                    && l.contains(&format!("\"action\":\"{action}\""))
                    && l.contains("\"operation\":\"read\"")),
            out.error(&format!(
                "no BLOCK_IO_ERROR for {qdev} with action {action}"
            ))
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
