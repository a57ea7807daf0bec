#!/usr/bin/env bash
# Starts a throw-away single-node Ceph cluster for blkvm's rbd tests and
# benchmarks: one monitor and one OSD on 127.0.0.1, the OSD on the
# memstore object store (data lives in the OSD's memory, so nothing is
# written to disk and it starts in seconds), pool `rbd` with one replica,
# cephx on as users run it. Prints the path of the cluster's ceph.conf.
#
# Usage: start.sh DIR
#   DIR holds everything (ceph.conf, keyrings, monitor store, logs, pid
#   files, admin sockets); stop.sh DIR ends the cluster. Several clusters
#   may run at once in different directories: each monitor takes a free
#   port. DIR/ceph.conf's keyring holds client.admin; DIR/blkvm.keyring
#   holds client.blkvm (rbd profile on pool rbd), whose bare key is in
#   DIR/blkvm.key.
#
# Needs ceph-mon, ceph-osd and ceph-common (resources/setup.sh).
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 DIR" >&2
    exit 2
fi
for tool in ceph-mon ceph-osd ceph ceph-authtool monmaptool rbd; do
    if ! command -v "$tool" >/dev/null; then
        echo "start.sh: $tool not found: install ceph-mon, ceph-osd and ceph-common (resources/setup.sh)" >&2
        exit 1
    fi
done

dir=$(mkdir -p "$1" && cd "$1" && pwd)
conf="$dir/ceph.conf"
if [ -e "$dir/run/mon.a.pid" ] && kill -0 "$(cat "$dir/run/mon.a.pid")" 2>/dev/null; then
    echo "start.sh: a cluster already runs in $dir (stop.sh $dir first)" >&2
    exit 1
fi
rm -rf "${dir:?}/mon" "$dir/osd" "$dir/run" "$dir/log"
mkdir -p "$dir/mon" "$dir/osd" "$dir/run" "$dir/log"

# A free port for the monitor (msgr2 only). The kernel picks it; another
# process could take it before the monitor binds, so a failed start is
# retried with a new port.
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

fsid=$(cat /proc/sys/kernel/random/uuid)

write_conf() {
    cat >"$conf" <<EOF
[global]
fsid = $fsid
mon host = v2:127.0.0.1:$1
public addr = 127.0.0.1
ms bind msgr1 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = $dir/keyring
run dir = $dir/run
# Clients (librbd in blkvm, fio, the rbd tool) keep quiet and make no
# admin socket of their own: many run at once under the same name.
log to stderr = false
err to stderr = false
admin socket =
mon cluster log file = $dir/log/cluster.log
# One host, one OSD, one replica.
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon data avail warn = 1
mon data avail crit = 0
# No manager: nothing here needs one.
mon warn on insecure global id reclaim allowed = false

[mon]
mon data = $dir/mon/\$cluster-\$id
admin socket = $dir/run/\$cluster-\$name.asok
pid file = $dir/run/\$name.pid
log file = $dir/log/\$name.log

[osd]
osd data = $dir/osd/\$cluster-\$id
admin socket = $dir/run/\$cluster-\$name.asok
pid file = $dir/run/\$name.pid
log file = $dir/log/\$name.log
osd objectstore = memstore
memstore device bytes = 4294967296
osd max object name len = 256
osd max object namespace len = 64
# A small machine: few threads, no scrubbing.
osd op num shards = 1
osd op num threads per shard = 2
osd scrub begin hour = 0
osd scrub end hour = 0
osd heartbeat grace = 60
EOF
}

key_of() {
    ceph-authtool --gen-print-key
}

keyring="$dir/keyring"
ceph-authtool --create-keyring "$keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
ceph-authtool "$keyring" --gen-key -n client.admin \
    --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' >/dev/null
osd_key=$(key_of)
ceph-authtool "$keyring" --add-key "$osd_key" -n osd.0 \
    --cap mon 'allow profile osd' --cap osd 'allow *' --cap mgr 'allow profile osd' >/dev/null

