/*
 * tree: a process tree (the started process is the root).
 *
 *   ./tree prefork   3 workers share a 64 KiB MAP_SHARED|MAP_ANONYMOUS area
 *                    made before fork; each bumps its own slot, a private
 *                    copy and a shared counter (__atomic), nanosleep 1 ms.
 *                    After SIGUSR1 the root writes a magic word and SIGUSR2s
 *                    each worker: it must see the magic, slot == private
 *                    copy, the area's pattern, pid/ppid/pgrp/sid, and
 *                    answers with an ack word the root must see.
 *   ./tree pipes     C1 writes 3 MiB of a pattern into pipe A (fd 10 in the
 *                    root, FD_CLOEXEC) in 16 KiB writes and is blocked with
 *                    A full; pipe B (root: write end fd 13) holds 10000
 *                    bytes for C2 (read end fd 21); pipe P (fds 11/12, read
 *                    end O_NONBLOCK, write end FD_CLOEXEC, F_SETPIPE_SZ
 *                    1 MiB) holds 512 KiB.  After SIGUSR1: fd flags, pipe
 *                    sizes, bytes queued, which fds share a pipe, all of A
 *                    byte by byte, all of P, then B's write end is closed
 *                    and C2 reads B to EOF and checks it.
 *   ./tree zombie    Z exits with 7 and stays unreaped (a zombie at READY);
 *                    S pauses.  After SIGUSR1: /proc/Z/stat is state Z with
 *                    ppid/pgrp/sid of the root, waitpid(Z) gives 7; S checks
 *                    its ids on SIGUSR2.
 *   ./tree session   G: setpgid(0,0) + grandchild GG in G's group;
 *                    L: setsid() + grandchild LL in L's session.  Each
 *                    checks pid/ppid/pgrp/sid on SIGUSR2 (forwarded by its
 *                    parent, which folds the child's status into its own);
 *                    the root also checks all four in /proc/PID/stat.
 * Children set PR_SET_PDEATHSIG SIGKILL right after fork (cleanup only) and
 * report failures as "FAIL: <who>: ..." lines and exit 1; the root checks
 * every exit status.  Children are told with SIGUSR2, re-sent every 20 ms
 * until they exit.
 * Sabotage, right after READY: prefork: worker 1 adds 1000 to its private
 * copy (the root waits for it); pipes: the root writes one extra byte into
 * P; zombie: the root reaps Z; session: the root moves G into its own
 * process group.
 */
#include "target.h"
#include "family.h"
#include <fcntl.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>

#define AREA_LEN 65536

static volatile sig_atomic_t got_usr2;
static void on_usr2(int sig) { (void)sig; got_usr2 = 1; }

struct ids {
	pid_t pid, ppid, pgrp, sid;
};

static struct ids root;         /* the root's own, recorded before any fork */

static void get_ids(struct ids *x)
{
	x->pid = getpid();
	x->ppid = getppid();
	x->pgrp = getpgrp();
	x->sid = getsid(0);
}

static void check_ids(const char *who, const struct ids *exp)
{
	struct ids now;
	get_ids(&now);
	char what[96];
	snprintf(what, sizeof(what), "%s: getpid", who);
	PS_CHECK_U64(what, exp->pid, now.pid);
	snprintf(what, sizeof(what), "%s: getppid", who);
	PS_CHECK_U64(what, exp->ppid, now.ppid);
	snprintf(what, sizeof(what), "%s: getpgrp", who);
	PS_CHECK_U64(what, exp->pgrp, now.pgrp);
	snprintf(what, sizeof(what), "%s: getsid", who);
	PS_CHECK_U64(what, exp->sid, now.sid);
}

/* Children wait for SIGUSR2; their parent re-sends it, so pause() may not lose it. */
static void child_wait_usr2(void)
{
	while (!got_usr2)
		pause();
}

__attribute__((noreturn)) static void child_exit(void) { _exit(ps_failures ? 1 : 0); }

