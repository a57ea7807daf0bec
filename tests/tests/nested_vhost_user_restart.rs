//! A storage daemon killed under a running guest loses nothing the guest
//! saw acknowledged: `blkvm run`'s vhost-user-blk-pci disk, served by
//! `blkvm storage-daemon` with `reconnect-ms` on the chardev, while L2
//! writes a stream of random MiB with O_DIRECT and fsync (a FLUSH) after
//! each. L1 kills the daemon with SIGKILL every few MiB and starts it
//! again on the same socket, ten times. The device reconnects and hands
//! the new daemon the guest's queue and the inflight area the old one
//! kept, so requests it had taken and not returned run again. L2's writes
//! all complete, and after the VM is gone every MiB L2 fsynced holds what
//! L2 wrote there.

use anyhow::{ensure, Result};
use tests::NestedVm;

/// Kill-and-restart cycles.
const CYCLES: u32 = 10;
/// MiB written between two kills.
const MIB_PER_CYCLE: u32 = 3;
/// MiB in the stream (a few after the last kill).
const STREAM_MIB: u32 = CYCLES * MIB_PER_CYCLE + 4;

/// L2: the stream. Each MiB is random data written with O_DIRECT and
/// fsync; once dd returns, its md5 is reported as `stream.N`. A failed
/// write is reported and ends the stream.
fn l2_script() -> String {
    format!(
        r#"
dev=/dev/$(ls /sys/block | grep '^vd' | head -n 1)
result stream.dev "$dev"
i=0
while [ $i -lt {STREAM_MIB} ]; do
    dd if=/dev/urandom of=/tmp/chunk bs=1M count=1 2>/dev/null
    if ! dd if=/tmp/chunk of="$dev" bs=1M seek=$i oflag=direct conv=fsync 2>/tmp/dd.err; then
        result stream.error "$i: $(tail -n 1 /tmp/dd.err)"
        break
    fi
    result stream.$i "$(md5sum </tmp/chunk | cut -d' ' -f1)"
    i=$((i + 1))
done
result stream.done "$i"
"#
    )
}

/// L1: the image on a loop device (O_DIRECT), the daemon, `blkvm run`
/// with the disk; after every MIB_PER_CYCLE MiB L2 reports, SIGKILL to
/// the daemon and a new one on the same socket; after the VM is gone, the
/// md5 of each MiB of the image.
fn l1_script() -> String {
    format!(
        r#"
img=$(loop_image vu 64)
sock=/tmp/vu.sock
start_daemon() {{
    blkvm storage-daemon \
        --blockdev "file,node-name=f0,filename=$img,aio=io_uring,cache.direct=on" \
        --export "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path=$sock,writable=on" \
        2>>/tmp/daemon.err &
    sd=$!
    wait_socket "$sock"
}}
start_daemon
{{ l2_boot \
    --chardev "socket,id=vu0,path=$sock,reconnect-ms=50" \
    --device vhost-user-blk-pci,id=vd0,chardev=vu0 || true; }} >/tmp/l2.out 2>&1 &
l2=$!
c=1
while [ $c -le {CYCLES} ]; do
    at=$((c * {MIB_PER_CYCLE}))
    # Also ends when blkvm run does (l2.rc), rather than after a timeout.
    wait_line "BLKVM-RESULT stream.$at=\|BLKVM-RESULT l2.rc=" /tmp/l2.out || true
    if ! grep -q "BLKVM-RESULT stream.$at=" /tmp/l2.out; then
        echo "BLKVM-ERROR L2 did not write MiB $at"
        cat /tmp/l2.out /tmp/daemon.err
        exit 1
    fi
    kill -KILL "$sd"
    wait "$sd" || true
    start_daemon
    result restart.$c "after MiB $at"
    c=$((c + 1))
done
wait "$l2"
cat /tmp/l2.out
kill -TERM "$sd"
wait "$sd" || true
sed 's/^/DAEMON| /' /tmp/daemon.err
losetup -d "$img"
i=0
while [ $i -lt {STREAM_MIB} ]; do
    result image.$i "$(dd if=/tmp/vu.img bs=1M skip=$i count=1 2>/dev/null | md5sum | cut -d' ' -f1)"
    i=$((i + 1))
done
"#
    )
}

#[test]
fn sigkilled_storage_daemon_restarts_under_a_writing_guest_and_nothing_acked_is_lost() -> Result<()>
{
    let out = NestedVm::new()
        .l2_script(l2_script())
        .l1_script(l1_script())
        .run()?;
    if std::env::var_os("BLKVM_SHOW_CONSOLE").is_some() {
        eprintln!("{}", out.console);
    }
    ensure!(out.result("l2.rc")? == "0", out.error("blkvm run failed"));
    ensure!(
        !out.console.contains("stream.error"),
        out.error("a write in L2 failed")
    );
    let done: u32 = out.l2_result("stream.done")?.parse()?;
    ensure!(
        done == STREAM_MIB,
        out.error(&format!("L2 wrote {done} MiB, not {STREAM_MIB}"))
    );
    for c in 1..=CYCLES {
        out.result(&format!("restart.{c}"))?;
    }
    let mut lost = Vec::new();
    for i in 0..STREAM_MIB {
        if out.l2_result(&format!("stream.{i}"))? != out.result(&format!("image.{i}"))? {
            lost.push(i);
        }
    }
    ensure!(
        lost.is_empty(),
        out.error(&format!("fsynced MiB not on the image: {lost:?}"))
    );
    let reconnects = out.console.matches("reconnected to the backend").count();
    ensure!(
        reconnects >= CYCLES as usize,
        out.error(&format!("{reconnects} reconnects for {CYCLES} restarts"))
    );
    eprintln!(
        "{CYCLES} SIGKILL restarts, {STREAM_MIB} MiB fsynced and on the image, {reconnects} reconnects; L2 ran {} s (L1's clock)",
        out.result("l2.seconds")?
    );
    Ok(())
}
