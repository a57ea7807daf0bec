#!/usr/bin/env python3
"""`blkvm run` driven over QMP by the qemu.qmp package, the client QEMU's
own tools use, with the tiny assembly guest of tests/guests/tiny.S (built
here with gcc). Each scenario is a function; the Rust test
tests/tests/run_qmp.rs runs them one by one:

    python run.py SCENARIO --blkvm PATH --workdir DIR --tiny tests/guests/tiny.S

A scenario raises (non-zero exit, traceback) on the first thing that is not
as QEMU's clients expect. The guest never drives its disks (it has no
virtio driver); what a real guest sees is tested through the nested
harness (tests/tests/nested_run_qmp.rs).
"""

import argparse
import asyncio
import os
import subprocess
import sys
import time

from qemu.qmp import EventListener, ExecuteError, QMPClient

ARGS = None


def tiny_guest(variant):
    out = os.path.join(ARGS.workdir, f"tiny-{variant}.elf")
    subprocess.run(["gcc", "-nostdlib", "-static", "-no-pie", "-Wl,--build-id=none",
                    "-Wl,-Ttext=0x200000", f"-D{variant}", ARGS.tiny, "-o", out], check=True)
    return out


class Vm:
    """One `blkvm run` of the tiny guest with a QMP socket; its console
    goes to a file."""

    def __init__(self, name, variant, *args, chardev=False, stdin=None):
        self.dir = ARGS.workdir
        self.qmp_path = os.path.join(self.dir, f"{name}-qmp.sock")
        self.log_path = os.path.join(self.dir, f"{name}.log")
        self.console_path = os.path.join(self.dir, f"{name}.console")
        if chardev:
            qmp = ["--chardev", f"socket,id=mon0,path={self.qmp_path},server=on,wait=off",
                   "--monitor", "chardev=mon0"]
        else:
            qmp = ["--qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        serial = ["--serial", "stdio"] if stdin else ["--serial", f"file:{self.console_path}"]
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [ARGS.blkvm, "run", "--kernel", tiny_guest(variant), "--memory", "64M",
             *serial, *args, *qmp],
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(lambda: os.path.exists(self.qmp_path) or self.proc.poll() is not None,
                 f"{name}'s QMP socket")
        if self.proc.poll() is not None:
            raise AssertionError(f"{name} exited: {self.output()}")

    def output(self):
        self.log.flush()
        with open(self.log_path) as f:
            return f.read()

    def console(self):
        try:
            with open(self.console_path) as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def wait(self, timeout=30):
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"blkvm run did not end: {self.output()}")

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def wait_for(cond, what, timeout=20.0):
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


async def connect(vm, name="test"):
    qmp = QMPClient(name)
    await qmp.connect(vm.qmp_path)
    return qmp


async def disconnect(qmp):
    """Disconnects from a VM that may have closed the connection first
    (after quit or a guest power-off, as QEMU does)."""
    try:
        await qmp.disconnect()
    except EOFError:
        pass


async def expect_error(qmp, cmd, args, cls, desc_part):
    try:
        res = await qmp.execute(cmd, args)
    except ExecuteError as e:
        assert e.error_class == cls, f"{cmd}: class {e.error_class}, wanted {cls}: {e}"
        assert desc_part in str(e), f"{cmd}: {e!s} lacks {desc_part!r}"
        return str(e)
    raise AssertionError(f"{cmd} {args} succeeded: {res}")


async def next_event(listener, name, timeout=10):
    ev = await asyncio.wait_for(listener.get(), timeout)
    assert ev["event"] == name, ev
    assert "seconds" in ev["timestamp"], ev
    return ev


def ticks(vm):
    return vm.console().count(".")


async def quit_and_check(qmp, vm):
    """quit: SHUTDOWN (host-qmp-quit) reaches the client, the VM exits 0."""
    shutdown = EventListener("SHUTDOWN")
    with qmp.listen(shutdown):
        await qmp.execute("quit")
        ev = await next_event(shutdown, "SHUTDOWN")
    assert ev["data"] == {"guest": False, "reason": "host-qmp-quit"}, ev
    await disconnect(qmp)
    rc = vm.wait()
    assert rc == 0, (rc, vm.output())
    assert not os.path.exists(vm.qmp_path), "the QMP socket was left behind"


