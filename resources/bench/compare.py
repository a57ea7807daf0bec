#!/usr/bin/env python3
"""Side-by-side benchmark of blkvm's block layer against fio and qemu-img
bench, on one scratch file, in one run (issue: foundation, item 6).

For each workload it runs, back to back on the same file:
  - blkvm bench   file,aio=io_uring,cache.direct=on   (random, like fio)
  - fio           ioengine=io_uring, direct=1          (random)
  - blkvm bench   the same node, sequential            (what qemu-img bench does)
  - qemu-img bench -t none -i io_uring, and -i threads (sequential only)
and prints IOPS and blkvm's ratio to each. The host disk here is virtual
and noisy, so every workload runs --rounds times with the tools interleaved,
and the table shows each tool's median. --json prints every figure.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys

import common

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKLOADS = [
    # (name, rw, bs, iodepth)
    ("4k randread qd1", "randread", 4096, 1),
    ("4k randread qd32", "randread", 4096, 32),
    ("512 randread qd1", "randread", 512, 1),
    ("4k randwrite qd32", "randwrite", 4096, 32),
]


PIN = []


def run(cmd):
    p = subprocess.run(PIN + cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{p.stderr}")
    return p.stdout


def blkvm(blkvm_bin, img, rw, bs, depth, runtime, aio="io_uring"):
    node = f"file,filename={img},aio={aio},cache.direct=on,node-name=d0"
    out = run([blkvm_bin, "bench", "--blockdev", node, "--rw", rw, "--bs", str(bs),
               "--iodepth", str(depth), "--runtime", str(runtime), "--json"])
    return json.loads(out)["iops"]


def fio(img, rw, bs, depth, runtime):
    job = common.fio_job(img, rw, bs, depth, runtime, runner=run)
    return job["write" if "write" in rw else "read"]["iops"]


def qemu_img(img, write, bs, depth, count, aio):
    cmd = ["qemu-img", "bench", "-f", "raw", "-t", "none", "-i", aio, "-c", str(count),
           "-d", str(depth), "-s", str(bs)]
    if write:
        cmd.append("-w")
    out = run(cmd + [img])
    m = re.search(r"Run completed in ([0-9.]+) seconds", out)
    if not m:
        sys.exit(f"unexpected qemu-img output: {out}")
    return count / float(m.group(1))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--img", default=os.path.join(ROOT, "resources/out/bench.img"))
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--runtime", type=float, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--blkvm", default=os.path.join(ROOT, "target/release/blkvm"))
    ap.add_argument("--pin", help="run every tool under `taskset -c PIN` (same CPU for all)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if a.pin is not None:
        PIN.extend(["taskset", "-c", a.pin])

    if not os.path.exists(a.blkvm):
        run(["cargo", "build", "--release", "-p", "vmm", "--manifest-path",
             os.path.join(ROOT, "Cargo.toml")])
    os.makedirs(os.path.dirname(a.img), exist_ok=True)
    if not os.path.exists(a.img) or os.path.getsize(a.img) != a.size_mib << 20:
        print(f"writing {a.size_mib} MiB of data to {a.img}", file=sys.stderr)
        run(["fio", "--name=fill", f"--filename={a.img}", "--rw=write", "--bs=1M",
             f"--size={a.size_mib}M", "--direct=1", "--ioengine=io_uring", "--iodepth=8"])

    rows = []
    for name, rw, bs, depth in WORKLOADS:
        seq = "write" if "write" in rw else "read"
        runs = {k: [] for k in ("blkvm", "fio_io_uring", "blkvm_seq",
                                "qemu_img_io_uring", "qemu_img_threads")}
        for i in range(a.rounds):
            print(f"running {name}, round {i + 1}/{a.rounds} ...", file=sys.stderr)
            runs["blkvm"].append(blkvm(a.blkvm, a.img, rw, bs, depth, a.runtime))
            runs["fio_io_uring"].append(fio(a.img, rw, bs, depth, a.runtime))
            runs["blkvm_seq"].append(blkvm(a.blkvm, a.img, seq, bs, depth, a.runtime))
            count = max(1000, int(runs["blkvm_seq"][-1] * a.runtime))
            for aio in ("io_uring", "threads"):
                runs[f"qemu_img_{aio}"].append(
                    qemu_img(a.img, seq == "write", bs, depth, count, aio))
        r = {"workload": name, "runs": runs}
        r.update({k: statistics.median(v) for k, v in runs.items()})
        r["ratio_fio"] = r["blkvm"] / r["fio_io_uring"]
        r["ratio_qemu_io_uring"] = r["blkvm_seq"] / r["qemu_img_io_uring"]
        r["ratio_qemu_threads"] = r["blkvm_seq"] / r["qemu_img_threads"]
        rows.append(r)

    if a.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"Medians of {a.rounds} interleaved rounds of {a.runtime:g} s each, IOPS; "
          f"{a.size_mib} MiB file, O_DIRECT.")
    print()
    print("| workload | blkvm (random) | fio io_uring | blkvm/fio | blkvm (seq) "
          "| qemu-img io_uring (seq) | blkvm/qemu | qemu-img threads (seq) | blkvm/qemu |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['workload']} | {r['blkvm']:.0f} | {r['fio_io_uring']:.0f} | "
              f"{r['ratio_fio']:.2f}x | {r['blkvm_seq']:.0f} | {r['qemu_img_io_uring']:.0f} | "
              f"{r['ratio_qemu_io_uring']:.2f}x | {r['qemu_img_threads']:.0f} | "
              f"{r['ratio_qemu_threads']:.2f}x |")


if __name__ == "__main__":
    main()
