#!/usr/bin/env bash
# Builds the test guest's initramfs, resources/out/guest/initramfs.cpio.gz
# (cpio newc, gzip): busybox-static as the whole userland, /init from this
# folder, /lib/blkvm.sh (lib.sh here) and the kernel modules that
# fetch-kernel.sh left in resources/out/guest/modules. It has no /test.sh:
# each test appends its own (see README.md). Idempotent: rebuilds only when
# an input is newer than the archive. FORCE=1 rebuilds.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
out=${GUEST_OUT:-$here/../out/guest}
mkdir -p "$out"
out=$(cd "$out" && pwd)
target=$out/initramfs.cpio.gz
busybox=/bin/busybox

for f in "$busybox" "$out/modules/order"; do
    [ -e "$f" ] || { echo "build-initramfs.sh: $f missing (resources/setup.sh, fetch-kernel.sh)" >&2; exit 1; }
done
if ldd "$busybox" >/dev/null 2>&1; then
    echo "build-initramfs.sh: $busybox is not static (install busybox-static)" >&2
    exit 1
fi

if [ "${FORCE:-0}" != 1 ] && [ -s "$target" ]; then
    stale=""
    for f in "$busybox" "$here/init" "$here/lib.sh" "$here/blkzero.c" "$here/build-initramfs.sh" "$out/modules/order" "$out"/modules/*.ko; do
        [ "$f" -nt "$target" ] && stale=1
    done
    [ -n "$stale" ] || exit 0
fi

stage=$(mktemp -d "$out/initramfs.XXXXXX")
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage"/{bin,dev,proc,sys,tmp,lib/modules}
cp "$busybox" "$stage/bin/busybox"
for applet in $("$busybox" --list); do
    [ "$applet" = busybox ] || ln -s busybox "$stage/bin/$applet"
done
ln -s bin "$stage/sbin"
install -m 0755 "$here/init" "$stage/init"
install -m 0644 "$here/lib.sh" "$stage/lib/blkvm.sh"
gcc -static -Os -o "$stage/bin/blkzero" "$here/blkzero.c"
cp "$out"/modules/*.ko "$out/modules/order" "$stage/lib/modules/"
# The kernel opens /dev/console before /init runs; without the node /init
# still gets its console once devtmpfs is mounted, only later.
[ "$(id -u)" -ne 0 ] || mknod -m 0600 "$stage/dev/console" c 5 1

(cd "$stage" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) | gzip -9n >"$target.new"
mv "$target.new" "$target"
echo "build-initramfs.sh: $target ($(stat -c %s "$target") bytes)"
