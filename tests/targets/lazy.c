/*
 * lazy: a large anonymous area for lazy restore (restore --lazy-pages),
 * checked page by page after the restore.
 *
 *   ./lazy MODE [MIB]        (MIB: size of the area, 256 by default)
 *
 * Page i of the area: never touched if i % 13 == 5 (reads zeros), written
 * and then zeroed if i % 13 == 7, else filled from seed i. A heap block and
 * a stack array hold patterns too. Prints "AREA <addr> <pages>" and READY.
 * What the process does at once after SIGUSR1, before it checks:
 *   default   nothing
 *   fork      forks; the child checks everything and exits 0 or 1; the
 *             parent checks too and waits for the child
 *   dontneed  MADV_DONTNEED on pages [1000, 3000): they must read zeros
 *   write     writes seed 1000000 + i into every 97th page and into the
 *             last 256: they must hold that, not the image's
 *   mremap    moves the area elsewhere and back, 9 times (MREMAP_FIXED): checked
 *             where it ends
 *   munmap    unmaps pages [2000, 4000), maps them again (fresh, zeros)
 * Then "PASS" or "FAIL: ..." lines; the check reads every page.
 */
#include "target.h"
#include <sys/mman.h>
#include <sys/wait.h>

#define PG 4096ul

static unsigned char *area;
static size_t pages;

static uint64_t word(size_t seed, size_t i) { return (uint64_t)seed * 0x9e3779b97f4a7c15ull + i + 1; }

static void fill(unsigned char *p, size_t seed)
{
	for (size_t i = 0; i < PG; i += 8)
		*(uint64_t *)(p + i) = word(seed, i);
}

static int holds(const unsigned char *p, size_t seed)
{
	for (size_t i = 0; i < PG; i += 8)
		if (*(const uint64_t *)(p + i) != word(seed, i))
			return 0;
	return 1;
}

static int zero(const unsigned char *p)
{
	for (size_t i = 0; i < PG; i += 8)
		if (*(const uint64_t *)(p + i))
			return 0;
	return 1;
}

/* 0: the image's content; 1: zeros; 2: seed 1000000 + i */
static int (*expect)(size_t i);

static int expect_image(size_t i) { return i % 13 == 5 || i % 13 == 7; }
static int expect_dontneed(size_t i) { return i >= 1000 && i < 3000 ? 1 : expect_image(i); }
static int expect_munmap(size_t i) { return i >= 2000 && i < 4000 ? 1 : expect_image(i); }
static int expect_write(size_t i) { return i % 97 == 0 || i >= pages - 256 ? 2 : expect_image(i); }

static int check_area(const unsigned char *a, const char *who)
{
	size_t bad = 0, first = 0;
	for (size_t i = 0; i < pages; i++) {
		int e = expect(i);
		int ok = e == 1 ? zero(a + i * PG) : holds(a + i * PG, e == 2 ? 1000000 + i : i);
		if (!ok && !bad++)
			first = i;
	}
	if (bad)
		ps_fail("area", "%s: %zu of %zu pages differ, the first page %zu (expected %s, found %#llx ...)", who,
			bad, pages, first, expect(first) == 1 ? "zeros" : "its pattern",
			(unsigned long long)*(const uint64_t *)(a + first * PG));
	return !bad;
}

int main(int argc, char **argv)
{
	static const char *modes[] = {"default", "fork", "dontneed", "write", "mremap", "munmap", NULL};
	int mode = -1;
	for (int m = 0; argc > 1 && modes[m]; m++)
		if (!strcmp(argv[1], modes[m]))
			mode = m;
	if (mode < 0)
		ps_bad_mode(argc > 1 ? argv[1] : NULL);
	size_t mib = argc > 2 ? strtoul(argv[2], NULL, 10) : 256;
	pages = mib * 256;
	area = mmap(NULL, pages * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	ps_setup(area != MAP_FAILED, "mmap area");
	for (size_t i = 0; i < pages; i++) {
		if (i % 13 == 5)
			continue;
		fill(area + i * PG, i);
		if (i % 13 == 7)
			memset(area + i * PG, 0, PG);
	}
	uint64_t *heap = malloc(64 * PG);
	ps_setup(heap != NULL, "malloc");
	for (size_t i = 0; i < 64 * PG / 8; i++)
		heap[i] = word(77, i);
	volatile uint64_t stack[512];
	for (size_t i = 0; i < 512; i++)
		stack[i] = word(78, i);
	dprintf(1, "AREA %lx %zu\n", (unsigned long)area, pages);
	ps_install_usr1();
	ps_ready();
	ps_wait_usr1();

	expect = expect_image;
	pid_t child = -1;
	unsigned char *at = area;
	switch (mode) {
	case 1:
		child = fork();
		ps_setup(child >= 0, "fork");
		if (child == 0)
			_exit(check_area(area, "child") ? 0 : 1);
		break;
	case 2:
		ps_setup(!madvise(area + 1000 * PG, 2000 * PG, MADV_DONTNEED), "madvise");
		expect = expect_dontneed;
		break;
	case 3:
		for (size_t i = 0; i < pages; i++)
			if (i % 97 == 0 || i >= pages - 256)
				fill(area + i * PG, 1000000 + i);
		expect = expect_write;
		break;
	case 4: {
		unsigned char *other = mmap(NULL, pages * PG, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		ps_setup(other != MAP_FAILED, "mmap a place to move to");
		for (int n = 0; n < 9; n++) { /* back and forth while the pages arrive; ends at `other` */
			unsigned char *to = n % 2 ? area : other, *from = n % 2 ? other : area;
			ps_setup(mremap(from, pages * PG, pages * PG, MREMAP_MAYMOVE | MREMAP_FIXED, to) == to,
				 "mremap");
			ps_setup(mmap(from, pages * PG, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) == from,
				 "mmap the place moved from");
			at = to;
		}
		break;
	}
	case 5:
		ps_setup(!munmap(area + 2000 * PG, 2000 * PG), "munmap");
		ps_setup(mmap(area + 2000 * PG, 2000 * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED,
			      -1, 0) != MAP_FAILED, "mmap again");
		expect = expect_munmap;
		break;
	}
	check_area(at, child == 0 ? "child" : "process");
	for (size_t i = 0; i < 64 * PG / 8; i++)
		if (heap[i] != word(77, i)) {
			ps_fail("heap", "word %zu differs", i);
			break;
		}
	for (size_t i = 0; i < 512; i++)
		if (stack[i] != word(78, i)) {
			ps_fail("stack", "word %zu differs", i);
			break;
		}
	if (child > 0) {
		int st;
		ps_setup(waitpid(child, &st, 0) == child, "waitpid");
		if (!WIFEXITED(st) || WEXITSTATUS(st))
			ps_fail("child", "the forked child's check failed (status %#x)", st);
	}
	return ps_finish();
}
