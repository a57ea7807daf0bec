#!/usr/bin/env bash
# Builds the demo guest (resources/demo.sh calls it):
#
#   resources/out/demo/initramfs.cpio.gz  busybox-static, initramfs-init as
#                                         /init, the virtio, ext4 and
#                                         power-button modules
#   $DEMO_OUT/demo-root.img               ext4 root file system, 64 MiB:
#                                         busybox, /sbin/init (init here),
#                                         the power button's acpid action
#   $DEMO_OUT/demo-data.img               an empty ext4 file system, 16 MiB
#
# GUEST_OUT (default resources/out/demo/guest) holds the kernel modules
# fetched by resources/guest/fetch-kernel.sh; DEMO_OUT defaults to
# resources/out. The initramfs is rebuilt only when an input is newer
# (FORCE=1 rebuilds it); the images are made afresh every time, so each
# demo starts from a new, never-booted root disk. The images are sparse
# files made with `mkfs.ext4 -d`, which needs no root and no loop device
# (run unprivileged, the files keep the builder's uid; the guest does not
# care).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
build=$here/../out/demo
guest=${GUEST_OUT:-$build/guest}
images=${DEMO_OUT:-$here/../out}
busybox=/bin/busybox
mkdir -p "$build" "$images"
build=$(cd "$build" && pwd)
images=$(cd "$images" && pwd)

for f in "$busybox" "$guest/modules/order"; do
    [ -e "$f" ] || { echo "demo/build.sh: $f missing (resources/setup.sh, resources/guest/fetch-kernel.sh)" >&2; exit 1; }
done
if ldd "$busybox" >/dev/null 2>&1; then
    echo "demo/build.sh: $busybox is not static (install busybox-static)" >&2
    exit 1
fi
for m in virtio_blk virtio_pci virtio_mmio ext4 button evdev; do
    grep -qx "$m" "$guest/modules/order" ||
        { echo "demo/build.sh: module $m missing from $guest/modules (fetch-kernel.sh with GUEST_MODULES)" >&2; exit 1; }
done

stage=$(mktemp -d "$build/stage.XXXXXX")
trap 'rm -rf "$stage"' EXIT

# busybox_root DIR: busybox and a link in DIR/bin for each applet but
# init (each root has its own).
busybox_root() {
    mkdir -p "$1/bin"
    cp "$busybox" "$1/bin/busybox"
    local applet
    for applet in $("$busybox" --list); do
        case $applet in busybox | init | linuxrc) continue ;; esac
        ln -s busybox "$1/bin/$applet"
    done
}

initramfs=$build/initramfs.cpio.gz
stale=${FORCE:-}
[ -s "$initramfs" ] || stale=1
for f in "$busybox" "$here/initramfs-init" "$here/build.sh" "$guest/modules/order" "$guest"/modules/*.ko; do
    [ "$f" -nt "$initramfs" ] && stale=1
done
if [ -n "$stale" ]; then
    root=$stage/initramfs
    busybox_root "$root"
    mkdir -p "$root"/{dev,proc,sys,newroot,lib/modules}
    install -m 0755 "$here/initramfs-init" "$root/init"
    cp "$guest"/modules/*.ko "$guest/modules/order" "$root/lib/modules/"
    # Without the node the kernel has no console for /init until devtmpfs
    # is mounted; only root may make it.
    [ "$(id -u)" -ne 0 ] || mknod -m 0600 "$root/dev/console" c 5 1
    (cd "$root" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) |
        gzip -9n >"$initramfs.new"
    mv "$initramfs.new" "$initramfs"
    echo "demo/build.sh: $initramfs ($(stat -c %s "$initramfs") bytes)"
fi

root=$stage/root
busybox_root "$root"
mkdir -p "$root"/{sbin,dev,proc,sys,run,tmp,data,root,var/lib/demo,etc/acpi/PWRF}
install -m 0755 "$here/init" "$root/sbin/init"
echo blkvm-demo >"$root/etc/hostname"
# busybox acpid runs /etc/acpi/PWRF/00000080 on the power button's event.
cat >"$root/etc/acpi/PWRF/00000080" <<'EOF'
#!/bin/sh
echo "init: power button pressed; powering off" >/dev/console
poweroff -f
EOF
chmod 0755 "$root/etc/acpi/PWRF/00000080"

make_ext4() { # IMAGE MIB LABEL [DIR]
    rm -f "$1"
    truncate -s "$2M" "$1"
    mkfs.ext4 -q -F -L "$3" -E root_owner=0:0 ${4:+-d "$4"} "$1"
}
make_ext4 "$images/demo-root.img" 64 demo-root "$root"
make_ext4 "$images/demo-data.img" 16 demo-data
echo "demo/build.sh: $images/demo-root.img (ext4, 64 MiB), $images/demo-data.img (ext4, 16 MiB, empty)"