struct pstat {
	char state;
	int ppid, pgrp, sid;
};

static int read_pstat(pid_t pid, struct pstat *p)
{
	char path[64], buf[1024];
	snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
	int fd = open(path, O_RDONLY);
	if (fd < 0)
		return -1;
	ssize_t n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		return -1;
	buf[n] = 0;
	char *q = strrchr(buf, ')');
	if (!q || sscanf(q + 1, " %c %d %d %d", &p->state, &p->ppid, &p->pgrp, &p->sid) != 4)
		return -1;
	return 0;
}

static int pstat_matches(const struct ids *exp)
{
	struct pstat ps;
	return read_pstat(exp->pid, &ps) == 0 && ps.ppid == exp->ppid && ps.pgrp == exp->pgrp &&
	       ps.sid == exp->sid;
}

/* /proc/PID/stat as seen from outside agrees with what the process recorded */
static void check_pstat(const char *who, const struct ids *exp)
{
	struct pstat ps;
	char what[96];
	if (read_pstat(exp->pid, &ps) != 0) {
		snprintf(what, sizeof(what), "%s: /proc/%d/stat", who, (int)exp->pid);
		ps_fail(what, "expected readable found errno %d", errno);
		return;
	}
	snprintf(what, sizeof(what), "%s: /proc stat ppid", who);
	PS_CHECK_U64(what, exp->ppid, ps.ppid);
	snprintf(what, sizeof(what), "%s: /proc stat pgrp", who);
	PS_CHECK_U64(what, exp->pgrp, ps.pgrp);
	snprintf(what, sizeof(what), "%s: /proc stat session", who);
	PS_CHECK_U64(what, exp->sid, ps.sid);
}

/* ---------------------------------------------------------------- prefork */

#define NW 3
#define MAGIC 0x6d61676963f00dull
#define A_MAGIC 0
#define A_COUNTER 1
#define A_READY 2
#define A_SABOTAGED 3
#define A_SLOT(i) (8 + 8 * (i))         /* own cache line each */
#define A_ACK(i) (8 + 8 * (i) + 1)
#define PAT_OFF 4096

__attribute__((noreturn)) static void prefork_worker(int i, uint64_t *a, uint64_t pat_hash)
{
	char who[32];
	snprintf(who, sizeof(who), "worker %d", i);
	struct ids me;
	get_ids(&me);
	uint64_t mine = 0;      /* private copy of the slot */
	int sab = ps_sabotage() && i == 1;
	while (!got_usr2) {
		__atomic_add_fetch(&a[A_SLOT(i)], 1, __ATOMIC_SEQ_CST);
		mine++;
		__atomic_add_fetch(&a[A_COUNTER], 1, __ATOMIC_SEQ_CST);
		if (sab && __atomic_load_n(&a[A_READY], __ATOMIC_SEQ_CST)) {
			mine += 1000;
			__atomic_store_n(&a[A_SABOTAGED], 1, __ATOMIC_SEQ_CST);
			sab = 0;
		}
		sleep_ms(1);
	}
	char what[96];
	snprintf(what, sizeof(what), "%s: root's magic in the shared area", who);
	PS_CHECK_U64(what, MAGIC, __atomic_load_n(&a[A_MAGIC], __ATOMIC_SEQ_CST));
	snprintf(what, sizeof(what), "%s: shared slot == private copy", who);
	PS_CHECK_U64(what, mine, __atomic_load_n(&a[A_SLOT(i)], __ATOMIC_SEQ_CST));
	snprintf(what, sizeof(what), "%s: shared area pattern hash", who);
	PS_CHECK_U64(what, pat_hash, ps_hash((unsigned char *)a + PAT_OFF, AREA_LEN - PAT_OFF));
	struct ids exp = { me.pid, root.pid, root.pgrp, root.sid };
	check_ids(who, &me);
	check_ids(who, &exp);
	__atomic_store_n(&a[A_ACK(i)], MAGIC ^ (uint64_t)i, __ATOMIC_SEQ_CST);
	child_exit();
}

