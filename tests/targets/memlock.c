/*
 * memlock: memory the kernel keeps state about beside its pages.
 *
 *   ./memlock guard       an 8-page area with guard pages 2-3 and 6 (MADV_GUARD_INSTALL)
 *                         and data on the others: after restore the pagemap shows bit 58
 *                         on exactly those pages, touching one faults, the data is intact
 *   ./memlock mlock       4 pages mlock()ed, 4 pages mlock2(MLOCK_ONFAULT) with one touched,
 *                         4 unlocked pages between them: smaps "lo" / "lo lf" / none, VmLck
 *   ./memlock mlockall    mlockall(MCL_FUTURE | MCL_ONFAULT): a page mapped after restore is
 *                         locked on fault ("lo lf"), existing areas are not locked
 *   ./memlock mlockall-current   mlockall(MCL_CURRENT | MCL_FUTURE): every area locked,
 *                         and one mapped after restore too
 *
 * Sabotage removes a guard page, munlocks an area, or munlockall()s.
 */
#include "target.h"
#include <fcntl.h>
#include <setjmp.h>
#include <sys/mman.h>
#include <sys/syscall.h>

#ifndef MADV_GUARD_INSTALL
#define MADV_GUARD_INSTALL 102
#define MADV_GUARD_REMOVE 103
#endif
#ifndef MLOCK_ONFAULT
#define MLOCK_ONFAULT 1
#endif
#ifndef MCL_ONFAULT
#define MCL_ONFAULT 4
#endif
#define PG 4096ul
#define PM_GUARD (1ull << 58)

static char flags_buf[256];

/* The VmFlags smaps shows for the area holding addr ("" if none). */
static const char *vmflags_of(void *addr)
{
	static char text[1 << 20];
	int fd = open("/proc/self/smaps", O_RDONLY);
	ps_setup(fd >= 0, "open smaps");
	size_t n = 0;
	ssize_t r;
	while ((r = read(fd, text + n, sizeof(text) - 1 - n)) > 0)
		n += (size_t)r;
	close(fd);
	text[n] = 0;
	flags_buf[0] = 0;
	int inside = 0;
	for (char *line = strtok(text, "\n"); line; line = strtok(NULL, "\n")) {
		unsigned long lo, hi;
		if (sscanf(line, "%lx-%lx ", &lo, &hi) == 2 && strchr(line, '-') < strchr(line, ' '))
			inside = (uintptr_t)addr >= lo && (uintptr_t)addr < hi;
		else if (inside && strncmp(line, "VmFlags:", 8) == 0) {
			snprintf(flags_buf, sizeof(flags_buf), "%s ", line + 8);
			return flags_buf;
		}
	}
	return flags_buf;
}

static int has_flag(void *addr, const char *flag)
{
	char want[8];
	snprintf(want, sizeof(want), " %s ", flag);
	return strstr(vmflags_of(addr), want) != NULL;
}

static unsigned long vmlck_kib(void)
{
	char text[8192];
	int fd = open("/proc/self/status", O_RDONLY);
	ps_setup(fd >= 0, "open status");
	ssize_t n = read(fd, text, sizeof(text) - 1);
	close(fd);
	ps_setup(n > 0, "read status");
	text[n] = 0;
	char *p = strstr(text, "VmLck:");
	return p ? strtoul(p + 6, NULL, 10) : ~0ul;
}

static uint64_t pagemap_of(void *addr)
{
	uint64_t e = 0;
	int fd = open("/proc/self/pagemap", O_RDONLY);
	ps_setup(fd >= 0, "open pagemap");
	ps_setup(pread(fd, &e, 8, (off_t)((uintptr_t)addr / PG * 8)) == 8, "read pagemap");
	close(fd);
	return e;
}

static sigjmp_buf fault_jmp;
static void on_segv(int sig) { (void)sig; siglongjmp(fault_jmp, 1); }

static int faults_on_read(volatile char *p)
{
	struct sigaction sa = { .sa_handler = on_segv }, old;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGSEGV, &sa, &old);
	int faulted = 1;
	if (!sigsetjmp(fault_jmp, 1)) {
		(void)*p;
		faulted = 0;
	}
	sigaction(SIGSEGV, &old, NULL);
	return faulted;
}

static void fill(char *p, size_t n, unsigned seed)
{
	for (size_t i = 0; i < n; i++)
		p[i] = (char)(i * 7 + seed);
}

static int guard_page(int i) { return i == 2 || i == 3 || i == 6; }

