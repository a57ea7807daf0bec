#!/usr/bin/env python3
"""blkvm storage-daemon against qemu-storage-daemon: the same backing node
type (null-co, and a file with cache.direct=on and aio=io_uring), each
exported over vhost-user-blk and driven by the same client, `blkvm bench`
through its `virtio-blk-vhost-user` (libblkio) node, with registered
buffers. Workloads: 4k iodepth 1, 4k iodepth 32, 512 iodepth 1 random
reads. Rounds are interleaved; the table shows medians and our ratio.
"""

import argparse
import json
import os
import stat

import common

WORKLOADS = [("4k randread qd1", 4096, 1), ("4k randread qd32", 4096, 32),
             ("512 randread qd1", 512, 1)]


def backings(img):
    # qemu-storage-daemon wants plain integers for sizes, and host_device
    # for a block device (blkvm's file takes both).
    blk = stat.S_ISBLK(os.stat(img).st_mode)
    return {
        "null-co": (["driver=null-co,node-name=d0,size=1073741824"],) * 2,
        "file": tuple(
            [f"driver={drv},node-name=f0,filename={img},aio=io_uring,cache.direct=on",
             "driver=raw,node-name=d0,file=f0"]
            for drv in ("file", "host_device" if blk else "file")),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runtime", type=float, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--img", help="file or block device to use instead of a scratch file")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--iothread", type=int, default=None, metavar="POLL_MAX_NS",
                    help="serve both exports from an iothread with this poll-max-ns "
                         "(QEMU's default is 32768); default: no iothread")
    ap.add_argument("--backing", choices=["null-co", "file"], action="append",
                    help="only these backings (repeatable)")
    a = ap.parse_args()
    common.build()
    img = a.img or common.scratch_image(os.path.join(common.OUT, "bench.img"), a.size_mib)
    sock = os.path.join(common.OUT, "export.sock")
    client = f"virtio-blk-vhost-user,path={sock},node-name=v0"
    rows = []
    for backing, (ours, theirs) in backings(img).items():
        if a.backing and backing not in a.backing:
            continue
        for name, bs, depth in WORKLOADS:
            runs = {"blkvm": [], "qsd": []}
            for _ in range(a.rounds):
                for who, start, nodes in (("blkvm", common.blkvm_daemon, ours),
                                          ("qsd", common.qsd_daemon, theirs)):
                    d = start(nodes, sock, iothread=a.iothread)
                    try:
                        runs[who].append(common.bench(client, "randread", bs, depth, a.runtime)["iops"])
                    finally:
                        d.stop()
            r = {"backing": backing, "workload": name, "runs": runs,
                 "blkvm": common.median(runs["blkvm"]), "qsd": common.median(runs["qsd"])}
            r["ratio"] = r["blkvm"] / r["qsd"]
            rows.append(r)
            print(f"{backing} {name}: blkvm {r['blkvm']:.0f} qsd {r['qsd']:.0f} "
                  f"ratio {r['ratio']:.2f}", file=__import__('sys').stderr)
    if a.json:
        print(json.dumps(rows, indent=2))
        return
    where = ("no iothread" if a.iothread is None
             else f"both exports on an iothread with poll-max-ns={a.iothread}")
    print(f"Medians of {a.rounds} interleaved rounds of {a.runtime:g} s; IOPS; client: "
          f"blkvm bench via libblkio virtio-blk-vhost-user, registered buffers; {where}.\n")
    print(common.table(["backing", "workload", "blkvm storage-daemon", "qemu-storage-daemon",
                        "ratio"],
                       [[r["backing"], r["workload"], f"{r['blkvm']:.0f}", f"{r['qsd']:.0f}",
                         f"{r['ratio']:.2f}x"] for r in rows]))


if __name__ == "__main__":
    main()