# --- scenarios ---------------------------------------------------------------


async def stop_and_cont():
    """The greeting and query-status; stop parks the vCPUs (STOP event,
    "paused", and the spinning guest prints nothing more), cont lets them
    go (RESUME, "running", the guest prints again); a second stop or cont
    is a no-op without an event; quit ends the VM with SHUTDOWN and 0."""
    vm = Vm("vm", "TICK", "--cpus", "2")
    qmp = await connect(vm)
    try:
        greeting = qmp.greeting._asdict()
        assert "blkvm" in greeting["QMP"]["version"]["package"], greeting
        assert greeting["QMP"]["capabilities"] == [], greeting
        cmds = {c["name"] for c in await qmp.execute("query-commands")}
        for c in ["query-status", "query-block", "query-named-block-nodes", "query-blockstats",
                  "query-iothreads", "blockdev-add", "blockdev-del", "block_resize", "quit",
                  "system_powerdown", "stop", "cont", "query-version"]:
            assert c in cmds, (c, cmds)
        st = await qmp.execute("query-status")
        assert st == {"status": "running", "singlestep": False, "running": True}, st
        wait_for(lambda: ticks(vm) >= 2, "the guest's ticks")

        events = EventListener(("STOP", "RESUME"))
        with qmp.listen(events):
            await qmp.execute("stop")
            await next_event(events, "STOP")
            st = await qmp.execute("query-status")
            assert st["status"] == "paused" and st["running"] is False, st
            before = ticks(vm)
            await asyncio.sleep(2.0)
            after = ticks(vm)
            assert after == before, f"the guest ran while paused: {before} -> {after}"
            # Already paused: no error, no second STOP.
            await qmp.execute("stop")

            await qmp.execute("cont")
            await next_event(events, "RESUME")
            st = await qmp.execute("query-status")
            assert st["status"] == "running" and st["running"] is True, st
            wait_for(lambda: ticks(vm) >= after + 2, "ticks after cont")
            # Already running: no error, no second RESUME.
            await qmp.execute("cont")
            # Pause and resume again (the vCPUs park a second time).
            await qmp.execute("stop")
            await next_event(events, "STOP")
            await qmp.execute("cont")
            await next_event(events, "RESUME")
            assert events.empty(), "an extra STOP or RESUME"
        await quit_and_check(qmp, vm)
    finally:
        vm.kill()


