/*
 * vdpasim-pktloop: send numbered raw Ethernet frames on one interface through AF_PACKET and report,
 * as one JSON object on stdout, which of them came back byte for byte.
 *
 * Busybox has no raw-packet tool, and a loopback device can only be checked with frames the kernel's
 * stack does not consume: these carry the IEEE 802 local experimental EtherType 0x88B5. Frames cycle
 * through three destinations (the interface's own MAC, broadcast, a foreign unicast MAC) so a test
 * sees the device's receive filter at work. Every frame is a pure function of (seed, seq, lengths):
 * vdpasim.guest.workloads.loopback_frame() builds the same bytes on the host, so the per-frame FNV-1a
 * digests printed here can be checked there.
 *
 * usage: vdpasim-pktloop IFACE COUNT MINLEN MAXLEN SEED TIMEOUT_MS [FRAMES(0|1)]
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <net/if.h>
#include <netpacket/packet.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define ETH_P_VDPASIM 0x88B5
#define HDR_LEN 30 /* Ethernet header + magic, seq, seed, length, kind, pad */
#define MAX_FRAME 1514
#define NKINDS 3

static const char *const kind_names[NKINDS] = {"own", "broadcast", "foreign"};
/* Locally administered, never assigned to the guest's NIC by any of our tests. */
static const unsigned char foreign_mac[6] = {0x02, 0x5e, 0x10, 0x00, 0x00, 0x01};

static uint64_t fnv1a(uint64_t h, const unsigned char *p, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		h ^= p[i];
		h *= 0x100000001b3ULL;
	}
	return h;
}

#define FNV_INIT 0xcbf29ce484222325ULL

/* A 32-bit integer hash (lowbias32): cheap, and trivially reproduced in Python. */
static uint32_t mix32(uint32_t x)
{
	x ^= x >> 16;
	x *= 0x7feb352dU;
	x ^= x >> 15;
	x *= 0x846ca68bU;
	x ^= x >> 16;
	return x;
}

static size_t frame_len(uint32_t seed, uint32_t seq, size_t min, size_t max)
{
	return min + mix32(seed ^ (seq * 0x9e3779b9U)) % (uint32_t)(max - min + 1);
}

static size_t build_frame(unsigned char *f, const unsigned char *own, uint32_t seed, uint32_t seq, size_t min,
			  size_t max)
{
	size_t len = frame_len(seed, seq, min, max);
	int kind = seq % NKINDS;
	uint32_t state = mix32(seed + seq) | 1;

	if (kind == 0)
		memcpy(f, own, 6);
	else if (kind == 1)
		memset(f, 0xff, 6);
	else
		memcpy(f, foreign_mac, 6);
	memcpy(f + 6, own, 6);
	f[12] = ETH_P_VDPASIM >> 8;
	f[13] = ETH_P_VDPASIM & 0xff;
	memcpy(f + 14, "VDPS", 4);
	uint32_t be = htonl(seq);
	memcpy(f + 18, &be, 4);
	be = htonl(seed);
	memcpy(f + 22, &be, 4);
	f[26] = len >> 8;
	f[27] = len & 0xff;
	f[28] = kind;
	f[29] = 0;
	for (size_t i = HDR_LEN; i < len; i++) {
		/* xorshift32 */
		state ^= state << 13;
		state ^= state >> 17;
		state ^= state << 5;
		f[i] = state & 0xff;
	}
	return len;
}

static long long now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000LL + ts.tv_nsec / 1000000;
}

static int fail(const char *iface, const char *what)
{
	printf("{\"type\":\"net-loopback\",\"iface\":\"%s\",\"error\":\"%s: %s\"}\n", iface, what, strerror(errno));
	return 2;
}

struct state {
	unsigned char *back;	/* per seq: copies received intact */
	unsigned char *bad;	/* per seq: copies received with wrong bytes */
	unsigned received, duplicates, corrupt, foreign_frames;
	unsigned pkttype[8];
};