static int mode_prefork(void)
{
	uint64_t *a = shared_area(AREA_LEN);
	unsigned char *pa = (unsigned char *)a + PAT_OFF;
	for (size_t k = 0; k < AREA_LEN - PAT_OFF; k++)
		pa[k] = pat(k, 1);
	uint64_t pat_hash = ps_hash(pa, AREA_LEN - PAT_OFF);

	pid_t w[NW];
	for (int i = 0; i < NW; i++) {
		w[i] = fork_child();
		if (w[i] == 0)
			prefork_worker(i, a, pat_hash);
	}
	double deadline = mono() + 5.0;
	for (int i = 0; i < NW; i++)
		while (__atomic_load_n(&a[A_SLOT(i)], __ATOMIC_SEQ_CST) == 0) {
			setup_alive(w[i], "worker");
			if (mono() > deadline)
				setup_fail("workers did not start counting within 5 s");
			sleep_ms(1);
		}

	ps_ready();
	__atomic_store_n(&a[A_READY], 1, __ATOMIC_SEQ_CST);
	if (ps_sabotage())
		while (!__atomic_load_n(&a[A_SABOTAGED], __ATOMIC_SEQ_CST))
			sleep_ms(1);
	ps_wait_usr1();

	check_ids("root", &root);
	uint64_t snap[NW];
	for (int i = 0; i < NW; i++)
		snap[i] = __atomic_load_n(&a[A_SLOT(i)], __ATOMIC_SEQ_CST);
	__atomic_store_n(&a[A_MAGIC], MAGIC, __ATOMIC_SEQ_CST);
	for (int i = 0; i < NW; i++) {
		char who[32], what[96];
		snprintf(who, sizeof(who), "worker %d", i);
		tell_and_reap(w[i], SIGUSR2, who);
		snprintf(what, sizeof(what), "root: worker %d ack in the shared area", i);
		PS_CHECK_U64(what, MAGIC ^ (uint64_t)i, a[A_ACK(i)]);
		if (a[A_SLOT(i)] < snap[i])
			ps_fail("root: worker slot", "%d expected >= %llu found %llu", i,
				(unsigned long long)snap[i], (unsigned long long)a[A_SLOT(i)]);
	}
	uint64_t sum = 0;
	for (int i = 0; i < NW; i++)
		sum += a[A_SLOT(i)];
	PS_CHECK_U64("root: shared counter == sum of slots", sum, a[A_COUNTER]);
	PS_CHECK_U64("root: shared area pattern hash", pat_hash, ps_hash(pa, AREA_LEN - PAT_OFF));
	return ps_finish();
}

/* ------------------------------------------------------------------ pipes */

#define FD_A_R 10
#define FD_P_R 11
#define FD_P_W 12
#define FD_B_W 13
#define FD_A_W 20
#define FD_B_R 21
#define A_LEN (3ul << 20)
#define A_CHUNK 16384
#define B_LEN 10000
#define P_SIZE (1 << 20)
#define P_LEN (512 << 10)
#define P_CHUNK 5000

static void move_fd(int from, int to)
{
	if (from == to)
		return;
	ps_setup(dup2(from, to) == to, "dup2");
	close(from);
}

static int write_all(int fd, const unsigned char *p, size_t n)
{
	while (n) {
		ssize_t w = write(fd, p, n);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return -1;
		p += w;
		n -= (size_t)w;
	}
	return 0;
}

__attribute__((noreturn)) static void pipes_c1(void)
{
	struct ids me;
	get_ids(&me);
	close(FD_A_R);
	static unsigned char buf[A_CHUNK];
	for (size_t off = 0; off < A_LEN; off += A_CHUNK) {
		for (size_t k = 0; k < A_CHUNK; k++)
			buf[k] = pat(off + k, 1);
		if (write_all(FD_A_W, buf, A_CHUNK)) {
			ps_fail("C1: write pipe A", "at %zu expected success found errno %d", off, errno);
			child_exit();
		}
	}
	close(FD_A_W);
	struct ids exp = { me.pid, root.pid, root.pgrp, root.sid };
	check_ids("C1", &exp);
	child_exit();
}

