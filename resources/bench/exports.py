#!/usr/bin/env python3
"""blkvm storage-daemon against qemu-storage-daemon: the same backing node
type (null-co, and a file with cache.direct=on and aio=io_uring), each
exported over vhost-user-blk and driven by the same client, `blkvm bench`
through its `virtio-blk-vhost-user` (libblkio) node, with registered
buffers. Workloads: 4k iodepth 1, 4k iodepth 32, 512 iodepth 1 random
reads.

Three settings, a table each:
  fair     both daemons serve the export from an IOThread with the same
           poll-max-ns (--poll-max-ns; QEMU's default, 32768, unless
           given), and the client polls its completion queue for up to
           the same time before it sleeps, as QEMU's own libblkio client
           does in such an IOThread (block/blkio.c registers a poll
           handler that peeks at the completion queue): the same poll
           settings on every side.
  sleep    as fair, but the client sleeps on its completion fd at once:
           how a client that does not poll sees the two daemons.
  default  each daemon without options: blkvm gives each export queue an
           IOThread of its own (QEMU's poll-max-ns, 32768, adaptive per
           event source); qemu-storage-daemon serves the export from
           its main loop, which does not poll; the client does not poll.

Beside IOPS, each run records, over the whole `blkvm bench` invocation
(connect, the measured run, disconnect; there is no ramp, and the
invocation lasts about 10 ms longer than --runtime):
  - the daemon's CPU per request: user and system time of all its threads
    (/proc/PID/stat), divided by the requests of the measured run;
  - the machine's idle share: idle and iowait time over all time of all
    CPUs (/proc/stat), so on 2 CPUs a run that keeps one CPU busy shows
    about 50%;
and blkvm bench's own figure for the client's CPU per request (its I/O
thread, over the measured run only). --json adds the bench process's CPU
per request (all its threads, whole invocation) and `other_cpus`, the
CPUs that everything else on the machine kept busy meanwhile; the tables
say when that was more than a tenth of a CPU.

Rounds are interleaved: in each round every (setting, daemon) pair runs
once, in an order that reverses every other round, each on a freshly
started daemon. The tables show per-figure medians and our IOPS ratio;
--json prints every run.
"""

import argparse
import json
import math
import os
import resource
import stat
import sys
import time

import common

WORKLOADS = [("4k randread qd1", 4096, 1), ("4k randread qd32", 4096, 32),
             ("512 randread qd1", 512, 1)]
BACKINGS = ["null-co", "file"]
DAEMONS = {"blkvm": common.blkvm_daemon, "qsd": common.qsd_daemon}
NAMES = {"blkvm": "blkvm storage-daemon", "qsd": "qemu-storage-daemon"}
# QEMU's default poll-max-ns for an IOThread (blkvm's DEFAULT_POLL_MAX_NS).
DEFAULT_POLL_MAX_NS = 32768
# The settings, each a table (see the docstring).
SETTINGS = {
    "fair": "both exports on an IOThread with poll-max-ns={p}; the client polls its "
            "completions for up to {p} ns before it sleeps",
    "sleep": "both exports on an IOThread with poll-max-ns={p}; the client sleeps at once",
    "default": "no IOThread, each daemon's defaults; the client sleeps at once",
}
# Other load, in CPUs, past which the tables say it was there (tick
# granularity and the script's own bookkeeping stay below it).
OTHER_LOAD_NOTE = 0.1
PLOT_HELP = ("--plot needs matplotlib: install it with `resources/out/venv/bin/pip install "
             "matplotlib` and run this script with resources/out/venv/bin/python")


def backing_nodes(backing, a):
    """The --blockdev arguments of blkvm's and qemu-storage-daemon's node."""
    if backing == "null-co":
        return (["driver=null-co,node-name=d0,size=1073741824"],) * 2
    img = a.img or common.scratch_image(os.path.join(common.OUT, "bench.img"), a.size_mib)
    # qemu-storage-daemon wants plain integers for sizes, and host_device
    # for a block device (blkvm's file takes both).
    blk = stat.S_ISBLK(os.stat(img).st_mode)
    return tuple([f"driver={drv},node-name=f0,filename={img},aio=io_uring,cache.direct=on",
                  "driver=raw,node-name=d0,file=f0"]
                 for drv in ("file", "host_device" if blk else "file"))