static void receive_all(int fd, struct state *st, const unsigned char *own, uint32_t seed, uint32_t count,
			size_t min, size_t max)
{
	unsigned char buf[MAX_FRAME + 64], want[MAX_FRAME];
	for (;;) {
		struct sockaddr_ll from;
		socklen_t fromlen = sizeof(from);
		ssize_t n = recvfrom(fd, buf, sizeof(buf), MSG_DONTWAIT, (struct sockaddr *)&from, &fromlen);
		if (n < 0)
			return;
		if (from.sll_pkttype == PACKET_OUTGOING)
			continue;
		if (n < HDR_LEN || memcmp(buf + 14, "VDPS", 4) != 0) {
			st->foreign_frames++;
			continue;
		}
		uint32_t seq;
		memcpy(&seq, buf + 18, 4);
		seq = ntohl(seq);
		if (seq >= count) {
			st->foreign_frames++;
			continue;
		}
		if (from.sll_pkttype < 8)
			st->pkttype[from.sll_pkttype]++;
		size_t len = build_frame(want, own, seed, seq, min, max);
		if ((size_t)n != len || memcmp(buf, want, len) != 0) {
			st->corrupt++;
			if (st->bad[seq] < 255)
				st->bad[seq]++;
			continue;
		}
		if (st->back[seq]) {
			st->duplicates++;
		} else {
			st->received++;
		}
		if (st->back[seq] < 255)
			st->back[seq]++;
	}
}