log_tail() {
    for f in "$dir"/log/*.log "$dir"/log/*.out; do
        [ -f "$f" ] || continue
        echo "--- $f" >&2
        tail -n 20 "$f" >&2
    done
}
fail() {
    echo "start.sh: $*" >&2
    log_tail
    "$(dirname "$0")/stop.sh" "$dir" >/dev/null 2>&1 || true
    exit 1
}

# The monitor: mkfs, start, retried on a port that was taken meanwhile.
started=""
for _ in 1 2 3; do
    port=$(free_port)
    write_conf "$port"
    rm -rf "$dir/mon" && mkdir -p "$dir/mon"
    monmaptool --create --clobber --fsid "$fsid" --addv a "[v2:127.0.0.1:$port]" \
        "$dir/monmap" >/dev/null
    ceph-mon -c "$conf" --mkfs -i a --monmap "$dir/monmap" --keyring "$keyring" \
        >"$dir/log/mon.mkfs.out" 2>&1 || fail "ceph-mon --mkfs failed"
    ceph-mon -c "$conf" -i a >"$dir/log/mon.a.out" 2>&1 || continue
    # The monitor daemonizes; it is up when it answers.
    if timeout 20 ceph -c "$conf" --connect-timeout 15 mon stat >/dev/null 2>&1; then
        started=1
        break
    fi
    [ -e "$dir/run/mon.a.pid" ] && kill "$(cat "$dir/run/mon.a.pid")" 2>/dev/null || true
    sleep 0.5
done
[ -n "$started" ] || fail "the monitor did not start"

# The OSD: registered with its key, mkfs'd (memstore: nothing on disk but
# its identity files), started.
osd_uuid=$(cat /proc/sys/kernel/random/uuid)
printf '{"cephx_secret": "%s"}' "$osd_key" >"$dir/osd.json"
osd_id=$(ceph -c "$conf" osd new "$osd_uuid" -i "$dir/osd.json") || fail "ceph osd new failed"
rm -f "$dir/osd.json"
mkdir -p "$dir/osd/ceph-$osd_id"
ceph-osd -c "$conf" -i "$osd_id" --mkfs --osd-uuid "$osd_uuid" \
    >"$dir/log/osd.mkfs.out" 2>&1 || fail "ceph-osd --mkfs failed"
ceph-osd -c "$conf" -i "$osd_id" >"$dir/log/osd.$osd_id.out" 2>&1 || fail "ceph-osd failed to start"

for _ in $(seq 1 100); do
    if ceph -c "$conf" osd dump 2>/dev/null | grep -q "^osd.$osd_id up"; then
        break
    fi
    sleep 0.2
done
ceph -c "$conf" osd dump 2>/dev/null | grep -q "^osd.$osd_id up" || fail "osd.$osd_id did not come up"

# The pool, and a user of it as a cloud would make one.
ceph -c "$conf" osd pool create rbd 8 8 >/dev/null 2>&1 || fail "pool create failed"
ceph -c "$conf" osd pool application enable rbd rbd >/dev/null 2>&1 || fail "pool application enable failed"
ceph -c "$conf" auth get-or-create client.blkvm mon 'profile rbd' osd 'profile rbd pool=rbd' \
    -o "$dir/blkvm.keyring" >/dev/null 2>&1 || fail "auth get-or-create client.blkvm failed"
ceph -c "$conf" auth print-key client.blkvm >"$dir/blkvm.key" 2>/dev/null || fail "auth print-key failed"

# Ready when an image can be made and removed (the pool's PGs are active).
timeout 60 rbd -c "$conf" create --size 1M rbd/start-probe >/dev/null 2>&1 ||
    fail "the pool did not become usable"
rbd -c "$conf" rm rbd/start-probe >/dev/null 2>&1 || true

echo "$conf"
