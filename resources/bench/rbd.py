#!/usr/bin/env python3
"""blkvm's rbd driver against fio's `rbd` engine, both librbd clients of
the same image on the same cluster: 4k random reads and writes at iodepth
1 and 32.

- blkvm: `blkvm bench --blockdev driver=rbd,pool=rbd,image=IMG,conf=CONF`
  (one data-plane queue, librbd's callbacks signalling its eventfd);
- fio: `--ioengine=rbd --pool=rbd --rbdname=IMG` (one job), with CEPH_CONF
  pointing at the same ceph.conf.

Both run librbd with its cache off (blkvm: cache.direct=on, which QEMU
and blkvm turn into rbd_cache=false; fio: `rbd cache = false` in the
ceph.conf it reads): with the cache on, librbd is writethrough until the
first flush, which blkvm bench never sends, while fio's writes measured
here ran at write-back speed (fio calls rbd_invalidate_cache when a job
starts, whatever the cause), so the two would not run the same librbd.
--cache on runs both with the cache in write-back from the start
(`rbd cache writethrough until flush = false` in the ceph.conf both read).
The image is written in full first
(librbd's object map answers reads of objects never written without
asking an OSD). The cluster is the project's (resources/ceph/start.sh: one
monitor, one memstore OSD on this machine, so the OSD's CPU is in every
figure), started for the run and stopped after it unless --conf names a
running one.

Each row: both tools' IOPS (medians of interleaved rounds), our ratio,
and each client process's CPU time per request: all its threads (librbd
works on its own threads), from wait4's rusage. --json prints every run.
"""

import argparse
import json
import os
import resource
import subprocess
import sys

import common

WORKLOADS = [("4k randread qd1", "randread", 1), ("4k randread qd32", "randread", 32),
             ("4k randwrite qd1", "randwrite", 1), ("4k randwrite qd32", "randwrite", 32)]
IMAGE = "blkvm-bench"
CEPH = os.path.join(common.ROOT, "resources/ceph")


def measured(cmd, env=None):
    """stdout and CPU seconds (user and system, every thread) of `cmd`:
    the growth of RUSAGE_CHILDREN across its run (one child at a time)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{p.stderr}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return p.stdout, cpu


def blkvm_one(conf, rw, depth, runtime, cache):
    direct = "off" if cache else "on"
    conf = client_conf(conf, cache)
    out, cpu = measured([common.BLKVM, "bench", "--blockdev",
                         f"driver=rbd,node-name=r0,pool=rbd,image={IMAGE},conf={conf},"
                         f"cache.direct={direct}",
                         "--rw", rw, "--bs", "4096", "--iodepth", str(depth),
                         "--runtime", str(runtime), "--json"])
    r = json.loads(out)
    ios = max(r["ios"], 1)
    return {"iops": r["iops"], "ios": ios, "cpu_us_per_io": cpu * 1e6 / ios}


def fio_one(conf, rw, depth, runtime, cache):
    env = dict(os.environ, CEPH_CONF=client_conf(conf, cache))
    out, cpu = measured(["fio", "--name=j", "--ioengine=rbd", "--clientname=admin",
                         "--pool=rbd", f"--rbdname={IMAGE}", f"--rw={rw}", "--bs=4k",
                         f"--iodepth={depth}", "--time_based", f"--runtime={runtime}",
                         "--output-format=json"], env)
    job = json.loads(out[out.index("{"):])["jobs"][0]
    side = job["read"] if rw.endswith("read") else job["write"]
    ios = max(side["total_ios"], 1)
    return {"iops": side["iops"], "ios": ios, "cpu_us_per_io": cpu * 1e6 / ios}


def client_conf(conf, cache):
    """A copy of `conf` with librbd's cache off, or in write-back from the
    first write."""
    name = "writeback" if cache else "nocache"
    setting = ("rbd cache = true\nrbd cache writethrough until flush = false" if cache
               else "rbd cache = false")
    path = os.path.join(common.OUT, f"rbd-bench-{name}.conf")
    with open(conf) as f:
        text = f.read()
    os.makedirs(common.OUT, exist_ok=True)
    with open(path, "w") as f:
        f.write(text + f"\n[client]\n{setting}\n")
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runtime", type=int, default=5, help="seconds per run (default: 5)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: 3)")
    ap.add_argument("--size-mib", type=int, default=512, help="image size (default: 512)")
    ap.add_argument("--conf", help="ceph.conf of a running cluster (default: start one)")
    ap.add_argument("--cache", choices=["on", "off"], default="off",
                    help="librbd's cache in both clients (default: off)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    common.build()
    cluster_dir = None
    conf = a.conf
    if conf is None:
        cluster_dir = os.path.join(common.OUT, "ceph-bench")
        subprocess.run([os.path.join(CEPH, "stop.sh"), cluster_dir], check=False)
        conf = common.run([os.path.join(CEPH, "start.sh"), cluster_dir]).strip()
    rbd = ["rbd", "-c", conf]
    try:
        subprocess.run(rbd + ["rm", "--no-progress", f"rbd/{IMAGE}"], capture_output=True)
        common.run(rbd + ["create", "--size", f"{a.size_mib}M", f"rbd/{IMAGE}"])
        common.run(rbd + ["bench", "--io-type", "write", "--io-pattern", "seq",
                          "--io-size", "4M", "--io-threads", "4",
                          "--io-total", f"{a.size_mib}M", f"rbd/{IMAGE}"])
        rows = []
        for name, rw, depth in WORKLOADS:
            runs = {"blkvm": [], "fio": []}
            for i in range(a.rounds):
                order = ["blkvm", "fio"] if i % 2 == 0 else ["fio", "blkvm"]
                for who in order:
                    f = blkvm_one if who == "blkvm" else fio_one
                    runs[who].append(f(conf, rw, depth, a.runtime, a.cache == "on"))
            med = {who: {k: common.median([r[k] for r in rs]) for k in rs[0]}
                   for who, rs in runs.items()}
            row = {"workload": name, "runs": runs, **med,
                   "ratio": med["blkvm"]["iops"] / med["fio"]["iops"]}
            rows.append(row)
            print(f"{name}: blkvm {row['blkvm']['iops']:.0f} fio {row['fio']['iops']:.0f} "
                  f"ratio {row['ratio']:.2f}", file=sys.stderr)
    finally:
        subprocess.run(rbd + ["rm", "--no-progress", f"rbd/{IMAGE}"], capture_output=True)
        if cluster_dir is not None:
            subprocess.run([os.path.join(CEPH, "stop.sh"), cluster_dir], check=False)
    if a.json:
        print(json.dumps({"rounds": a.rounds, "runtime_s": a.runtime, "cache": a.cache,
                          "rows": rows}, indent=2))
        return
    print(f"Medians of {a.rounds} interleaved rounds of {a.runtime} s on {os.cpu_count()} CPUs; "
          f"one memstore OSD and one monitor on the same machine; librbd cache {a.cache}. "
          f"CPU µs/req: the client "
          f"process's, all threads (librbd's included).\n")
    print(common.table(
        ["workload", "blkvm IOPS", "fio rbd IOPS", "ratio", "blkvm CPU µs/req",
         "fio CPU µs/req"],
        [[r["workload"], f"{r['blkvm']['iops']:.0f}", f"{r['fio']['iops']:.0f}",
          f"{r['ratio']:.2f}x", f"{r['blkvm']['cpu_us_per_io']:.1f}",
          f"{r['fio']['cpu_us_per_io']:.1f}"] for r in rows]))


if __name__ == "__main__":
    main()