def children_cpu_s():
    """CPU seconds of the children waited for so far: across one bench
    run, the bench process, all its threads (daemons are waited for only
    when stopped, after their run)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def measured_run(daemon, client, bs, depth, runtime, client_poll_ns):
    """One bench run on `daemon`, with the daemon's CPU and the machine's
    idle share over the whole bench invocation. `other_cpus` is how many
    CPUs everything but the daemon and the bench process kept busy: other
    load on the machine, which the idle share includes."""
    start = (daemon.cpu_s(), children_cpu_s(), common.machine_cpu(), time.monotonic())
    extra = ("--poll-max-ns", str(client_poll_ns)) if client_poll_ns else ()
    rep = common.bench(client, "randread", bs, depth, runtime, extra=extra)
    end = (daemon.cpu_s(), children_cpu_s(), common.machine_cpu(), time.monotonic())
    daemon_s, client_s = end[0] - start[0], end[1] - start[1]
    idle, total = (e - s for s, e in zip(start[2], end[2]))
    wall = end[3] - start[3]
    ios = max(rep["ios"], 1)
    return {"iops": rep["iops"], "ios": rep["ios"], "runtime_s": rep["runtime_s"],
            "wall_s": wall, "daemon_cpu_s": daemon_s,
            "daemon_cpu_us_per_io": daemon_s * 1e6 / ios,
            "client_cpu_us_per_io": rep["cpu_ns_per_io"] / 1000,
            "client_process_cpu_us_per_io": client_s * 1e6 / ios,
            "idle": idle / max(total, 1),
            "other_cpus": ((total - idle) / common.CLK_TCK - daemon_s - client_s) / wall}


def run_row(settings, nodes, client, bs, depth, a):
    """Every (setting, daemon) pair, a.rounds interleaved times: their runs."""
    pairs = [(s, who) for s in settings for who in DAEMONS]
    runs = {s: {who: [] for who in DAEMONS} for s in settings}
    for i in range(a.rounds):
        for s, who in (pairs if i % 2 == 0 else pairs[::-1]):
            d = DAEMONS[who](nodes[who], os.path.join(common.OUT, "export.sock"),
                             iothread=settings[s]["iothread"])
            try:
                runs[s][who].append(measured_run(d, client, bs, depth, a.runtime,
                                                 settings[s]["client_poll_ns"]))
            finally:
                d.stop()
    return runs


def medians(runs):
    return {k: common.median([r[k] for r in runs]) for k in runs[0]}


def plot(path, results):
    """The rows as bar charts: above, our IOPS ratio, a bar per setting
    (a line marks 1x); below, the IOPS of each daemon in each setting, on a
    log scale, since qd32 runs ten times the IOPS of qd1."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = next(iter(results.values()))["rows"]
    xs = range(len(rows))
    fig, (ratio_ax, iops_ax) = plt.subplots(2, 1, figsize=(max(6, 1.5 * len(rows)), 8))
    colors = plt.get_cmap("tab10").colors
    width = 0.8 / len(results)
    for i, (setting, res) in enumerate(results.items()):
        bars = ratio_ax.bar([x + (i + 0.5) * width - 0.4 for x in xs],
                            [r["ratio"] for r in res["rows"]], width, color=colors[2 + i],
                            label=f"{setting}: {res['description']}")
        ratio_ax.bar_label(bars, fmt="%.2fx", fontsize=7)
    ratio_ax.axhline(1, color="black", linewidth=0.8)
    ratio_ax.margins(y=0.1)
    ratio_ax.set_ylabel("blkvm / qemu-storage-daemon IOPS")
    # A hue per daemon, darkest for the first setting.
    shades = {"blkvm": plt.get_cmap("Blues"), "qsd": plt.get_cmap("Oranges")}
    pairs = [(setting, who) for who in DAEMONS for setting in results]
    width = 0.8 / len(pairs)
    for i, (setting, who) in enumerate(pairs):
        iops_ax.bar([x + (i + 0.5) * width - 0.4 for x in xs],
                    [r[who]["iops"] for r in results[setting]["rows"]], width,
                    color=shades[who](0.9 - 0.5 * list(results).index(setting)
                                      / max(1, len(results) - 1)),
                    label=f"{NAMES[who]}, {setting}")
    iops_ax.set_yscale("log")
    iops_ax.set_ylim(bottom=10 ** math.floor(math.log10(
        min(r[who]["iops"] for res in results.values() for r in res["rows"] for who in DAEMONS))))
    iops_ax.set_ylabel("IOPS (median)")
    for ax in (ratio_ax, iops_ax):
        ax.set_xticks(list(xs), [f"{r['backing']}\n{r['workload']}" for r in rows], fontsize=8)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.savefig(path, bbox_inches="tight")


