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

The second table measures the clients: `blkvm bench` through an `nbd`
client node (one connection, one thread) against fio's `nbd` engine
(libnbd, one connection) on the same server, 4k random reads at iodepth 1
and 32, against each daemon. Neither client busy-polls. CPU µs/req there is
the client's own (blkvm bench's cpu_ns_per_io; fio's usr+sys time).
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


def fio_nbd(sock, depth, conns, runtime):
    out = common.run(["fio", "--name=j", "--ioengine=nbd",
                      f"--uri=nbd+unix:///disk?socket={sock}", "--rw=randread",
                      "--bs=4k", f"--iodepth={depth}", f"--numjobs={conns}",
                      "--size=1G", "--time_based", f"--runtime={runtime}",
                      "--group_reporting", "--output-format=json"])
    return json.loads(out[out.index("{"):])["jobs"][0]


def client_one(who, client, node_args, depth, runtime):
    """One client run against a fresh daemon: IOPS and client CPU µs/req."""
    sock = os.path.join(common.OUT, "nbd-bench.sock")
    d = daemon(who, node_args, sock)
    try:
        if client == "blkvm":
            r = common.bench(f"driver=nbd,server.type=unix,server.path={sock},export=disk,read-only=on",
                             "randread", 4096, depth, runtime)
            return {"iops": r["iops"], "client_cpu_us_per_io": r["cpu_ns_per_io"] / 1000}
        job = fio_nbd(sock, depth, 1, runtime)
        ios = max(job["read"]["total_ios"], 1)
        cpu_s = (job["usr_cpu"] + job["sys_cpu"]) / 100 * job["job_runtime"] / 1000
        return {"iops": job["read"]["iops"], "client_cpu_us_per_io": cpu_s * 1e6 / ios}
    finally:
        d.stop()


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runtime", type=int, default=3, help="seconds per run (default: 3)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: 3)")
    ap.add_argument("--img", help="file or block device instead of the scratch image")
    ap.add_argument("--backing", choices=BACKINGS, action="append")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--no-clients", action="store_true", help="skip the client table")
    ap.add_argument("--only-clients", action="store_true", help="only the client table")
    a = ap.parse_args()
    common.build()
    rows = []
    for backing in [b for b in BACKINGS if not a.backing or b in a.backing]:
        n = nodes(backing, a)
        for name, depth, conns in ([] if a.only_clients else WORKLOADS):
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
    clients = []
    for backing in [] if a.no_clients else [b for b in BACKINGS if not a.backing or b in a.backing]:
        n = nodes(backing, a)
        for server in ["blkvm", "qsd"]:
            for depth in [1, 32]:
                runs = {"blkvm": [], "fio": []}
                for i in range(a.rounds):
                    order = ["blkvm", "fio"] if i % 2 == 0 else ["fio", "blkvm"]
                    for client in order:
                        runs[client].append(client_one(server, client, n, depth, a.runtime))
                med = {c: {k: common.median([r[k] for r in rs]) for k in rs[0]}
                       for c, rs in runs.items()}
                row = {"backing": backing, "server": server, "iodepth": depth, "runs": runs,
                       **med, "ratio": med["blkvm"]["iops"] / med["fio"]["iops"]}
                clients.append(row)
                print(f"client {backing} server {server} qd{depth}: blkvm bench "
                      f"{row['blkvm']['iops']:.0f} fio {row['fio']['iops']:.0f} "
                      f"ratio {row['ratio']:.2f}", file=sys.stderr)
    if a.json:
        print(json.dumps({"rounds": a.rounds, "runtime_s": a.runtime, "rows": rows,
                          "clients": clients}, indent=2))
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
    if clients:
        print("\nClients, 4k randread, one connection: blkvm bench through an nbd node "
              "against fio --ioengine=nbd, on the same server.\n")
        print(common.table(
            ["backing", "server", "iodepth", "blkvm bench IOPS", "fio nbd IOPS", "ratio",
             "blkvm CPU µs/req", "fio CPU µs/req"],
            [[r["backing"], r["server"], str(r["iodepth"]), f"{r['blkvm']['iops']:.0f}",
              f"{r['fio']['iops']:.0f}", f"{r['ratio']:.2f}x",
              f"{r['blkvm']['client_cpu_us_per_io']:.2f}",
              f"{r['fio']['client_cpu_us_per_io']:.2f}"] for r in clients]))


if __name__ == "__main__":
    main()
