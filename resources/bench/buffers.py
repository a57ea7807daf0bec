#!/usr/bin/env python3
"""Registered against bounced against map-per-request buffers (issue: RAM
registrar). A qemu-storage-daemon vhost-user-blk export (null-co, and a
file with cache.direct=on and aio=io_uring) driven by `blkvm bench`
through its libblkio `virtio-blk-vhost-user` node, at 512 B iodepth 1 and
4 KiB iodepth 32; then native `file,aio=io_uring,cache.direct=on` with
registered (io_uring fixed buffers) against unregistered buffers at 4 KiB
iodepth 1 and 32, with fio's io_uring engine with and without --fixedbufs on
the same file for reference. Each row is `blkvm bench --buffers all --rounds N`: the
modes interleave and the table shows each mode's median run.

Every shape runs twice: with the client sleeping on the completion fd as
soon as it has nothing to do (`--poll-max-ns 0`), and busy-polling for up
to 32 µs first, as a QEMU or blkvm IOThread does by default
(`--poll-max-ns 32768`). On these machines a thread wake-up costs tens of
microseconds, so a sleeping client measures mostly its own wake-ups.
"""

import argparse
import json
import math
import os
import stat

import common

SHAPES = [(512, 1), (4096, 32)]
TARGETS = ["qsd-null-co", "qsd-file", "native", "fio"]


def median_ci(xs, level=0.95):
    """A distribution-free confidence interval for the median of `xs`:
    the k-th smallest and k-th largest values, with k the largest order
    such that fewer than k of n samples fall below the median with
    probability at most (1 - level) / 2 (a binomial(n, 1/2) tail)."""
    xs = sorted(xs)
    n = len(xs)
    tail, k = 0.0, 0
    while k < n // 2:
        tail += math.comb(n, k) / 2 ** n
        if tail > (1 - level) / 2:
            break
        k += 1
    if k == 0:
        return None  # too few rounds for this level
    return xs[k - 1], xs[n - k]


def modes(report):
    """Each mode's median IOPS, and registered's IOPS over each mode's
    paired within rounds: the median over rounds and its 95% interval."""
    out = {r["buffers"]: r["iops"] for r in report["runs"]}
    out["cpu_us"] = {r["buffers"]: r["cpu_ns_per_io"] / 1000 for r in report["runs"]}
    rounds = report["round_iops"]
    out["registered_over"] = {}
    for m in ("bounce", "map-per-request"):
        ratios = [r / x for r, x in zip(rounds["registered"], rounds[m]) if x > 0]
        out["registered_over"][m] = {"median": common.median(ratios),
                                     "ci95": median_ci(ratios),
                                     "rounds_at_least_1": sum(q >= 1 for q in ratios),
                                     "rounds": len(ratios)}
    out["round_iops"] = rounds
    return out


def ratio(q):
    """`1.02x [0.91-1.10]`: a paired median ratio and its interval."""
    ci = q["ci95"]
    return f"{q['median']:.2f}x" + (f" [{ci[0]:.2f}-{ci[1]:.2f}]" if ci else "")


