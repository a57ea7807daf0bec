#!/usr/bin/env bash
# Installs what blkvm's tests and benchmarks need on a fresh Debian 12
# machine. Idempotent: packages already present are not fetched again.
set -euo pipefail

need=()
for pkg in qemu-utils fio e2fsprogs util-linux; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}"
fi
