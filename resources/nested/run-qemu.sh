#!/usr/bin/env bash
# Boots the nested harness's L1 by hand, for debugging a test: the same
# QEMU command line and initrd as the Rust fixture (tests/src/nested.rs),
# console on this terminal. Ctrl-C ends it.
#
#   resources/nested/run-qemu.sh L1-SCRIPT [L2-SCRIPT]
#
# L1-SCRIPT is L1's /test.sh (`-` for none); L2-SCRIPT, if given, is
# appended to the test guest's initramfs as its /test.sh, and the result
# is L1's /l2/initrd. BLKVM (default: blkvm from PATH, then
# target/debug/blkvm) is packed with its libraries; MEM (MiB, default
# 2048) and CPUS (2) size L1; APPEND adds L1 kernel arguments; WITH_QEMU=1
# puts qemu-system-x86_64 in L1 too.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
guest_out=$here/../out/guest
out=$here/../out/nested
[ $# -ge 1 ] || { sed -n '2,14p' "$0" >&2; exit 2; }
l1_script=$1
l2_script=${2:-}
blkvm=${BLKVM:-$(command -v blkvm || echo "$here/../../target/debug/blkvm")}
QEMU=${WITH_QEMU:-0} "$here/build.sh" "$blkvm" >&2

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# pad FILE: zeros to a 512-byte boundary, so the next archive starts
# aligned (the kernel skips zeros between archives).
pad() { truncate -s %512 "$1"; }
cp "$out/initramfs.cpio" "$work/initrd"
pad "$work/initrd"
cat "$out/programs.cpio" >>"$work/initrd"
pad "$work/initrd"
if [ "${WITH_QEMU:-0}" = 1 ]; then
    cat "$out/qemu.cpio" >>"$work/initrd"
    pad "$work/initrd"
fi
mkdir -p "$work/root/l2"
[ "$l1_script" = - ] || cp "$l1_script" "$work/root/test.sh"
cp "$guest_out/initramfs.cpio.gz" "$work/root/l2/initrd"
if [ -n "$l2_script" ]; then
    pad "$work/root/l2/initrd"
    mkdir "$work/l2root"
    cp "$l2_script" "$work/l2root/test.sh"
    (cd "$work/l2root" && echo test.sh | cpio --quiet -o -H newc -R 0:0) >>"$work/root/l2/initrd"
fi
(cd "$work/root" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) >>"$work/initrd"

"${QEMU_SYSTEM_X86_64:-qemu-system-x86_64}" -nodefaults -no-user-config -display none -no-reboot \
    -machine q35 -accel tcg -cpu max -smp "${CPUS:-2}" -m "${MEM:-2048}M" \
    -serial stdio -kernel "$guest_out/vmlinuz" -initrd "$work/initrd" \
    -append "console=ttyS0 panic=-1 ${APPEND:-}"
