/*
 * halfzero: memory whose pages alternate written and zero, so that its
 * image has a page run per page (issue 12: restore holds the runs packed).
 *
 *   ./halfzero default      8192 pages private, 1024 pages shared anonymous
 *   ./halfzero N            N private pages (N/8 shared)
 *
 * Even pages of each area hold words that depend on the area and the page,
 * odd pages stay zero (a dump skips them: one run per written page). The
 * shared anonymous area's pages are read while frozen by a --leave-running
 * dump, before the private ones: its runs come first in pages.img. After
 * SIGUSR1 it checks every word of every page. Sabotage: one word of one
 * written page changes after READY.
 */
#include "target.h"
#include <sys/mman.h>

#define PG 4096ul
#define WORDS (PG / sizeof(uint64_t))

static uint64_t word(unsigned area, unsigned long page, unsigned long j)
{
	return ((page + 1) * 0x9e3779b97f4a7c15ull ^ (j * 0xff51afd7ed558ccdull)) + area;
}

static void fill(uint64_t *p, unsigned long npages, unsigned area)
{
	for (unsigned long i = 0; i < npages; i += 2)
		for (unsigned long j = 0; j < WORDS; j++)
			p[i * WORDS + j] = word(area, i, j);
}

static void check(const char *what, const uint64_t *p, unsigned long npages, unsigned area)
{
	for (unsigned long i = 0; i < npages; i++)
		for (unsigned long j = 0; j < WORDS; j++) {
			uint64_t want = i % 2 ? 0 : word(area, i, j);
			if (p[i * WORDS + j] != want) {
				ps_fail(what, "page %lu word %lu: expected %#llx found %#llx", i, j,
					(unsigned long long)want, (unsigned long long)p[i * WORDS + j]);
				return;
			}
		}
}

int main(int argc, char **argv)
{
	if (argc < 2)
		ps_bad_mode(NULL);
	unsigned long n = strcmp(argv[1], "default") ? strtoul(argv[1], NULL, 10) : 8192;
	if (n < 16)
		ps_bad_mode(argv[1]);
	unsigned long ns = n / 8;
	uint64_t *priv = mmap(NULL, n * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	ps_setup(priv != MAP_FAILED, "mmap private");
	uint64_t *shr = mmap(NULL, ns * PG, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	ps_setup(shr != MAP_FAILED, "mmap shared");
	fill(priv, n, 1);
	fill(shr, ns, 2);
	ps_install_usr1();
	ps_ready();
	if (ps_sabotage())
		priv[(n / 2 & ~1ul) * WORDS + 3] ^= 1;
	ps_wait_usr1();
	check("private page contents", priv, n, 1);
	check("shared page contents", shr, ns, 2);
	return ps_finish();
}