static int run_guard(void)
{
	char *a = mmap(NULL, 8 * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	ps_setup(a != MAP_FAILED, "mmap");
	fill(a, 8 * PG, 3);
	ps_setup(madvise(a + 2 * PG, 2 * PG, MADV_GUARD_INSTALL) == 0, "MADV_GUARD_INSTALL 2-3");
	ps_setup(madvise(a + 6 * PG, PG, MADV_GUARD_INSTALL) == 0, "MADV_GUARD_INSTALL 6");
	uint64_t sums[8];
	for (int i = 0; i < 8; i++)
		sums[i] = guard_page(i) ? 0 : ps_hash(a + i * PG, PG);
	ps_ready();
	if (ps_sabotage())
		ps_setup(madvise(a + 3 * PG, PG, MADV_GUARD_REMOVE) == 0, "MADV_GUARD_REMOVE");
	ps_wait_usr1();
	for (int i = 0; i < 8; i++) {
		char what[64];
		snprintf(what, sizeof(what), "page %d guard bit", i);
		PS_CHECK_U64(what, guard_page(i), !!(pagemap_of(a + i * PG) & PM_GUARD));
		snprintf(what, sizeof(what), "page %d faults", i);
		PS_CHECK_U64(what, guard_page(i), faults_on_read(a + i * PG));
		if (!guard_page(i)) {
			snprintf(what, sizeof(what), "page %d data", i);
			PS_CHECK_U64(what, sums[i], ps_hash(a + i * PG, PG));
		}
	}
	if (!has_flag(a, "gu"))
		ps_fail("area flags", "expected 'gu' found '%s'", vmflags_of(a));
	return ps_finish();
}

static int run_mlock(void)
{
	char *a = mmap(NULL, 12 * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	ps_setup(a != MAP_FAILED, "mmap");
	fill(a, 12 * PG, 5);
	char *locked = a, *onfault = a + 8 * PG;
	ps_setup(mlock(locked, 4 * PG) == 0, "mlock");
	ps_setup(syscall(SYS_mlock2, onfault, 4 * PG, MLOCK_ONFAULT) == 0, "mlock2");
	uint64_t sum = ps_hash(a, 12 * PG);
	unsigned long lck = vmlck_kib();
	ps_ready();
	if (ps_sabotage())
		ps_setup(munlock(locked, 4 * PG) == 0, "munlock");
	ps_wait_usr1();
	PS_CHECK_U64("data", sum, ps_hash(a, 12 * PG));
	PS_CHECK_U64("VmLck kB", lck, vmlck_kib());
	PS_CHECK_U64("mlocked area lo", 1, has_flag(locked, "lo"));
	PS_CHECK_U64("mlocked area lf", 0, has_flag(locked, "lf"));
	PS_CHECK_U64("middle area lo", 0, has_flag(a + 4 * PG, "lo"));
	PS_CHECK_U64("onfault area lo", 1, has_flag(onfault, "lo"));
	PS_CHECK_U64("onfault area lf", 1, has_flag(onfault, "lf"));
	return ps_finish();
}

static int run_mlockall(int current)
{
	char *a = mmap(NULL, 4 * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	ps_setup(a != MAP_FAILED, "mmap");
	fill(a, 4 * PG, 9);
	ps_setup(mlockall(current ? MCL_CURRENT | MCL_FUTURE : MCL_FUTURE | MCL_ONFAULT) == 0, "mlockall");
	unsigned long lck = vmlck_kib();
	ps_ready();
	if (ps_sabotage())
		ps_setup(munlockall() == 0, "munlockall");
	ps_wait_usr1();
	PS_CHECK_U64("VmLck kB", lck, vmlck_kib());
	PS_CHECK_U64("existing area lo", current, has_flag(a, "lo"));
	char *b = mmap(NULL, PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	ps_setup(b != MAP_FAILED, "mmap after restore");
	PS_CHECK_U64("new area lo", 1, has_flag(b, "lo"));
	PS_CHECK_U64("new area lf", !current, has_flag(b, "lf"));
	return ps_finish();
}

int main(int argc, char **argv)
{
	ps_install_usr1();
	const char *mode = argc > 1 ? argv[1] : NULL;
	if (mode && !strcmp(mode, "guard"))
		return run_guard();
	if (mode && !strcmp(mode, "mlock"))
		return run_mlock();
	if (mode && !strcmp(mode, "mlockall"))
		return run_mlockall(0);
	if (mode && !strcmp(mode, "mlockall-current"))
		return run_mlockall(1);
	ps_bad_mode(mode);
}