int main(int argc, char **argv)
{
	if (argc < 7) {
		fprintf(stderr, "usage: %s IFACE COUNT MINLEN MAXLEN SEED TIMEOUT_MS [FRAMES [WINDOW]]\n", argv[0]);
		return 64;
	}
	const char *iface = argv[1];
	uint32_t count = strtoul(argv[2], NULL, 0);
	size_t min = strtoul(argv[3], NULL, 0), max = strtoul(argv[4], NULL, 0);
	uint32_t seed = strtoul(argv[5], NULL, 0);
	long timeout_ms = strtol(argv[6], NULL, 0);
	int list_frames = argc > 7 ? atoi(argv[7]) : 1;
	/* WINDOW > 0: at most that many frames that should come back are in flight at a time, so a device whose
	 * receive ring is larger never runs out of buffers (an overrun drops frames, which a comparison of
	 * two back-ends must not depend on). 0: send as fast as the TX queue takes them. */
	unsigned window = argc > 8 ? strtoul(argv[8], NULL, 0) : 0;
	if (min < HDR_LEN)
		min = HDR_LEN;
	if (max > MAX_FRAME)
		max = MAX_FRAME;
	if (max < min)
		max = min;

	int fd = socket(AF_PACKET, SOCK_RAW, htons(ETH_P_VDPASIM));
	if (fd < 0)
		return fail(iface, "socket");
	struct ifreq ifr;
	memset(&ifr, 0, sizeof(ifr));
	snprintf(ifr.ifr_name, IFNAMSIZ, "%s", iface);
	if (ioctl(fd, SIOCGIFINDEX, &ifr) < 0)
		return fail(iface, "SIOCGIFINDEX");
	int ifindex = ifr.ifr_ifindex;
	if (ioctl(fd, SIOCGIFHWADDR, &ifr) < 0)
		return fail(iface, "SIOCGIFHWADDR");
	unsigned char own[6];
	memcpy(own, ifr.ifr_hwaddr.sa_data, 6);
	int rcvbuf = 8 << 20;
	setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &rcvbuf, sizeof(rcvbuf));
	struct sockaddr_ll sll = {.sll_family = AF_PACKET, .sll_protocol = htons(ETH_P_VDPASIM), .sll_ifindex = ifindex};
	if (bind(fd, (struct sockaddr *)&sll, sizeof(sll)) < 0)
		return fail(iface, "bind");

	struct state st;
	memset(&st, 0, sizeof(st));
	st.back = calloc(count + 1, 1);
	st.bad = calloc(count + 1, 1);
	uint64_t *digests = calloc(count + 1, sizeof(uint64_t));
	unsigned sent_kind[NKINDS] = {0}, back_kind[NKINDS] = {0};
	unsigned sent = 0, send_errors = 0;
	uint64_t digest_sent = FNV_INIT;
	unsigned char f[MAX_FRAME];
	long long start = now_ms();
	long long last_rx = start; /* when the last frame came back: the run's length without the final wait */

	for (uint32_t seq = 0; seq < count; seq++) {
		size_t len = build_frame(f, own, seed, seq, min, max);
		digests[seq] = fnv1a(FNV_INIT, f, len);
		digest_sent = fnv1a(digest_sent, f, len);
		int tries = 0;
		for (;;) {
			if (send(fd, f, len, 0) == (ssize_t)len) {
				sent++;
				sent_kind[seq % NKINDS]++;
				break;
			}
			/* A full TX queue is back-pressure, not loss: wait a little and retry. */
			if ((errno != ENOBUFS && errno != EAGAIN) || ++tries > 200) {
				send_errors++;
				break;
			}
			poll(NULL, 0, 5);
		}
		unsigned before = st.received;
		receive_all(fd, &st, own, seed, count, min, max);
		/* Frames of the first two kinds come back; wait while a window's worth is out (bounded by the
		 * timeout, so lost frames cannot stall the run). */
		long long window_deadline = now_ms() + timeout_ms;
		while (window && sent_kind[0] + sent_kind[1] >= st.received + window && now_ms() < window_deadline) {
			struct pollfd p = {.fd = fd, .events = POLLIN};
			poll(&p, 1, 10);
			receive_all(fd, &st, own, seed, count, min, max);
		}
		if (st.received != before)
			last_rx = now_ms();
	}
	long long deadline = now_ms() + timeout_ms;
	while (st.received < sent && now_ms() < deadline) {
		struct pollfd p = {.fd = fd, .events = POLLIN};
		long long left = deadline - now_ms();
		poll(&p, 1, left > 0 ? (int)left : 0);
		unsigned before = st.received;
		receive_all(fd, &st, own, seed, count, min, max);
		if (st.received != before)
			last_rx = now_ms();
	}
	long long elapsed = now_ms() - start;

	uint64_t digest_back = FNV_INIT;
	for (uint32_t seq = 0; seq < count; seq++) {
		if (st.back[seq]) {
			size_t len = build_frame(f, own, seed, seq, min, max);
			digest_back = fnv1a(digest_back, f, len);
			back_kind[seq % NKINDS]++;
		}
	}

	printf("{\"type\":\"net-loopback\",\"iface\":\"%s\",\"mac\":\"%02x:%02x:%02x:%02x:%02x:%02x\","
	       "\"foreign_mac\":\"%02x:%02x:%02x:%02x:%02x:%02x\",",
	       iface, own[0], own[1], own[2], own[3], own[4], own[5], foreign_mac[0], foreign_mac[1], foreign_mac[2],
	       foreign_mac[3], foreign_mac[4], foreign_mac[5]);
	printf("\"count\":%u,\"seed\":%u,\"min_len\":%zu,\"max_len\":%zu,\"sent\":%u,\"send_errors\":%u,"
	       "\"received\":%u,\"duplicates\":%u,\"corrupt\":%u,\"other_frames\":%u,\"elapsed_ms\":%lld,"
	       "\"last_rx_ms\":%lld,",
	       count, seed, min, max, sent, send_errors, st.received, st.duplicates, st.corrupt, st.foreign_frames,
	       elapsed, last_rx - start);
	printf("\"pkttype\":{\"host\":%u,\"broadcast\":%u,\"multicast\":%u,\"otherhost\":%u},", st.pkttype[PACKET_HOST],
	       st.pkttype[PACKET_BROADCAST], st.pkttype[PACKET_MULTICAST], st.pkttype[PACKET_OTHERHOST]);
	printf("\"kinds\":{");
	for (int k = 0; k < NKINDS; k++)
		printf("%s\"%s\":{\"sent\":%u,\"back\":%u}", k ? "," : "", kind_names[k], sent_kind[k], back_kind[k]);
	printf("},\"missing\":[");
	int first = 1;
	for (uint32_t seq = 0; seq < count; seq++) {
		if (!st.back[seq]) {
			printf("%s%u", first ? "" : ",", seq);
			first = 0;
		}
	}
	printf("],\"corrupt_seqs\":[");
	first = 1;
	for (uint32_t seq = 0; seq < count; seq++) {
		if (st.bad[seq]) {
			printf("%s%u", first ? "" : ",", seq);
			first = 0;
		}
	}
	printf("],\"digest_sent\":\"%016llx\",\"digest_back\":\"%016llx\"", (unsigned long long)digest_sent,
	       (unsigned long long)digest_back);
	if (list_frames) {
		printf(",\"frames\":[");
		for (uint32_t seq = 0; seq < count; seq++) {
			size_t len = frame_len(seed, seq, min, max);
			printf("%s[%u,%zu,\"%016llx\",%u]", seq ? "," : "", seq, len, (unsigned long long)digests[seq],
			       st.back[seq]);
		}
		printf("]");
	}
	printf("}\n");
	return 0;
}
