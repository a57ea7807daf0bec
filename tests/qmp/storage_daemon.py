#!/usr/bin/env python3
"""`blkvm storage-daemon` driven over QMP by the qemu.qmp package, the
client QEMU's own tools use. Each scenario is a function; the Rust test
tests/tests/qmp.rs runs them one by one:

    python storage_daemon.py SCENARIO --blkvm PATH --workdir DIR

A scenario raises (non-zero exit, traceback) on the first thing that is not
as QEMU's clients expect.
"""

import argparse
import asyncio
import atexit
import json
import os
import socket
import subprocess
import sys
import time

from qemu.qmp import EventListener, ExecuteError, QMPClient

ARGS = None
# Every process a scenario starts, killed at exit whatever happened.
CHILDREN = []


@atexit.register
def _kill_children():
    for p in CHILDREN:
        if p.poll() is None:
            p.kill()


class Daemon:
    """One `blkvm storage-daemon` with a QMP socket."""

    def __init__(self, name, *args, chardev=False):
        self.dir = ARGS.workdir
        self.qmp_path = os.path.join(self.dir, f"{name}-qmp.sock")
        self.log_path = os.path.join(self.dir, f"{name}.log")
        if chardev:
            qmp = ["--chardev", f"socket,id=mon0,path={self.qmp_path},server=on,wait=off",
                   "--monitor", "chardev=mon0"]
        else:
            qmp = ["--qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [ARGS.blkvm, "storage-daemon", *args, *qmp],
            stdout=self.log, stderr=subprocess.STDOUT)
        CHILDREN.append(self.proc)
        wait_for(lambda: os.path.exists(self.qmp_path) or self.proc.poll() is not None,
                 f"{name}'s QMP socket")
        if self.proc.poll() is not None:
            raise AssertionError(f"{name} exited: {self.output()}")

    def sock(self, name):
        return os.path.join(self.dir, name)

    def output(self):
        self.log.flush()
        with open(self.log_path) as f:
            return f.read()

    def alive(self):
        return self.proc.poll() is None

    def stop(self):
        if self.alive():
            self.proc.terminate()
        return self.proc.wait(timeout=30)


async def disconnect_after_quit(qmp):
    """Disconnects after `quit`. The daemon may close the connection
    before we do, and qemu.qmp then re-raises that EOF from disconnect();
    QEMU's own qemu.machine accepts EOF after a quit it issued, so do we."""
    try:
        await qmp.disconnect()
    except EOFError:
        pass


def wait_for(cond, what, timeout=20.0):
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


async def connect(daemon, name="test"):
    qmp = QMPClient(name)
    await qmp.connect(daemon.qmp_path)
    return qmp


async def expect_error(qmp, cmd, args, cls, desc_part):
    try:
        res = await qmp.execute(cmd, args)
    except ExecuteError as e:
        assert e.error_class == cls, f"{cmd}: class {e.error_class}, wanted {cls}: {e}"
        assert desc_part in str(e), f"{cmd}: {e!s} lacks {desc_part!r}"
        return str(e)
    raise AssertionError(f"{cmd} {args} succeeded: {res}")