__attribute__((noreturn)) static void pipes_c2(uint64_t *ready)
{
	struct ids me;
	get_ids(&me);
	close(FD_A_R);
	close(FD_B_W);
	int fl = fcntl(FD_B_R, F_GETFL);
	__atomic_store_n(ready, 1, __ATOMIC_SEQ_CST);
	child_wait_usr2();

	PS_CHECK_U64("C2: pipe B read end flags", fl, fcntl(FD_B_R, F_GETFL));
	unsigned char buf[4096];
	size_t total = 0;
	int bad = 0;
	for (;;) {
		ssize_t r = read(FD_B_R, buf, sizeof(buf));
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0) {
			ps_fail("C2: read pipe B", "expected data or EOF found errno %d", errno);
			break;
		}
		if (r == 0)
			break;
		for (ssize_t k = 0; k < r && !bad; k++)
			if (buf[k] != pat(total + k, 2)) {
				ps_fail("C2: pipe B content", "at byte %zu expected %#x found %#x",
					total + k, pat(total + k, 2), buf[k]);
				bad = 1;
			}
		total += r;
	}
	PS_CHECK_U64("C2: pipe B length", B_LEN, total);
	struct ids exp = { me.pid, root.pid, root.pgrp, root.sid };
	check_ids("C2", &exp);
	child_exit();
}

struct fdstate {
	int fd, fl, fdfl;
	ino_t ino;
};

static void fd_state(int fd, struct fdstate *s)
{
	struct stat st;
	s->fd = fd;
	s->fl = fcntl(fd, F_GETFL);
	s->fdfl = fcntl(fd, F_GETFD);
	s->ino = fstat(fd, &st) == 0 ? st.st_ino : 0;
}

static int queued(int fd)
{
	int n = -1;
	if (ioctl(fd, FIONREAD, &n) != 0)
		return -1;
	return n;
}

