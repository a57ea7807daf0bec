#!/usr/bin/env bash
# README's first command: boot a stock Debian kernel under `blkvm run`
# from an ext4 root disk, with a second disk for data.
#
#   resources/demo.sh
#
# On a fresh Debian 12 machine it installs what it needs
# (resources/setup.sh), builds blkvm (cargo build --release), fetches the
# Debian kernel with its virtio and ext4 modules
# (resources/guest/fetch-kernel.sh), and makes the guest
# (resources/demo/build.sh): an initramfs that loads the modules and
# mounts root=/dev/vda, and two fresh ext4 images, demo-root.img (busybox
# and /sbin/init, resources/demo/init) and an empty demo-data.img. It
# then boots the guest twice on the same images
# (resources/demo/boot.sh): the root disk on virtio-blk-pci with an
# IOThread and io_uring, the data disk on virtio-blk-device (virtio-mmio).
# The guest prints its kernel, mounts and disks, counts its boots on the
# root disk, writes a checksummed file to the data disk and reads every
# one back; the host prints blkvm's query-blockstats counters and the
# times, and after each boot checks both images with `e2fsck -fn` and
# reads the boot counter and the data files back with debugfs.
#
# Where /dev/kvm can boot a stock kernel (VT-x/AMD-V), blkvm runs on the
# host. Where it cannot (PVM, or no /dev/kvm), it says so in one line and
# runs the same guest nested: blkvm inside a QEMU TCG guest (L1) with
# emulated AMD SVM, whose KVM is real (resources/nested/), the images
# given to L1 as its disks, so the guest's writes land in the host files.
#
# Environment: BLKVM, a blkvm binary to use instead of building
# target/release/blkvm; DEMO_OUT, where the images go (default
# resources/out); DEMO_MODE=direct|nested overrides the choice;
# DEMO_BOOTS, how many boots (default 2). Idempotent: each step is skipped
# when done, and the images are made afresh on every run. Build output
# goes to stderr, the demo's own lines to stdout.
set -euo pipefail

cd "$(dirname "$0")/.."
repo=$(pwd)
build=$repo/resources/out/demo
guest=$build/guest
mkdir -p "$build" "${DEMO_OUT:-resources/out}"
images=$(cd "${DEMO_OUT:-resources/out}" && pwd)
root_img=$images/demo-root.img
data_img=$images/demo-data.img
boots=${DEMO_BOOTS:-2}
# One demo at a time per checkout: they share resources/out/demo.
exec 8>"$build/.lock"
flock 8

resources/setup.sh >&2
if [ -n "${BLKVM:-}" ]; then
    blkvm=$(readlink -f "$BLKVM")
else
    cargo build --release -p vmm --bin blkvm >&2
    blkvm=$repo/target/release/blkvm
fi
# The test guest's modules (virtio, the power button) plus ext4 and the
# crc32c it checksums metadata with (a soft dependency modinfo does not
# list), in a folder of the demo's own so the tests' guest stays as it is.
GUEST_OUT=$guest GUEST_MODULES="virtio_pci virtio_mmio virtio_blk button evdev crc32c_generic ext4" \
    resources/guest/fetch-kernel.sh >&2
GUEST_OUT=$guest DEMO_OUT=$images resources/demo/build.sh >&2

# The same test as blkvm's own warning (vmm/src/vm/pvm.rs).
if [ -n "${DEMO_MODE:-}" ]; then
    mode=$DEMO_MODE
    echo "blkvm demo: DEMO_MODE=$mode"
elif [ ! -e /dev/kvm ]; then
    mode=nested
    echo "blkvm demo: no /dev/kvm here, so the guest runs nested: blkvm run inside a QEMU TCG guest (L1) with emulated AMD SVM"
elif [ -d /sys/module/kvm_pvm ] || ! grep '^flags' /proc/cpuinfo | grep -qw -e vmx -e svm; then
    mode=nested
    echo "blkvm demo: /dev/kvm here is PVM (no vmx/svm), which cannot boot a stock kernel, so the guest runs nested: blkvm run inside a QEMU TCG guest (L1) with emulated AMD SVM"
else
    mode=direct
    echo "blkvm demo: /dev/kvm has hardware virtualization: blkvm run boots the guest on this host"
fi

# pad FILE: zeros to a 512-byte boundary, so the next cpio archive of an
# initrd starts aligned (the kernel skips zeros between archives).
pad() { truncate -s %512 "$1"; }

case $mode in
    direct)
        qmp_send=$build/qmp-send
        if [ ! -x "$qmp_send" ] || [ resources/nested/qmp-send.c -nt "$qmp_send" ]; then
            gcc -O2 -Wall -Wextra -Werror -o "$qmp_send" resources/nested/qmp-send.c
        fi
        cpus=$(($(nproc) >= 2 ? 2 : 1))
        ;;
    nested)
        # L1's base initramfs (with this kernel's modules) and blkvm.
        GUEST_OUT=$guest NESTED_OUT=$build/nested resources/nested/build.sh "$blkvm" >&2
        initrd=$build/l1-initrd
        cp "$build/nested/initramfs.cpio" "$initrd"
        pad "$initrd"
        cat "$build/nested/programs.cpio" >>"$initrd"
        pad "$initrd"
        stage=$(mktemp -d "$build/l1.XXXXXX")
        trap 'rm -rf "$stage"' EXIT
        mkdir -p "$stage/l2" "$stage/demo"
        cp resources/demo/l1.sh "$stage/test.sh"
        cp resources/demo/boot.sh "$stage/demo/boot.sh"
        cp "$build/initramfs.cpio.gz" "$stage/l2/initrd"
        (cd "$stage" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) >>"$initrd"
        ;;
    *)
        echo "blkvm demo: DEMO_MODE must be direct or nested, not $mode" >&2
        exit 2
        ;;