async def block_devices():
    """query-block lists both devices (virtio-blk-pci with an id, a
    virtio-blk-device without), query-iothreads gives real thread ids,
    blockdev-add/-del of a spare node works while a device's node is
    refused naming the device, block_resize shows in query-block, and
    query-blockstats names the devices. Monitor on --chardev/--monitor."""
    vm = Vm("vm", "TICK",
            "--object", "iothread,id=io0,poll-max-ns=1000",
            "--object", "iothread,id=io1",
            "--blockdev", "null-co,node-name=n0,size=64M",
            "--blockdev", "null-co,node-name=f1,size=32M",
            "--blockdev", "raw,node-name=d1,file=f1",
            "--device", "virtio-blk-pci,id=disk0,drive=n0,iothread=io0",
            "--device", "virtio-blk-device,drive=d1,iothread=io1",
            chardev=True)
    qmp = await connect(vm)
    try:
        blocks = await qmp.execute("query-block")
        assert [b["qdev"] for b in blocks] == [
            "disk0", "/machine/peripheral-anon/device[0]/virtio-backend"], blocks
        assert [b["inserted"]["node-name"] for b in blocks] == ["n0", "d1"], blocks
        assert blocks[0]["inserted"]["image"]["virtual-size"] == 64 << 20, blocks
        assert blocks[1]["inserted"]["drv"] == "raw", blocks
        assert all(b["device"] == "" for b in blocks), blocks

        its = {t["id"]: t for t in await qmp.execute("query-iothreads")}
        assert set(its) == {"io0", "io1"}, its
        assert its["io0"]["poll-max-ns"] == 1000, its
        assert its["io1"]["poll-max-ns"] == 32768, its
        tasks = os.listdir(f"/proc/{vm.proc.pid}/task")
        for t in its.values():
            assert t["thread-id"] > 0 and str(t["thread-id"]) in tasks, (its, tasks)
        assert its["io0"]["thread-id"] != its["io1"]["thread-id"], its
        with open(f"/proc/{vm.proc.pid}/task/{its['io0']['thread-id']}/comm") as f:
            assert f.read().strip() == "iothread-io0"

        nodes = {n["node-name"]: n for n in
                 await qmp.execute("query-named-block-nodes", {"flat": True})}
        assert set(nodes) == {"n0", "f1", "d1"}, nodes
        stats = await qmp.execute("query-blockstats")
        assert [s["qdev"] for s in stats] == [b["qdev"] for b in blocks], stats
        assert stats[1]["node-name"] == "d1" and stats[1]["parent"]["node-name"] == "f1", stats
        by_node = await qmp.execute("query-blockstats", {"query-nodes": True})
        assert {s["node-name"] for s in by_node} == {"n0", "f1", "d1"}, by_node

        await qmp.execute("blockdev-add", {"driver": "null-co", "node-name": "spare",
                                           "size": 1 << 20})
        nodes = await qmp.execute("query-named-block-nodes")
        assert "spare" in {n["node-name"] for n in nodes}, nodes
        await qmp.execute("blockdev-del", {"node-name": "spare"})
        nodes = await qmp.execute("query-named-block-nodes")
        assert "spare" not in {n["node-name"] for n in nodes}, nodes
        await expect_error(qmp, "blockdev-del", {"node-name": "n0"},
                           "GenericError", "device 'disk0'")
        await expect_error(qmp, "blockdev-del", {"node-name": "f1"},
                           "GenericError", "node 'd1'")
        await expect_error(qmp, "blockdev-del", {"node-name": "nope"},
                           "GenericError", "nope")

        await qmp.execute("block_resize", {"node-name": "n0", "size": 128 << 20})
        blocks = await qmp.execute("query-block")
        assert blocks[0]["inserted"]["image"]["virtual-size"] == 128 << 20, blocks
        await expect_error(qmp, "block_resize", {"node-name": "absent", "size": 4096},
                           "DeviceNotFound", "absent")
        await quit_and_check(qmp, vm)
    finally:
        vm.kill()


async def powerdown_event():
    """system_powerdown presses the ACPI power button: POWERDOWN is
    emitted; the tiny guest does not listen, so it keeps running."""
    vm = Vm("vm", "TICK")
    qmp = await connect(vm)
    try:
        listener = EventListener("POWERDOWN")
        with qmp.listen(listener):
            await qmp.execute("system_powerdown")
            ev = await next_event(listener, "POWERDOWN")
        assert "data" not in ev, ev
        wait_for(lambda: ticks(vm) >= 3, "ticks after the button")
        st = await qmp.execute("query-status")
        assert st["running"] is True, st
        assert vm.proc.poll() is None, vm.output()
        await quit_and_check(qmp, vm)
    finally:
        vm.kill()


async def guest_poweroff_event():
    """A guest that powers off (ACPI S5) ends the VM with SHUTDOWN
    (guest: true, guest-shutdown) to the connected client, and exit 0."""
    vm = Vm("vm", "ECHO", stdin=True)
    qmp = await connect(vm)
    try:
        shutdown = EventListener("SHUTDOWN")
        with qmp.listen(shutdown):
            vm.proc.stdin.write(b"bye\n")
            vm.proc.stdin.flush()
            ev = await next_event(shutdown, "SHUTDOWN", timeout=30)
        assert ev["data"] == {"guest": True, "reason": "guest-shutdown"}, ev
        assert vm.wait() == 0, vm.output()
        await disconnect(qmp)
        assert "bye" in vm.output(), vm.output()
    finally:
        vm.kill()


def main():
    global ARGS
    p = argparse.ArgumentParser()
    p.add_argument("scenario")
    p.add_argument("--blkvm", required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--tiny", required=True)
    ARGS = p.parse_args()
    fn = globals().get(ARGS.scenario)
    if fn is None or not asyncio.iscoroutinefunction(fn):
        sys.exit(f"no scenario {ARGS.scenario}")
    asyncio.run(asyncio.wait_for(fn(), 120))
    print(f"{ARGS.scenario}: ok")


if __name__ == "__main__":
    main()
