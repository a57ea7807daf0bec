//! `blkvm run`'s vhost-user-blk devices on real (nested) KVM, served by
//! the two backends a user would pick: `blkvm storage-daemon` and
//! qemu-storage-daemon (QEMU's, the known-good one). The VMM only
//! negotiates: guest RAM, the ioeventfd kicks and the irqfd calls go to
//! the daemons, so the block I/O must show up in the daemons' counters
//! and in none of blkvm run's threads.
//!
//! One L2 boot with two disks, each on a loop device in L1 (O_DIRECT,
//! io_uring), told apart in L2 by size (vhost-user-blk has no serial
//! property):
//! - `blkvm`: vhost-user-blk-pci, 32 MiB, two queues, served by `blkvm
//!   storage-daemon` (`num-queues=2`, 4 KiB logical blocks);
//! - `qsd`: vhost-user-blk (virtio-mmio), 48 MiB, one queue, served by
//!   qemu-storage-daemon;
//! - `ro`: vhost-user-blk-pci, 8 MiB of L1's random data in tmpfs, served
//!   read-only (`writable=off`) by a second `blkvm storage-daemon`.
//!
//! L2 checks geometry and data (written at start, middle and end,
//! discarded, zeroed, read back), then L1 grows qemu-storage-daemon's
//! image to 64 MiB and its node with QMP `block_resize`: the daemon's
//! CONFIG_CHANGE message must reach L2's kernel as a config interrupt.
//! (`blkvm storage-daemon` cannot send that message yet: the `vhost`
//! crate's backend channel has no CONFIG_CHANGE_MSG, so its disk is not
//! resized here.)

use anyhow::{ensure, Result};
use tests::{NestedOutput, NestedVm};

/// L2: for each disk what the kernel sees; 4 MiB of random data at its
/// start, middle and end with O_DIRECT and fsync, read back; a discard of
/// the second MiB and a write-zeroes (BLKZEROOUT) of the third, read
/// back; the md5 of the whole disk; an 8 MiB read of the PCI disk from
/// each vCPU (one per queue). Then it says `l2.resize.ready`, waits up to
/// 20 s for the qemu-storage-daemon disk to grow to 64 MiB, writes 1 MiB
/// of random data into its last MiB and reads it back, and waits for the
/// power button.
const L2_SCRIPT: &str = r#"
dev_blkvm=
dev_qsd=
for d in /sys/block/vd*; do
    n=${d##*/}
    case $(cat "$d/size") in
    65536) name=blkvm; dev_blkvm=$n ;;
    98304) name=qsd; dev_qsd=$n ;;
    16384)
        # The read-only disk: L1's data, and a write that must fail.
        result ro.dev "$n"
        disk_info "$n"
        result ro.md5 "$(md5 "/dev/$n")"
        if dd if=/dev/zero of="/dev/$n" bs=4k count=1 oflag=direct 2>/dev/null; then
            result ro.write ok
        else
            result ro.write refused
        fi
        continue
        ;;
    *) result "$n.unexpected_size" "$(cat "$d/size")"; continue ;;
    esac
    result "$name.dev" "$n"
    result "$name.sysfs" "$(readlink -f "$d/device")"
    result "$name.serial" "$(cat "$d/serial" 2>/dev/null)"
    result "$name.write_zeroes_max_bytes" "$(cat "$d/queue/write_zeroes_max_bytes")"
    disk_info "$n"
    mib=$(($(cat "$d/size") / 2048))
    dd if=/dev/urandom of=/tmp/random bs=1M count=4 2>/dev/null
    want=$(md5sum </tmp/random | cut -d' ' -f1)
    for at in 0 $((mib / 2)) $((mib - 4)); do
        dd if=/tmp/random of="/dev/$n" bs=1M seek="$at" oflag=direct conv=fsync 2>/dev/null
        [ "$(md5 "/dev/$n" "$at" 4)" = "$want" ] || result "$name.readback.$at" bad
    done
    result "$name.readback" done
    blkdiscard -o 1048576 -l 1048576 "/dev/$n"
    result "$name.discarded.md5" "$(md5 "/dev/$n" 1 1)"
    blkzero "/dev/$n" 2097152 1048576
    result "$name.zeroed.md5" "$(md5 "/dev/$n" 2 1)"
    result "$name.md5" "$(md5 "/dev/$n")"
