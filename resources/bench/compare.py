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

The qcow2 rows (issue 15) run `blkvm bench` (a qcow2 node over a file
node, aio=io_uring, cache.direct=on) and `qemu-img bench -f qcow2 -t none`
on the same qcow2 file, 4k requests:
  - reads of a fully allocated image (the raw scratch file converted), at
    iodepth 1 and 32. qemu-img bench has no random mode, so both tools
    take the same stride through the image (`-S`, blkvm `--step`): a step
    of READ_STEP_BLOCKS blocks, coprime to the block count, visits every
    block once per pass in an order with no locality;
  - allocating writes on a sparse image, at iodepth 1 and 32: each tool
    gets a fresh copy of the sparse image for every run and writes 4k at
    the start of every cluster once (`-S` / `--step` of one cluster), so
    every write allocates a cluster.
`--only raw` or `--only qcow2` runs one set of rows.
"""

import argparse
import json
import os
import re
import shutil
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

# The qcow2 rows: (name, write, iodepth).
QCOW2_WORKLOADS = [
    ("qcow2 4k read qd1 (allocated)", False, 1),
    ("qcow2 4k read qd32 (allocated)", False, 32),
    ("qcow2 4k allocating write qd1 (sparse)", True, 1),
    ("qcow2 4k allocating write qd32 (sparse)", True, 32),
]
QCOW2_BS = 4096
# qemu-img create's default cluster size.
QCOW2_CLUSTER = 65536
# The read stride, in 4k blocks: odd (so coprime to any power-of-two block
# count) and prime, about 400 MiB, so consecutive requests are far apart.
READ_STEP_BLOCKS = 104729

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


def qemu_img(img, write, bs, depth, count, aio, fmt="raw", step=None):
    """Requests per second of one `qemu-img bench` run (`step`: its -S)."""
    cmd = ["qemu-img", "bench", "-f", fmt, "-t", "none", "-i", aio, "-c", str(count),
           "-d", str(depth), "-s", str(bs)]
    if step is not None:
        cmd += ["-S", str(step)]
    if write:
        cmd.append("-w")
    out = run(cmd + [img])
    m = re.search(r"Run completed in ([0-9.]+) seconds", out)
    if not m:
        sys.exit(f"unexpected qemu-img output: {out}")
    return count / float(m.group(1))


def qcow2_blockdevs(img):
    return ["--blockdev", f"file,node-name=f0,filename={img},aio=io_uring,cache.direct=on",
            "--blockdev", "qcow2,node-name=q0,file=f0"]


def blkvm_qcow2(blkvm_bin, img, write, depth, step, runtime=None, count=None):
    """(IOPS, requests done) of `blkvm bench` on the qcow2 image `img`,
    sequential with a stride of `step` bytes."""
    cmd = [blkvm_bin, "bench", *qcow2_blockdevs(img), "--rw", "write" if write else "read",
           "--bs", str(QCOW2_BS), "--step", str(step), "--iodepth", str(depth), "--json"]
    cmd += ["--runtime", str(runtime)] if count is None else ["--count", str(count)]
    r = json.loads(run(cmd))
    return r["iops"], r["ios"]


def qemu_img_qcow2(img, write, depth, step, count, aio):
    return qemu_img(img, write, QCOW2_BS, depth, count, aio, fmt="qcow2", step=step)


def qcow2_images(raw_img, alloc_mib):
    """The fully allocated qcow2 image (`raw_img` converted, remade when
    the raw file is newer) and the sparse template of `alloc_mib` MiB."""
    base = os.path.splitext(raw_img)[0]
    full = base + ".qcow2"
    if not os.path.exists(full) or os.path.getmtime(full) < os.path.getmtime(raw_img):
        print(f"converting {raw_img} to {full}", file=sys.stderr)
        run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-t", "none", raw_img,
             full + ".tmp"])
        os.replace(full + ".tmp", full)
    sparse = f"{base}-sparse-{alloc_mib}M.qcow2"
    if not os.path.exists(sparse):
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={QCOW2_CLUSTER}",
             sparse + ".tmp", f"{alloc_mib}M"])
        os.replace(sparse + ".tmp", sparse)
    return full, sparse


def fresh_copy(template):
    """A copy of the sparse image to allocate into (a few hundred KiB)."""
    work = template.replace(".qcow2", "-run.qcow2")
    shutil.copyfile(template, work)
    return work


def qcow2_rows(a):
    full, sparse = qcow2_images(a.img, a.alloc_size_mib)
    clusters = (a.alloc_size_mib << 20) // QCOW2_CLUSTER
    rows = []
    for name, write, depth in QCOW2_WORKLOADS:
        runs = {k: [] for k in ("blkvm", "qemu_img_io_uring", "qemu_img_threads")}
        for i in range(a.rounds):
            print(f"running {name}, round {i + 1}/{a.rounds} ...", file=sys.stderr)
            if write:
                # Every cluster once, each tool on a fresh copy.
                step = QCOW2_CLUSTER
                img = fresh_copy(sparse)
                iops, _ = blkvm_qcow2(a.blkvm, img, True, depth, step, count=clusters)
                runs["blkvm"].append(iops)
                count = clusters
            else:
                step = READ_STEP_BLOCKS * QCOW2_BS
                img = full
                iops, count = blkvm_qcow2(a.blkvm, img, False, depth, step, runtime=a.runtime)
                runs["blkvm"].append(iops)
                count = max(1000, count)
            for aio in ("io_uring", "threads"):
                if write:
                    img = fresh_copy(sparse)
                runs[f"qemu_img_{aio}"].append(qemu_img_qcow2(img, write, depth, step, count, aio))
            if write:
                os.unlink(img)
        r = {"workload": name, "runs": runs}
        r.update({k: statistics.median(v) for k, v in runs.items()})
        r["ratio_qemu_io_uring"] = r["blkvm"] / r["qemu_img_io_uring"]
        r["ratio_qemu_threads"] = r["blkvm"] / r["qemu_img_threads"]
        rows.append(r)
    return rows


def raw_rows(a):
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
    return rows


def print_raw(rows):
    print("| workload | blkvm (random) | fio io_uring | blkvm/fio | blkvm (seq) "
          "| qemu-img io_uring (seq) | blkvm/qemu | qemu-img threads (seq) | blkvm/qemu |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['workload']} | {r['blkvm']:.0f} | {r['fio_io_uring']:.0f} | "
              f"{r['ratio_fio']:.2f}x | {r['blkvm_seq']:.0f} | {r['qemu_img_io_uring']:.0f} | "
              f"{r['ratio_qemu_io_uring']:.2f}x | {r['qemu_img_threads']:.0f} | "
              f"{r['ratio_qemu_threads']:.2f}x |")


def print_qcow2(rows):
    print("| workload | blkvm | qemu-img io_uring | blkvm/qemu | qemu-img threads "
          "| blkvm/qemu |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['workload']} | {r['blkvm']:.0f} | {r['qemu_img_io_uring']:.0f} | "
              f"{r['ratio_qemu_io_uring']:.2f}x | {r['qemu_img_threads']:.0f} | "
              f"{r['ratio_qemu_threads']:.2f}x |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--img", default=os.path.join(ROOT, "resources/out/bench.img"))
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--runtime", type=float, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--blkvm", default=os.path.join(ROOT, "target/release/blkvm"))
    ap.add_argument("--pin", help="run every tool under `taskset -c PIN` (same CPU for all)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--only", choices=["raw", "qcow2"],
                    help="run only the raw-file rows or only the qcow2 rows")
    ap.add_argument("--alloc-size-mib", type=int, default=1024,
                    help="virtual size of the sparse qcow2 image the allocating-write rows "
                         "fill, one 4k write per 64k cluster")
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

    raw = raw_rows(a) if a.only in (None, "raw") else []
    qcow2 = qcow2_rows(a) if a.only in (None, "qcow2") else []

    if a.json:
        print(json.dumps(raw + qcow2, indent=2))
        return
    print(f"Medians of {a.rounds} interleaved rounds of {a.runtime:g} s each, IOPS; "
          f"{a.size_mib} MiB file, O_DIRECT.")
    if raw:
        print()
        print_raw(raw)
    if qcow2:
        print()
        print(f"qcow2, the same file for both tools: reads stride {READ_STEP_BLOCKS} blocks "
              f"through a fully allocated image for {a.runtime:g} s (qemu-img: as many "
              f"requests); allocating writes fill a fresh {a.alloc_size_mib} MiB sparse "
              f"image, one 4k write per {QCOW2_CLUSTER >> 10}k cluster.")
        print()
        print_qcow2(qcow2)


if __name__ == "__main__":
    main()
