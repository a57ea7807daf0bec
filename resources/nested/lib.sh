# Helpers for the L1 test script of the nested harness, /lib/nested.sh in
# L1 (sourced after /lib/blkvm.sh, whose `result`, `md5` and `disk_info`
# are there too).

# The L2 guest: the same Debian kernel as L1 and the test guest's
# initramfs (resources/guest/) with the test's L2 script appended.
L2_KERNEL=/l2/vmlinuz
L2_INITRD=/l2/initrd
# 8250 console; panic=-1 turns an L2 panic into a reset, which should end
# `blkvm run` (as QEMU's -no-reboot does). virtio-mmio devices are found
# through ACPI, so nothing for them here.
L2_CMDLINE=${L2_CMDLINE:-console=ttyS0 panic=-1}
# L2's RAM and vCPUs.
L2_MEMORY=${L2_MEMORY:-256M}
L2_CPUS=${L2_CPUS:-1}
# Seconds `blkvm run` may take before it is killed (SIGKILL).
L2_TIMEOUT=${L2_TIMEOUT:-200}

uptime_s() { cut -d' ' -f1 /proc/uptime; }

# l2_exec COMMAND...: runs a VMM whose stdout is L2's serial console;
# each line of it is printed as `L2| LINE` (a last line without a newline
# gets one, so L1's next line stays L1's), which the harness files under
# L2 (the VMM's stderr passes through unmarked, as L1 output). Reports
# `l2.rc` (the VMM's exit code, 137 if L2_TIMEOUT killed it) and
# `l2.seconds` (wall time in L1), and returns the exit code, so under
# `sh -e` a failed run ends the script unless tested with `if`.
l2_exec() {
    l2_t0=$(uptime_s)
    {
        l2_rc=0
        timeout -s KILL "$L2_TIMEOUT" "$@" </dev/null || l2_rc=$?
        echo "$l2_rc" >/tmp/l2.rc
    } | awk '{ print "L2| " $0; fflush() }'
    l2_rc=$(cat /tmp/l2.rc)
    result l2.rc "$l2_rc"
    result l2.seconds "$(awk -v a="$l2_t0" -v b="$(uptime_s)" 'BEGIN { printf "%.2f", b - a }')"
    return "$l2_rc"
}

# l2_run ARG...: l2_exec blkvm run ARG...
l2_run() {
    l2_exec blkvm run "$@"
}

# l2_boot ARG...: l2_run with the L2 kernel, initrd and command line,
# L2_MEMORY, L2_CPUS and the serial console on stdio; ARG... adds the
# devices (set the variables to change the rest).
l2_boot() {
    l2_run --kernel "$L2_KERNEL" --initrd "$L2_INITRD" --cmdline "$L2_CMDLINE" \
        --memory "$L2_MEMORY" --cpus "$L2_CPUS" --serial stdio "$@"
}

# l2_boot_qemu ARG...: the same L2 under QEMU with KVM, the known-good VMM
# (only with NestedVm::with_qemu): a microvm with ACPI, so virtio-mmio
# devices (-device virtio-blk-device) are found as blkvm's are, and PCIe,
# for virtio-blk-pci. ARG... adds the devices.
l2_boot_qemu() {
    l2_exec qemu-system-x86_64 -nodefaults -no-user-config -display none -no-reboot \
        -machine microvm,acpi=on,pcie=on,rtc=on -accel kvm -cpu host -m "$L2_MEMORY" -smp "$L2_CPUS" \
        -serial stdio -kernel "$L2_KERNEL" -initrd "$L2_INITRD" -append "$L2_CMDLINE" "$@"
}

# image NAME MIB: creates /tmp/NAME.img, MIB MiB of zeros (sparse, in L1's
# tmpfs) and prints its path. Linux 6.1's tmpfs has no O_DIRECT: give
# such images cache.direct=off.
image() {
    truncate -s "$2M" "/tmp/$1.img"
    echo "/tmp/$1.img"
}

# loop_image NAME MIB: `image NAME MIB` behind a loop device, which takes
# O_DIRECT; prints the device. Detach it (losetup -d) before reading the
# file.
loop_image() {
    loop_file=$(image "$1" "$2")
    loop_dev=$(losetup -f)
    losetup "$loop_dev" "$loop_file"
    echo "$loop_dev"
}

# image_md5 FILE: the md5 of a whole image file, as L1 sees it.
image_md5() {
    md5sum <"$1" | cut -d' ' -f1
}

# wait_line PATTERN FILE: waits (up to 120 s) for a line matching PATTERN
# (grep) in FILE; fails with a BLKVM-ERROR line naming both otherwise.
wait_line() {
    wait_i=0
    until grep -q "$1" "$2" 2>/dev/null; do
        wait_i=$((wait_i + 1))
        [ $wait_i -lt 1200 ] || { echo "BLKVM-ERROR no '$1' in $2"; return 1; }
        sleep 0.1
    done
}

# thread_io PID: for each thread of PID, one `thread.TID.COMM` result with
# its I/O counters from /proc/PID/task/TID/io (rchar wchar syscr syscw
# read_bytes write_bytes, in that order, space-separated).
thread_io() {
    for t in /proc/"$1"/task/*; do
        c=$(tr ' ' _ <"$t/comm")
        result "thread.${t##*/}.$c" "$(awk '{ printf "%s ", $2 }' "$t/io")"
    done
}

# wait_socket PATH: waits (up to 60 s) for a unix socket at PATH (a
# daemon's listener); fails with a BLKVM-ERROR line naming it otherwise.
wait_socket() {
    wait_i=0
    until [ -S "$1" ]; do
        wait_i=$((wait_i + 1))
        [ $wait_i -lt 600 ] || { echo "BLKVM-ERROR no socket $1"; return 1; }
        sleep 0.1
    done
}

# pid_of WORD...: the pid of a process whose command line starts with
# WORD... (e.g. `pid_of blkvm run`, which `pidof blkvm` cannot tell from
# `blkvm storage-daemon`); fails if there is none.
pid_of() {
    for pid_p in /proc/[0-9]*; do
        case "$(tr '\0' ' ' <"$pid_p/cmdline" 2>/dev/null)" in
        "$* "*)
            echo "${pid_p##*/}"
            return 0
            ;;
        esac
    done
    return 1
}

# process_io KEY PID: one KEY result with the I/O counters of the whole
# process PID (/proc/PID/io: its threads, living and exited), in
# thread_io's order.
process_io() {
    result "$1" "$(awk '{ printf "%s ", $2 }' "/proc/$2/io")"
}