done
[ -n "$dev_blkvm" ] && [ -n "$dev_qsd" ] || { echo "BLKVM-ERROR a disk is missing"; exit 1; }
# blk-mq maps vCPU N to queue N: each of the PCI disk's two queues (its
# own kick and call) serves one of these.
for cpu in 1 2; do
    taskset "$cpu" dd if="/dev/$dev_blkvm" of=/dev/null bs=1M count=8 iflag=direct 2>/dev/null
done
result blkvm.per_cpu_reads done
power_button_poweroff
result l2.resize.ready 1
i=0
while [ $i -lt 200 ]; do
    [ "$(cat /sys/block/$dev_qsd/size)" = 98304 ] || break
    sleep 0.1
    i=$((i + 1))
done
result l2.resize.polls "$i"
for name in qsd; do
    eval "n=\$dev_$name"
    size=$(cat "/sys/block/$n/size")
    result "$name.resized.size" "$size"
    [ "$size" = 131072 ] || continue
    dd if=/dev/urandom of=/tmp/tail bs=1M count=1 2>/dev/null
    result "$name.tail.want" "$(md5sum </tmp/tail | cut -d' ' -f1)"
    dd if=/tmp/tail of="/dev/$n" bs=1M seek=63 oflag=direct conv=fsync 2>/dev/null
    result "$name.tail.md5" "$(md5 "/dev/$n" 63 1)"
done
await_power_button
"#;

/// L1: the two loop-backed images and their daemons (each with QMP),
/// `blkvm run` with QMP in the background; once L2's I/O is done, the
/// qemu-storage-daemon image grown to 64 MiB (the file, the loop device,
/// the daemon's node by `block_resize`); once L2 waits for its power button, blkvm run's
/// per-thread and the daemons' per-process I/O counters, then the power
/// button; after blkvm exits, SIGTERM to each daemon and, once they are
/// gone, the md5 of each image's original extent and of its last MiB.
const L1_SCRIPT: &str = r#"
bdev=$(loop_image blkvm 32)
qdev=$(loop_image qsd 48)
bsock=/tmp/blkvm-sd.sock
bqmp=/tmp/blkvm-sd.qmp
qsock=/tmp/qsd.sock
qqmp=/tmp/qsd.qmp
vqmp=/tmp/run.qmp
blkvm storage-daemon \
    --blockdev "file,node-name=f0,filename=$bdev,aio=io_uring,cache.direct=on,discard=unmap" \
    --blockdev raw,node-name=d0,file=f0,discard=unmap \
    --export "type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path=$bsock,writable=on,num-queues=2,logical-block-size=4096" \
    --qmp "unix:$bqmp,server=on,wait=off" &
bsd=$!
qemu-storage-daemon \
    --blockdev "driver=host_device,node-name=f1,filename=$qdev,aio=io_uring,cache.direct=on,discard=unmap" \
    --blockdev driver=raw,node-name=d1,file=f1,discard=unmap \
    --export "type=vhost-user-blk,id=e1,node-name=d1,addr.type=unix,addr.path=$qsock,writable=on" \
    --chardev "socket,id=m,path=$qqmp,server=on,wait=off" --monitor chardev=m &
qsd=$!
# A third disk, read-only: 8 MiB of L1's random data behind a writable=off
# export of its own blkvm storage-daemon.
ro=$(image ro 8)
dd if=/dev/urandom of="$ro" bs=1M count=8 conv=notrunc 2>/dev/null
result ro.image.md5 "$(image_md5 "$ro")"
rsock=/tmp/ro.sock
blkvm storage-daemon \
    --blockdev "file,node-name=r0,filename=$ro,read-only=on" \
    --export "type=vhost-user-blk,id=e2,node-name=r0,addr.type=unix,addr.path=$rsock,writable=off" &
