/*
 * cow: a forked server whose workers share its private anonymous memory
 * copy-on-write, each changed in its own way after the fork (the started
 * process is the root).
 *
 *   ./cow server   The root fills an area of NPAGES pages (a pattern, seed 1)
 *                  with a free hole after it, and forks the workers:
 *                    0 reader     only reads
 *                    1 writer     rewrites pages W1_LO..W1_HI (seed 2)
 *                    2 dropper    MADV_DONTNEED pages DROP_LO..DROP_HI (zeros),
 *                                 munmaps UNMAP_LO..UNMAP_HI (gone)
 *                    3 neighbour  maps NEIGH pages right after the area (kept
 *                                 apart from it by the kernel: the area is
 *                                 inherited), writes half of them
 *                    4 parent     rewrites pages W4_LO..W4_HI (seed 4), then
 *                                 forks a grandchild that only reads (three
 *                                 levels: it shares pages with both)
 *                    5 group      setpgid(0, 0)
 *                    6 joiner     joins worker 5's group
 *                    7 session    setsid()
 *                    8 zombies'   has a child that exited with 3 and one killed
 *                                 by SIGTERM, both unreaped, and a SIGCHLD
 *                                 handler that ran once for each
 *                    9 epoll      holds an epoll watching a pipe
 *                  Before READY it prints "AREA <start> <pages>" and
 *                  "PIDS <worker 0> ... <worker 9> <grandchild>".
 *                  After SIGUSR1 the root tells each worker (SIGUSR2; worker
 *                  4 passes it on): each checks every page of its view of
 *                  the area (and its ids, and its own extras), then writes
 *                  page COW_PAGE + its number and checks it. The root then
 *                  checks that its own area is unchanged (copy-on-write
 *                  still works after the restore) and every exit status.
 * Sabotage: worker 0 rewrites page 0 just before its check (which fails).
 */
#include "target.h"
#include "family.h"
#include <fcntl.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/wait.h>

#define PG 4096
#define NPAGES 2048
#define HOLE 16
#define W1_LO 0
#define W1_HI 16
#define DROP_LO 16
#define DROP_HI 32
#define UNMAP_LO 32
#define UNMAP_HI 48
#define W4_LO 48
#define W4_HI 64
#define NEIGH 8
#define COW_PAGE 1000
#define NW 10

static volatile sig_atomic_t got_usr2;
static void on_usr2(int sig) { (void)sig; got_usr2 = 1; }
static volatile sig_atomic_t got_chld;
static void on_chld(int sig) { (void)sig; got_chld++; }

static unsigned char *area;
static int report_w = -1;

static void fill_page(unsigned char *p, size_t page, unsigned seed)
{
	for (size_t k = 0; k < PG; k++)
		p[k] = pat(page * PG + k, seed) | 1;
}

static int page_is(const unsigned char *p, size_t page, unsigned seed)
{
	for (size_t k = 0; k < PG; k++)
		if (p[k] != (seed ? (unsigned char)(pat(page * PG + k, seed) | 1) : 0))
			return 0;
	return 1;
}

static int mapped(const void *p)
{
	return msync((void *)((uintptr_t)p & ~(uintptr_t)(PG - 1)), PG, MS_ASYNC) == 0;
}

/* what page `page` of worker `w`'s view holds: a seed, 0 for zeros, -1 unmapped */
static int expect(int w, int grandchild, size_t page)
{
	if (w == 1 && page >= W1_LO && page < W1_HI)
		return 2;
	if (w == 2 && page >= DROP_LO && page < DROP_HI)
		return 0;
	if (w == 2 && page >= UNMAP_LO && page < UNMAP_HI)
		return -1;
	if (w == 4 && page >= W4_LO && page < W4_HI)
		return 4;
	(void)grandchild;
	return 1;
}

static void check_view(const char *who, int w, int grandchild)
{
	for (size_t i = 0; i < NPAGES; i++) {
		int e = expect(w, grandchild, i);
		unsigned char *p = area + i * PG;
		if (e < 0) {
			if (mapped(p))
				ps_fail(who, "page %zu expected unmapped found mapped", i);
		} else if (!mapped(p) || !page_is(p, i, (unsigned)e)) {
			ps_fail(who, "page %zu expected seed %d found other contents", i, e);
			return;
		}
	}
}

static void wait_usr2(void)
{
	while (!got_usr2)
		pause();
}

