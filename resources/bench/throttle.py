#!/usr/bin/env python3
"""The cost of the throttle filter when no limit is set: `blkvm bench` on
a node alone against the same node under `throttle` with an empty
throttle group, 4k random reads at iodepth 1 and 32, over null-co and
the 1 GiB scratch file (cache.direct=on, io_uring). Interleaved rounds,
medians; the ratio is throttled / alone (1.00 = no cost). --json prints
every run.
"""

import argparse
import json
import os
import sys

import common

GROUP = "throttle-group,id=g0"


def nodes(backing, a):
    if backing == "null-co":
        return "driver=null-co,size=1G"
    img = a.img or common.scratch_image(os.path.join(common.OUT, "bench.img"), 1024)
    return f"driver=file,filename={img},cache.direct=on,aio=io_uring"


def one(node, throttled, depth, runtime):
    if throttled:
        prefixed = ",".join("file." + kv for kv in node.split(","))
        dev = f"driver=throttle,throttle-group=g0,{prefixed}"
        r = common.bench(dev, "randread", 4096, depth, runtime, extra=("--object", GROUP))
    else:
        r = common.bench(node, "randread", 4096, depth, runtime)
    return {"iops": r["iops"], "cpu_us_per_io": r["cpu_ns_per_io"] / 1000}


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runtime", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--img")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    common.build()
    rows = []
    for backing in ["null-co", "file"]:
        node = nodes(backing, a)
        for depth in [1, 32]:
            runs = {"alone": [], "throttle": []}
            for i in range(a.rounds):
                order = ["alone", "throttle"] if i % 2 == 0 else ["throttle", "alone"]
                for who in order:
                    runs[who].append(one(node, who == "throttle", depth, a.runtime))
            med = {w: {k: common.median([r[k] for r in rs]) for k in rs[0]}
                   for w, rs in runs.items()}
            row = {"backing": backing, "iodepth": depth, "runs": runs, **med,
                   "ratio": med["throttle"]["iops"] / med["alone"]["iops"]}
            rows.append(row)
            print(f"{backing} qd{depth}: alone {med['alone']['iops']:.0f} throttle "
                  f"{med['throttle']['iops']:.0f} ratio {row['ratio']:.3f}", file=sys.stderr)
    if a.json:
        print(json.dumps({"rounds": a.rounds, "runtime_s": a.runtime, "rows": rows}, indent=2))
        return
    print(f"Medians of {a.rounds} interleaved rounds of {a.runtime} s on {os.cpu_count()} CPUs; "
          "4k randread; throttle: an empty throttle group.\n")
    print(common.table(
        ["backing", "iodepth", "alone IOPS", "throttle IOPS", "ratio", "alone CPU µs/req",
         "throttle CPU µs/req"],
        [[r["backing"], str(r["iodepth"]), f"{r['alone']['iops']:.0f}",
          f"{r['throttle']['iops']:.0f}", f"{r['ratio']:.3f}x",
          f"{r['alone']['cpu_us_per_io']:.2f}", f"{r['throttle']['cpu_us_per_io']:.2f}"]
         for r in rows]))


if __name__ == "__main__":
    main()