def bench(*args, runtime=None, count=None):
    """Starts `blkvm bench` as a libblkio vhost-user-blk client."""
    cmd = [ARGS.blkvm, "bench", "--json", *args]
    if runtime is not None:
        cmd += ["--runtime", str(runtime)]
    if count is not None:
        cmd += ["--count", str(count)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    CHILDREN.append(p)
    return p


def bench_result(p, timeout=60):
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, f"bench failed ({p.returncode}): {err}"
    return json.loads(out)


def vhost_user(path, node="c0"):
    return f"virtio-blk-vhost-user,path={path},node-name={node}"


def stats_of(stats, node):
    for s in stats:
        if s["node-name"] == node:
            return s["stats"]
    raise AssertionError(f"no stats for {node} in {stats}")


# --- scenarios ---------------------------------------------------------------


async def add_and_export_during_io():
    """A node is added and exported over QMP while a client does I/O on
    another export; both clients finish without error and the stats of
    the busy node move between two queries."""
    img = os.path.join(ARGS.workdir, "disk.img")
    with open(img, "wb") as f:
        f.truncate(64 << 20)
    d = Daemon("sd",
               "--blockdev", f"file,node-name=f0,filename={img},aio=io_uring",
               "--blockdev", "raw,node-name=d0,file=f0",
               "--export", f"vhost-user-blk,id=e0,node-name=d0,addr.type=unix,"
                           f"addr.path={os.path.join(ARGS.workdir, 'e0.sock')},writable=on")
    qmp = await connect(d)
    busy = bench("--blockdev", vhost_user(d.sock("e0.sock")), "--rw", "randrw",
                 "--iodepth", "4", runtime=4)
    # Let the client get going, then read the stats twice.
    await asyncio.sleep(1.0)
    s1 = stats_of(await qmp.execute("query-blockstats", {"query-nodes": True}), "d0")
    await qmp.execute("blockdev-add", {"driver": "null-co", "node-name": "n1",
                                       "size": 32 << 20, "read-zeroes": True})
    await qmp.execute("block-export-add", {
        "type": "vhost-user-blk", "id": "e1", "node-name": "n1", "writable": True,
        "addr": {"type": "unix", "path": d.sock("e1.sock")}})
    exports = await qmp.execute("query-block-exports")
    assert sorted(e["id"] for e in exports) == ["e0", "e1"], exports
    assert all(e["type"] == "vhost-user-blk" for e in exports), exports
    second = bench_result(bench("--blockdev", vhost_user(d.sock("e1.sock")),
                                "--rw", "randread", count=2000))
    assert second["ios"] == 2000, second
    s2 = stats_of(await qmp.execute("query-blockstats", {"query-nodes": True}), "d0")
    assert s2["rd_operations"] > s1["rd_operations"] > 0, (s1, s2)
    assert s2["wr_operations"] > s1["wr_operations"] > 0, (s1, s2)
    assert s2["rd_bytes"] > s1["rd_bytes"], (s1, s2)
    n1 = stats_of(await qmp.execute("query-blockstats", {"query-nodes": True}), "n1")
    assert n1["rd_operations"] >= 2000, n1
    # Per-user view: one entry per export, named by qdev.
    users = await qmp.execute("query-blockstats")
    assert sorted(u["qdev"] for u in users) == ["export 'e0'", "export 'e1'"], users
    # Each export counts its own requests (its BlockBackend), apart from
    # the node's counters, and names its node.
    by_qdev = {u["qdev"]: u for u in users}
    assert by_qdev["export 'e1'"]["node-name"] == "n1", users
    assert by_qdev["export 'e1'"]["stats"]["rd_operations"] >= 2000, users
    assert by_qdev["export 'e1'"]["stats"]["wr_operations"] == 0, users
    assert by_qdev["export 'e0'"]["parent"]["node-name"] == "f0", users
    bench_result(busy)
    nodes = await qmp.execute("query-named-block-nodes", {"flat": True})
    by_name = {n["node-name"]: n for n in nodes}
    assert by_name["f0"]["file"] == img and by_name["f0"]["drv"] == "file", by_name
    assert by_name["d0"]["image"]["virtual-size"] == 64 << 20, by_name
    assert by_name["n1"]["drv"] == "null-co", by_name
    blocks = await qmp.execute("query-block")
    assert sorted(b["qdev"] for b in blocks) == ["e0", "e1"], blocks
    await qmp.disconnect()
    assert d.stop() == 0, d.output()


async def resize_is_seen_through_the_export():
    """block_resize grows a node; a vhost-user-blk client (our
    virtio-blk-vhost-user node in a second daemon) reads the new capacity
    through the export's config space."""
    d = Daemon("sd", "--blockdev", "null-co,node-name=n0,size=64M",
               "--export", f"vhost-user-blk,id=e0,node-name=n0,addr.type=unix,"
                           f"addr.path={os.path.join(ARGS.workdir, 'e0.sock')},writable=on")
    client = Daemon("client")
    qmp = await connect(d)
    cq = await connect(client, "client")
    await cq.execute("blockdev-add", {"driver": "virtio-blk-vhost-user", "node-name": "c0",
                                      "path": d.sock("e0.sock")})
    nodes = await cq.execute("query-named-block-nodes")
    assert nodes[0]["image"]["virtual-size"] == 64 << 20, nodes
    await cq.execute("blockdev-del", {"node-name": "c0"})
    await qmp.execute("block_resize", {"node-name": "n0", "size": 128 << 20})
    await expect_error(qmp, "block_resize", {"node-name": "n0", "size": -1},
                       "GenericError", "expects a >0 size")
    await expect_error(qmp, "block_resize", {"node-name": "nope", "size": 4096},
                       "DeviceNotFound", "nope")
    mine = await qmp.execute("query-named-block-nodes")
    assert mine[0]["image"]["virtual-size"] == 128 << 20, mine
    await cq.execute("blockdev-add", {"driver": "virtio-blk-vhost-user", "node-name": "c0",
                                      "path": d.sock("e0.sock")})
    nodes = await cq.execute("query-named-block-nodes")
    assert nodes[0]["image"]["virtual-size"] == 128 << 20, nodes
    await cq.execute("blockdev-del", {"node-name": "c0"})
    await cq.disconnect()
    await qmp.disconnect()
    assert client.stop() == 0, client.output()
    assert d.stop() == 0, d.output()


async def export_del_sends_the_event():
    """block-export-del: safe mode refuses while a frontend is connected,
    hard mode disconnects it; either way BLOCK_EXPORT_DELETED arrives, and
    the node is free to delete afterwards (blockdev-del names the user
    before)."""
    d = Daemon("sd", "--blockdev", "null-co,node-name=n0",
               "--blockdev", "null-co,node-name=n1",
               "--export", f"vhost-user-blk,id=e0,node-name=n0,addr.type=unix,"
                           f"addr.path={os.path.join(ARGS.workdir, 'e0.sock')}",
               "--export", f"vhost-user-blk,id=e1,node-name=n1,addr.type=unix,"
                           f"addr.path={os.path.join(ARGS.workdir, 'e1.sock')},writable=on",
               chardev=True)
    qmp = await connect(d)
    listener = EventListener("BLOCK_EXPORT_DELETED")
    with qmp.listen(listener):
        await expect_error(qmp, "blockdev-del", {"node-name": "n0"},
                           "GenericError", "in use by export 'e0'")
        await qmp.execute("block-export-del", {"id": "e0"})
        ev = await asyncio.wait_for(listener.get(), 10)
        assert ev["data"] == {"id": "e0"}, ev
        assert "seconds" in ev["timestamp"], ev
        await qmp.execute("blockdev-del", {"node-name": "n0"})
        # A frontend on e1: safe mode refuses, hard mode goes through.
        client = Daemon("client")
        cq = await connect(client, "client")
        await cq.execute("blockdev-add", {"driver": "virtio-blk-vhost-user",
                                          "node-name": "c1", "path": d.sock("e1.sock")})
        await expect_error(qmp, "block-export-del", {"id": "e1"}, "GenericError",
                           "still in use")
        await qmp.execute("block-export-del", {"id": "e1", "mode": "hard"})
        ev = await asyncio.wait_for(listener.get(), 10)
        assert ev["data"] == {"id": "e1"}, ev
        await expect_error(qmp, "block-export-del", {"id": "e1"}, "GenericError",
                           "not found")
    assert await qmp.execute("query-block-exports") == []
    await cq.disconnect()
    client.stop()
    await qmp.disconnect()
    assert d.stop() == 0, d.output()


async def io_error_event():
    """A write that fails on the host (ENOSPC on a full tmpfs) completes
    with an error for the client and raises BLOCK_IO_ERROR with
    nospace=true."""
    mnt = os.path.join(ARGS.workdir, "tiny")
    os.mkdir(mnt)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", mnt], check=True)
    try:
        img = os.path.join(mnt, "sparse.img")
        with open(img, "wb") as f:
            f.truncate(16 << 20)
        d = Daemon("sd", "--blockdev", f"file,node-name=f0,filename={img}",
                   "--export", f"vhost-user-blk,id=e0,node-name=f0,addr.type=unix,"
                               f"addr.path={os.path.join(ARGS.workdir, 'e0.sock')},writable=on")
        qmp = await connect(d)
        listener = EventListener("BLOCK_IO_ERROR")
        with qmp.listen(listener):
            p = bench("--blockdev", vhost_user(d.sock("e0.sock")), "--rw", "write",
                      "--bs", "64k", count=256)
            ev = await asyncio.wait_for(listener.get(), 20)
            p.communicate(timeout=60)
        data = ev["data"]
        assert data["node-name"] == "f0" and data["operation"] == "write", ev
        assert data["nospace"] is True and data["action"] == "report", ev
        assert "space" in data["reason"], ev
        st = stats_of(await qmp.execute("query-blockstats", {"query-nodes": True}), "f0")
        assert st["failed_wr_operations"] > 0, st
        await qmp.execute("quit")
        await disconnect_after_quit(qmp)
        assert d.proc.wait(timeout=30) == 0, d.output()
    finally:
        subprocess.run(["umount", "-l", mnt], check=False)


async def bad_input_keeps_everything_working():
    """Malformed JSON, an oversized message, unknown commands, unknown or
    wrong-typed arguments and commands before negotiation each get QEMU's
    error shape; the connection, the other clients and the process go on."""
    d = Daemon("sd", "--blockdev", "null-co,node-name=n0")
    watcher = await connect(d, "watcher")

    s = socket.socket(socket.AF_UNIX)
    s.connect(d.qmp_path)
    f = s.makefile("rwb")

    def send(b):
        f.write(b)
        f.flush()

    def recv():
        line = f.readline()
        assert line.endswith(b"\r\n"), line
        return json.loads(line)

    greeting = recv()
    assert "QMP" in greeting and greeting["QMP"]["capabilities"] == [], greeting
    send(b'{"execute": "query-status", "id": 1}')
    r = recv()
    assert r["error"]["class"] == "CommandNotFound" and r["id"] == 1, r
    assert "qmp_capabilities" in r["error"]["desc"], r
    send(b'{"execute": "qmp_capabilities"}')
    assert recv() == {"return": {}}
    send(b'{"execute": "query-status", oops}')
    r = recv()
    assert r["error"]["class"] == "GenericError", r
    assert r["error"]["desc"].startswith("JSON parse error"), r
    send(b'{"execute": "x", "arguments": {"a": "' + b"z" * (2 << 20) + b'"}}')
    r = recv()
    assert "too large" in r["error"]["desc"], r
    send(b'"just a string"\n')
    assert "error" in recv()
    send(b'{"execute": "query-status", "id": "ok"}')
    r = recv()
    assert r["return"]["status"] == "running" and r["id"] == "ok", r
    s.close()

    await expect_error(watcher, "no-such-command", {}, "CommandNotFound",
                       "The command no-such-command has not been found")
    await expect_error(watcher, "blockdev-del", {"node-name": "n0", "force": True},
                       "GenericError", "Parameter 'force' is unexpected")
    await expect_error(watcher, "blockdev-del", {"node-name": 7},
                       "GenericError", "Invalid parameter type for 'node-name', expected: string")
    await expect_error(watcher, "blockdev-add", {"driver": "null-co", "node-name": "n2",
                                                 "size": "big"},
                       "GenericError", "size")
    await expect_error(watcher, "blockdev-add", {"driver": "file", "node-name": "n3"},
                       "GenericError", "Parameter 'filename' is missing")
    await expect_error(watcher, "blockdev-add", {"driver": "file", "node-name": "n4",
                                                 "filename": "/nonexistent/x.img"},
                       "GenericError", "/nonexistent/x.img")
    await expect_error(watcher, "blockdev-add", {"driver": "null-co", "node-name": "n0"},
                       "GenericError", "Duplicate nodes with node-name='n0'")
    await expect_error(watcher, "block-export-add",
                       {"type": "vhost-user-blk", "id": "e9", "node-name": "absent",
                        "addr": {"type": "unix", "path": d.sock("e9.sock")}},
                       "GenericError", "absent")
    await expect_error(watcher, "query-named-block-nodes", {"flat": "yes"},
                       "GenericError", "expected: boolean")
    st = await watcher.execute("query-status")
    assert st["running"] is True, st
    cmds = {c["name"] for c in await watcher.execute("query-commands")}
    for c in ["query-version", "query-status", "query-block", "query-named-block-nodes",
              "query-blockstats", "query-iothreads", "blockdev-add", "blockdev-del",
              "block_resize", "quit", "block-export-add", "block-export-del",
              "query-block-exports"]:
        assert c in cmds, (c, cmds)
    ver = await watcher.execute("query-version")
    assert "blkvm" in ver["package"], ver
    shutdown = EventListener("SHUTDOWN")
    with watcher.listen(shutdown):
        await watcher.execute("quit")
        ev = await asyncio.wait_for(shutdown.get(), 10)
    assert ev["data"] == {"guest": False, "reason": "host-qmp-quit"}, ev
    await disconnect_after_quit(watcher)
    assert d.proc.wait(timeout=30) == 0, d.output()


async def iothreads_are_listed():
    """query-iothreads lists the --object iothreads with their polling
    parameters and, once an export on one has served a request, its
    thread id."""
    d = Daemon("sd", "--object", "iothread,id=io0,poll-max-ns=1000",
               "--object", "iothread,id=io1",
               "--blockdev", "null-co,node-name=n0",
               "--export", f"vhost-user-blk,id=e0,node-name=n0,iothread=io0,addr.type=unix,"
                           f"addr.path={os.path.join(ARGS.workdir, 'e0.sock')},writable=on")
    qmp = await connect(d)
    busy = bench("--blockdev", vhost_user(d.sock("e0.sock")), runtime=3)
    await asyncio.sleep(1.5)
    its = {t["id"]: t for t in await qmp.execute("query-iothreads")}
    tasks = os.listdir(f"/proc/{d.proc.pid}/task")
    bench_result(busy)
    assert set(its) == {"io0", "io1"}, its
    assert its["io0"]["poll-max-ns"] == 1000, its
    tid = its["io0"]["thread-id"]
    assert str(tid) in tasks, (its, tasks)
    await qmp.disconnect()
    assert d.stop() == 0, d.output()


async def throttle_limits_change_live():
    """A throttle node's group: qom-get/qom-set of its limits and
    block_set_io_throttle change the rate a client sees, at once; bad
    limits and wrong targets get QEMU's errors and change nothing."""
    d = Daemon("sd", "--object", "iothread,id=io0",
               "--object", "throttle-group,id=g0,x-iops-total=200",
               "--blockdev", "null-co,node-name=n0",
               "--blockdev", "throttle,node-name=t0,throttle-group=g0,file=n0",
               "--export", f"vhost-user-blk,id=e0,node-name=t0,iothread=io0,addr.type=unix,"
                           f"addr.path={os.path.join(ARGS.workdir, 'e0.sock')},writable=on")
    qmp = await connect(d)

    def rate():
        r = bench_result(bench("--blockdev", vhost_user(d.sock("e0.sock")),
                               "--iodepth", "8", runtime=2))
        return r["iops"]

    lim = await qmp.execute("qom-get", {"path": "/objects/g0", "property": "limits"})
    assert lim["iops-total"] == 200 and lim["bps-total"] == 0, lim
    r = rate()
    assert 180 <= r <= 240, f"{r} IOPS at iops-total=200"
    await qmp.execute("qom-set", {"path": "g0", "property": "limits",
                                  "value": {"iops-total": 1000}})
    r = rate()
    assert 900 <= r <= 1150, f"{r} IOPS at iops-total=1000"
    await qmp.execute("block_set_io_throttle", {
        "device": "t0", "bps": 0, "bps_rd": 0, "bps_wr": 0,
        "iops": 400, "iops_rd": 0, "iops_wr": 0})
    r = rate()
    assert 360 <= r <= 460, f"{r} IOPS after block_set_io_throttle iops=400"
    await expect_error(qmp, "block_set_io_throttle", {
        "device": "n0", "bps": 0, "bps_rd": 0, "bps_wr": 0,
        "iops": 1, "iops_rd": 0, "iops_wr": 0}, "GenericError", "not a throttle node")
    await expect_error(qmp, "qom-set", {"path": "g0", "property": "limits",
                                        "value": {"iops-total-max": 10}},
                       "GenericError", "cannot be lower")
    await expect_error(qmp, "qom-get", {"path": "nope", "property": "limits"},
                       "DeviceNotFound", "nope")
    lim = await qmp.execute("qom-get", {"path": "g0", "property": "limits"})
    assert lim["iops-total"] == 400 and lim["iops-total-max"] == 0, lim
    await qmp.disconnect()
    assert d.stop() == 0, d.output()


def qemu_img(*args):
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def chain_nodes(nodes):
    """Nodes by (driver, file name): implicit nodes get names of their
    own in each daemon, and this pair names each node of a chain once."""
    out = {}
    for n in nodes:
        key = (n["drv"], n["file"])
        assert key not in out, f"two nodes {key}: {nodes}"
        out[key] = n
    return out


def assert_same_node(ours, qemus, where):
    """Every field QEMU shows of a node is in ours, with the same value;
    the image (and its backing-image chain) is the same as a whole."""
    assert ours["image"] == qemus["image"], \
        f"{where}: image differs:\nours: {json.dumps(ours['image'], indent=1)}\n" \
        f"qemu: {json.dumps(qemus['image'], indent=1)}"
    for k, v in qemus.items():
        if k in ("node-name", "image"):
            continue
        assert ours.get(k) == v, f"{where}: {k} is {ours.get(k)!r}, QEMU has {v!r}"


async def query_chain(qmp):
    return {
        "tree": chain_nodes(await qmp.execute("query-named-block-nodes")),
        "flat": chain_nodes(await qmp.execute("query-named-block-nodes", {"flat": True})),
    }


async def qcow2_chain_shown_as_qemu_shows_it():
    """A qcow2 image over a qcow2 (version 2) over a raw base, opened from
    the headers: query-named-block-nodes shows each node as
    qemu-storage-daemon does for the same chain (backing_file,
    backing_file_depth, the image's backing-image chain, and flat
    without it); query-block shows the export's chain and
    query-blockstats nests the backing node's stats under `backing`."""
    w = ARGS.workdir
    base, mid, top = (os.path.join(w, f) for f in ("base.raw", "mid.qcow2", "top.qcow2"))
    qemu_img("create", "-f", "raw", base, "16M")
    qemu_img("create", "-f", "qcow2", "-o", "compat=0.10", "-b", "base.raw", "-F", "raw", mid)
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4096", "-b", "mid.qcow2",
             "-F", "qcow2", top)
    blockdev = f"driver=qcow2,node-name=q0,file.driver=file,file.filename={top}"

    qsd_sock = os.path.join(w, "qsd-qmp.sock")
    log = open(os.path.join(w, "qsd.log"), "w")
    qsd = subprocess.Popen(
        ["qemu-storage-daemon", "--blockdev", blockdev,
         "--chardev", f"socket,id=c,path={qsd_sock},server=on,wait=off",
         "--monitor", "chardev=c"], stdout=log, stderr=subprocess.STDOUT)
    CHILDREN.append(qsd)
    wait_for(lambda: os.path.exists(qsd_sock) or qsd.poll() is not None, "qsd's QMP socket")
    qq = QMPClient("qemu")
    await qq.connect(qsd_sock)
    want = await query_chain(qq)
    await qq.execute("quit")
    await disconnect_after_quit(qq)
    qsd.wait(timeout=30)

    d = Daemon("sd", "--blockdev", blockdev,
               "--export", f"vhost-user-blk,id=e0,node-name=q0,addr.type=unix,"
                           f"addr.path={os.path.join(w, 'e0.sock')},writable=on")
    qmp = await connect(d)
    got = await query_chain(qmp)
    for view in ("tree", "flat"):
        assert set(got[view]) == set(want[view]), (view, set(got[view]), set(want[view]))
        for key, q in want[view].items():
            assert_same_node(got[view][key], q, f"{view} {key}")
    q0 = got["tree"][("qcow2", top)]
    assert q0["node-name"] == "q0", q0
    assert q0["backing_file_depth"] == 2 and q0["backing_file"] == mid, q0
    assert q0["image"]["backing-image"]["backing-image"]["filename"] == base, q0

    blocks = await qmp.execute("query-block")
    assert len(blocks) == 1, blocks
    assert_same_node(blocks[0]["inserted"], want["tree"][("qcow2", top)], "query-block")
    users = await qmp.execute("query-blockstats")
    assert len(users) == 1, users
    u = users[0]
    assert u["node-name"] == "q0", u
    assert u["parent"]["node-name"] == got["tree"][("file", top)]["node-name"], u
    mid_name = got["tree"][("qcow2", mid)]["node-name"]
    base_name = got["tree"][("raw", base)]["node-name"]
    assert u["backing"]["node-name"] == mid_name, u
    assert u["backing"]["backing"]["node-name"] == base_name, u
    per_node = await qmp.execute("query-blockstats", {"query-nodes": True})
    assert all("backing" not in s for s in per_node), per_node
    await qmp.disconnect()
    assert d.stop() == 0, d.output()


def main():
    global ARGS
    p = argparse.ArgumentParser()
    p.add_argument("scenario")
    p.add_argument("--blkvm", required=True)
    p.add_argument("--workdir", required=True)
    ARGS = p.parse_args()
    fn = globals().get(ARGS.scenario)
    if fn is None or not asyncio.iscoroutinefunction(fn):
        sys.exit(f"no scenario {ARGS.scenario}")
    asyncio.run(asyncio.wait_for(fn(), 120))
    print(f"{ARGS.scenario}: ok")


if __name__ == "__main__":
    main()
