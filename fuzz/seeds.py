#!/usr/bin/env python3
"""Writes the seed corpus of the fuzz targets into fuzz/corpus/TARGET/.

The seeds are small valid inputs taken from what the test suites do: the
option strings and QMP commands they use, a frontend's vhost-user
handshake as QEMU sends it, and a driver's virtio-mmio and virtio-pci
bring-up with one read request, and qcow2 images made by qemu-img and
qemu-io (skipped, with a note, where QEMU's tools are missing). Each
follows the input format its target
documents at the top of fuzz_targets/TARGET.rs. Seeds are named
`seed-NAME`; inputs the fuzzer found (crashes fixed since) are named
`regression-NAME` and are not written here.

Run: python3 fuzz/seeds.py
"""

import json
import pathlib
import random
import shutil
import struct
import subprocess
import sys
import tempfile

CORPUS = pathlib.Path(__file__).resolve().parent / "corpus"


def write(target, name, data):
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    (d / f"seed-{name}").write_bytes(data)


# --- keyval_options: the first byte picks the parser -----------------------

BLOCKDEV, EXPORT, NBD_SERVER, OBJECT, DEVICE, CHARDEV_MONITOR, QMP_ARG = range(7)
CHARDEV_PAIR, SIZE, KEYVAL, KEYVAL_DRIVER, DEVICE_TYPED = range(7, 12)

KEYVAL_SEEDS = {
    BLOCKDEV: [
        "null-co,node-name=n0,size=1M",
        "driver=null-co,node-name=n0,size=1048576,read-zeroes=on",
        "null-co,node-name=f1,size=32M,read-only=on,detect-zeroes=unmap,discard=unmap",
        "file,node-name=f0,filename=/tmp/img,cache.direct=on,cache.no-flush=off,aio=io_uring,locking=off",
        "host_device,node-name=h0,filename=/dev/sda",
        "raw,node-name=d0,file=f0",
        "raw,node-name=d1,file.driver=file,file.filename=x,offset=4k,size=1M",
        "raw,node-name=d2,file.driver=raw,file.file.driver=null-co,file.file.size=1G",
        "io_uring,node-name=u0,path=/tmp/img,cache.direct=on",
        "virtio-blk-vhost-user,node-name=c0,path=/tmp/vu.sock,num-queues=2",
        "nbd,node-name=b0,server.type=unix,server.path=/tmp/nbd.sock,export=disk",
        "nbd,node-name=b1,server.type=inet,server.host=127.0.0.1,server.port=10809,reconnect-delay=5",
        '{"driver": "null-co", "node-name": "n0", "size": 4096}',
        '{"driver": "raw", "node-name": "d0", "file": {"driver": "file", "filename": "/tmp/img"}}',
        '{"driver": "nbd", "node-name": "b0", "server": {"type": "unix", "path": "/s"}}',
        "file,?",
        "file,driver=raw",
    ],
    EXPORT: [
        "vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path=/tmp/s,writable=on,num-queues=2,logical-block-size=4k",
        "type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path=/tmp/vu.sock,iothread=io0",
        "nbd,id=e1,node-name=d0,name=disk,description=a disk,writable=on",
        '{"type":"vhost-user-blk","id":"e0","node-name":"d0","addr":{"type":"unix","path":"/tmp/s"},"writable":true,"num-queues":2}',
    ],
    NBD_SERVER: [
        "addr.type=inet,addr.host=127.0.0.1,addr.port=10809",
        "addr.type=unix,addr.path=/tmp/nbd.sock,max-connections=4,tls-creds=tls0",
        '{"addr": {"type": "unix", "path": "/tmp/nbd.sock"}}',
    ],
    OBJECT: [
        "iothread,id=io0",
        "iothread,id=io0,poll-max-ns=0x100,poll-grow=2,poll-shrink=4",
        "qom-type=iothread,id=io1,poll-max-ns=1000",
        "tls-creds-x509,id=t,dir=d,endpoint=server,verify-peer=off",
        '{"qom-type": "iothread", "id": "io0", "poll-max-ns": 32768}',
    ],
    DEVICE: [
        "virtio-blk-pci,id=disk0,drive=n0,iothread=io0",
        "virtio-blk-pci,drive=d0,num-queues=4,queue-size=128,serial=abc,discard=on,write-zeroes=off,config-wce=on",
        "virtio-blk-pci,drive=d0,iothread-vq-mapping.0.iothread=io0,iothread-vq-mapping.1.iothread=io1",
        "virtio-blk-pci,drive=d0,iothread-vq-mapping.0.iothread=io0,iothread-vq-mapping.0.vqs.0=0,iothread-vq-mapping.0.vqs.1=1",
        "virtio-blk-device,drive=d1,logical_block_size=4096,physical_block_size=4096",
        "vhost-user-blk-pci,chardev=vu0,num-queues=2,config-wce=off",
        "vhost-user-blk,chardev=vu1,queue-size=128",
        '{"driver": "virtio-blk-pci", "drive": "d0", "iothread-vq-mapping": [{"iothread": "io0"}]}',
    ],
    CHARDEV_MONITOR: [
        "socket,id=c0,path=/tmp/q,server=on,wait=off",
        "socket,id=vu0,path=/tmp/vu.sock,reconnect-ms=500",
        "chardev=c0,mode=control",
    ],
    QMP_ARG: [
        "unix:/tmp/qmp.sock,server=on,wait=off",
        "unix:/tmp/a,,b.sock,server,nowait",
    ],
    CHARDEV_PAIR: [
        "socket,id=mon0,path=/tmp/qmp.sock,server=on,wait=off\nchardev=mon0",
        "socket,id=mon0,path=/tmp/qmp.sock,server=on,wait=off\nchardev=mon0,mode=readline",
    ],
    SIZE: ["4k", "1.5G", "0x1000", "512", "18446744073709551615", "1.5B", "0.0005k"],
    KEYVAL: ["a=1,b.0=x,b.1=y", "a.b.c=1,a.b.d=2,a,,b=c,,d", "__org.qemu_x=1"],
    KEYVAL_DRIVER: ["file,filename=x", "null-co,a.0.b=1,a.1.b=2"],
    DEVICE_TYPED: ["driver=virtio-blk-pci,drive=d0,num-queues=4"],
}

