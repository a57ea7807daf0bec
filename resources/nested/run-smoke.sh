#!/usr/bin/env bash
# Manual smoke test of `blkvm run` booting the stock Debian test kernel on
# real (nested) KVM: L0 QEMU TCG (-cpu max, AMD SVM) boots an L1 Debian
# kernel with kvm-amd; L1's /init runs `blkvm run` with the test guest's
# kernel and initramfs (resources/out/guest) as L2, then powers off. The
# L2 test script prints its CPU count, memory and the ACPI/e820/PCI lines
# of its dmesg. Expect "BLKVM-DONE rc=0", "ACPI: PM: Preparing to enter
# system sleep state S5" and "L1: blkvm rc=0". Takes ~15 s.
#
# usage: [MEM=512M] [CPUS=2] run-smoke.sh BLKVM_BINARY KVM_MODULES_DIR
#   KVM_MODULES_DIR holds irqbypass.ko, kvm.ko, ccp.ko and kvm-amd.ko of
#   the kernel in resources/out/guest (lib/modules/<release>/kernel/... of
#   the linux-image package; see MACHINE-FACTS.md for getting it).
# The real harness is tests' nested-KVM fixture; this is only a quick check.
set -euo pipefail
blkvm=$1
mods=$2
here=$(cd "$(dirname "$0")" && pwd)
guest=$here/../out/guest
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/root
mkdir -p "$root"/{bin,dev,proc,sys,tmp,lib/modules,lib64,lib/x86_64-linux-gnu} "$work/l2add"
cp /bin/busybox "$root/bin/"
for a in $("$root/bin/busybox" --list); do [ "$a" = busybox ] || ln -sf busybox "$root/bin/$a"; done
ln -s bin "$root/sbin"
for m in irqbypass kvm ccp kvm-amd; do cp "$(find "$mods" -name "$m.ko" | head -1)" "$root/lib/modules/"; done
strip -o "$root/bin/blkvm" "$blkvm"
for lib in $(ldd "$blkvm" | awk '/=>/ { print $3 } /ld-linux/ { print $1 }'); do
    cp "$lib" "$root$lib" 2>/dev/null || cp "$lib" "$root/lib/x86_64-linux-gnu/"
done
cp "$guest/vmlinuz" "$root/l2-vmlinuz"
cat >"$work/l2add/test.sh" <<'L2'
echo "L2-CPUS $(grep -c ^processor /proc/cpuinfo)"
echo "L2-MEM $(grep MemTotal /proc/meminfo)"
dmesg | grep -iE "ACPI: (RSDP|XSDT|FACP|DSDT|APIC|MCFG)|e820|PCI host|MMCONFIG|virtio|smpboot|ACPI Error|ACPI BIOS" | head -40
ls /sys/bus/acpi/devices/ | tr '\n' ' '; echo
L2
(cd "$work/l2add" && echo test.sh | cpio --quiet -o -H newc -R 0:0 | gzip -9n) >"$work/add.gz"
cat "$guest/initramfs.cpio.gz" "$work/add.gz" >"$root/l2-initrd.gz"
cat >"$root/init" <<L1
#!/bin/sh
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
for m in irqbypass kvm ccp kvm-amd; do insmod /lib/modules/\$m.ko || echo "L1: insmod \$m failed"; done
echo "L1: starting blkvm run"
/bin/blkvm run --kernel /l2-vmlinuz --initrd /l2-initrd.gz --memory ${MEM:-512M} --cpus ${CPUS:-2} \
    --cmdline "console=ttyS0 reboot=k panic=-1 quiet"
echo "L1: blkvm rc=\$?"
poweroff -f
L1
chmod +x "$root/init"
(cd "$root" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0 | gzip -1) >"$work/l1.cpio.gz"
timeout 300 qemu-system-x86_64 -machine q35 -cpu max -smp 2 -m 2048 -nographic -no-reboot \
    -kernel "$guest/vmlinuz" -initrd "$work/l1.cpio.gz" -append "console=ttyS0 panic=-1 quiet"