static int mode_pipes(void)
{
	uint64_t *sh = shared_area(4096);
	int fds[2];

	ps_setup(pipe(fds) == 0, "pipe A");
	move_fd(fds[0], FD_A_R);
	move_fd(fds[1], FD_A_W);
	ps_setup(fcntl(FD_A_R, F_SETFD, FD_CLOEXEC) == 0, "FD_CLOEXEC A");
	pid_t c1 = fork_child();
	if (c1 == 0)
		pipes_c1();
	close(FD_A_W);

	ps_setup(pipe(fds) == 0, "pipe B");
	move_fd(fds[0], FD_B_R);
	move_fd(fds[1], FD_B_W);
	unsigned char *buf = malloc(P_LEN + 1);
	ps_setup(buf != NULL, "malloc");
	for (size_t k = 0; k < B_LEN; k++)
		buf[k] = pat(k, 2);
	ps_setup(write_all(FD_B_W, buf, B_LEN) == 0, "write pipe B");
	pid_t c2 = fork_child();
	if (c2 == 0)
		pipes_c2(&sh[0]);
	close(FD_B_R);

	ps_setup(pipe(fds) == 0, "pipe P");
	move_fd(fds[0], FD_P_R);
	move_fd(fds[1], FD_P_W);
	ps_setup(fcntl(FD_P_R, F_SETFL, O_NONBLOCK) == 0, "O_NONBLOCK P");
	ps_setup(fcntl(FD_P_W, F_SETFD, FD_CLOEXEC) == 0, "FD_CLOEXEC P");
	ps_setup(fcntl(FD_P_W, F_SETPIPE_SZ, P_SIZE) >= P_SIZE, "F_SETPIPE_SZ 1 MiB");
	for (size_t k = 0; k < P_LEN; k++)
		buf[k] = pat(k, 3);
	for (size_t off = 0; off < P_LEN; off += P_CHUNK) {
		size_t n = P_LEN - off < P_CHUNK ? P_LEN - off : P_CHUNK;
		ps_setup(write_all(FD_P_W, buf + off, n) == 0, "write pipe P");
	}

	int a_size = fcntl(FD_A_R, F_GETPIPE_SZ);
	ps_setup(a_size > 0, "F_GETPIPE_SZ A");
	double deadline = mono() + 5.0;
	while (queued(FD_A_R) < a_size || !__atomic_load_n(&sh[0], __ATOMIC_SEQ_CST)) {
		setup_alive(c1, "C1");
		setup_alive(c2, "C2");
		if (mono() > deadline)
			setup_fail("pipe A not full or C2 not ready within 5 s");
		sleep_ms(1);
	}
	int a_queued = queued(FD_A_R);
	int p_size = fcntl(FD_P_W, F_GETPIPE_SZ);
	struct fdstate saved[4], now[4];
	for (int i = 0; i < 4; i++)
		fd_state(FD_A_R + i, &saved[i]);

	ps_ready();
	if (ps_sabotage())
		ps_setup(write(FD_P_W, "\xff", 1) == 1, "sabotage write P");
	ps_wait_usr1();

	check_ids("root", &root);
	static const char *names[] = { "A read end", "P read end", "P write end", "B write end" };
	for (int i = 0; i < 4; i++) {
		char what[96];
		fd_state(FD_A_R + i, &now[i]);
		snprintf(what, sizeof(what), "root: fd %d (%s) F_GETFL", saved[i].fd, names[i]);
		PS_CHECK_U64(what, saved[i].fl, now[i].fl);
		snprintf(what, sizeof(what), "root: fd %d (%s) F_GETFD", saved[i].fd, names[i]);
		PS_CHECK_U64(what, saved[i].fdfl, now[i].fdfl);
	}
	PS_CHECK_U64("root: fd 11 O_NONBLOCK", O_NONBLOCK, now[1].fl & O_NONBLOCK);
	PS_CHECK_U64("root: fd 12 O_NONBLOCK", 0, now[2].fl & O_NONBLOCK);
	PS_CHECK_U64("root: fd 10 FD_CLOEXEC", FD_CLOEXEC, now[0].fdfl);
	PS_CHECK_U64("root: fd 12 FD_CLOEXEC", FD_CLOEXEC, now[2].fdfl);
	PS_CHECK_U64("root: fd 13 FD_CLOEXEC", 0, now[3].fdfl);
	if (now[1].ino != now[2].ino)
		ps_fail("root: fds 11 and 12", "expected one pipe found inodes %lu and %lu",
			(unsigned long)now[1].ino, (unsigned long)now[2].ino);
	if (now[0].ino == now[1].ino || now[0].ino == now[3].ino || now[1].ino == now[3].ino)
		ps_fail("root: pipes A, P, B", "expected three pipes found a shared inode %s", "");
	PS_CHECK_U64("root: pipe A F_GETPIPE_SZ", a_size, fcntl(FD_A_R, F_GETPIPE_SZ));
	PS_CHECK_U64("root: pipe A bytes queued", a_queued, queued(FD_A_R));
	PS_CHECK_U64("root: pipe P F_GETPIPE_SZ", p_size, fcntl(FD_P_R, F_GETPIPE_SZ));
	PS_CHECK_U64("root: pipe P bytes queued", P_LEN, queued(FD_P_R));

	/* all of A, byte by byte, until C1 closes it */
	size_t total = 0;
	int bad = 0;
	for (;;) {
		struct pollfd p = { .fd = FD_A_R, .events = POLLIN };
		int r = poll(&p, 1, 5000);
		if (r < 0 && errno == EINTR)
			continue;
		if (r == 0) {
			ps_fail("root: pipe A", "expected data or EOF within 5 s found none at %zu", total);
			break;
		}
		ssize_t n = read(FD_A_R, buf, 65536);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			ps_fail("root: read pipe A", "expected data found errno %d", errno);
			break;
		}
		if (n == 0)
			break;
		for (ssize_t k = 0; k < n && !bad; k++)
			if (buf[k] != pat(total + k, 1)) {
				ps_fail("root: pipe A content", "at byte %zu expected %#x found %#x",
					total + k, pat(total + k, 1), buf[k]);
				bad = 1;
			}
		total += n;
	}
	PS_CHECK_U64("root: pipe A length", A_LEN, total);
	tell_and_reap(c1, 0, "C1");

	/* all of P: exactly P_LEN bytes, then EAGAIN */
	total = 0;
	bad = 0;
	for (;;) {
		ssize_t n = read(FD_P_R, buf, 65536);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			if (errno != EAGAIN)
				ps_fail("root: read pipe P", "expected EAGAIN at the end found errno %d", errno);
			break;
		}
		if (n == 0) {
			ps_fail("root: read pipe P", "expected EAGAIN at the end found EOF %s", "");
			break;
		}
		for (ssize_t k = 0; k < n && !bad; k++)
			if (total + k >= P_LEN) {
				ps_fail("root: pipe P content", "at byte %zu expected end of data found %#x",
					total + k, buf[k]);
				bad = 1;
			} else if (buf[k] != pat(total + k, 3)) {
				ps_fail("root: pipe P content", "at byte %zu expected %#x found %#x",
					total + k, pat(total + k, 3), buf[k]);
				bad = 1;
			}
		total += n;
	}
	PS_CHECK_U64("root: pipe P length", P_LEN, total);
	char c = 0;
	PS_CHECK_U64("root: pipe P write after drain", 1, write(FD_P_W, "x", 1));
	PS_CHECK_U64("root: pipe P read back", 1, read(FD_P_R, &c, 1));
	PS_CHECK_U64("root: pipe P byte read back", 'x', c);

	close(FD_B_W);          /* C2 reads B to EOF */
	tell_and_reap(c2, SIGUSR2, "C2");
	return ps_finish();
}

