/* Benchmark target for bench/predump.py: SIZE MiB of anonymous memory,
 * filled, then written for ever; the count of page writes is kept in the
 * first 8 bytes of COUNTER (a file it maps shared), for the bench to read.
 *
 *   ./dirtier SIZE COUNTER 0      every page in turn, as fast as it can
 *   ./dirtier SIZE COUNTER RATE   RATE MiB/s of pages picked at random (in 10 ms steps)
 */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PG 4096ul

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(int argc, char **argv)
{
	if (argc < 4)
		return 2;
	size_t pages = strtoul(argv[1], 0, 10) << 8;
	double rate = atof(argv[3]);
	int fd = open(argv[2], O_RDWR);
	volatile uint64_t *count = mmap(0, PG, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	unsigned char *p = mmap(0, pages * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (fd < 0 || count == MAP_FAILED || p == MAP_FAILED)
		return 2;
	for (size_t i = 0; i < pages * PG; i += 8)
		*(uint64_t *)(p + i) = i * 0x9e3779b97f4a7c15ull + 1;
	write(1, "READY\n", 6);
	uint64_t n = 0, x = 88172645463325252ull;
	if (rate <= 0) {
		for (size_t i = 0;; i = (i + 1) % pages) {
			p[i * PG + (n & 4095)] = (unsigned char)n;
			*count = ++n;
		}
	}
	size_t per_step = (size_t)(rate * 256 / 100); /* pages per 10 ms */
	double next = now();
	for (;;) {
		for (size_t k = 0; k < per_step; k++) {
			x ^= x << 13; x ^= x >> 7; x ^= x << 17;
			p[(x % pages) * PG + (n & 4095)] = (unsigned char)n;
			*count = ++n;
		}
		next += 0.01;
		double wait = next - now();
		if (wait > 0)
			usleep((useconds_t)(wait * 1e6));
	}
}
