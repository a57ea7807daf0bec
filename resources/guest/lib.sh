# Helpers for test scripts, sourced before /test.sh in the blkvm test guest.

# result KEY VALUE...: reports KEY=VALUE to the host as one
# `BLKVM-RESULT KEY=VALUE` line (the value runs to the end of the line).
result() {
    key=$1
    shift
    echo "BLKVM-RESULT $key=$*"
}

# disk_info DISK: reports what the guest sees of a disk (e.g. vda):
# DISK.size (512-byte sectors), DISK.logical_block_size,
# DISK.physical_block_size, DISK.ro (0 or 1), DISK.queues (blk-mq
# hardware queues) and DISK.discard_max_bytes.
disk_info() {
    q=/sys/block/$1/queue
    result "$1.size" "$(cat "/sys/block/$1/size")"
    result "$1.logical_block_size" "$(cat "$q/logical_block_size")"
    result "$1.physical_block_size" "$(cat "$q/physical_block_size")"
    result "$1.ro" "$(cat "/sys/block/$1/ro")"
    result "$1.queues" "$(ls "/sys/block/$1/mq" | wc -l)"
    result "$1.discard_max_bytes" "$(cat "$q/discard_max_bytes")"
}

# md5 FILE [SKIP COUNT] (1 MiB blocks, O_DIRECT): the md5 of a range of a
# disk as read from the device, not from the guest's page cache.
md5() {
    if [ $# -gt 1 ]; then
        dd if="$1" bs=1M skip="$2" count="$3" iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1
    else
        dd if="$1" bs=1M iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1
    fi
}

# power_button_poweroff: arms busybox acpid so that the ACPI power button
# (blkvm's and QEMU's system_powerdown) powers the guest off, reporting
# `power.button=acpid` first. Needs the button and evdev modules.
power_button_poweroff() {
    mkdir -p /etc/acpi/PWRF
    cat >/etc/acpi/PWRF/00000080 <<'EOS'
#!/bin/sh
echo "BLKVM-RESULT power.button=acpid" >/dev/console
sync
poweroff -f
EOS
    chmod +x /etc/acpi/PWRF/00000080
    acpid -d 2>/dev/console &
}

# await_power_button: reports `l2.waiting=1`, then waits for the power
# button armed by power_button_poweroff; after 120 s without it, fails the
# script (exit 3).
await_power_button() {
    result l2.waiting 1
    sleep 120
    echo "BLKVM-ERROR the power button was not obeyed"
    exit 3
}