rsd=$!
for s in "$bsock" "$bqmp" "$qsock" "$qqmp" "$rsock"; do
    wait_socket "$s"
done
result daemons.ready 1

# stuck WHAT: what blkvm run's threads are doing, then fails the script.
stuck() {
    echo "BLKVM-ERROR $1"
    if run=$(pid_of blkvm run); then
        for t in /proc/"$run"/task/*; do
            echo "STUCK $(cat "$t/comm") $(cut -d' ' -f3 "$t/stat") $(cat "$t/wchan")"
        done
    fi
    exit 1
}

L2_CPUS=2
{ l2_boot \
    --chardev "socket,id=vu0,path=$bsock" \
    --device vhost-user-blk-pci,id=vpci,chardev=vu0,num-queues=2 \
    --chardev "socket,id=vu1,path=$qsock" \
    --device vhost-user-blk,id=vmmio,chardev=vu1 \
    --chardev "socket,id=vu2,path=$rsock" \
    --device vhost-user-blk-pci,id=vro,chardev=vu2 \
    --qmp "unix:$vqmp,server=on,wait=off" || true; } | tee /tmp/l2.out &
l2=$!
wait_line 'l2.resize.ready\|BLKVM-DONE\|l2.rc=' /tmp/l2.out || stuck "L2 did not finish its I/O"
grep -q l2.resize.ready /tmp/l2.out || stuck "L2 or blkvm run ended before L2's I/O was done"

# grow NAME LOOPDEV QMP NODE: /tmp/NAME.img and its loop device to
# 64 MiB, then the daemon's NODE through its QMP; reports
# NAME.block_resize and prints the QMP lines as `NAME-QMP| `.
grow() {
    truncate -s 64M "/tmp/$1.img"
    losetup -c "$2"
    if qmp-send "$3" "{\"execute\":\"block_resize\",\"arguments\":{\"node-name\":\"$4\",\"size\":67108864}}" \
        >"/tmp/$1.resize" 2>&1; then
        result "$1.block_resize" ok
    else
        result "$1.block_resize" "failed: $(tail -n 1 "/tmp/$1.resize")"
    fi
    sed "s/^/$1-QMP| /" "/tmp/$1.resize"
}
grow qsd "$qdev" "$qqmp" d1

wait_line "L2| BLKVM-RESULT l2.waiting" /tmp/l2.out || stuck "L2 never waited for its power button"
thread_io "$(pid_of blkvm run)"
qmp-send "$vqmp" '{"execute":"x-query-virtio"}' | sed 's/^/RUN-QMP| /'
process_io blkvm.daemon.io "$bsd"
process_io qsd.daemon.io "$qsd"
qmp-send "$vqmp" '{"execute":"system_powerdown"}' wait:SHUTDOWN >/dev/null
wait "$l2"

# stop NAME PID: SIGTERM, then the daemon's exit code as NAME.daemon.rc.
stop() {
    kill -TERM "$2" || true
    rc=0
    wait "$2" || rc=$?
    result "$1.daemon.rc" "$rc"
}
stop blkvm "$bsd"
stop qsd "$qsd"
stop ro "$rsd"
result ro.image.md5.after "$(image_md5 "$ro")"
losetup -d "$bdev"
losetup -d "$qdev"
for disk in blkvm:32 qsd:48; do
    name=${disk%:*}
    img=/tmp/$name.img
    result "$name.image.size" "$(stat -c %s "$img")"
    result "$name.image.md5" "$(dd if="$img" bs=1M count="${disk#*:}" 2>/dev/null | md5sum | cut -d' ' -f1)"
    result "$name.image.tail.md5" "$(dd if="$img" bs=1M skip=63 count=1 2>/dev/null | md5sum | cut -d' ' -f1)"
done
"#;

const MIB: u64 = 1 << 20;

/// What each disk should look like in L2.
struct Disk {
    /// The result keys' prefix.
    name: &'static str,
    /// Where its device sits in L2's sysfs.
    bus: &'static str,
    mib: u64,
    block_size: u64,
    queues: u64,
    /// The least its daemon must have read from storage: L2's whole-disk
    /// md5, its read-backs (12 MiB) and, on the PCI disk, 8 MiB per vCPU.
    min_daemon_read: u64,
}

const BLKVM: Disk = Disk {
    name: "blkvm",
    bus: "/pci0000:",
    mib: 32,
    block_size: 4096,
    queues: 2,
    min_daemon_read: (32 + 12 + 16) * MIB,
};

const QSD: Disk = Disk {
    name: "qsd",
    bus: "/LNRO0005:",
    mib: 48,
    block_size: 512,
    queues: 1,
    min_daemon_read: (48 + 12) * MIB,
};

/// The size both disks are grown to.
const GROWN_MIB: u64 = 64;

#[test]
fn debian_uses_vhost_user_blk_disks_served_by_blkvm_and_qemu_storage_daemon() -> Result<()> {
    let out = NestedVm::new()
        .with_qsd()
        .l2_script(L2_SCRIPT)
        .l1_script(L1_SCRIPT)
        .run()?;
    if std::env::var_os("BLKVM_SHOW_CONSOLE").is_some() {
        eprintln!("{}", out.console);
    }
    eprintln!(
        "L1 boot {:?}; L2 run {} s (L1's clock); L2 polled the sizes {} times",
        out.boot_time,
        out.result("l2.seconds")?,
        out.l2_result("l2.resize.polls")?
    );
    ensure!(out.result("l2.rc")? == "0", out.error("blkvm run failed"));
    ensure!(
        out.l2_result("power.button")? == "acpid",
        out.error("L2 was not powered off by its power button")
    );
    for disk in [&BLKVM, &QSD] {
        check_geometry(&out, disk)?;
        check_data(&out, disk)?;
        check_daemon(&out, disk)?;
    }
    check_read_only(&out)?;
    check_run_threads(&out)?;
    check_query_virtio(&out)?;
    check_blkvm_export_stats(&out)?;
    // qemu-storage-daemon's CONFIG_CHANGE first: the known-good backend.
    check_resize(&out, &QSD)
}

/// Bus, size, block sizes, queues, and discard/write-zeroes limits: the
/// backend's configuration space as the guest reads it through blkvm run.
fn check_geometry(out: &NestedOutput, disk: &Disk) -> Result<()> {
    let name = disk.name;
    let sysfs = out.l2_result(&format!("{name}.sysfs"))?;
    ensure!(
        sysfs.contains(disk.bus),
        out.error(&format!("{name} is at {sysfs}, not under {}", disk.bus))
    );
    let dev = out.l2_result(&format!("{name}.dev"))?;
    for (what, value) in [
        ("size", disk.mib * 2048),
        ("logical_block_size", disk.block_size),
        ("physical_block_size", disk.block_size),
        ("queues", disk.queues),
        ("ro", 0),
    ] {
        let seen = out.l2_result(&format!("{dev}.{what}"))?;
        ensure!(
            seen == value.to_string(),
            out.error(&format!("{name}: {what} is {seen}, not {value}"))
        );
    }
    for key in [
        format!("{dev}.discard_max_bytes"),
        format!("{name}.write_zeroes_max_bytes"),
    ] {
        ensure!(
            out.l2_result(&key)? != "0",
            out.error(&format!("{name}: {key} is 0"))
        );
    }
    Ok(())
}

/// What L2 wrote it read back, discarded and zeroed ranges read as zeros,
/// and the image holds, in its original extent, what L2 saw.
fn check_data(out: &NestedOutput, disk: &Disk) -> Result<()> {
    let name = disk.name;
    let zeros = tests::md5_hex(&vec![0u8; MIB as usize])?;
    ensure!(
        out.l2_result(&format!("{name}.readback"))? == "done",
        out.error(&format!("{name}: no readback"))
    );
    ensure!(
        !out.console.contains(&format!("{name}.readback.")),
        out.error(&format!("{name}: L2 read back other data than it wrote"))
    );
    for what in ["discarded", "zeroed"] {
        ensure!(
            out.l2_result(&format!("{name}.{what}.md5"))? == zeros,
            out.error(&format!("{name}: the {what} MiB does not read as zeros"))
        );
    }
    ensure!(
        out.result(&format!("{name}.image.md5"))? == out.l2_result(&format!("{name}.md5"))?,
        out.error(&format!("the {name} image does not hold what L2 saw"))
    );
    Ok(())
}

/// The daemon read at least what L2 read from its disk (`read_bytes` of
/// /proc/PID/io: its threads' and io_uring workers' block I/O) and exited
/// 0 on SIGTERM.
fn check_daemon(out: &NestedOutput, disk: &Disk) -> Result<()> {
    let name = disk.name;
    let io = counters(out, out.result(&format!("{name}.daemon.io"))?)?;
    ensure!(
        io[4] >= disk.min_daemon_read,
        out.error(&format!(
            "{name}'s daemon read {} bytes from storage, under {}",
            io[4], disk.min_daemon_read
        ))
    );
    ensure!(
        out.result(&format!("{name}.daemon.rc"))? == "0",
        out.error(&format!("{name}'s daemon did not exit 0 on SIGTERM"))
    );
    Ok(())
}

/// rchar wchar syscr syscw read_bytes write_bytes cancelled_write_bytes.
fn counters(out: &NestedOutput, text: &str) -> Result<Vec<u64>> {
    let c: Vec<u64> = text
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    ensure!(c.len() == 7, out.error(&format!("bad counters: {text}")));
    Ok(c)
}

/// Per-thread I/O counters of blkvm run: no thread read or wrote a byte
/// of storage (the daemons did the I/O), the two vCPU threads made no read
/// calls at all, and each device has its control thread.
fn check_run_threads(out: &NestedOutput) -> Result<()> {
    let mut comms = Vec::new();
    for (comm, c) in out.thread_io()? {
        ensure!(
            c[4] == 0 && c[5] == 0,
            out.error(&format!("blkvm run's thread {comm} did block I/O: {c:?}"))
        );
        if comm.starts_with("vcpu") {
            ensure!(
                c[0] == 0 && c[2] == 0,
                out.error(&format!("vCPU thread {comm} read: {c:?}"))
            );
        }
        comms.push(comm);
    }
    let vcpus = comms.iter().filter(|c| c.starts_with("vcpu")).count();
    ensure!(
        vcpus == 2,
        out.error(&format!("{vcpus} vCPU threads, not 2: {comms:?}"))
    );
    for control in ["vpci-vu", "vmmio-vu"] {
        ensure!(
            comms.iter().any(|c| c == control),
            out.error(&format!("no control thread {control}: {comms:?}"))
        );
    }
    Ok(())
}

/// `blkvm storage-daemon`'s stats line at exit: the export served reads,
/// writes, flushes, discards and write-zeroes, and none failed.
fn check_blkvm_export_stats(out: &NestedOutput) -> Result<()> {
    let line = out
        .l1_lines()
        .find(|l| l.contains("blkvm storage-daemon: export e0 stats:"))
        .ok_or_else(|| out.error("blkvm storage-daemon printed no stats"))?;
    let stat = |key: &str| -> Result<u64> {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
            .ok_or_else(|| out.error(&format!("no {key} in {line}")))
    };
    ensure!(stat("errors")? == 0, out.error(&format!("errors: {line}")));
    ensure!(
        stat("read_bytes")? >= BLKVM.min_daemon_read,
        out.error(&format!("the export read too little: {line}"))
    );
    for key in ["write_ops", "flush_ops", "discard_ops", "write_zeroes_ops"] {
        ensure!(stat(key)? > 0, out.error(&format!("no {key}: {line}")));
    }
    Ok(())
}

/// The daemon's `block_resize` reached L2: its kernel saw the disk grow
/// to 64 MiB (the backend's CONFIG_CHANGE, blkvm run's config interrupt),
/// and 1 MiB L2 wrote past the old end is in the image.
fn check_resize(out: &NestedOutput, disk: &Disk) -> Result<()> {
    let name = disk.name;
    let resize = out.result(&format!("{name}.block_resize"))?;
    ensure!(
        resize == "ok",
        out.error(&format!("{name}: block_resize {resize}"))
    );
    let size = out.l2_result(&format!("{name}.resized.size"))?;
    ensure!(
        size == (GROWN_MIB * 2048).to_string(),
        out.error(&format!(
            "{name}: L2 still saw {size} sectors 20 s after block_resize to {GROWN_MIB} MiB"
        ))
    );
    let want = out.l2_result(&format!("{name}.tail.want"))?;
    ensure!(
        out.l2_result(&format!("{name}.tail.md5"))? == want
            && out.result(&format!("{name}.image.tail.md5"))? == want,
        out.error(&format!(
            "{name}: the MiB L2 wrote past the old end is not what it read or what the image holds"
        ))
    );
    ensure!(
        out.result(&format!("{name}.image.size"))? == (GROWN_MIB * MIB).to_string(),
        out.error(&format!("{name}: the image is not {GROWN_MIB} MiB"))
    );
    Ok(())
}

/// `x-query-virtio` on blkvm run's QMP lists both devices as
/// vhost-user-blk, each with its socket and connected.
fn check_query_virtio(out: &NestedOutput) -> Result<()> {
    let reply: serde_json::Value = out
        .l1_lines()
        .filter_map(|l| l.strip_prefix("RUN-QMP| "))
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["return"].is_array())
        .ok_or_else(|| out.error("no x-query-virtio reply"))?;
    let devices = reply["return"].as_array().cloned().unwrap_or_default();
    for (id, socket) in [("vpci", "/tmp/blkvm-sd.sock"), ("vmmio", "/tmp/qsd.sock")] {
        let d = devices
            .iter()
            .find(|d| d["path"] == format!("/machine/peripheral/{id}/virtio-backend"))
            .ok_or_else(|| out.error(&format!("x-query-virtio does not list {id}")))?;
        ensure!(
            d["name"] == "vhost-user-blk"
                && d["blkvm-backend"]["vhost-user"] == socket
                && d["blkvm-backend"]["connected"] == true,
            out.error(&format!("x-query-virtio: {id} is {d}"))
        );
    }
    Ok(())
}

/// The read-only export is a read-only disk in L2 (VIRTIO_BLK_F_RO passed
/// through): L1's data, and a write refused; the image did not change.
fn check_read_only(out: &NestedOutput) -> Result<()> {
    let dev = out.l2_result("ro.dev")?;
    for (what, want) in [("ro", "1"), ("size", "16384")] {
        let seen = out.l2_result(&format!("{dev}.{what}"))?;
        ensure!(
            seen == want,
            out.error(&format!("read-only disk: {what} is {seen}, not {want}"))
        );
    }
    let image = out.result("ro.image.md5")?;
    ensure!(
        out.l2_result("ro.md5")? == image && out.result("ro.image.md5.after")? == image,
        out.error("the read-only disk does not hold L1's data, or changed")
    );
    ensure!(
        out.l2_result("ro.write")? == "refused",
        out.error("a write to the read-only disk succeeded")
    );
    ensure!(
        out.result("ro.daemon.rc")? == "0",
        out.error("the read-only disk's daemon did not exit 0")
    );
    Ok(())
}
