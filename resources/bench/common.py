"""Shared helpers of the side-by-side benchmark scripts: running blkvm
bench, starting an export daemon (blkvm storage-daemon or
qemu-storage-daemon) and waiting for its socket, CPU time from /proc,
medians of interleaved rounds, and markdown tables."""

import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BLKVM = os.path.join(ROOT, "target/release/blkvm")
OUT = os.path.join(ROOT, "resources/out")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def build():
    if not os.path.exists(BLKVM) or os.environ.get("BLKVM_REBUILD"):
        subprocess.run(["cargo", "build", "--release", "-p", "vmm", "--manifest-path",
                        os.path.join(ROOT, "Cargo.toml")], check=True)


def run(cmd):
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{p.stderr}")
    return p.stdout


def bench(blockdev, rw, bs, depth, runtime, buffers="registered", extra=()):
    """IOPS (and the whole JSON report) of one blkvm bench run."""
    out = run([BLKVM, "bench", "--blockdev", blockdev, "--rw", rw, "--bs", str(bs),
               "--iodepth", str(depth), "--runtime", str(runtime), "--buffers", buffers,
               "--json", *extra])
    return json.loads(out)


def fio_job(img, rw, bs, depth, runtime, extra=(), runner=None):
    """fio's JSON report of its one job: io_uring, O_DIRECT, time based.
    `runner` runs the command line (default: `run`)."""
    out = (runner or run)(["fio", "--name=job", f"--filename={img}", "--direct=1",
                           "--ioengine=io_uring", f"--rw={rw}", f"--bs={bs}",
                           f"--iodepth={depth}", f"--runtime={round(runtime * 1000)}ms", "--time_based",
                           "--output-format=json", *extra])
    return json.loads(out)["jobs"][0]


def scratch_image(path, size_mib):
    """A file of `size_mib` MiB filled with data (O_DIRECT reads of holes
    would not touch the disk)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.exists(path) and os.path.getsize(path) == size_mib << 20:
        return path
    print(f"writing {size_mib} MiB of data to {path}", file=sys.stderr)
    run(["fio", "--name=fill", f"--filename={path}", "--rw=write", "--bs=1M",
         f"--size={size_mib}M", "--direct=1", "--ioengine=io_uring", "--iodepth=8"])
    return path


class Daemon:
    """An export daemon on a unix socket, stopped with SIGTERM."""

    def __init__(self, cmd, sock):
        self.sock = sock
        if os.path.exists(sock):
            os.unlink(sock)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
        for _ in range(200):
            if os.path.exists(sock):
                return
            if self.proc.poll() is not None:
                sys.exit(f"{' '.join(cmd)} exited:\n{self.proc.stderr.read()}")
            time.sleep(0.05)
        sys.exit(f"{' '.join(cmd)}: no socket at {sock}")

    def cpu_s(self):
        return process_cpu_s(self.proc.pid)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


def process_cpu_s(pid):
    """Seconds of CPU (user and system) process `pid` has used so far, all
    its threads, exited ones included (utime and stime of proc(5))."""
    with open(f"/proc/{pid}/stat") as f:
        # The command name may hold spaces; the fields after it start at
        # field 3 (state), so utime (14) and stime (15) are 11 and 12.
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_cpu():
    """(idle, total) time of all CPUs so far, in clock ticks, from
    /proc/stat; idle counts iowait. Total is user, nice, system, idle,
    iowait, irq, softirq and steal (guest time is inside user and nice)."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:9]]
    return ticks[3] + ticks[4], sum(ticks)


def export_args(node_args, sock, node="d0", iothread=None):
    """Daemon arguments shared by both storage daemons: the nodes, and one
    export, on an iothread with poll-max-ns `iothread` when given."""
    cmd = []
    for b in node_args:
        cmd += ["--blockdev", b]
    export = (f"type=vhost-user-blk,id=e0,node-name={node},addr.type=unix,"
              f"addr.path={sock},writable=on")
    if iothread is not None:
        cmd += ["--object", f"iothread,id=io0,poll-max-ns={iothread}"]
        export += ",iothread=io0"
    return cmd + ["--export", export]


def blkvm_daemon(node_args, sock, node="d0", iothread=None):
    return Daemon([BLKVM, "storage-daemon", *export_args(node_args, sock, node, iothread)], sock)


def qsd_daemon(node_args, sock, node="d0", iothread=None):
    return Daemon(["qemu-storage-daemon", *export_args(node_args, sock, node, iothread)], sock)


def median(xs):
    return statistics.median(xs)


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(r) + " |")
    return "\n".join(lines)
