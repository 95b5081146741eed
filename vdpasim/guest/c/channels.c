/*
 * vdpasim-channels: read, and optionally set, an interface's combined channel count (the number of
 * virtio-net queue pairs in use) with the ETHTOOL_GCHANNELS / ETHTOOL_SCHANNELS ioctls, which is
 * what `ethtool -L IFACE combined N` does; busybox has no ethtool. Prints one JSON object.
 *
 * usage: vdpasim-channels IFACE [COMBINED]
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/ethtool.h>
#include <linux/sockios.h>
#include <net/if.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>

static int channels(int fd, const char *iface, struct ethtool_channels *ch, unsigned cmd)
{
	struct ifreq ifr;
	memset(&ifr, 0, sizeof(ifr));
	snprintf(ifr.ifr_name, IFNAMSIZ, "%s", iface);
	ch->cmd = cmd;
	ifr.ifr_data = (void *)ch;
	return ioctl(fd, SIOCETHTOOL, &ifr);
}

int main(int argc, char **argv)
{
	if (argc < 2) {
		fprintf(stderr, "usage: %s IFACE [COMBINED]\n", argv[0]);
		return 64;
	}
	const char *iface = argv[1];
	int fd = socket(AF_INET, SOCK_DGRAM, 0);
	struct ethtool_channels ch;
	memset(&ch, 0, sizeof(ch));
	if (fd < 0 || channels(fd, iface, &ch, ETHTOOL_GCHANNELS) < 0) {
		printf("{\"type\":\"channels\",\"iface\":\"%s\",\"error\":\"ETHTOOL_GCHANNELS: %s\"}\n", iface,
		       strerror(errno));
		return 2;
	}
	int set_errno = 0;
	if (argc > 2) {
		ch.combined_count = strtoul(argv[2], NULL, 0);
		if (channels(fd, iface, &ch, ETHTOOL_SCHANNELS) < 0)
			set_errno = errno;
		memset(&ch, 0, sizeof(ch));
		channels(fd, iface, &ch, ETHTOOL_GCHANNELS);
	}
	printf("{\"type\":\"channels\",\"iface\":\"%s\",\"max_combined\":%u,\"combined\":%u,\"max_rx\":%u,"
	       "\"max_tx\":%u,\"rx\":%u,\"tx\":%u",
	       iface, ch.max_combined, ch.combined_count, ch.max_rx, ch.max_tx, ch.rx_count, ch.tx_count);
	if (set_errno)
		printf(",\"error\":\"ETHTOOL_SCHANNELS: %s\",\"errno\":%d", strerror(set_errno), set_errno);
	printf("}\n");
	return set_errno ? 1 : 0;
}