/* ----------------------------------------------------------------- zombie */

static int mode_zombie(void)
{
	pid_t z = fork_child();
	if (z == 0)
		_exit(7);
	pid_t s = fork_child();
	if (s == 0) {
		struct ids me;
		get_ids(&me);
		child_wait_usr2();
		struct ids exp = { me.pid, root.pid, root.pgrp, root.sid };
		check_ids("S", &exp);
		child_exit();
	}
	struct pstat ps;
	double deadline = mono() + 5.0;
	while (read_pstat(z, &ps) != 0 || ps.state != 'Z') {
		if (mono() > deadline)
			setup_fail("Z not a zombie within 5 s");
		sleep_ms(1);
	}
	setup_alive(s, "S");

	ps_ready();
	if (ps_sabotage())
		waitpid(z, NULL, 0);
	ps_wait_usr1();

	check_ids("root", &root);
	if (read_pstat(z, &ps) != 0) {
		ps_fail("root: /proc/Z/stat", "expected a zombie found errno %d", errno);
	} else {
		PS_CHECK_U64("root: Z state", 'Z', ps.state);
		PS_CHECK_U64("root: Z ppid", root.pid, ps.ppid);
		PS_CHECK_U64("root: Z pgrp", root.pgrp, ps.pgrp);
		PS_CHECK_U64("root: Z session", root.sid, ps.sid);
	}
	int st = 0;
	pid_t r;
	while ((r = waitpid(z, &st, WNOHANG)) < 0 && errno == EINTR)
		;
	if (r != z)
		ps_fail("root: waitpid(Z, WNOHANG)", "expected %d found %d (errno %d)", (int)z,
			(int)r, r < 0 ? errno : 0);
	else if (!WIFEXITED(st) || WEXITSTATUS(st) != 7)
		ps_fail("root: Z status", "expected exit 7 found %#x", st);
	tell_and_reap(s, SIGUSR2, "S");
	return ps_finish();
}

