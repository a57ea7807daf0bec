#!/usr/bin/env bash
# README's main job: build blkvm and run `blkvm bench` on a default scratch
# image (1 GiB, filled with data, O_DIRECT, io_uring), 4k random reads at
# iodepth 32 for 10 s. Set IMG to use another file or device.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release -p vmm
IMG=${IMG:-resources/out/scratch.img}
mkdir -p "$(dirname "$IMG")"
if [ ! -e "$IMG" ]; then
    echo "creating $IMG (1 GiB of data)" >&2
    head -c 1G /dev/urandom > "$IMG.tmp" && mv "$IMG.tmp" "$IMG"
fi
exec target/release/blkvm bench \
    --blockdev "file,filename=$IMG,aio=io_uring,cache.direct=on,node-name=disk0" \
    --rw randread --bs 4k --iodepth 32 --runtime "${RUNTIME:-10}" "$@"
