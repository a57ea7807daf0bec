//! `blkvm run` boots a stock Debian kernel on real (nested) KVM: L1 under
//! QEMU TCG has kvm-amd, L2 is the test guest (resources/guest/) with our
//! virtio-blk devices. See resources/nested/README.md.
//!
//! Each test runs first with QEMU (KVM) as L1's VMM, the same options in
//! QEMU's spelling: that proves the scripts and the checks against a
//! known-good VMM, so a failure of the `blkvm run` twin is blkvm's.

use anyhow::{ensure, Result};
use tests::{NestedOutput, NestedVm};

/// L2's script: for each virtio disk, which bus it is on, then 4 MiB of
/// random data written at 1 MiB with O_DIRECT and read back. The disks
/// are told apart by size (64 MiB on PCI, 96 MiB on MMIO), not by name,
/// since probe order is not what the test is about.
const L2_WRITE_AND_READ_BACK: &str = r#"
for d in /sys/block/vd*; do
    n=${d##*/}
    case $(cat "$d/size") in
        131072) name=pci ;;
        196608) name=mmio ;;
        *) name=$n ;;
    esac
    result "$name.dev" "$n"
    result "$name.sysfs" "$(readlink -f "$d/device")"
    disk_info "$n"
    dd if=/dev/urandom of=/tmp/random bs=1M count=4 2>/dev/null
    result "$name.written.md5" "$(md5sum </tmp/random | cut -d' ' -f1)"
    dd if=/tmp/random of="/dev/$n" bs=1M seek=1 oflag=direct 2>/dev/null
    result "$name.readback.md5" "$(md5 "/dev/$n" 1 4)"
done
"#;

/// L1's script: two images in L1's tmpfs, `blkvm run` with one
/// virtio-blk-pci (on a loop device, with O_DIRECT and io_uring) and one
/// virtio-blk-device (virtio-mmio, found through ACPI; buffered, threads),
/// each on its own iothread; after L2 is gone, what the images hold where
/// L2 wrote.
const L1_BOOT_L2_WITH_TWO_DISKS: &str = r#"
pci=$(loop_image pci 64)
mmio=$(image mmio 96)
l2_boot \
    --object iothread,id=io0 \
    --object iothread,id=io1 \
    --blockdev "file,node-name=f0,filename=$pci,aio=io_uring,cache.direct=on" \
    --blockdev raw,node-name=d0,file=f0 \
    --blockdev "file,node-name=f1,filename=$mmio" \
    --blockdev raw,node-name=d1,file=f1 \
    --device virtio-blk-pci,drive=d0,iothread=io0 \
    --device virtio-blk-device,drive=d1,iothread=io1
images_report
"#;

/// The same under QEMU: a microvm with ACPI (virtio-mmio devices found as
/// blkvm's are) and PCIe; QEMU's `file` takes no block device.
const L1_BOOT_L2_WITH_TWO_DISKS_QEMU: &str = r#"
pci=$(loop_image pci 64)
mmio=$(image mmio 96)
l2_boot_qemu \
    -object iothread,id=io0 \
    -object iothread,id=io1 \
    -blockdev "host_device,node-name=f0,filename=$pci,aio=io_uring,cache.direct=on" \
    -blockdev raw,node-name=d0,file=f0 \
    -blockdev "file,node-name=f1,filename=$mmio" \
    -blockdev raw,node-name=d1,file=f1 \
    -device virtio-blk-pci,drive=d0,iothread=io0 \
    -device virtio-blk-device,drive=d1,iothread=io1
images_report
"#;

/// Defines `images_report`, run by L1 after L2 is gone: the size of each
/// image and the md5 of where L2 wrote (the loop device detached first).
const L1_IMAGES_REPORT: &str = r#"
images_report() {
    losetup -d "$pci"
    for name in pci mmio; do
        img=/tmp/$name.img
        result "$name.image.size" "$(stat -c %s "$img")"
        result "$name.image.md5" "$(dd if="$img" bs=1M skip=1 count=4 2>/dev/null | md5sum | cut -d' ' -f1)"
    done
}
"#;

#[test]
fn qemu_kvm_boots_debian_with_pci_and_mmio_disks_on_their_own_iothreads() -> Result<()> {
    let out = NestedVm::new()
        .with_qemu()
        .l2_script(L2_WRITE_AND_READ_BACK)
        .l1_script(format!(
            "{L1_IMAGES_REPORT}{L1_BOOT_L2_WITH_TWO_DISKS_QEMU}"
        ))
        .run()?;
    check_two_disks(&out)
}

#[test]
fn debian_boots_under_blkvm_run_with_pci_and_mmio_disks_on_their_own_iothreads() -> Result<()> {
    let out = NestedVm::new()
        .l2_script(L2_WRITE_AND_READ_BACK)
        .l1_script(format!("{L1_IMAGES_REPORT}{L1_BOOT_L2_WITH_TWO_DISKS}"))
        .run()?;
    check_two_disks(&out)
}

/// The VMM exited 0, L2's script passed, each disk is on its bus, and
/// what L2 wrote it read back and L1 finds in the image.
fn check_two_disks(out: &NestedOutput) -> Result<()> {
    if std::env::var_os("BLKVM_SHOW_CONSOLE").is_some() {
        eprintln!("{}", out.console);
    }
    eprintln!(
        "L1 boot {:?}; L2 run {} s (L1's clock)",
        out.boot_time,
        out.result("l2.seconds")?
    );
    ensure!(out.result("l2.rc")? == "0", out.error("the VMM failed"));
    out.check_l2_success()?;
    for (name, bus) in [("pci", "/pci0000:"), ("mmio", "/LNRO0005:")] {
        let sysfs = out.l2_result(&format!("{name}.sysfs"))?;
        ensure!(
            sysfs.contains(bus),
            out.error(&format!("the {name} disk is at {sysfs}, not under {bus}"))
        );
        let dev = out.l2_result(&format!("{name}.dev"))?;
        ensure!(
            out.l2_result(&format!("{dev}.ro"))? == "0",
            out.error(&format!("the {name} disk is read-only"))
        );
        let written = out.l2_result(&format!("{name}.written.md5"))?;
        ensure!(
            out.l2_result(&format!("{name}.readback.md5"))? == written,
            out.error(&format!("L2 read back other data than it wrote to {name}"))
        );
        ensure!(
            out.result(&format!("{name}.image.md5"))? == written,
            out.error(&format!("the {name} image does not hold what L2 wrote"))
        );
    }
    ensure!(
        out.result("pci.image.size")? == (64u64 << 20).to_string()
            && out.result("mmio.image.size")? == (96u64 << 20).to_string(),
        out.error("an image changed size")
    );
    Ok(())
}