static void report(int w, int extra)
{
	int msg[2] = { w, extra };
	if (write(report_w, msg, sizeof(msg)) != sizeof(msg))
		_exit(2);
	close(report_w);
}

__attribute__((noreturn)) static void grandchild_main(void)
{
	wait_usr2();
	check_view("grandchild", 4, 1);
	fill_page(area + (COW_PAGE + NW) * PG, COW_PAGE + NW, 9);
	if (!page_is(area + (COW_PAGE + NW) * PG, COW_PAGE + NW, 9))
		ps_fail("grandchild", "its own write expected seed 9 found %s", "other");
	_exit(ps_failures ? 1 : 0);
}

__attribute__((noreturn)) static void worker(int w, pid_t group)
{
	char who[32];
	snprintf(who, sizeof(who), "worker %d", w);
	pid_t ppid = getppid(), pgrp = getpgrp(), sid = getsid(0);
	int extra = 0, epfd = -1, pfd[2] = { -1, -1 };
	pid_t kid = -1, kid2 = -1;
	switch (w) {
	case 1:
		for (size_t i = W1_LO; i < W1_HI; i++)
			fill_page(area + i * PG, i, 2);
		break;
	case 2:
		ps_setup(madvise(area + DROP_LO * PG, (DROP_HI - DROP_LO) * PG, MADV_DONTNEED) == 0, "madvise");
		ps_setup(munmap(area + UNMAP_LO * PG, (UNMAP_HI - UNMAP_LO) * PG) == 0, "munmap");
		break;
	case 3: {
		unsigned char *n = mmap(area + NPAGES * PG, NEIGH * PG, PROT_READ | PROT_WRITE,
					MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
		ps_setup(n == area + NPAGES * PG, "mmap next to the area");
		for (size_t i = 0; i < NEIGH / 2; i++)
			fill_page(n + i * PG, NPAGES + i, 3);
		break;
	}
	case 4:
		for (size_t i = W4_LO; i < W4_HI; i++)
			fill_page(area + i * PG, i, 4);
		kid = fork_child();
		if (kid == 0) {
			close(report_w);
			grandchild_main();
		}
		extra = kid;
		break;
	case 5:
		ps_setup(setpgid(0, 0) == 0, "setpgid");
		pgrp = getpid();
		break;
	case 6:
		ps_setup(setpgid(0, group) == 0, "setpgid to worker 5's group");
		pgrp = group;
		break;
	case 7:
		ps_setup(setsid() == getpid(), "setsid");
		pgrp = sid = getpid();
		break;
	case 8: {
		struct sigaction sc = { .sa_handler = on_chld, .sa_flags = SA_RESTART };
		sigemptyset(&sc.sa_mask);
		ps_setup(sigaction(SIGCHLD, &sc, NULL) == 0, "sigaction(SIGCHLD)");
		for (int z = 0; z < 2; z++) {   /* one after the other: two SIGCHLDs could merge */
			pid_t k = fork();
			ps_setup(k >= 0, "fork");
			if (k == 0 && z == 0)
				_exit(3);
			if (k == 0) {
				signal(SIGTERM, SIG_DFL);
				raise(SIGTERM);
				_exit(2);
			}
			while (waitid(P_PID, k, &(siginfo_t){0}, WEXITED | WNOWAIT) < 0 && errno == EINTR)
				;
			while (got_chld < z + 1)
				sleep_ms(1);
			*(z ? &kid2 : &kid) = k;
		}
		break;
	}
	case 9: {
		ps_setup(pipe(pfd) == 0, "pipe");
		epfd = epoll_create1(0);
		ps_setup(epfd >= 0, "epoll_create1");
		struct epoll_event ev = { .events = EPOLLIN, .data.u64 = 77 };
		ps_setup(epoll_ctl(epfd, EPOLL_CTL_ADD, pfd[0], &ev) == 0, "epoll_ctl");
		break;
	}
	}
	report(w, extra);
	wait_usr2();
	if (w == 0 && ps_sabotage())
		fill_page(area, 0, 5);
	check_view(who, w, 0);
	char what[96];
	snprintf(what, sizeof(what), "%s: getppid", who);
	PS_CHECK_U64(what, ppid, getppid());
	snprintf(what, sizeof(what), "%s: getpgrp", who);
	PS_CHECK_U64(what, pgrp, getpgrp());
	snprintf(what, sizeof(what), "%s: getsid", who);
	PS_CHECK_U64(what, sid, getsid(0));
	if (w == 3) {
		unsigned char *n = area + NPAGES * PG;
		for (size_t i = 0; i < NEIGH; i++)
			if (!page_is(n + i * PG, NPAGES + i, i < NEIGH / 2 ? 3 : 0))
				ps_fail(who, "neighbour page %zu expected its contents found %s", i, "other");
	}
	if (w == 4)
		tell_and_reap(kid, SIGUSR2, "grandchild");
	if (w == 8) {
		int st = 0;
		PS_CHECK_U64("worker 8: SIGCHLDs handled (one per zombie, none from the restore)", 2, got_chld);
		PS_CHECK_U64("worker 8: waitpid(zombie)", kid, waitpid(kid, &st, 0));
		PS_CHECK_U64("worker 8: zombie's exit status", 3, WIFEXITED(st) ? WEXITSTATUS(st) : 256);
		PS_CHECK_U64("worker 8: waitpid(killed zombie)", kid2, waitpid(kid2, &st, 0));
		PS_CHECK_U64("worker 8: killed zombie's signal", SIGTERM, WIFSIGNALED(st) ? WTERMSIG(st) : 0);
	}
	if (w == 9) {
		struct epoll_event ev;
		PS_CHECK_U64("worker 9: write to the watched pipe", 1, write(pfd[1], "x", 1));
		PS_CHECK_U64("worker 9: epoll_wait", 1, epoll_wait(epfd, &ev, 1, 1000));
		PS_CHECK_U64("worker 9: epoll data", 77, ev.data.u64);
	}
	size_t mine = COW_PAGE + (size_t)w;
	fill_page(area + mine * PG, mine, 7);
	if (!page_is(area + mine * PG, mine, 7))
		ps_fail(who, "its own write expected seed 7 found %s", "other");
	_exit(ps_failures ? 1 : 0);
}

static int mode_server(void)
{
	struct sigaction sa = { .sa_handler = on_usr2 };
	sigemptyset(&sa.sa_mask);
	ps_setup(sigaction(SIGUSR2, &sa, NULL) == 0, "sigaction");
	unsigned char *p = mmap(NULL, (NPAGES + HOLE) * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	ps_setup(p != MAP_FAILED, "mmap");
	ps_setup(munmap(p + NPAGES * PG, HOLE * PG) == 0, "munmap the hole");
	area = p;
	for (size_t i = 0; i < NPAGES; i++)
		fill_page(area + i * PG, i, 1);
	int rep[2];
	ps_setup(pipe(rep) == 0, "pipe");
	pid_t w[NW] = { 0 }, grandchild = 0;
	int reports = 0;
	for (int i = 0; i < NW; i++) {
		w[i] = fork_child();
		if (w[i] == 0) {
			close(rep[0]);
			report_w = rep[1];
			worker(i, w[5]);
		}
		/* worker 6 joins worker 5's group: every one before it has reported first */
		for (; reports < (i == 5 ? 6 : i == NW - 1 ? NW : 0); reports++) {
			int msg[2];
			ps_setup(read(rep[0], msg, sizeof(msg)) == sizeof(msg), "a worker's report");
			if (msg[0] == 4)
				grandchild = msg[1];
		}
	}
	close(rep[1]);
	close(rep[0]);
	for (int i = 0; i < NW; i++)
		setup_alive(w[i], "worker");
	dprintf(1, "AREA %#lx %d\n", (unsigned long)area, NPAGES);
	dprintf(1, "PIDS");
	for (int i = 0; i < NW; i++)
		dprintf(1, " %d", (int)w[i]);
	dprintf(1, " %d\n", (int)grandchild);
	ps_ready();
	ps_wait_usr1();
	for (int i = 0; i < NW; i++) {
		char who[32];
		snprintf(who, sizeof(who), "worker %d", i);
		tell_and_reap(w[i], SIGUSR2, who);
	}
	for (size_t i = 0; i < NPAGES; i++)
		if (!page_is(area + i * PG, i, 1)) {
			ps_fail("root", "page %zu expected seed 1 (unchanged by the workers' writes) found %s", i, "other");
			break;
		}
	return ps_finish();
}

int main(int argc, char **argv)
{
	ps_install_usr1();
	const char *mode = argc > 1 ? argv[1] : "server";
	if (strcmp(mode, "server") == 0)
		return mode_server();
	ps_bad_mode(mode);
	return 2;
}
