/* blkzero DEV OFFSET LEN: asks a block device to zero a byte range with the
 * BLKZEROOUT ioctl, which Linux sends to a virtio-blk disk as a
 * WRITE_ZEROES request (busybox has no `blkdiscard -z`). Built statically
 * into the test guest's initramfs. */
#include <fcntl.h>
#include <linux/fs.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: blkzero DEV OFFSET LEN\n");
        return 2;
    }
    int fd = open(argv[1], O_WRONLY);
    if (fd < 0) {
        perror(argv[1]);
        return 1;
    }
    uint64_t range[2] = { strtoull(argv[2], NULL, 0), strtoull(argv[3], NULL, 0) };
    if (ioctl(fd, BLKZEROOUT, range) < 0) {
        perror("BLKZEROOUT");
        return 1;
    }
    return close(fd) < 0;
}
