#!/usr/bin/env bash
# Installs what blkvm's tests and benchmarks need on a fresh Debian 12
# machine. Idempotent: packages already present are not fetched again,
# and when everything is present this makes no network access at all.
set -euo pipefail

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
updated=""
apt_update() {
    [ -n "$updated" ] || $sudo apt-get update -qq
    updated=1
}
installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "ok installed"
}

# busybox-static, cpio and kmod build the real-Linux-guest initramfs
# (resources/guest/); binutils' strip and libc-bin's ldd pack programs for
# the nested harness's L1 (resources/nested/); acpica-tools (iasl)
# disassembles blkvm's ACPI tables in the vmm tests; python3-venv holds the
# qemu.qmp client of the QMP tests; libnbd-bin (nbdinfo, nbdcopy) is a
# client of the NBD server tests, nbdkit a server of the NBD client tests;
# openssl makes their TLS certificates.
need=()
for pkg in qemu-utils fio e2fsprogs util-linux busybox-static cpio kmod gcc libc6-dev binutils libc-bin acpica-tools python3-venv libnbd-bin nbdkit openssl; do
    installed "$pkg" || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
    apt_update
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}"
fi

# The rbd driver's tests and benchmark run a throw-away Ceph cluster
# (resources/ceph/start.sh): ceph-mon and ceph-osd are its daemons,
# ceph-common holds the ceph, rbd and ceph-authtool tools, librbd1 the
# library blkvm and fio's rbd engine load. No recommends: they pull in
# Ceph's systemd units' companions and Python tools the tests do not use.
need=()
for pkg in ceph-mon ceph-osd ceph-common librbd1; do
    installed "$pkg" || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
    apt_update
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

# qemu-system-x86 10.x from backports runs the real-Linux-guest tests
# (vhost-user-blk-pci under TCG). Bookworm's 7.2 conflicts with the
# qemu-utils 10.x the image ships, so it must come from backports.
qemu_major() {
    dpkg-query -W -f='${Version}' "$1" 2>/dev/null | sed -E 's/^[0-9]+://; s/[^0-9].*//'
}
if [ "$(qemu_major qemu-system-x86)" -lt 10 ] 2>/dev/null || ! installed qemu-system-x86; then
    codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
    suite="$codename-backports"
    if ! grep -rqsw -- "$suite" /etc/apt/sources.list /etc/apt/sources.list.d/; then
        # The mirror is whatever this machine already uses for Debian:
        # the first URI of a deb822 stanza or sources.list line whose
        # suites include the release's codename.
        uri=""
        for f in /etc/apt/sources.list.d/*.sources; do
            [ -f "$f" ] || continue
            uri=$(awk -v c="$codename" 'BEGIN { RS = ""; FS = "\n" }
                {
                    u = ""; s = ""
                    for (i = 1; i <= NF; i++) {
                        if ($i ~ /^URIs:/) { u = $i; sub(/^URIs:[ \t]*/, "", u) }
                        if ($i ~ /^Suites:/) { s = $i " " }
                    }
                    if (u != "" && index(s, " " c " ")) { split(u, a, " "); print a[1]; exit }
                }' "$f")
            [ -z "$uri" ] || break
        done
        if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
            uri=$(awk -v c="$codename" '$1 == "deb" {
                    for (i = 2; i < NF; i++)
                        if ($i ~ /^[a-z+]+:\/\// && $(i + 1) == c) { print $i; exit }
                }' /etc/apt/sources.list)
        fi
        if [ -z "$uri" ]; then
            echo "setup.sh: no Debian $codename source found under /etc/apt to derive $suite from" >&2
            exit 1
        fi
        keyring=/usr/share/keyrings/debian-archive-keyring.gpg
        {
            echo "Types: deb"
            echo "URIs: $uri"
            echo "Suites: $suite"
            echo "Components: main"
            [ ! -f "$keyring" ] || echo "Signed-By: $keyring"
        } | $sudo tee "/etc/apt/sources.list.d/$suite.sources" >/dev/null
        updated=""
    fi
    apt_update
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends -t "$suite" qemu-system-x86
fi

# The QMP tests drive blkvm with qemu.qmp, the client QEMU's own tools
# (qmp-shell among them) are built on, from PyPI into a venv of our own.
venv="$(dirname "$0")/out/venv"
if ! "$venv/bin/python" -c 'import qemu.qmp' 2>/dev/null; then
    /usr/bin/python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check 'qemu.qmp>=0.0.3,<0.1'
fi
