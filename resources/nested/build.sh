#!/usr/bin/env bash
# Builds what the nested harness boots, under resources/out/nested: the
# test guest first (resources/guest/build.sh: the kernel, the modules, the
# L2 initramfs), then L1's base initramfs, then, if PROGRAM... are given
# (blkvm), their archive:
#
#   resources/nested/build.sh [PROGRAM...]
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
