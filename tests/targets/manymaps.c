/*
 * manymaps: a process with many small VMAs (issue 12: a restore must not
 * cost a few ptrace round trips per VMA).
 *
 *   ./manymaps default      10000 one-page anonymous VMAs
 *   ./manymaps N            N of them
 *
 * One region of N pages; page i is written with words that depend on i
 * and then made read-only when i is odd, so that no two neighbours merge:
 * the region is N VMAs, alternating rw-p and r--p. After SIGUSR1 it checks
 * every word of every page, that /proc/self/maps shows exactly N VMAs in
 * the region with the alternating protections, and that the writable
 * pages take a write. Sabotage: one word of one page changes after READY.
 */
#include "target.h"
#include <sys/mman.h>

#define PG 4096ul
#define WORDS (PG / sizeof(uint64_t))

static uint64_t word(unsigned long page, unsigned long j)
{
	return (page + 1) * 0x9e3779b97f4a7c15ull ^ (j * 0xff51afd7ed558ccdull);
}

static unsigned long count_vmas(unsigned long lo, unsigned long hi, int *perms_ok)
{
	FILE *f = fopen("/proc/self/maps", "r");
	ps_setup(f != NULL, "open /proc/self/maps");
	char line[512];
	unsigned long n = 0;
	*perms_ok = 1;
	while (fgets(line, sizeof(line), f)) {
		unsigned long s, e;
		char perms[8];
		if (sscanf(line, "%lx-%lx %7s", &s, &e, perms) != 3 || s < lo || e > hi)
			continue;
		unsigned long page = (s - lo) / PG;
		const char *want = page % 2 ? "r--p" : "rw-p";
		if (e - s != PG || strcmp(perms, want) != 0)
			*perms_ok = 0;
		n++;
	}
	fclose(f);
	return n;
}

int main(int argc, char **argv)
{
	const char *mode = argc > 1 ? argv[1] : "default";
	unsigned long n = strcmp(mode, "default") == 0 ? 10000 : strtoul(mode, NULL, 10);
	if (n < 2 || n > 60000)
		ps_bad_mode(mode);
	ps_install_usr1();

	unsigned char *region = mmap(NULL, n * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	ps_setup(region != MAP_FAILED, "mmap region");
	for (unsigned long i = 0; i < n; i++) {
		uint64_t *w = (uint64_t *)(region + i * PG);
		for (unsigned long j = 0; j < WORDS; j++)
			w[j] = word(i, j);
	}
	for (unsigned long i = 1; i < n; i += 2)
		ps_setup(mprotect(region + i * PG, PG, PROT_READ) == 0, "mprotect");
	unsigned long lo = (unsigned long)region, hi = lo + n * PG;
	int perms_ok;
	ps_setup(count_vmas(lo, hi, &perms_ok) == n && perms_ok, "the region is not N alternating VMAs");

	ps_ready();
	if (ps_sabotage())
		((uint64_t *)(region + (n / 2 & ~1ul) * PG))[7] ^= 1;
	ps_wait_usr1();

	unsigned long bad = 0, first_bad = 0;
	for (unsigned long i = 0; i < n; i++) {
		const uint64_t *w = (const uint64_t *)(region + i * PG);
		for (unsigned long j = 0; j < WORDS; j++)
			if (w[j] != word(i, j)) {
				if (!bad++)
					first_bad = i;
				break;
			}
	}
	if (bad)
		ps_fail("page contents", "expected all %lu pages intact, found %lu wrong (first: page %lu)",
			n, bad, first_bad);
	unsigned long vmas = count_vmas(lo, hi, &perms_ok);
	PS_CHECK_U64("VMAs in the region", n, vmas);
	PS_CHECK_U64("alternating rw-p/r--p one-page VMAs", 1, perms_ok);
	for (unsigned long i = 0; i < n; i += 2)
		((uint64_t *)(region + i * PG))[0] = 0;
	return ps_finish();
}
