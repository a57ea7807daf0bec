#!/usr/bin/env bash
# Builds the nested harness's L1 base initramfs,
# resources/out/nested/initramfs.cpio (cpio newc, uncompressed: under TCG
# the L1 kernel copies it faster than it could gunzip it): busybox-static,
# /init and /lib/nested.sh from this folder, /lib/blkvm.sh
# (resources/guest/lib.sh), /bin/kvm-smoke, /bin/qmp-send, the KVM, loop and virtio modules
# that resources/guest/fetch-kernel.sh left in resources/out/guest, and
# the L2 kernel /l2/vmlinuz (the same Debian kernel). No blkvm, no
# /test.sh, no /l2/initrd: each test appends those (see README.md).
# Idempotent: rebuilds only when an input is newer than the archive.
# FORCE=1 rebuilds.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
guest=${GUEST_OUT:-$here/../out/guest}
out=${NESTED_OUT:-$here/../out/nested}
mkdir -p "$out"
out=$(cd "$out" && pwd)
guest=$(cd "$guest" && pwd)
target=$out/initramfs.cpio
busybox=/bin/busybox

for f in "$busybox" "$guest/vmlinuz" "$guest/modules/order" "$guest/l1-modules/order"; do
    [ -e "$f" ] || { echo "build-initramfs.sh: $f missing (resources/setup.sh, resources/guest/build.sh)" >&2; exit 1; }
done
if ldd "$busybox" >/dev/null 2>&1; then
    echo "build-initramfs.sh: $busybox is not static (install busybox-static)" >&2
    exit 1
fi

if [ "${FORCE:-0}" != 1 ] && [ -s "$target" ]; then
    stale=""
    for f in "$busybox" "$here/init" "$here/lib.sh" "$here/kvm-smoke.c" "$here/qmp-send.c" "$here/build-initramfs.sh" \
        "$here/../guest/lib.sh" "$guest/vmlinuz" "$guest"/modules/* "$guest"/l1-modules/*; do
        [ "$f" -nt "$target" ] && stale=1
    done
    [ -n "$stale" ] || exit 0
fi

stage=$(mktemp -d "$out/initramfs.XXXXXX")
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage"/{bin,dev,proc,sys,tmp,l2,lib/modules/l1,lib/modules/virtio}
cp "$busybox" "$stage/bin/busybox"
for applet in $("$busybox" --list); do
    [ "$applet" = busybox ] || ln -s busybox "$stage/bin/$applet"
done
ln -s bin "$stage/sbin"
install -m 0755 "$here/init" "$stage/init"
install -m 0644 "$here/../guest/lib.sh" "$stage/lib/blkvm.sh"
install -m 0644 "$here/lib.sh" "$stage/lib/nested.sh"
gcc -static -O2 -Wall -Wextra -Werror -o "$stage/bin/kvm-smoke" "$here/kvm-smoke.c"
gcc -static -O2 -Wall -Wextra -Werror -o "$stage/bin/qmp-send" "$here/qmp-send.c"
cp "$guest"/l1-modules/*.ko "$guest/l1-modules/order" "$stage/lib/modules/l1/"
cp "$guest"/modules/*.ko "$guest/modules/order" "$stage/lib/modules/virtio/"
cp "$guest/vmlinuz" "$stage/l2/vmlinuz"
[ "$(id -u)" -ne 0 ] || mknod -m 0600 "$stage/dev/console" c 5 1

(cd "$stage" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) >"$target.new"
mv "$target.new" "$target"
echo "build-initramfs.sh: $target ($(stat -c %s "$target") bytes)"
