# L1's /test.sh on the demo's nested path (resources/demo.sh): QEMU gave
# L1 the host's two images as virtio-blk disks, so what L2 writes through
# `blkvm run` lands in the host's files. They are checked by serial, then
# resources/demo/boot.sh (/demo/boot.sh here) boots L2 on them. Sourced
# by L1's /init under `sh -e` (resources/nested/init).
for disk in vda:demo-root vdb:demo-data; do
    dev=${disk%%:*}
    serial=${disk#*:}
    if [ "$(cat "/sys/block/$dev/serial" 2>/dev/null)" != "$serial" ]; then
        echo "BLKVM-ERROR L1's /dev/$dev is not the disk with serial $serial"
        exit 1
    fi
done
DEMO_CLOCK="L1's clock" sh /demo/boot.sh blkvm /l2/vmlinuz /l2/initrd /dev/vda /dev/vdb
