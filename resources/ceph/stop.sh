#!/usr/bin/env bash
# Ends the cluster resources/ceph/start.sh DIR started: its daemons (by
# the pid files in DIR/run) are sent SIGTERM, then SIGKILL after 10 s, and
# the script returns once none is left. The OSD's data (memstore) goes
# with it; DIR keeps ceph.conf, keyrings and logs for a post-mortem.
#
# Usage: stop.sh DIR
set -uo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 DIR" >&2
    exit 2
fi
dir=$1
[ -d "$dir/run" ] || exit 0

pids=()
for f in "$dir"/run/*.pid; do
    [ -f "$f" ] || continue
    pid=$(cat "$f")
    # Only a Ceph daemon of this cluster (the pid file may be stale).
    if [ -n "$pid" ] && grep -qs "$dir" "/proc/$pid/cmdline" 2>/dev/null; then
        pids+=("$pid")
    fi
    rm -f "$f"
done
# Daemons whose pid file is gone (a crash in start-up) but that run on
# this cluster's ceph.conf.
for p in /proc/[0-9]*; do
    pid=${p#/proc/}
    cmd=$(tr '\0' ' ' 2>/dev/null <"$p/cmdline") || continue
    case "$cmd" in
    ceph-mon*"$dir/ceph.conf"* | ceph-osd*"$dir/ceph.conf"*) pids+=("$pid") ;;
    esac
done
[ ${#pids[@]} -gt 0 ] || exit 0

kill -TERM "${pids[@]}" 2>/dev/null
# A daemon a test stopped (SIGSTOP) acts on SIGTERM only once continued.
kill -CONT "${pids[@]}" 2>/dev/null
for _ in $(seq 1 100); do
    alive=()
    for pid in "${pids[@]}"; do
        kill -0 "$pid" 2>/dev/null && alive+=("$pid")
    done
    [ ${#alive[@]} -gt 0 ] || exit 0
    sleep 0.1
done
kill -KILL "${alive[@]}" 2>/dev/null
for _ in $(seq 1 50); do
    alive2=()
    for pid in "${alive[@]}"; do
        kill -0 "$pid" 2>/dev/null && alive2+=("$pid")
    done
    [ ${#alive2[@]} -gt 0 ] || exit 0
    sleep 0.1
done
echo "stop.sh: processes ${alive2[*]} did not exit" >&2
exit 1
