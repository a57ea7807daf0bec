//! What a stock Debian kernel's virtio-blk driver sees and does through
//! `blkvm run`'s devices on real (nested) KVM, beyond plain reads and
//! writes (`nested_run.rs`): the configured capacities, block sizes,
//! serials (GET_ID) and read-only flag; two queues on a PCI disk; data
//! written across each disk checked in L2 and, after the VM is gone, in
//! L1's images; flush, discard and write-zeroes; and, while L2 waits for
//! its power button, which of blkvm's threads did the block I/O.
//!
//! One L2 boot with three disks:
//! - `pci`: virtio-blk-pci, 32 MiB, 4 KiB logical and physical blocks,
//!   two queues spread over iothreads io0 and io2 (QEMU's
//!   `iothread-vq-mapping`), a loop device with O_DIRECT and io_uring;
//! - `mmio`: virtio-blk-device on iothread io1, 48 MiB, a buffered file
//!   with aio=threads;
//! - `ro`: virtio-blk-pci, 4 MiB of L1's random data, `read-only=on`.

use anyhow::{ensure, Result};
use tests::{NestedOutput, NestedVm};

/// L2: for each disk (told apart by serial), what the kernel sees; then
/// on each writable disk 4 MiB of random data at its start, middle and
/// end with O_DIRECT and fsync (flush), read back; a discard of the
/// second MiB and a write-zeroes (BLKZEROOUT) of the third, read back;
/// the md5 of the whole disk. On `ro`, its md5 and a write that must
/// fail. Then it waits for the power button.
const L2_SCRIPT: &str = r#"
for d in /sys/block/vd*; do
    n=${d##*/}
    name=$(cat "$d/serial")
    result "$name.dev" "$n"
    result "$name.sysfs" "$(readlink -f "$d/device")"
    result "$name.write_zeroes_max_bytes" "$(cat "$d/queue/write_zeroes_max_bytes")"
    disk_info "$n"
    if [ "$name" = blkvm-ro ]; then
        result "$name.md5" "$(md5 "/dev/$n")"
        if dd if=/dev/zero of="/dev/$n" bs=4k count=1 oflag=direct 2>/dev/null; then
            result "$name.write" ok
        else
            result "$name.write" refused
        fi
        continue
    fi
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
# One O_DIRECT read of the PCI disk from each vCPU: blk-mq maps CPU N to
# queue N, so each of its two queues (on their own IOThreads) serves one.
for cpu in 1 2; do
    taskset "$cpu" dd if=/dev/"$(ls /sys/block/*/serial | xargs grep -l blkvm-pci | cut -d/ -f4)" \
        of=/dev/null bs=1M count=8 iflag=direct 2>/dev/null
done
power_button_poweroff
await_power_button
"#;

/// L1: the images, `blkvm run` with QMP in the background; once L2
/// waits, blkvm's block statistics and each of its threads' I/O
/// counters, then the power button; after blkvm exits, the md5 of each
/// image.
const L1_SCRIPT: &str = r#"
pci=$(loop_image pci 32)
mmio=$(image mmio 48)
ro=$(image ro 4)
dd if=/dev/urandom of="$ro" bs=1M count=4 conv=notrunc 2>/dev/null
result ro.image.md5 "$(image_md5 "$ro")"
sock=/tmp/qmp.sock
L2_CPUS=2
{ l2_boot \
    --object iothread,id=io0 \
    --object iothread,id=io1 \
    --object iothread,id=io2 \
    --blockdev "file,node-name=f0,filename=$pci,aio=io_uring,cache.direct=on,discard=unmap" \
    --blockdev raw,node-name=d0,file=f0,discard=unmap \
    --blockdev "file,node-name=f1,filename=$mmio,discard=unmap" \
    --blockdev raw,node-name=d1,file=f1,discard=unmap \
    --blockdev "file,node-name=f2,filename=$ro,read-only=on" \
    --device virtio-blk-pci,id=pci,drive=d0,num-queues=2,iothread-vq-mapping.0.iothread=io0,iothread-vq-mapping.1.iothread=io2,serial=blkvm-pci,logical_block_size=4096,physical_block_size=4096 \
    --device virtio-blk-device,id=mmio,drive=d1,iothread=io1,serial=blkvm-mmio \
    --device virtio-blk-pci,id=ro,drive=f2,serial=blkvm-ro \
    --qmp "unix:$sock,server=on,wait=off" || true; } >/tmp/l2.out &
wait_line "BLKVM-RESULT l2.waiting" /tmp/l2.out || {
    cat /tmp/l2.out
    for t in /proc/$(pidof blkvm)/task/*; do echo "STUCK $(cat $t/comm) $(cut -d' ' -f3 $t/stat) $(cat $t/wchan) $(cut -d' ' -f14,15 $t/stat)"; done
    qmp-send "$sock" '{"execute":"query-status"}' '{"execute":"query-blockstats"}' | sed 's/^/STUCK /'
    sleep 2
    for t in /proc/$(pidof blkvm)/task/*; do echo "STUCK2 $(cat $t/comm) $(cut -d' ' -f3 $t/stat) $(cut -d' ' -f14,15 $t/stat)"; done
    exit 1
}
thread_io "$(pidof blkvm)"
qmp-send "$sock" '{"execute":"query-blockstats"}' | sed 's/^/QMP| /'
qmp-send "$sock" '{"execute":"system_powerdown"}' wait:SHUTDOWN >/dev/null
wait
cat /tmp/l2.out
losetup -d "$pci"
result pci.image.md5 "$(image_md5 /tmp/pci.img)"
result mmio.image.md5 "$(image_md5 "$mmio")"
result ro.image.md5.after "$(image_md5 "$ro")"
"#;

const MIB: usize = 1 << 20;

#[test]
fn debian_sees_and_uses_every_disk_feature_through_blkvm_run() -> Result<()> {
    let out = NestedVm::new()
        .l2_script(L2_SCRIPT)
        .l1_script(L1_SCRIPT)
        .run()?;
    if std::env::var_os("BLKVM_SHOW_CONSOLE").is_some() {
        eprintln!("{}", out.console);
    }
    ensure!(out.result("l2.rc")? == "0", out.error("blkvm run failed"));
    ensure!(
        out.l2_result("power.button")? == "acpid",
        out.error("L2 was not powered off by its power button")
    );
    check_geometry(&out)?;
    check_data(&out)?;
    check_threads(&out)?;
    check_stats(&out)
}

/// Bus, size, block sizes, queues, read-only flag and discard/write-zeroes
/// limits as configured.
fn check_geometry(out: &NestedOutput) -> Result<()> {
    // (serial, bus in sysfs, sectors, logical, physical, queues, ro)
    let want = [
        ("blkvm-pci", "/pci0000:", 32 * 2048, 4096, 4096, 2, 0),
        ("blkvm-mmio", "/LNRO0005:", 48 * 2048, 512, 512, 1, 0),
        ("blkvm-ro", "/pci0000:", 4 * 2048, 512, 512, 1, 1),
    ];
    for (name, bus, sectors, lbs, pbs, queues, ro) in want {
        let sysfs = out.l2_result(&format!("{name}.sysfs"))?;
        ensure!(
            sysfs.contains(bus),
            out.error(&format!("{name} is at {sysfs}, not under {bus}"))
        );
        let dev = out.l2_result(&format!("{name}.dev"))?;
        for (what, value) in [
            ("size", sectors),
            ("logical_block_size", lbs),
            ("physical_block_size", pbs),
            ("queues", queues),
            ("ro", ro),
        ] {
            let seen = out.l2_result(&format!("{dev}.{what}"))?;
            ensure!(
                seen == value.to_string(),
                out.error(&format!("{name}: {what} is {seen}, not {value}"))
            );
        }
        if ro == 0 {
            for limit in ["discard_max_bytes", "write_zeroes_max_bytes"] {
                let key = if limit == "discard_max_bytes" {
                    format!("{dev}.{limit}")
                } else {
                    format!("{name}.{limit}")
                };
                ensure!(
                    out.l2_result(&key)? != "0",
                    out.error(&format!("{name} offers no {limit}"))
                );
            }
        }
    }
    Ok(())
}

/// What L2 wrote it read back, discarded and zeroed ranges read as zeros,
/// and L1's images end up with the md5 L2 saw; the read-only disk kept
/// L1's data and refused the write.
fn check_data(out: &NestedOutput) -> Result<()> {
    let zeros = tests::md5_hex(&vec![0u8; MIB])?;
    for name in ["pci", "mmio"] {
        let serial = format!("blkvm-{name}");
        ensure!(
            out.l2_result(&format!("{serial}.readback"))? == "done",
            out.error(&format!("{name}: no readback"))
        );
        ensure!(
            !out.console.contains(&format!("{serial}.readback.")),
            out.error(&format!("{name}: L2 read back other data than it wrote"))
        );
        for what in ["discarded", "zeroed"] {
            ensure!(
                out.l2_result(&format!("{serial}.{what}.md5"))? == zeros,
                out.error(&format!("{name}: the {what} MiB does not read as zeros"))
            );
        }
        ensure!(
            out.result(&format!("{name}.image.md5"))? == out.l2_result(&format!("{serial}.md5"))?,
            out.error(&format!("the {name} image does not hold what L2 saw"))
        );
    }
    let ro = out.result("ro.image.md5")?;
    ensure!(
        out.l2_result("blkvm-ro.md5")? == ro && out.result("ro.image.md5.after")? == ro,
        out.error("the read-only disk does not hold L1's data, or changed")
    );
    ensure!(
        out.l2_result("blkvm-ro.write")? == "refused",
        out.error("a write to the read-only disk succeeded")
    );
    Ok(())
}

/// Per-thread I/O counters of blkvm (`/proc/PID/task/*/io`): the vCPU
/// threads read and wrote nothing from storage and made no read calls;
/// the O_DIRECT reads of the loop-backed PCI disk were done by its two
/// IOThreads (io_uring submits inline), each at least the 8 MiB that L2
/// read through its queue.
fn check_threads(out: &NestedOutput) -> Result<()> {
    let mut vcpus = 0;
    let mut others_read = 0u64;
    let mut pci_threads = [0u64; 2];
    for (comm, c) in out.thread_io()? {
        // rchar wchar syscr syscw read_bytes write_bytes cancelled_write_bytes
        if comm.starts_with("vcpu") {
            vcpus += 1;
            ensure!(
                c[0] == 0 && c[2] == 0 && c[4] == 0 && c[5] == 0,
                out.error(&format!("vCPU thread {comm} did I/O: {c:?}"))
            );
        } else {
            others_read += c[4];
            match comm.as_str() {
                "iothread-io0" => pci_threads[0] = c[4],
                "iothread-io2" => pci_threads[1] = c[4],
                _ => {}
            }
        }
    }
    ensure!(
        pci_threads.iter().all(|&b| b >= (8 * MIB) as u64),
        out.error(&format!(
            "the PCI disk's IOThreads read {pci_threads:?} bytes, not 8 MiB each"
        ))
    );
    ensure!(
        vcpus == 2,
        out.error(&format!("{vcpus} vCPU threads, not 2"))
    );
    ensure!(
        others_read >= (12 * MIB) as u64,
        out.error(&format!(
            "blkvm's other threads read {others_read} bytes from storage, under 12 MiB"
        ))
    );
    Ok(())
}

/// `query-blockstats`: each writable device counted writes, flushes and
/// discards.
fn check_stats(out: &NestedOutput) -> Result<()> {
    let replies: Vec<serde_json::Value> = out
        .l1_lines()
        .filter_map(|l| l.strip_prefix("QMP| "))
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let devices = replies
        .iter()
        .find_map(|r| r["return"].as_array())
        .ok_or_else(|| out.error("no query-blockstats reply"))?;
    for qdev in ["pci", "mmio"] {
        let dev = devices
            .iter()
            .find(|d| d["qdev"] == qdev)
            .ok_or_else(|| out.error(&format!("query-blockstats has no {qdev}")))?;
        let s = &dev["stats"];
        for key in ["wr_operations", "flush_operations", "unmap_operations"] {
            ensure!(
                s[key].as_u64().unwrap_or(0) > 0,
                out.error(&format!("{qdev}: {key} is {}", s[key]))
            );
        }
    }
    Ok(())
}
