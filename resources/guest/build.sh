#!/usr/bin/env bash
# Builds everything a test guest needs under resources/out/guest (the
# kernel and its modules, then the initramfs). Idempotent and cheap when
# all is there; serialised with a lock, since tests run in parallel
# processes and each may call it.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
out=${GUEST_OUT:-$here/../out/guest}
mkdir -p "$out"
exec 9>"$out/.lock"
flock 9
"$here/fetch-kernel.sh"
"$here/build-initramfs.sh"
