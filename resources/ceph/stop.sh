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

# Waits up to $1 tenths of a second for the processes in `alive` to
# exit; true once none is left (`alive` keeps the survivors).
wait_exit() {
    for _ in $(seq 1 "$1"); do
        local still=()
        for pid in "${alive[@]}"; do
            kill -0 "$pid" 2>/dev/null && still+=("$pid")
        done
        alive=("${still[@]}")
        [ ${#alive[@]} -gt 0 ] || return 0
        sleep 0.1
    done
    return 1
}

alive=("${pids[@]}")
kill -TERM "${alive[@]}" 2>/dev/null
# A daemon a test stopped (SIGSTOP) acts on SIGTERM only once continued.
kill -CONT "${alive[@]}" 2>/dev/null
wait_exit 100 && exit 0
kill -KILL "${alive[@]}" 2>/dev/null
wait_exit 50 && exit 0
echo "stop.sh: processes ${alive[*]} did not exit" >&2
exit 1
