/*
 * vdpasim-blkop: the block-device requests busybox cannot issue: write-zeroes (BLKZEROOUT; busybox's
 * blkdiscard has no -z), discard (BLKDISCARD) and an explicit cache flush (fsync on the device, which
 * becomes VIRTIO_BLK_T_FLUSH when the device offers VIRTIO_BLK_F_FLUSH). Prints one JSON object so a
 * refusal (EOPNOTSUPP when the device lacks DISCARD/WRITE_ZEROES) is reported, not hidden.
 *
 * usage: vdpasim-blkop zeroout|discard DEV OFFSET LENGTH
 *        vdpasim-blkop flush DEV
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	if (argc < 3 || (strcmp(argv[1], "flush") != 0 && argc < 5)) {
		fprintf(stderr, "usage: %s zeroout|discard DEV OFFSET LENGTH | flush DEV\n", argv[0]);
		return 64;
	}
	const char *op = argv[1], *dev = argv[2];
	uint64_t range[2] = {0, 0};
	if (argc >= 5) {
		range[0] = strtoull(argv[3], NULL, 0);
		range[1] = strtoull(argv[4], NULL, 0);
	}
	int rc = -1;
	int fd = open(dev, O_RDWR | O_CLOEXEC);
	if (fd >= 0) {
		if (strcmp(op, "zeroout") == 0)
			rc = ioctl(fd, BLKZEROOUT, range);
		else if (strcmp(op, "discard") == 0)
			rc = ioctl(fd, BLKDISCARD, range);
		else if (strcmp(op, "flush") == 0)
			rc = fsync(fd);
		else
			errno = EINVAL;
	}
	int err = rc < 0 ? errno : 0;
	printf("{\"op\":\"%s\",\"dev\":\"%s\",\"offset\":%llu,\"length\":%llu,\"ok\":%s", op, dev,
	       (unsigned long long)range[0], (unsigned long long)range[1], err ? "false" : "true");
	if (err)
		printf(",\"errno\":%d,\"error\":\"%s\"", err, strerror(err));
	printf("}\n");
	return err ? 1 : 0;
}
