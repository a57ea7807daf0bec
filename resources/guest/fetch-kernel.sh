#!/usr/bin/env bash
# Fetches the current Debian kernel without installing it (installing would
# pull initramfs-tools and udev): `apt-cache depends linux-image-amd64`
# names the versioned package, `apt-get download` fetches it and
# `dpkg-deb -x` unpacks it. Keeps only what a test guest needs:
#
#   resources/out/guest/vmlinuz                 the bzImage
#   resources/out/guest/kernel-release          e.g. 6.1.0-56-amd64
#   resources/out/guest/modules/NAME.ko         the wanted modules and their
#                                               dependencies, uncompressed
#   resources/out/guest/modules/order           load order, one name a line
#   resources/out/guest/l1-modules/             the same for the nested
#                                               harness's L1 only: KVM
#                                               (kvm-amd) and loop
#
# The wanted modules are $GUEST_MODULES (default: virtio-pci, virtio-mmio
# and virtio-blk, and the ACPI power button with evdev, so a guest's
# busybox acpid sees KEY_POWER) and $L1_MODULES (default: kvm-amd, loop); their dependencies
# are found with `modinfo -F depends` and put before them. One download
# serves both sets, so the nested harness's L1 and L2 run the same kernel.
# Idempotent: does nothing when all of that is there. FORCE=1 fetches
# again (e.g. after a kernel update).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
out=${GUEST_OUT:-$here/../out/guest}
wanted=${GUEST_MODULES:-virtio_pci virtio_mmio virtio_blk button evdev}
wanted_l1=${L1_MODULES:-kvm_amd loop}

mkdir -p "$out"
out=$(cd "$out" && pwd)

have_all() {
    [ -s "$out/vmlinuz" ] && [ -s "$out/modules/order" ] && [ -s "$out/l1-modules/order" ] || return 1
    local m
    for m in $wanted; do
        grep -qx "$m" "$out/modules/order" || return 1
    done
    for m in $wanted_l1; do
        grep -qx "$m" "$out/l1-modules/order" || return 1
    done
}
if [ "${FORCE:-0}" != 1 ] && have_all; then
    exit 0
fi

for tool in apt-cache apt-get dpkg-deb modinfo; do
    command -v "$tool" >/dev/null || { echo "fetch-kernel.sh: $tool missing (run resources/setup.sh)" >&2; exit 1; }
done

kernel_package() {
    apt-cache depends linux-image-amd64 2>/dev/null |
        awk '$1 == "Depends:" && $2 ~ /^linux-image-/ { print $2; exit }'
}
download() {
    (cd "$work" && apt-get download -qq -o APT::Sandbox::User=root "$pkg")
}
# Stale or missing package lists (a newer kernel replaced the one they
# name in the archive) are refreshed once, when we may.
apt_update() {
    if [ "$(id -u)" -eq 0 ]; then
        apt-get update -qq
    elif command -v sudo >/dev/null; then
        sudo apt-get update -qq
    else
        return 1
    fi
}

work=$(mktemp -d "$out/fetch.XXXXXX")
trap 'rm -rf "$work"' EXIT
pkg=$(kernel_package)
if [ -z "$pkg" ] || ! download; then
    apt_update || true
    pkg=$(kernel_package)
    if [ -z "$pkg" ]; then
        echo "fetch-kernel.sh: apt-cache depends linux-image-amd64 names no linux-image package" >&2
        exit 1
    fi
    download
fi
dpkg-deb -x "$work"/"$pkg"_*.deb "$work/root"

release=$(ls "$work/root/lib/modules")
moddir=$work/root/lib/modules/$release

# Finds a module by name (modinfo's names use '_', files may use '-') and
# leaves it uncompressed in $work/mods.
mkdir -p "$work/mods"
module_file() {
    local name=$1 f
    f=$(find "$moddir" -regextype posix-extended \
        -regex ".*/$(echo "$name" | sed 's/[-_]/[-_]/g')\.ko(\.xz|\.zst|\.gz)?" | head -n 1)
    if [ -z "$f" ]; then
        echo "fetch-kernel.sh: module $name not in $pkg (built in?)" >&2
        return 1
    fi
    case $f in
        *.ko) cp "$f" "$work/mods/$name.ko" ;;
        *.xz) xz -dc "$f" >"$work/mods/$name.ko" ;;
        *.zst) zstd -qdc "$f" >"$work/mods/$name.ko" ;;
        *.gz) gzip -dc "$f" >"$work/mods/$name.ko" ;;
    esac
}

# Depth-first: a module's dependencies are listed before it.
order=()
visit() {
    local name=${1//-/_} dep seen
    for seen in "${order[@]}"; do
        [ "$seen" != "$name" ] || return 0
    done
    module_file "$name"
    for dep in $(modinfo -F depends "$work/mods/$name.ko" | tr ',' ' '); do
        visit "$dep"
    done
    order+=("$name")
}
# collect DIR NAME...: the named modules and their dependencies into
# $work/DIR with their load order.
collect() {
    local dir=$1 m
    shift
    order=()
    for m in "$@"; do
        visit "$m"
    done
    mkdir -p "$work/$dir"
    for m in "${order[@]}"; do
        mv "$work/mods/$m.ko" "$work/$dir/"
    done
    printf '%s\n' "${order[@]}" >"$work/$dir/order"
    echo "fetch-kernel.sh: $dir: ${order[*]}"
}
# shellcheck disable=SC2086 # word lists
collect modules $wanted
# shellcheck disable=SC2086
collect l1-modules $wanted_l1

rm -rf "$out/modules" "$out/l1-modules"
cp "$work/root/boot/vmlinuz-$release" "$out/vmlinuz.new"
echo "$release" >"$out/kernel-release"
mv "$work/modules" "$out/modules"
mv "$work/l1-modules" "$out/l1-modules"
mv "$out/vmlinuz.new" "$out/vmlinuz"
echo "fetch-kernel.sh: $pkg ($release)"
