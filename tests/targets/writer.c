/*
 * A process that never stops writing memory, to prove that a dump taken
 * while it keeps running (--leave-running) holds its memory as of one
 * instant, not pages read at different times.
 *
 * Iteration k writes k into the first word of page k % P. Before writing,
 * it checks that the page still holds k - P, written one lap earlier. A
 * torn image (a page read later than the registers or other pages) breaks
 * that chain, and the restored process finds out on its next lap.
 *
 *   ./writer default  -> READY, loop until SIGUSR1, PASS if no break seen
 */
#include "target.h"
#include <sys/mman.h>

#define PAGES 16384 /* 64 MiB */
#define WORDS (4096 / 8)

int main(int argc, char **argv)
{
	if (argc < 2 || strcmp(argv[1], "default"))
		ps_bad_mode(argc > 1 ? argv[1] : NULL);
	ps_install_usr1();
	volatile uint64_t *a = mmap(NULL, (size_t)PAGES * 4096, PROT_READ | PROT_WRITE,
				    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	ps_setup(a != MAP_FAILED, "mmap");
	for (uint64_t j = 0; j < PAGES; j++)
		a[j * WORDS] = j - PAGES;
	uint64_t breaks = 0, first_bad = 0, k = 0, laps_after_ready = 0;
	ps_ready();
	int sabotage = ps_sabotage();
	while (!ps_usr1 || laps_after_ready < 2) { /* at least two laps: every page checked */
		uint64_t j = k % PAGES;
		if (a[j * WORDS] != k - PAGES) {
			if (!breaks++)
				first_bad = k;
		}
		a[j * WORDS] = k;
		k++;
		if (j == PAGES - 1) {
			laps_after_ready++;
			if (sabotage && laps_after_ready == 1)
				a[(PAGES / 2) * WORDS] += 7;
		}
	}
	if (breaks)
		ps_fail("memory chain", "expected no break, found %llu (first at iteration %llu)",
			(unsigned long long)breaks, (unsigned long long)first_bad);
	return ps_finish();
}