for which, args in KEYVAL_SEEDS.items():
    for i, arg in enumerate(args):
        write("keyval_options", f"{which}-{i}", bytes([which]) + arg.encode())


# --- qmp_session: what a client writes --------------------------------------

def lines(*cmds):
    return "".join(json.dumps(c) + "\n" for c in cmds)


CAPS = {"execute": "qmp_capabilities"}
QMP_SEEDS = {
    "negotiate": lines(
        {"execute": "query-status", "id": 1},
        CAPS,
        {"execute": "qmp_capabilities", "id": "again"},
        {"execute": "query-version"},
        {"execute": "query-commands"},
    ),
    "blockdev": lines(
        CAPS,
        {"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "n1", "size": 1 << 30}},
        {"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "r1", "file": "n1", "offset": 512}},
        {"execute": "query-named-block-nodes", "arguments": {"flat": True}},
        {"execute": "query-blockstats", "arguments": {"query-nodes": True}},
        {"execute": "query-blockstats"},
        {"execute": "block_resize", "arguments": {"node-name": "n1", "size": 128 << 20}, "id": "r"},
        {"execute": "blockdev-del", "arguments": {"node-name": "r1"}},
        {"execute": "blockdev-del", "arguments": {"node-name": "disk0"}},
        {"execute": "query-block"},
        {"execute": "query-block-exports"},
    ),
    "errors": lines(
        CAPS,
        {"execute": "nope", "id": 3},
        {"execute": "query-status", "arguments": {"x": 1}},
        {"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}},
        {"execute": "block_resize", "arguments": {"device": "a", "node-name": "b", "size": -1}},
        {"execute": "blockdev-add", "arguments": {"driver": "file", "filename": "/nonexistent"}},
        {"exec-oob": "query-status"},
        {"execute": 5},
        {"execute": "query-status", "arguments": []},
    ),
    "framing": json.dumps(CAPS)
    + '{"execute":\n "query-status"}[1, {"a": "}"}] foo 42 "a \\" b"\n{"execute": "query-status", oops}\n',
    "resize": lines(
        CAPS,
        {"execute": "block_resize", "arguments": {"node-name": "disk0", "size": 134217728}},
        {"execute": "query-named-block-nodes"},
    ),
}
for name, text in QMP_SEEDS.items():
    write("qmp_session", name, text)


# --- vhost_user_messages: records of code, flags, fds, length, payload ----

GET_FEATURES, SET_FEATURES, SET_OWNER, RESET_OWNER, SET_MEM_TABLE = 1, 2, 3, 4, 5
SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE, GET_VRING_BASE = 8, 9, 10, 11
SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR = 12, 13, 14
GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM = 15, 16, 17
SET_VRING_ENABLE, GET_CONFIG, SET_CONFIG = 18, 24, 25
GET_INFLIGHT_FD, SET_INFLIGHT_FD, RESET_DEVICE = 31, 32, 34
GET_MAX_MEM_SLOTS, ADD_MEM_REG, REM_MEM_REG = 36, 37, 38

NEED_REPLY = 0x8
# fd kinds: 0 eventfd, 1 memfd 1 MiB, 2 memfd 4 KiB, 3 pipe.
EVENTFD = 1 | (0 << 2)
MEMFD = 1 | (1 << 2)
MEMFD_SMALL = 1 | (2 << 2)

F_VERSION_1 = 1 << 32
F_EVENT_IDX = 1 << 29
F_PROTOCOL_FEATURES = 1 << 30
# SEG_MAX, BLK_SIZE, FLUSH, TOPOLOGY, CONFIG_WCE, MQ, DISCARD, WRITE_ZEROES,
# INDIRECT_DESC: what the export offers with two queues.
F_BLK = sum(1 << b for b in (2, 6, 9, 10, 11, 12, 13, 14, 28))
PF_MQ, PF_REPLY_ACK, PF_CONFIG = 1 << 0, 1 << 3, 1 << 9
PF_INFLIGHT, PF_MEM_SLOTS = 1 << 12, 1 << 15

USER = 0x7F00_0000_0000
MEM = 1 << 20
DESC, AVAIL, USED = 0x1000, 0x2000, 0x3000


def rec(code, payload=b"", fds=0, flags=0):
    # flags: the record's byte is xor'd with 1 by the harness.
    return bytes([code, flags, fds]) + struct.pack("<H", len(payload)) + payload


def u64(v):
    return struct.pack("<Q", v)


def state(index, num):
    return struct.pack("<II", index, num)


def region(gpa, size, user, offset=0):
    return struct.pack("<QQQQ", gpa, size, user, offset)


def negotiate(flags=0, proto=PF_MQ | PF_REPLY_ACK | PF_CONFIG | PF_INFLIGHT | PF_MEM_SLOTS):
    return (
        rec(GET_FEATURES)
        + rec(SET_FEATURES, u64(F_VERSION_1 | F_PROTOCOL_FEATURES | F_EVENT_IDX | F_BLK))
        + rec(GET_PROTOCOL_FEATURES)
        + rec(SET_PROTOCOL_FEATURES, u64(proto), flags=flags)
        + rec(GET_QUEUE_NUM)
        + rec(GET_MAX_MEM_SLOTS)
        + rec(SET_OWNER, flags=flags)
        + rec(GET_CONFIG, struct.pack("<III", 0, 60, 0) + bytes(60))
    )


def start_ring(q, flags=0, size=16):
    base = 0x4000 * q
    return (
        rec(SET_VRING_NUM, state(q, size), flags=flags)
        + rec(SET_VRING_BASE, state(q, 0), flags=flags)
        + rec(
            SET_VRING_ADDR,
            struct.pack("<II", q, 0) + u64(USER + DESC + base) + u64(USER + USED + base)
            + u64(USER + AVAIL + base) + u64(0),
            flags=flags,
        )
        + rec(SET_VRING_KICK, u64(q), EVENTFD, flags=flags)
        + rec(SET_VRING_CALL, u64(q), EVENTFD, flags=flags)
        + rec(SET_VRING_ERR, u64(q), EVENTFD, flags=flags)
        + rec(SET_VRING_ENABLE, state(q, 1), flags=flags)
    )


MEM_TABLE = rec(SET_MEM_TABLE, struct.pack("<II", 1, 0) + region(0, MEM, USER), MEMFD)

VU_SEEDS = {
    "qemu-start-stop": negotiate() + MEM_TABLE + start_ring(0) + start_ring(1)
    + rec(GET_VRING_BASE, state(0, 0)) + rec(GET_VRING_BASE, state(1, 0)),
    "reply-ack": negotiate(NEED_REPLY) + rec(SET_MEM_TABLE, struct.pack("<II", 1, 0) + region(0, MEM, USER), MEMFD, NEED_REPLY)
    + start_ring(0, NEED_REPLY) + rec(SET_CONFIG, struct.pack("<III", 32, 1, 0) + b"\x00", flags=NEED_REPLY)
    + rec(GET_VRING_BASE, state(0, 0)) + rec(RESET_OWNER, flags=NEED_REPLY),
    "mem-slots": negotiate()
    + rec(ADD_MEM_REG, u64(0) + region(0, MEM, USER), MEMFD)
    + rec(ADD_MEM_REG, u64(0) + region(MEM, 4096, USER + MEM), MEMFD_SMALL)
    + start_ring(0)
    + rec(REM_MEM_REG, u64(0) + region(MEM, 4096, USER + MEM))
    + rec(REM_MEM_REG, u64(0) + region(0, MEM, USER)),
    "inflight": negotiate()
    + rec(GET_INFLIGHT_FD, u64(0) + u64(0) + struct.pack("<HHI", 2, 16, 0))
    + rec(SET_INFLIGHT_FD, u64(0x2000) + u64(0) + struct.pack("<HHI", 2, 16, 0), MEMFD_SMALL)
    + MEM_TABLE + start_ring(0) + rec(GET_VRING_BASE, state(0, 0)),
    "no-protocol-features": rec(GET_FEATURES) + rec(SET_OWNER) + MEM_TABLE
    + rec(SET_VRING_NUM, state(0, 16)) + rec(SET_FEATURES, u64(F_VERSION_1 | F_BLK))
    + rec(SET_VRING_ADDR, struct.pack("<II", 0, 0) + u64(USER + DESC) + u64(USER + USED) + u64(USER + AVAIL) + u64(0))
    + rec(SET_VRING_KICK, u64(0), EVENTFD) + rec(RESET_OWNER),
}
for name, data in VU_SEEDS.items():
    write("vhost_user_messages", name, data)


# --- virtio register sequences ----------------------------------------------

ACK, DRIVER, DRIVER_OK, FEATURES_OK = 1, 2, 4, 8
REQ_HDR, REQ_DATA, REQ_STATUS = 0x4000, 0x5000, 0x6000


def request_memory(mem_op):
    """Guest memory writes of one read request on a 16-entry queue at
    DESC/AVAIL/USED: header, data and status descriptors, avail idx 1."""
    descs = (
        struct.pack("<QIHH", REQ_HDR, 16, 1, 1)
        + struct.pack("<QIHH", REQ_DATA, 512, 1 | 2, 2)
        + struct.pack("<QIHH", REQ_STATUS, 1, 2, 0)
    )
    hdr = struct.pack("<IIQ", 0, 0, 0)  # VIRTIO_BLK_T_IN, sector 0
    avail = struct.pack("<HHH", 0, 1, 0)
    return mem_op(DESC, descs) + mem_op(REQ_HDR, hdr) + mem_op(AVAIL, avail)


# virtio-mmio: op byte = kind | log2(width) << 2.
def mmio_w(off, v):
    return bytes([1 | (2 << 2)]) + struct.pack("<HI", off, v)


def mmio_r(off):
    return bytes([0 | (2 << 2)]) + struct.pack("<H", off)


def mmio_mem(at, data):
    return bytes([2]) + struct.pack("<HB", at // 16, len(data)) + data


def mmio_bringup(queues=(0,)):
    s = mmio_w(0x70, 0) + mmio_w(0x70, ACK) + mmio_w(0x70, ACK | DRIVER)
    for page in (0, 1):
        s += mmio_w(0x14, page) + mmio_r(0x10) + mmio_w(0x24, page)
        s += mmio_w(0x20, 0x7FFF_FFFF if page == 0 else 1)
    s += mmio_w(0x70, ACK | DRIVER | FEATURES_OK) + mmio_r(0x70)
    for q in queues:
        base = 0x4000 * q if q else 0
        s += mmio_w(0x30, q) + mmio_r(0x34) + mmio_w(0x38, 16)
        s += mmio_w(0x80, DESC + base) + mmio_w(0x84, 0)
        s += mmio_w(0x90, AVAIL + base) + mmio_w(0x94, 0)
        s += mmio_w(0xA0, USED + base) + mmio_w(0xA4, 0)
        s += mmio_w(0x44, 1)
    s += mmio_w(0x70, ACK | DRIVER | FEATURES_OK | DRIVER_OK)
    return s


MMIO_SEEDS = {
    "identify": b"".join(mmio_r(o) for o in (0, 4, 8, 0xC, 0x10, 0x34, 0x60, 0x70, 0xFC))
    + bytes([0]) + struct.pack("<H", 0x100) + bytes([4]) + struct.pack("<H", 0x104),
    "bringup-read": request_memory(mmio_mem) + mmio_bringup() + mmio_w(0x50, 0)
    + mmio_r(0x60) + mmio_w(0x64, 1) + mmio_w(0x70, 0),
    "two-queues-resize": mmio_bringup((0, 1)) + bytes([3]) + mmio_r(0xFC) + mmio_r(0x60)
    + bytes([1]) + struct.pack("<HB", 0x100 + 32, 0) + mmio_w(0x70, 0),
}
for name, data in MMIO_SEEDS.items():
    write("virtio_mmio_regs", name, data)


# virtio-pci: op byte = kind | log2(width) << 3; BAR offsets relative to
# BAR0. Capabilities: MSI-X at 0x40, common 0x4c, notify 0x5c, ISR 0x70,
# device 0x80, PCI_CFG 0x90 (window at 0xa0).
def width(n):
    return {1: 0, 2: 1, 4: 2, 8: 3}[n] << 3


def cfg_r(reg, n=4):
    return bytes([0 | width(n), 0]) + struct.pack("<H", reg)


def cfg_w(reg, v, n=4):
    return bytes([1 | width(n), 0]) + struct.pack("<H", reg) + v.to_bytes(n, "little")


def bar_r(off, n=4):
    return bytes([2 | width(n)]) + struct.pack("<H", off)


def bar_w(off, v, n=4):
    return bytes([3 | width(n)]) + struct.pack("<H", off) + v.to_bytes(n, "little")


def pci_mem(at, data):
    return bytes([4]) + struct.pack("<HB", at // 16, len(data)) + data


def pci_bringup(msix=True):
    s = cfg_r(0x0) + cfg_r(0x6, 2) + cfg_r(0x34, 1)
    for cap in (0x40, 0x4C, 0x5C, 0x70, 0x80, 0x90):
        s += cfg_r(cap) + cfg_r(cap + 4) + cfg_r(cap + 8)
    s += cfg_w(0x04, 0x6, 2)  # memory decoding, bus master
    if msix:
        s += cfg_w(0x42, 0x8000, 2)  # MSI-X enable
        for v in range(3):
            e = 0x4000 + 16 * v
            s += bar_w(e, 0xFEE0_0000) + bar_w(e + 4, 0) + bar_w(e + 8, 0x30 + v) + bar_w(e + 12, 0)
    s += bar_w(0x14, 0, 1) + bar_w(0x14, ACK, 1) + bar_w(0x14, ACK | DRIVER, 1)
    for page in (0, 1):
        s += bar_w(0x0, page) + bar_r(0x4) + bar_w(0x8, page)
        s += bar_w(0xC, 0x7FFF_FFFF if page == 0 else 1)
    s += bar_w(0x14, ACK | DRIVER | FEATURES_OK, 1) + bar_r(0x14, 1)
    if msix:
        s += bar_w(0x10, 0, 2)
    s += bar_w(0x16, 0, 2) + bar_r(0x18, 2) + bar_w(0x18, 16, 2)
    if msix:
        s += bar_w(0x1A, 1, 2)
    s += bar_w(0x20, DESC, 8) + bar_w(0x28, AVAIL, 8) + bar_w(0x30, USED) + bar_w(0x34, 0)
    s += bar_w(0x1C, 1, 2) + bar_r(0x1E, 2)
    s += bar_w(0x14, ACK | DRIVER | FEATURES_OK | DRIVER_OK, 1)
    return s


PCI_SEEDS = {
    "bringup-read": request_memory(pci_mem) + pci_bringup() + bar_w(0x3000, 0, 2)
    + bar_r(0x1000, 1) + bar_r(0x6000, 8) + bar_w(0x14, 0, 1),
    "no-msix": request_memory(pci_mem) + pci_bringup(False) + bar_w(0x3000, 0, 2) + bar_r(0x1000, 1),
    "bar-move": cfg_w(0x10, 0xFFFF_FFFF) + cfg_r(0x10) + cfg_w(0x14, 0xFFFF_FFFF) + cfg_r(0x14)
    + cfg_w(0x10, 0xE010_0000) + cfg_w(0x14, 0) + cfg_w(0x04, 0, 2) + cfg_w(0x04, 2, 2)
    + bar_r(0x0) + bar_r(0x2000, 8) + bytes([5]),
    "pci-cfg-window": cfg_w(0x94, 0, 1) + cfg_w(0x98, 0x14) + cfg_w(0x9C, 1) + cfg_w(0xA0, ACK)
    + cfg_r(0xA0) + cfg_w(0x98, 0x2000) + cfg_w(0x9C, 4) + cfg_r(0xA0),
    "ports": bytes([6 | width(4)]) + bytes([0]) + struct.pack("<I", 0x8000_0800)
    + bytes([7 | width(4), 4]) + bytes([6 | width(4), 0]) + struct.pack("<I", 0x8000_0810)
    + bytes([6 | width(4), 4]) + struct.pack("<I", 0xFFFF_FFFF) + bytes([7 | width(4), 4]),
}
for name, data in PCI_SEEDS.items():
    write("virtio_pci_regs", name, data)


# --- qcow2_metadata: 16 operation bytes, then an image qemu-img made ---------

# (op, arg) pairs as fuzz_targets/qcow2_metadata.rs reads them: read at 0,
# write, read, write-zeroes of 5 pages, write-zeroes, discard, flush, then
# block status and growth.
QCOW2_OPS = bytes([0x00, 0x00, 0x02, 0x0A, 0x01, 0x64, 0x2C, 0xC8,
                   0x04, 0x32, 0x05, 0x03, 0x06, 0x00, 0x07, 0xFF])

# Each seed: how to make it in a scratch directory, with 512-byte clusters
# so that a small image still has many tables and clusters to mutate.
QCOW2_SEEDS = {
    # Version 3: data, a zero cluster run, unallocated clusters.
    "v3": [["create", "-f", "qcow2", "-o", "cluster_size=512", "v3.qcow2", "256K"],
           ["io", "v3.qcow2", "write -P 1 0 4k", "write -z 8k 4k", "write -P 2 100k 3k"]],
    # Version 2 (no zero clusters, no feature bits).
    "v2": [["create", "-f", "qcow2", "-o", "compat=0.10,cluster_size=512", "v2.qcow2", "256K"],
           ["io", "v2.qcow2", "write -P 3 1k 6k"]],
    # Compressed clusters, deflate and zstd.
    "c": [["convert", "-c", "-f", "raw", "-O", "qcow2",
           "-o", "cluster_size=512,compression_type=zlib", "text", "c.qcow2"]],
    "z": [["convert", "-c", "-f", "raw", "-O", "qcow2",
           "-o", "cluster_size=512,compression_type=zstd", "text", "z.qcow2"]],
    # An overlay: a backing file name and format extension in the header.
    "ov": [["create", "-f", "qcow2", "-o", "cluster_size=512", "v3.qcow2", "256K"],
           ["create", "-f", "qcow2", "-o", "cluster_size=512", "-b", "v3.qcow2",
            "-F", "qcow2", "ov.qcow2", "256K"]],
}


def qcow2_seeds():
    if not (shutil.which("qemu-img") and shutil.which("qemu-io")):
        print("seeds.py: no qemu-img/qemu-io, qcow2_metadata seeds not written",
              file=sys.stderr)
        return
    rng = random.Random(15)
    # Compressible but not trivial: base64-like text.
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    text = bytes(rng.choice(alphabet) for _ in range(64 << 10))
    for name, steps in QCOW2_SEEDS.items():
        with tempfile.TemporaryDirectory() as d:
            (pathlib.Path(d) / "text").write_bytes(text)
            for step in steps:
                if step[0] == "io":
                    cmd = ["qemu-io", "-f", "qcow2"]
                    for c in step[2:]:
                        cmd += ["-c", c]
                    cmd.append(step[1])
                else:
                    cmd = ["qemu-img", *step]
                subprocess.run(cmd, cwd=d, check=True, capture_output=True)
            image = (pathlib.Path(d) / f"{name}.qcow2").read_bytes()
            write("qcow2_metadata", name, QCOW2_OPS + image)


qcow2_seeds()
