/*
 * vdpasim-blkverify: write a known pattern with O_DIRECT and read it back, pass after pass, for a while.
 *
 * Each pass writes every 4 KiB block of [OFFSET, OFFSET+LENGTH) in order with a pattern that depends on
 * (seed, pass, block), then reads the whole range back and compares. A write or read that fails, and a
 * block that reads back anything but what its last completed write put there, are counted and listed:
 * the test of a back-end that restarts under the guest's feet (no completed write may be lost). The
 * longest single request is reported too: the pause a restart costs the guest. Prints one JSON object.
 *
 * usage: vdpasim-blkverify DEV OFFSET LENGTH SECONDS SEED
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define BLOCK 4096
#define MAX_LISTED 16

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* The bytes of one block: xorshift32 seeded by (seed, pass, block); the first words name them. */
static void pattern(uint32_t *words, uint32_t seed, uint32_t pass, uint64_t block)
{
	uint32_t state = (seed * 0x9E3779B9u) ^ (pass * 0x85EBCA6Bu) ^ (uint32_t)(block * 0xC2B2AE35u) ^ 0x27d4eb2fu;
	words[0] = seed;
	words[1] = pass;
	words[2] = (uint32_t)block;
	for (size_t i = 3; i < BLOCK / 4; i++) {
		state ^= state << 13;
		state ^= state >> 17;
		state ^= state << 5;
		words[i] = state;
	}
}

struct failures {
	unsigned count;
	uint64_t listed[MAX_LISTED];
};

static void note(struct failures *f, uint64_t block)
{
	if (f->count < MAX_LISTED)
		f->listed[f->count] = block;
	f->count++;
}

static void print_list(const char *name, const struct failures *f)
{
	printf(",\"%s\":%u,\"%s_blocks\":[", name, f->count, name);
	for (unsigned i = 0; i < f->count && i < MAX_LISTED; i++)
		printf("%s%llu", i ? "," : "", (unsigned long long)f->listed[i]);
	printf("]");
}

int main(int argc, char **argv)
{
	if (argc < 6) {
		fprintf(stderr, "usage: %s DEV OFFSET LENGTH SECONDS SEED\n", argv[0]);
		return 64;
	}
	const char *dev = argv[1];
	uint64_t offset = strtoull(argv[2], NULL, 0), length = strtoull(argv[3], NULL, 0);
	double seconds = atof(argv[4]);
	uint32_t seed = (uint32_t)strtoul(argv[5], NULL, 0);
	if (offset % BLOCK || length % BLOCK || length == 0) {
		printf("{\"type\":\"blk-verify\",\"error\":\"offset and length must be multiples of %d\"}\n", BLOCK);
		return 64;
	}
	int fd = open(dev, O_RDWR | O_DIRECT);
	if (fd < 0) {
		printf("{\"type\":\"blk-verify\",\"error\":\"open %s: %s\"}\n", dev, strerror(errno));
		return 1;
	}
	uint32_t *wbuf, *rbuf;
	if (posix_memalign((void **)&wbuf, BLOCK, BLOCK) || posix_memalign((void **)&rbuf, BLOCK, BLOCK))
		return 1;

	uint64_t blocks = length / BLOCK, written = 0, read_back = 0;
	struct failures write_errors = {0}, read_errors = {0}, mismatches = {0};
	double start = now(), longest = 0;
	uint32_t pass = 0;
	while (now() - start < seconds || pass == 0) {
		for (uint64_t b = 0; b < blocks; b++) {
			pattern(wbuf, seed, pass, b);
			double t = now();
			ssize_t n = pwrite(fd, wbuf, BLOCK, (off_t)(offset + b * BLOCK));
			double took = now() - t;
			longest = took > longest ? took : longest;
			if (n == BLOCK)
				written++;
			else
				note(&write_errors, b);
		}
		for (uint64_t b = 0; b < blocks; b++) {
			double t = now();
			ssize_t n = pread(fd, rbuf, BLOCK, (off_t)(offset + b * BLOCK));
			double took = now() - t;
			longest = took > longest ? took : longest;
			if (n != BLOCK) {
				note(&read_errors, b);
				continue;
			}
			read_back++;
			pattern(wbuf, seed, pass, b);
			if (memcmp(wbuf, rbuf, BLOCK) != 0)
				note(&mismatches, b);
		}
		pass++;
	}
	close(fd);
	printf("{\"type\":\"blk-verify\",\"dev\":\"%s\",\"offset\":%llu,\"length\":%llu,\"passes\":%u,"
	       "\"blocks_written\":%llu,\"blocks_read\":%llu,\"seconds\":%.3f,\"longest_request_ms\":%.1f",
	       dev, (unsigned long long)offset, (unsigned long long)length, pass, (unsigned long long)written,
	       (unsigned long long)read_back, now() - start, longest * 1e3);
	print_list("write_errors", &write_errors);
	print_list("read_errors", &read_errors);
	print_list("mismatches", &mismatches);
	printf(",\"ok\":%s}\n", write_errors.count + read_errors.count + mismatches.count ? "false" : "true");
	return write_errors.count + read_errors.count + mismatches.count ? 1 : 0;
}