/* ---------------------------------------------------------------- session */

enum { G, GG, L, LL, NSESS };
static const char *sess_names[NSESS] = { "G", "GG", "L", "LL" };

struct sess_rec {
	struct ids ids;
	int ready;
};

static void sess_member(int who, struct sess_rec *rec)
{
	get_ids(&rec[who].ids);
	__atomic_store_n(&rec[who].ready, 1, __ATOMIC_SEQ_CST);
	child_wait_usr2();
	check_ids(sess_names[who], &rec[who].ids);
}

/* G and L: one grandchild each, told and reaped on their own SIGUSR2 */
__attribute__((noreturn)) static void sess_parent(int who, struct sess_rec *rec)
{
	pid_t c = fork_child();
	if (c == 0) {
		if (who == G)
			ps_setup(setpgid(0, getppid()) == 0, "GG setpgid");
		sess_member(who + 1, rec);
		child_exit();
	}
	sess_member(who, rec);
	tell_and_reap(c, SIGUSR2, sess_names[who + 1]);
	child_exit();
}

static int mode_session(void)
{
	struct sess_rec *rec = shared_area(4096);
	pid_t g = fork_child();
	if (g == 0) {
		ps_setup(setpgid(0, 0) == 0, "G setpgid(0, 0)");
		sess_parent(G, rec);
	}
	pid_t l = fork_child();
	if (l == 0) {
		ps_setup(setsid() == getpid(), "L setsid");
		sess_parent(L, rec);
	}
	double deadline = mono() + 5.0;
	for (int i = 0; i < NSESS; i++)
		while (!__atomic_load_n(&rec[i].ready, __ATOMIC_SEQ_CST)) {
			setup_alive(g, "G");
			setup_alive(l, "L");
			if (mono() > deadline)
				setup_fail("session members not ready within 5 s");
			sleep_ms(1);
		}
	struct ids *gi = &rec[G].ids, *ggi = &rec[GG].ids, *li = &rec[L].ids, *lli = &rec[LL].ids;
	ps_setup(gi->pid == g && gi->ppid == root.pid && gi->pgrp == g && gi->sid == root.sid,
		 "G ids");
	ps_setup(ggi->ppid == g && ggi->pgrp == g && ggi->sid == root.sid, "GG ids");
	ps_setup(li->pid == l && li->ppid == root.pid && li->pgrp == l && li->sid == l, "L ids");
	ps_setup(lli->ppid == l && lli->pgrp == l && lli->sid == l, "LL ids");
	for (int i = 0; i < NSESS; i++)
		if (!pstat_matches(&rec[i].ids))
			setup_fail("/proc/PID/stat of a session member disagrees with its own ids");

	ps_ready();
	if (ps_sabotage())
		ps_setup(setpgid(g, root.pgrp) == 0, "sabotage setpgid(G)");
	ps_wait_usr1();

	check_ids("root", &root);
	for (int i = 0; i < NSESS; i++)
		check_pstat(sess_names[i], &rec[i].ids);
	tell_and_reap(g, SIGUSR2, "G");
	tell_and_reap(l, SIGUSR2, "L");
	return ps_finish();
}

int main(int argc, char **argv)
{
	const char *mode = argc >= 2 ? argv[1] : NULL;
	ps_install_usr1();
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_usr2;        /* no SA_RESTART: it ends nanosleep/pause */
	sigemptyset(&sa.sa_mask);
	ps_setup(sigaction(SIGUSR2, &sa, NULL) == 0, "sigaction SIGUSR2");
	get_ids(&root);

	if (mode && !strcmp(mode, "prefork"))
		return mode_prefork();
	if (mode && !strcmp(mode, "pipes"))
		return mode_pipes();
	if (mode && !strcmp(mode, "zombie"))
		return mode_zombie();
	if (mode && !strcmp(mode, "session"))
		return mode_session();
	ps_bad_mode(mode);
	return 2;
}
