#!/usr/bin/env bash
# Boots the test guest by hand, for debugging a test: the same QEMU
# command line as the Rust fixture (tests/src/vm.rs), console on this
# terminal. Ctrl-C ends it.
#
#   resources/guest/run-qemu.sh SCRIPT [SOCKET...]
#
# SCRIPT is the guest's /test.sh (`-` for none: the guest reports that and
# powers off); each SOCKET is a vhost-user-blk backend's unix socket, in
# the guest vda, vdb, ... MEM (MiB, default 512), CPUS (1) and QUEUES
# (per disk, 1; the backend must offer as many) tune it; APPEND adds
# kernel arguments.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
out=$here/../out/guest
[ $# -ge 1 ] || { sed -n '2,13p' "$0" >&2; exit 2; }
script=$1
shift
"$here/build.sh" >&2

mem=${MEM:-512}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The script travels as a second cpio archive after the base initramfs,
# which is padded to 512 bytes first (as the fixture does).
cp "$out/initramfs.cpio.gz" "$work/initrd"
truncate -s %512 "$work/initrd"
if [ "$script" != - ]; then
    mkdir "$work/root"
    cp "$script" "$work/root/test.sh"
    (cd "$work/root" && echo test.sh | cpio --quiet -o -H newc -R 0:0) >>"$work/initrd"
fi

args=(-nodefaults -no-user-config -display none -no-reboot
    -machine q35,memory-backend=mem0 -accel tcg -cpu max
    -smp "${CPUS:-1}" -m "${mem}M"
    -object "memory-backend-memfd,id=mem0,size=${mem}M,share=on")
i=0
for sock in "$@"; do
    args+=(-chardev "socket,id=vhost$i,path=${sock//,/,,}"
        -device "vhost-user-blk-pci,chardev=vhost$i,num-queues=${QUEUES:-1}")
    i=$((i + 1))
done
args+=(-serial stdio -kernel "$out/vmlinuz" -initrd "$work/initrd"
    -append "console=ttyS0 panic=-1 ${APPEND:-}")
"${QEMU_SYSTEM_X86_64:-qemu-system-x86_64}" "${args[@]}"