def fio(img, bs, depth, runtime, ramp, fixedbufs):
    """IOPS and CPU µs per request of fio random reads."""
    job = common.fio_job(img, "randread", bs, depth, runtime,
                         [f"--ramp_time={round(ramp * 1000)}ms"]
                         + (["--fixedbufs"] if fixedbufs else []))
    # fio's usr/sys_cpu are percent of its runtime, of its one job thread.
    cpu_s = (job["usr_cpu"] + job["sys_cpu"]) / 100 * job["job_runtime"] / 1000
    return job["read"]["iops"], cpu_s / max(job["read"]["total_ios"], 1) * 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runtime", type=float, default=0.5)
    ap.add_argument("--rounds", type=int, default=12,
                    help="a multiple of 6 runs every order of the three modes equally often")
    ap.add_argument("--ramp", type=float, default=0.25,
                    help="seconds each run runs unmeasured first (bench --ramp-time, "
                    "fio --ramp_time): a thread that was idle runs slower for a while here")
    ap.add_argument("--only", default=",".join(TARGETS),
                    help=f"comma-separated targets to run, of {','.join(TARGETS)}")
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--img", help="file or block device to use instead of a scratch file")
    ap.add_argument("--poll", default="0,32768",
                    help="comma-separated client --poll-max-ns values to run")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    only = set(a.only.split(","))
    if only - set(TARGETS):
        ap.error(f"--only: unknown targets {','.join(sorted(only - set(TARGETS)))}")
    common.build()
    img = a.img or common.scratch_image(os.path.join(common.OUT, "bench.img"), a.size_mib)
    sock = os.path.join(common.OUT, "qsd.sock")
    polls = [int(p) for p in a.poll.split(",")]
    rows = []

    def row(target, blockdev, bs, depth, poll):
        """One `blkvm bench --buffers all` row of the table."""
        rep = common.bench(blockdev, "randread", bs, depth, a.runtime, "all",
                           ["--rounds", str(a.rounds), "--poll-max-ns", str(poll),
                            "--ramp-time", str(a.ramp)])
        rows.append({"target": target, "bs": bs, "iodepth": depth, "poll": poll,
                     **modes(rep)})
    backings = {
        "null-co": ["driver=null-co,node-name=d0,size=1073741824"],
        # QEMU insists on host_device for block devices.
        "file": [f"driver={'host_device' if stat.S_ISBLK(os.stat(img).st_mode) else 'file'},"
                 f"node-name=f0,filename={img},aio=io_uring,cache.direct=on",
                 "driver=raw,node-name=d0,file=f0"],
    }
    for backing, nodes in backings.items():
        if f"qsd-{backing}" not in only:
            continue
        d = common.qsd_daemon(nodes, sock)
        try:
            for poll in polls:
                for bs, depth in SHAPES:
                    row(f"qsd vhost-user-blk, {backing}",
                        f"virtio-blk-vhost-user,path={sock},node-name=v0", bs, depth, poll)
        finally:
            d.stop()
    native = f"file,filename={img},aio=io_uring,cache.direct=on,node-name=f0"
    for poll in polls if "native" in only else []:
        for bs, depth in [(4096, 1), (4096, 32)]:
            row("native file,aio=io_uring", native, bs, depth, poll)
    # The reference tool on the same file: fio's io_uring engine with and
    # without --fixedbufs (registered buffers), rounds interleaved.
    fio_rows = []
    for depth in (1, 32) if "fio" in only else ():
        runs = {True: [], False: []}
        for i in range(a.rounds):
            for fixed in ((True, False) if i % 2 == 0 else (False, True)):
                runs[fixed].append(fio(img, 4096, depth, a.runtime, a.ramp, fixed))
        paired = sorted(f[0] / u[0] for f, u in zip(runs[True], runs[False]))
        fio_rows.append({"target": "fio io_uring, direct=1", "bs": 4096, "iodepth": depth,
                         "fixedbufs": common.median([r[0] for r in runs[True]]),
                         "plain": common.median([r[0] for r in runs[False]]),
                         "fixed/plain": paired[len(paired) // 2],
                         "cpu_us": {"fixedbufs": common.median([r[1] for r in runs[True]]),
                                    "plain": common.median([r[1] for r in runs[False]])}})
    if a.json:
        print(json.dumps({"blkvm": rows, "fio": fio_rows}, indent=2))
        return
    print(f"IOPS: median of {a.rounds} interleaved rounds of {a.runtime:g} s per mode, each "
          f"after {a.ramp:g} s unmeasured (the "
          "order changes every round; six rounds hold every order). Ratios: median over "
          "rounds of the ratio within a round, with its 95% interval (order statistics) "
          "where there are enough rounds; 'rounds ≥ 1': rounds in which registered was at "
          "least as fast as bounce. "
          "For native io_uring, 'bounce' means plain unregistered memory (the kernel "
          "pins pages per request; no copy).\n")
    out = []
    for r in rows:
        reg, bnc, mpr = r["registered"], r["bounce"], r["map-per-request"]
        over = r["registered_over"]
        client = f"polls {r['poll']} ns" if r["poll"] else "sleeps"
        out.append([r["target"], f"{r['bs']} qd{r['iodepth']}", client, f"{reg:.0f}", f"{bnc:.0f}",
                    f"{mpr:.0f}", ratio(over["bounce"]),
                    f"{over['bounce']['rounds_at_least_1']}/{over['bounce']['rounds']}",
                    ratio(over["map-per-request"])])
    print(common.table(["target", "shape", "client", "registered", "bounce", "map-per-request",
                        "registered/bounce", "rounds ≥ 1", "registered/map"], out))
    print("\nCPU time of the submitting thread per request (us), sleeping clients; a "
          "polling client spends its poll window too:\n")
    out = []
    for r in rows:
        if r["poll"]:
            continue
        c = r["cpu_us"]
        out.append([r["target"], f"{r['bs']} qd{r['iodepth']}", f"{c['registered']:.2f}",
                    f"{c['bounce']:.2f}", f"{c['map-per-request']:.2f}"])
    for r in fio_rows:
        c = r["cpu_us"]
        out.append([r["target"] + " (--fixedbufs / without)", f"{r['bs']} qd{r['iodepth']}",
                    f"{c['fixedbufs']:.2f}", f"{c['plain']:.2f}", ""])
    print(common.table(["target", "shape", "registered", "bounce", "map-per-request"], out))
    print("\nfio on the same file, sleeping in io_uring_enter as fio does by default:\n")
    print(common.table(["target", "shape", "--fixedbufs", "without", "fixed/without"],
                       [[r["target"], f"{r['bs']} qd{r['iodepth']}", f"{r['fixedbufs']:.0f}",
                         f"{r['plain']:.0f}", f"{r['fixed/plain']:.2f}x"] for r in fio_rows]))

if __name__ == "__main__":
    main()
