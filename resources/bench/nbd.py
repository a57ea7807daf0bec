#!/usr/bin/env python3
"""blkvm storage-daemon's NBD export against qemu-storage-daemon's, the
same client for both: fio's `nbd` engine (libnbd), 4k random reads at
iodepth 1 and 32, with 1 and 4 connections (fio jobs, each its own
connection), over null-co (read-zeroes) and a file (the 1 GiB scratch
image, cache.direct=on, aio=io_uring). Both daemons serve the export from
an IOThread with the same poll-max-ns (QEMU's default, 32768) on a unix
socket.

Each row: both daemons' IOPS (medians of interleaved rounds, each run on a
freshly started daemon), our ratio, and each daemon's CPU time per request
(all its threads, /proc). --json prints every run.

Not measured yet: `blkvm bench` through an `nbd` client node (the client
driver is not written).
"""

import argparse
import json
import os
import sys

import common

WORKLOADS = [("4k randread qd1 1conn", 1, 1), ("4k randread qd32 1conn", 32, 1),
             ("4k randread qd1 4conn", 1, 4), ("4k randread qd32 4conn", 32, 4)]
BACKINGS = ["null-co", "file"]
POLL_MAX_NS = 32768


def nodes(backing, a):
    if backing == "null-co":
        return ["driver=null-co,node-name=d0,size=1073741824,read-zeroes=on"]
    img = a.img or common.scratch_image(os.path.join(common.OUT, "bench.img"), 1024)
    return [f"driver=file,node-name=f0,filename={img},cache.direct=on,aio=io_uring",
            "driver=raw,node-name=d0,file=f0"]


def daemon(who, node_args, sock):
    cmd = [common.BLKVM, "storage-daemon"] if who == "blkvm" else ["qemu-storage-daemon"]
    for b in node_args:
        cmd += ["--blockdev", b]
    cmd += ["--object", f"iothread,id=io0,poll-max-ns={POLL_MAX_NS}",
            "--nbd-server", f"addr.type=unix,addr.path={sock}",
            "--export", "type=nbd,id=e0,node-name=d0,name=disk,iothread=io0"]
    return common.Daemon(cmd, sock)


def run_one(who, node_args, depth, conns, runtime):
    sock = os.path.join(common.OUT, "nbd-bench.sock")
    d = daemon(who, node_args, sock)
    try:
        start = d.cpu_s()
        out = common.run(["fio", "--name=j", "--ioengine=nbd",
                          f"--uri=nbd+unix:///disk?socket={sock}", "--rw=randread",
                          "--bs=4k", f"--iodepth={depth}", f"--numjobs={conns}",
                          "--size=1G", "--time_based", f"--runtime={runtime}",
                          "--group_reporting", "--output-format=json"])
        cpu = d.cpu_s() - start
    finally:
        d.stop()
    job = json.loads(out[out.index("{"):])["jobs"][0]
    ios = max(job["read"]["total_ios"], 1)
    return {"iops": job["read"]["iops"], "ios": ios, "daemon_cpu_us_per_io": cpu * 1e6 / ios}


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runtime", type=int, default=3, help="seconds per run (default: 3)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: 3)")
    ap.add_argument("--img", help="file or block device instead of the scratch image")
    ap.add_argument("--backing", choices=BACKINGS, action="append")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    common.build()
    rows = []
    for backing in [b for b in BACKINGS if not a.backing or b in a.backing]:
        n = nodes(backing, a)
        for name, depth, conns in WORKLOADS:
            runs = {"blkvm": [], "qsd": []}
            for i in range(a.rounds):
                order = ["blkvm", "qsd"] if i % 2 == 0 else ["qsd", "blkvm"]
                for who in order:
                    runs[who].append(run_one(who, n, depth, conns, a.runtime))
            med = {who: {k: common.median([r[k] for r in rs]) for k in rs[0]}
                   for who, rs in runs.items()}
            row = {"backing": backing, "workload": name, "runs": runs, **med,
                   "ratio": med["blkvm"]["iops"] / med["qsd"]["iops"]}
            rows.append(row)
            print(f"{backing} {name}: blkvm {row['blkvm']['iops']:.0f} qsd "
                  f"{row['qsd']['iops']:.0f} ratio {row['ratio']:.2f}", file=sys.stderr)
    if a.json:
        print(json.dumps({"rounds": a.rounds, "runtime_s": a.runtime, "rows": rows}, indent=2))
        return
    print(f"Medians of {a.rounds} interleaved rounds of {a.runtime} s on {os.cpu_count()} CPUs; "
          f"client: fio --ioengine=nbd (one connection per job); both daemons with "
          f"iothread poll-max-ns={POLL_MAX_NS}. CPU µs/req: the daemon's, all threads.\n")
    print(common.table(
        ["backing", "workload", "blkvm IOPS", "qsd IOPS", "ratio", "blkvm CPU µs/req",
         "qsd CPU µs/req"],
        [[r["backing"], r["workload"], f"{r['blkvm']['iops']:.0f}", f"{r['qsd']['iops']:.0f}",
          f"{r['ratio']:.2f}x", f"{r['blkvm']['daemon_cpu_us_per_io']:.2f}",
          f"{r['qsd']['daemon_cpu_us_per_io']:.2f}"] for r in rows]))


if __name__ == "__main__":
    main()