esac

# boot_direct: one boot on this host.
boot_direct() {
    QMP_SEND=$qmp_send DEMO_CPUS=$cpus sh resources/demo/boot.sh \
        "$blkvm" "$guest/vmlinuz" "$build/initramfs.cpio.gz" "$root_img" "$data_img"
}

# boot_nested N: one boot inside L1, which QEMU gives the images as its
# virtio-blk disks. L1's console goes to resources/out/demo/l1-boot-N.log;
# what its script prints (boot.sh's lines) is shown. QEMU's TCG now and
# then crashes L1's kernel or L2's early boot (resources/nested/README.md,
# tests/src/nested.rs): such a run in which the guest never reached its
# /sbin/init, so the disks are as they were, is run again, twice at most.
boot_nested() {
    local n=$1 log=$build/l1-boot-$1.log attempt t0 rc line shown
    for attempt in 1 2 3; do
        t0=$(date +%s)
        shown=""
        set +o pipefail
        timeout -s KILL 420 "${QEMU_SYSTEM_X86_64:-qemu-system-x86_64}" \
            -nodefaults -no-user-config -display none -no-reboot \
            -machine q35 -accel tcg -cpu max -smp 2 -m "${L1_MEMORY:-2048}M" \
            -drive "file=$root_img,format=raw,if=none,id=root" \
            -device virtio-blk-pci,drive=root,serial=demo-root \
            -drive "file=$data_img,format=raw,if=none,id=data" \
            -device virtio-blk-pci,drive=data,serial=demo-data \
            -serial stdio -kernel "$guest/vmlinuz" -initrd "$initrd" \
            -append "console=ttyS0 panic=-1" </dev/null 2>&1 |
            while IFS= read -r line; do
                line=${line%$'\r'}
                printf '%s\n' "$line" >>"$log"
                case $line in
                    BLKVM-L1-READY*) shown=1 ;;
                    BLKVM-DONE*) shown="" ;;
                    "dmesg: "*) ;;
                    *) [ -z "$shown" ] || printf '%s\n' "$line" ;;
                esac
            done
        set -o pipefail
        rc=$(sed -n 's/^BLKVM-DONE rc=\([0-9]*\).*/\1/p' "$log" | tail -n 1)
        echo "nested: L1 (QEMU TCG, 2 vCPUs) ran $(($(date +%s) - t0)) s in all; its script ended with rc=${rc:-none}"
        [ "$rc" != 0 ] || return 0
        # TCG's doing: L1 never finished its script (it crashed, reset or
        # hung), or L2 triple-faulted, and the guest never reached its
        # /sbin/init either.
        if [ $attempt -lt 3 ] && ! grep -q '^guest| init: boot ' "$log" &&
            { [ -z "$rc" ] || grep -q 'triple fault (KVM_EXIT_SHUTDOWN)' "$log"; }; then
            echo "nested: L1 or L2 crashed before the guest's /sbin/init (TCG's nested SVM does, now and then); booting again"
            mv "$log" "$log.attempt$attempt"
            continue
        fi
        echo "nested: failed; L1's console is in $log (last lines below)"
        tail -n 20 "$log" | sed 's/^/  | /'
        return 1
    done
}

# check_images N: e2fsck -fn on both images (read-only, forced), then what
# the host reads in them with debugfs after boot N: the boot counter (N)
# and each data file's md5 against the one the guest stored beside it.
check_images() {
    local n=$1 img out rc ok=0 count i want got
    for img in "$root_img" "$data_img"; do
        rc=0
        out=$(e2fsck -fn "$img" 2>&1) || rc=$?
        if [ "$rc" = 0 ]; then
            echo "e2fsck -fn $(basename "$img"): clean: $(tail -n 1 <<<"$out")"
        else
            echo "e2fsck -fn $(basename "$img"): NOT clean (exit $rc):"
            echo "  | ${out//$'\n'/$'\n'  | }"
            ok=1
        fi
    done
    count=$(debugfs -R "cat /var/lib/demo/boot-count" "$root_img" 2>/dev/null)
    if [ "$count" = "$n" ]; then
        echo "host: demo-root.img /var/lib/demo/boot-count = $count"
    else
        echo "host: demo-root.img /var/lib/demo/boot-count = ${count:-nothing}: BAD (boot $n)"
        ok=1
    fi
    for ((i = 1; i <= ${count:-0}; i++)); do
        want=$(debugfs -R "cat /boot-$i.md5" "$data_img" 2>/dev/null | cut -d' ' -f1)
        got=$(debugfs -R "cat /boot-$i.bin" "$data_img" 2>/dev/null | md5sum | cut -d' ' -f1)
        if [ -n "$want" ] && [ "$want" = "$got" ]; then
            echo "host: demo-data.img /boot-$i.bin md5 $got: ok"
        else
            echo "host: demo-data.img /boot-$i.bin md5 ${got}: BAD (the guest stored ${want:-nothing})"
            ok=1
        fi
    done
    return $ok
}

rm -f "$build"/l1-boot-*.log*
for ((n = 1; n <= boots; n++)); do
    echo "== boot $n of $boots: root $(basename "$root_img") on virtio-blk-pci (IOThread io0, io_uring, O_DIRECT), data $(basename "$data_img") on virtio-blk-device (virtio-mmio)"
    failed=""
    "boot_$mode" "$n" || failed=1
    check_images "$n" || failed=1
    if [ -n "$failed" ]; then
        echo "blkvm demo: FAILED at boot $n (stderr has blkvm's and the build's messages)"
        exit 1
    fi
done
echo "blkvm demo: done: $boots boots from $root_img, both images clean after each"
