/*
 * predump: writes known pages between pre-dump passes, checks them all
 * after the restore.
 *
 *   ./predump default
 *
 * An area of AREA pages, page i filled from seed i; prints
 * "AREA <addr> <pages>" and READY. Each SIGUSR2 starts the next step,
 * which ends with "STEP <n> <addr>\n" (addr: a new area, 0 if none):
 *   1: pages 20, 40, 41 and 100 rewritten (seed + 1000)
 *   2: a new area of NEW pages mapped and filled (seed 5000 + i)
 *   3: page 50 dropped (MADV_DONTNEED: reads as zeros), page 60 rewritten
 *      (seed + 2000), page 16 of the new area rewritten (seed 6000 + 16)
 * (Unchanged stretches of at least 8 pages: predump.py's MIN_REFERRED.)
 * After SIGUSR1: every page as the steps left it, and no userfaultfd fd
 * and no area registered with one ("uw" in smaps): the tracking of the
 * pre-dump is procsnap's, gone once the final dump is made.
 */
#include "target.h"
#include <dirent.h>
#include <sys/mman.h>

#define PG 4096ul
#define AREA 256
#define NEW 32

static volatile sig_atomic_t usr2;
static void on_usr2(int sig) { (void)sig; usr2++; }

static void fill(unsigned char *p, unsigned seed)
{
	for (size_t i = 0; i < PG; i += 8)
		*(uint64_t *)(p + i) = (uint64_t)seed * 0x9e3779b97f4a7c15ull + i;
}

static int holds(const unsigned char *p, unsigned seed)
{
	for (size_t i = 0; i < PG; i += 8)
		if (*(const uint64_t *)(p + i) != (uint64_t)seed * 0x9e3779b97f4a7c15ull + i)
			return 0;
	return 1;
}

static int zero(const unsigned char *p)
{
	for (size_t i = 0; i < PG; i++)
		if (p[i])
			return 0;
	return 1;
}

static void check_no_tracking(void)
{
	DIR *d = opendir("/proc/self/fd");
	ps_setup(d != NULL, "opendir /proc/self/fd");
	struct dirent *e;
	char path[300], link[256];
	while ((e = readdir(d))) {
		snprintf(path, sizeof(path), "/proc/self/fd/%s", e->d_name);
		ssize_t n = readlink(path, link, sizeof(link) - 1);
		if (n > 0) {
			link[n] = 0;
			if (strstr(link, "userfaultfd"))
				ps_fail("fds", "expected no userfaultfd, found fd %s", e->d_name);
		}
	}
	closedir(d);
	FILE *f = fopen("/proc/self/smaps", "r");
	ps_setup(f != NULL, "fopen smaps");
	char line[512];
	while (fgets(line, sizeof(line), f))
		if (!strncmp(line, "VmFlags:", 8) && strstr(line, " uw"))
			ps_fail("smaps", "expected no area registered with a userfaultfd, found '%s'", line);
	fclose(f);
}

int main(int argc, char **argv)
{
	if (argc < 2 || strcmp(argv[1], "default"))
		ps_bad_mode(argc > 1 ? argv[1] : NULL);
	ps_install_usr1();
	signal(SIGUSR2, on_usr2);
	unsigned char *a = mmap(NULL, AREA * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	ps_setup(a != MAP_FAILED, "mmap area");
	unsigned char *n = NULL;
	for (unsigned i = 0; i < AREA; i++)
		fill(a + i * PG, i);
	dprintf(1, "AREA %#lx %d\n", (unsigned long)a, AREA);
	ps_ready();
	int step = 0;
	while (!ps_usr1) {
		if (usr2 > step) {
			step++;
			if (step == 1) {
				fill(a + 20 * PG, 20 + 1000);
				fill(a + 40 * PG, 40 + 1000);
				fill(a + 41 * PG, 41 + 1000);
				fill(a + 100 * PG, 100 + 1000);
			} else if (step == 2) {
				n = mmap(NULL, NEW * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
				ps_setup(n != MAP_FAILED, "mmap new");
				for (unsigned i = 0; i < NEW; i++)
					fill(n + i * PG, 5000 + i);
			} else if (step == 3) {
				ps_setup(madvise(a + 50 * PG, PG, MADV_DONTNEED) == 0, "madvise");
				fill(a + 60 * PG, 60 + 2000);
				fill(n + 16 * PG, 6000 + 16);
			}
			dprintf(1, "STEP %d %#lx\n", step, step == 2 ? (unsigned long)n : 0ul);
			continue;
		}
		pause();
	}
	for (unsigned i = 0; i < AREA; i++) {
		unsigned seed = i;
		if (step >= 1 && (i == 20 || i == 40 || i == 41 || i == 100))
			seed = i + 1000;
		if (step >= 3 && i == 60)
			seed = i + 2000;
		int ok = step >= 3 && i == 50 ? zero(a + i * PG) : holds(a + i * PG, seed);
		if (ps_sabotage() && i == 40)
			ok = holds(a + i * PG, i);
		if (!ok)
			ps_fail("area", "page %u: expected its step-%d contents, found others", i, step);
	}
	for (unsigned i = 0; n && i < NEW; i++)
		if (!holds(n + i * PG, (step >= 3 && i == 16) ? 6000 + 16 : 5000 + i))
			ps_fail("new area", "page %u: expected its contents, found others", i);
	check_no_tracking();
	return ps_finish();
}
