#!/bin/sh
# One boot of the demo guest under `blkvm run`, and what the host sees of
# it. POSIX sh: resources/demo.sh runs it on the host when /dev/kvm can
# boot a stock kernel, and L1's /test.sh (resources/demo/l1.sh) runs it
# under busybox inside the nested harness's L1 otherwise.
#
#   boot.sh BLKVM KERNEL INITRD ROOT DATA
#
# ROOT and DATA are the disks (image files, or L1's block devices holding
# them): ROOT on virtio-blk-pci with IOThread io0 and io_uring, DATA on
# virtio-blk-device (virtio-mmio), both O_DIRECT (`cache.direct=on`).
# Prints the guest's console as `guest| LINE`; when the guest says it is
# clean and waits for its power button, the disks' `query-blockstats`
# counters (as `blockstats qdev=... rd_operations=...`), then presses the
# button over QMP (`system_powerdown`); at the end one `boot:` line with
# the times and blkvm's exit code, which is also this script's (1 if the
# guest powered off before it was clean).
#
# QMP_SEND (default: qmp-send from PATH) is the QMP client
# (resources/nested/qmp-send.c); DEMO_CPUS (1) the guest's vCPUs, and as
# many queues on the root disk; DEMO_TIMEOUT (240) the seconds blkvm may
# run before it is killed; DEMO_CLOCK names the clock of the times.
set -eu

[ $# -eq 5 ] || { sed -n '2,22p' "$0" >&2; exit 2; }
blkvm=$1 kernel=$2 initrd=$3 root=$4 data=$5
cpus=${DEMO_CPUS:-1}
qmp_send=${QMP_SEND:-qmp-send}
clock=${DEMO_CLOCK:-the host clock}
work=$(mktemp -d "${TMPDIR:-/tmp}/blkvm-demo.XXXXXX")
trap 'rm -rf "$work"' EXIT
sock=$work/qmp.sock
cr=$(printf '\r')

uptime_s() { cut -d' ' -f1 /proc/uptime; }
seconds_since() { awk -v a="$1" -v b="$(uptime_s)" 'BEGIN { printf "%.1f", b - a }'; }

# blockstats: `query-blockstats` over QMP, one line per device with its
# node's counters. blkvm writes each reply on one line, members sorted:
# after `"qdev": "ID"` comes the device node's own `"stats": {...}` (the
# file node's, under "parent", came before it).
blockstats() {
    "$qmp_send" "$sock" '{"execute":"query-blockstats"}' >"$work/stats" 2>&1 ||
        { sed 's/^/qmp| /' "$work/stats"; return 0; }
    grep '"qdev"' "$work/stats" | awk '{
        n = split($0, dev, /"qdev": *"/)
        for (i = 2; i <= n; i++) {
            qdev = substr(dev[i], 1, index(dev[i], "\"") - 1)
            s = substr(dev[i], index(dev[i], "\"stats\""))
            s = substr(s, 1, index(s, "}"))
            line = "blockstats qdev=" qdev
            split("rd_operations rd_bytes wr_operations wr_bytes flush_operations failed_rd_operations failed_wr_operations", keys, " ")
            for (k = 1; k <= 7; k++) {
                if (match(s, "\"" keys[k] "\": *[0-9]+")) {
                    v = substr(s, RSTART, RLENGTH)
                    sub(/.*: */, "", v)
                    line = line " " keys[k] "=" v
                }
            }
            print line
        }
    }'
}

t0=$(uptime_s)
{
    rc=0
    timeout -s KILL "${DEMO_TIMEOUT:-240}" "$blkvm" run \
        --kernel "$kernel" --initrd "$initrd" \
        --cmdline "console=ttyS0 root=/dev/vda rw quiet panic=-1" \
        --memory 256M --cpus "$cpus" \
        --object iothread,id=io0 \
        --blockdev "file,node-name=root-file,filename=$root,aio=io_uring,cache.direct=on" \
        --blockdev raw,node-name=root-disk,file=root-file \
        --blockdev "file,node-name=data-file,filename=$data,aio=threads,cache.direct=on" \
        --blockdev raw,node-name=data-disk,file=data-file \
        --device "virtio-blk-pci,id=root,drive=root-disk,iothread=io0,num-queues=$cpus,serial=demo-root" \
        --device virtio-blk-device,id=data,drive=data-disk,serial=demo-data \
        --serial stdio --qmp "unix:$sock,server=on,wait=off" </dev/null || rc=$?
    echo "$rc" >"$work/rc"
} | while IFS= read -r line; do
    line=${line%"$cr"}
    echo "guest| $line"
    case $line in
        "init: boot "*) seconds_since "$t0" >"$work/init" ;;
        "init: clean:"*)
            : >"$work/clean"
            blockstats
            "$qmp_send" "$sock" '{"execute":"system_powerdown"}' >"$work/powerdown" 2>&1 ||
                sed 's/^/qmp| /' "$work/powerdown"
            ;;
    esac
done
rc=$(cat "$work/rc")
if [ "$rc" = 0 ] && [ ! -e "$work/clean" ]; then
    echo "boot: the guest powered off without finishing (no 'init: clean:')"
    rc=1
fi
if [ -s "$work/init" ]; then
    init="the guest's /sbin/init started $(cat "$work/init") s after blkvm did"
else
    init="the guest never reached its /sbin/init"
fi
echo "boot: blkvm run exited $rc after $(seconds_since "$t0") s; $init ($clock)"
exit "$rc"
