/*
 * A process that keeps writing its memory while it is migrated (pre-copy
 * rounds copy it as it changes; tests/test_migrate.py).
 *
 * SIZE MiB of pages, each stamped with its index, its generation (how often
 * it was written; the table of generations is in memory too) and a checksum
 * of both in its first and last words. Every RATE MiB/s (in 10 ms steps; 0:
 * as fast as it can) a page picked at random is checked against its
 * generation, then written again with the next one. A page copied at one
 * instant and the table at another, a page lost or zeroed, breaks the check.
 * After SIGUSR1 every page is checked once more, and the process must have
 * kept writing after READY.
 *
 *   ./migrator default SIZE RATE  -> READY, write until SIGUSR1, PASS
 */
#include "target.h"
#include <sys/mman.h>
#include <time.h>

#define PG 4096ul
#define WORDS (PG / 8)

static uint64_t mix(uint64_t a, uint64_t b)
{
	uint64_t x = a * 0x9e3779b97f4a7c15ull ^ (b + 0x632be59bd9b4e019ull);
	x ^= x >> 29;
	return x * 0xbf58476d1ce4e5b9ull;
}

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec * 1e-9;
}

static int page_ok(volatile uint64_t *p, uint64_t j, uint64_t gen)
{
	return p[0] == j && p[1] == gen && p[2] == mix(j, gen) && p[WORDS - 1] == ~mix(j, gen);
}

static void stamp(volatile uint64_t *p, uint64_t j, uint64_t gen)
{
	p[0] = j;
	p[1] = gen;
	p[2] = mix(j, gen);
	p[WORDS - 1] = ~mix(j, gen);
}

int main(int argc, char **argv)
{
	if (argc < 4 || strcmp(argv[1], "default"))
		ps_bad_mode(argc > 1 ? argv[1] : NULL);
	ps_install_usr1();
	size_t pages = strtoul(argv[2], 0, 10) << 8;
	double rate = atof(argv[3]);
	volatile uint64_t *a = mmap(NULL, pages * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	uint64_t *gen = mmap(NULL, pages * 8, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	ps_setup(pages && a != MAP_FAILED && gen != MAP_FAILED, "mmap");
	for (uint64_t j = 0; j < pages; j++)
		stamp(a + j * WORDS, j, 0);
	uint64_t writes = 0, breaks = 0, first_bad = ~0ull, x = 88172645463325252ull;
	size_t per_step = rate > 0 ? (size_t)(rate * 256 / 100) + 1 : 4096; /* pages per 10 ms */
	ps_ready();
	uint64_t at_ready = writes;
	if (ps_sabotage())
		a[(pages / 2) * WORDS + 2] ^= 1; /* one word of one page, its generation not: the check must see it */
	double next = now();
	while (!ps_usr1) {
		for (size_t k = 0; k < per_step; k++) {
			x ^= x << 13;
			x ^= x >> 7;
			x ^= x << 17;
			uint64_t j = x % pages;
			volatile uint64_t *p = a + j * WORDS;
			if (!page_ok(p, j, gen[j]) && !breaks++)
				first_bad = j;
			stamp(p, j, ++gen[j]);
			writes++;
		}
		if (rate > 0) {
			next += 0.01;
			double wait = next - now();
			if (wait > 0)
				usleep((useconds_t)(wait * 1e6));
			else if (wait < -1.0)
				next = now(); /* frozen for a while (the migration's downtime): no burst after it */
		}
	}
	for (uint64_t j = 0; j < pages; j++)
		if (!page_ok(a + j * WORDS, j, gen[j]) && !breaks++)
			first_bad = j;
	if (breaks)
		ps_fail("pages", "expected every page to match its generation, found %llu bad (first: page %llu)",
			(unsigned long long)breaks, (unsigned long long)first_bad);
	if (writes <= at_ready)
		ps_fail("writes", "expected writes after READY, found %llu", (unsigned long long)(writes - at_ready));
	return ps_finish();
}
