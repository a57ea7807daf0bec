#!/usr/bin/env bash
# Builds what the nested harness boots, under resources/out/nested: the
# test guest first (resources/guest/build.sh: the kernel, the modules, the
# L2 initramfs), then L1's base initramfs (initramfs.cpio), then, if
# PROGRAM... are given (blkvm), their archive (programs.cpio), and, with
# QEMU=1, an archive of qemu-system-x86_64 with its libraries and the
# firmware it needs to boot L2 with KVM (qemu.cpio, ~60 MB), the
# known-good VMM the nested tests compare `blkvm run` with, and, with
# QSD=1, an archive of qemu-storage-daemon and its libraries (qsd.cpio,
# ~16 MB), the known-good vhost-user-blk backend:
#
#   [QEMU=1] [QSD=1] resources/nested/build.sh [PROGRAM...]
#
# Idempotent and cheap when all is there; serialised with a lock, since
# tests run in parallel processes and each may call it.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
guest=${GUEST_OUT:-$here/../out/guest}
out=${NESTED_OUT:-$here/../out/nested}
GUEST_OUT=$guest "$here/../guest/build.sh"
mkdir -p "$out"
out=$(cd "$out" && pwd)
exec 9>"$out/.lock"
flock 9
GUEST_OUT=$guest NESTED_OUT=$out "$here/build-initramfs.sh"
if [ $# -gt 0 ]; then
    "$here/pack-binary.sh" "$out/programs.cpio" "$@"
fi
if [ "${QEMU:-0}" = 1 ]; then
    qemu=$(command -v "${QEMU_SYSTEM_X86_64:-qemu-system-x86_64}") ||
        { echo "build.sh: qemu-system-x86_64 missing (run resources/setup.sh)" >&2; exit 1; }
    # SeaBIOS for q35/pc, qboot for microvm, the option ROMs of -kernel.
    firmware=()
    for f in /usr/share/seabios/bios-256k.bin /usr/share/seabios/bios-microvm.bin \
        /usr/share/qemu/qboot.rom /usr/share/qemu/linuxboot_dma.bin /usr/share/qemu/kvmvapic.bin; do
        [ -e "$f" ] && firmware+=("$f")
    done
    "$here/pack-binary.sh" "$out/qemu.cpio" "$qemu" -- "${firmware[@]}"
fi
if [ "${QSD:-0}" = 1 ]; then
    qsd=$(command -v "${QEMU_STORAGE_DAEMON:-qemu-storage-daemon}") ||
        { echo "build.sh: qemu-storage-daemon missing (run resources/setup.sh)" >&2; exit 1; }
    "$here/pack-binary.sh" "$out/qsd.cpio" "$qsd"
fi