def print_tables(results, a):
    print(f"Medians of {a.rounds} interleaved rounds of {a.runtime:g} s on {os.cpu_count()} "
          "CPUs; client: blkvm bench via libblkio virtio-blk-vhost-user, registered buffers, "
          "no ramp. CPU µs/req: the daemon's user and system time, all threads, over the "
          "whole bench invocation, per measured request; client: bench's I/O thread. "
          "idle: the machine's idle share during the blkvm / qsd runs.")
    for setting, res in results.items():
        print(f"\n{setting}: {res['description']}.\n")
        print(common.table(
            ["backing", "workload", "blkvm IOPS", "qsd IOPS", "ratio", "blkvm CPU µs/req",
             "qsd CPU µs/req", "client CPU µs/req", "idle %"],
            [[r["backing"], r["workload"], f"{r['blkvm']['iops']:.0f}",
              f"{r['qsd']['iops']:.0f}", f"{r['ratio']:.2f}x",
              f"{r['blkvm']['daemon_cpu_us_per_io']:.2f}",
              f"{r['qsd']['daemon_cpu_us_per_io']:.2f}",
              f"{r['blkvm']['client_cpu_us_per_io']:.2f} / "
              f"{r['qsd']['client_cpu_us_per_io']:.2f}",
              f"{r['blkvm']['idle'] * 100:.0f} / {r['qsd']['idle'] * 100:.0f}"]
             for r in res["rows"]]))
    other = max(r[who]["other_cpus"] for res in results.values() for r in res["rows"]
                for who in DAEMONS)
    if other > OTHER_LOAD_NOTE:
        print(f"\nOther processes kept up to {other:.2f} CPUs busy during the runs (median "
              "of a row); the idle shares include that load.")


def main():
    ap = argparse.ArgumentParser(description=__doc__, epilog=PLOT_HELP,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runtime", type=float, default=3, help="seconds per run (default: 3)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: 3)")
    ap.add_argument("--size-mib", type=int, default=1024,
                    help="size of the scratch file of the file backing (default: 1024)")
    ap.add_argument("--img", help="file or block device to use instead of a scratch file")
    ap.add_argument("--json", action="store_true", help="print every run's figures as JSON")
    ap.add_argument("--setting", choices=list(SETTINGS), action="append",
                    help="only these settings (repeatable; default: all three, a table each)")
    ap.add_argument("--poll-max-ns", type=int, default=DEFAULT_POLL_MAX_NS,
                    help="poll-max-ns of the IOThreads, and the polling client's window, in "
                         "the fair and sleep settings (default: %(default)s)")
    ap.add_argument("--backing", choices=BACKINGS, action="append",
                    help="only these backings (repeatable)")
    ap.add_argument("--plot", metavar="FILE.svg",
                    help="also draw the rows as a bar chart (needs matplotlib; any format "
                         "matplotlib infers from the name)")
    a = ap.parse_args()
    if a.plot:
        try:
            import matplotlib  # noqa: F401 -- fail before the runs, not after
        except ImportError:
            sys.exit(PLOT_HELP)
    p = a.poll_max_ns
    settings = {s: {"iothread": p if s != "default" else None,
                    "client_poll_ns": p if s == "fair" else 0,
                    "description": SETTINGS[s].format(p=p)}
                for s in SETTINGS if not a.setting or s in a.setting}
    common.build()
    client = f"virtio-blk-vhost-user,path={os.path.join(common.OUT, 'export.sock')},node-name=v0"
    results = {s: {"poll_max_ns": v["iothread"], "client_poll_ns": v["client_poll_ns"],
                   "rows": [], "description": v["description"]}
               for s, v in settings.items()}
    for backing in [b for b in BACKINGS if not a.backing or b in a.backing]:
        ours, theirs = backing_nodes(backing, a)
        for name, bs, depth in WORKLOADS:
            runs = run_row(settings, {"blkvm": ours, "qsd": theirs}, client, bs, depth, a)
            for s, by_daemon in runs.items():
                r = {"backing": backing, "workload": name, "runs": by_daemon,
                     **{who: medians(rs) for who, rs in by_daemon.items()}}
                r["ratio"] = r["blkvm"]["iops"] / r["qsd"]["iops"]
                results[s]["rows"].append(r)
                print(f"{s} {backing} {name}: blkvm {r['blkvm']['iops']:.0f} "
                      f"qsd {r['qsd']['iops']:.0f} ratio {r['ratio']:.2f}", file=sys.stderr)
    if a.plot:
        plot(a.plot, results)
    if a.json:
        print(json.dumps({"rounds": a.rounds, "runtime_s": a.runtime, "cpus": os.cpu_count(),
                          "settings": results}, indent=2))
    else:
        print_tables(results, a)


if __name__ == "__main__":
    main()
