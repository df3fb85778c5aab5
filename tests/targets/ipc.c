/*
 * ipc: anonymous-inode fds, unix sockets with data in flight, a FIFO and
 * shared memory between a root and its child.
 *
 *   ./ipc anonfd     One process, fds at fixed numbers:
 *                    20 eventfd A (EFD_NONBLOCK, count 5 + 2 = 7)
 *                    21 eventfd B (EFD_SEMAPHORE, count 3, blocking)
 *                    22 signalfd for SIGUSR2 (SFD_NONBLOCK; SIGUSR2 blocked
 *                       and queued to itself once with sival_int 1234)
 *                    23 timerfd T1 CLOCK_MONOTONIC (TFD_CLOEXEC), 1000 s
 *                       left, interval 7 s
 *                    24 timerfd T2 CLOCK_REALTIME (TFD_NONBLOCK), interval
 *                       50 ms, >= 2 expirations unread at READY
 *                    25 epoll E (EPOLL_CLOEXEC) watching A (EPOLLIN, data
 *                       0x1111222233334444), 26 (EPOLLIN|EPOLLET, 0xabcdef)
 *                       and B (EPOLLOUT, 42); epoll_wait never called
 *                       before SIGUSR1, so the edge of 26 is still unseen
 *                    26/27 pipe read end (O_NONBLOCK) / write end, 10 bytes
 *                    After SIGUSR1: F_GETFL/F_GETFD of 20..27, the clocks in
 *                    fdinfo, epoll_wait(E, 0) is exactly the three events
 *                    with their data, A reads 7 then EAGAIN, B reads 1 three
 *                    times then EAGAIN, the signalfd gives SIGUSR2 SI_QUEUE
 *                    1234 from our pid then EAGAIN, T1 interval 7 s and 900
 *                    to 1000 s left, T2 reads >= 2; EPOLL_CTL_MOD of 26 (it
 *                    fails with ENOENT if the watch was added under another
 *                    fd number) and EPOLL_CTL_DEL of 20 succeed and the next
 *                    epoll_wait sees 26 (new data) and B only.
 *   ./ipc sockets    socketpairs made by the root before fork; the root
 *                    keeps 20/22/24 (22 O_NONBLOCK, 24 FD_CLOEXEC), the
 *                    child C 21/23/25.  Before READY C writes 100000 bytes
 *                    of a pattern into stream 21 (SO_SNDBUF 1 MiB,
 *                    MSG_DONTWAIT), 5 datagrams (1, 100, 1000, 5000, 60
 *                    bytes) into dgram 23 and 3 records (10, 2000, 3) into
 *                    seqpacket 25; the root writes 3000 bytes into 20.
 *                    Nothing is read before SIGUSR1.  After SIGUSR1 the root
 *                    reads all of it (exact bytes and message boundaries in
 *                    order, then EAGAIN), SIGUSR2s C, which reads the 3000
 *                    bytes (then EAGAIN) and sends one more datagram; the
 *                    root reaps C and receives that datagram, then sees EOF
 *                    on 20 and 24 (C held the only peer ends).
 *   ./ipc fifo DIR   DIR/fifo: the root reads it (fd 20, O_RDONLY|
 *                    O_NONBLOCK), C writes it (fd 21) 20000 bytes, unread.
 *                    memfd "ipc-memfd" of 256 KiB with a pattern: fd 22 in
 *                    the root (FD_CLOEXEC, position 4096), MAP_SHARED in
 *                    both (C closed its fd).  A 1 MiB MAP_SHARED|
 *                    MAP_ANONYMOUS area where only page 0 and 200 were
 *                    written (by the root) and page 100 (by C).  After
 *                    SIGUSR1 the root reads exactly 20000 bytes from the
 *                    FIFO (then EAGAIN), checks the fds' links, flags,
 *                    position, size and content of the memfd (read() and
 *                    mapping), pages 0/100/200, writes magic words into the
 *                    memfd mapping (visible through the fd) and page 0;
 *                    SIGUSR2 to C, which checks both magics through its own
 *                    mappings, pages 100/200, and zeros everywhere else in
 *                    the area.  Then the FIFO reads EOF (C was its writer).
 * Children set PR_SET_PDEATHSIG SIGKILL right after fork (cleanup only),
 * report "FAIL: C: ..." lines and exit 1; the root checks the exit status.
 * SIGUSR2 to a child is re-sent every 20 ms until it exits.
 * Sabotage, right after READY: anonfd: eventfd A gets 1 more (8); sockets:
 * C sends a 6th datagram; fifo: C writes one more byte into the FIFO (the
 * root waits until the child has done it).
 */
#include "target.h"
#include "family.h"
#include <fcntl.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/timerfd.h>
#include <sys/wait.h>
#include <limits.h>
#include <time.h>

static volatile sig_atomic_t got_usr2;
static void on_usr2(int sig) { (void)sig; got_usr2 = 1; }

static void fill(unsigned char *b, size_t n, uint64_t off0, unsigned seed)
{
	for (size_t k = 0; k < n; k++)
		b[k] = pat(off0 + k, seed);
}

/* index of the first byte that differs from the pattern, or -1 */
static long mismatch(const unsigned char *b, size_t n, uint64_t off0, unsigned seed)
{
	for (size_t k = 0; k < n; k++)
		if (b[k] != pat(off0 + k, seed))
			return (long)k;
	return -1;
}

/* check b[0..n) against the pattern at off0; one FAIL line at the first difference */
static void check_pat(const char *what, const unsigned char *b, size_t n, uint64_t off0,
		      unsigned seed)
{
	long k = mismatch(b, n, off0, seed);
	if (k >= 0)
		ps_fail(what, "at byte %llu expected %#x found %#x",
			(unsigned long long)(off0 + k), pat(off0 + k, seed), b[k]);
}

/* fd -> want (keeping close-on-exec: dup2 would drop it) */
static void at(int fd, int want)
{
	ps_setup(fd >= 0, "create fd");
	if (fd == want)
		return;
	int fdfl = fcntl(fd, F_GETFD);
	ps_setup(fdfl >= 0, "F_GETFD");
	ps_setup(dup3(fd, want, (fdfl & FD_CLOEXEC) ? O_CLOEXEC : 0) == want, "dup3 to fixed number");
	close(fd);
}

__attribute__((noreturn)) static void child_exit(void) { _exit(ps_failures ? 1 : 0); }

/*
 * A child waits for SIGUSR2.  Under sabotage it acts once the root said
 * READY (flag *ready) and then says so in *done; otherwise it just pauses.
 */
static void child_wait_usr2(const uint64_t *ready, uint64_t *done, void (*sabotage)(void))
{
	int sab = ps_sabotage();
	while (!got_usr2) {
		if (!sab) {
			pause();
			continue;
		}
		if (__atomic_load_n(ready, __ATOMIC_SEQ_CST)) {
			sabotage();
			__atomic_store_n(done, 1, __ATOMIC_SEQ_CST);
			sab = 0;
			continue;
		}
		sleep_ms(2);
	}
}

/* The root, after READY: wait until the child's sabotage is done. */
static void root_await_sabotage(uint64_t *ready, const uint64_t *done)
{
	__atomic_store_n(ready, 1, __ATOMIC_SEQ_CST);
	if (!ps_sabotage())
		return;
	while (!__atomic_load_n(done, __ATOMIC_SEQ_CST))
		sleep_ms(1);
}

struct fdflags {
	int fd, fl, fdfl;
};

static void record_flags(struct fdflags *f, const int *fds, int n)
{
	for (int i = 0; i < n; i++) {
		f[i].fd = fds[i];
		f[i].fl = fcntl(fds[i], F_GETFL);
		f[i].fdfl = fcntl(fds[i], F_GETFD);
		ps_setup(f[i].fl >= 0 && f[i].fdfl >= 0, "record fd flags");
	}
}

static void check_flags(const char *who, const struct fdflags *f, int n)
{
	char what[96];
	for (int i = 0; i < n; i++) {
		int fl = fcntl(f[i].fd, F_GETFL), fdfl = fcntl(f[i].fd, F_GETFD);
		if (fl < 0 || fdfl < 0) {
			snprintf(what, sizeof(what), "%sfd %d", who, f[i].fd);
			ps_fail(what, "expected open found errno %d", errno);
			continue;
		}
		snprintf(what, sizeof(what), "%sfd %d F_GETFL", who, f[i].fd);
		PS_CHECK_U64(what, f[i].fl, fl);
		snprintf(what, sizeof(what), "%sfd %d F_GETFD", who, f[i].fd);
		PS_CHECK_U64(what, f[i].fdfl, fdfl);
	}
}

/* A "key:" line of /proc/self/fdinfo/FD as a number in base; -1 if missing. */
static long long fdinfo_num(int fd, const char *key, int base)
{
	char path[64], buf[4096];
	snprintf(path, sizeof(path), "/proc/self/fdinfo/%d", fd);
	int f = open(path, O_RDONLY | O_CLOEXEC);
	if (f < 0)
		return -1;
	ssize_t n = read(f, buf, sizeof(buf) - 1);
	close(f);
	if (n <= 0)
		return -1;
	buf[n] = 0;
	size_t kl = strlen(key);
	for (char *line = buf; line && *line; line = strchr(line, '\n') ? strchr(line, '\n') + 1 : NULL)
		if (!strncmp(line, key, kl))
			return (long long)strtoull(line + kl, NULL, base);
	return -1;
}

static void check_link(const char *what, int fd, const char *expected)
{
	char path[64], target[PATH_MAX];
	snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
	ssize_t n = readlink(path, target, sizeof(target) - 1);
	if (n < 0) {
		ps_fail(what, "expected '%s' found errno %d", expected, errno);
		return;
	}
	target[n] = 0;
	PS_CHECK_STR(what, expected, target);
}

/* read(2) of an fd that must be empty and non-blocking now: EAGAIN */
static void expect_eagain_read(const char *what, int fd)
{
	unsigned char b[256];      /* a signalfd wants >= 128 */
	ssize_t r;
	while ((r = read(fd, b, sizeof(b))) < 0 && errno == EINTR)
		;
	if (r >= 0)
		ps_fail(what, "expected EAGAIN found %zd more bytes", r);
	else if (errno != EAGAIN)
		ps_fail(what, "expected EAGAIN found errno %d", errno);
}

/* ----------------------------------------------------------------- anonfd */

#define FD_EVA 20
#define FD_EVB 21
#define FD_SIG 22
#define FD_T1 23
#define FD_T2 24
#define FD_EP 25
#define FD_PR 26
#define FD_PW 27
#define DATA_A 0x1111222233334444ull
#define DATA_P 0xabcdefull
#define DATA_P2 0x5555666677778888ull
#define DATA_B 42ull
#define SIG_VAL 1234
#define PIPE_LEN 10

struct evexp {
	uint64_t data;
	uint32_t events;
	const char *name;
};

/* epoll_wait(E, 0) must give exactly exp[0..n) as a set */
static void check_epoll(const char *what, const struct evexp *exp, int n)
{
	struct epoll_event ev[16];
	int got;
	while ((got = epoll_wait(FD_EP, ev, 16, 0)) < 0 && errno == EINTR)
		;
	if (got < 0) {
		ps_fail(what, "epoll_wait expected %d events found errno %d", n, errno);
		return;
	}
	int seen[16] = { 0 };
	for (int i = 0; i < got; i++) {
		int match = -1;
		for (int j = 0; j < n; j++)
			if (exp[j].data == ev[i].data.u64)
				match = j;
		if (match < 0) {
			ps_fail(what, "expected no event with data %#llx found events %#x",
				(unsigned long long)ev[i].data.u64, ev[i].events);
			continue;
		}
		if (seen[match]++)
			ps_fail(what, "expected one event for %s found another", exp[match].name);
		if (ev[i].events != exp[match].events)
			ps_fail(what, "%s expected events %#x found %#x", exp[match].name,
				exp[match].events, ev[i].events);
	}
	for (int j = 0; j < n; j++)
		if (!seen[j])
			ps_fail(what, "expected an event for %s (data %#llx) found none", exp[j].name,
				(unsigned long long)exp[j].data);
}

static void epoll_add(int fd, uint32_t events, uint64_t data)
{
	struct epoll_event ev = { .events = events, .data.u64 = data };
	ps_setup(epoll_ctl(FD_EP, EPOLL_CTL_ADD, fd, &ev) == 0, "epoll_ctl ADD");
}

static int mode_anonfd(void)
{
	pid_t me = getpid();
	uint64_t one = 1, two = 2;

	at(eventfd(5, EFD_NONBLOCK), FD_EVA);
	ps_setup(write(FD_EVA, &two, 8) == 8, "write eventfd A");
	at(eventfd(3, EFD_SEMAPHORE), FD_EVB);

	sigset_t usr2;
	sigemptyset(&usr2);
	sigaddset(&usr2, SIGUSR2);
	ps_setup(sigprocmask(SIG_BLOCK, &usr2, NULL) == 0, "block SIGUSR2");
	at(signalfd(-1, &usr2, SFD_NONBLOCK), FD_SIG);
	union sigval sv = { .sival_int = SIG_VAL };
	ps_setup(sigqueue(me, SIGUSR2, sv) == 0, "sigqueue SIGUSR2");

	at(timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC), FD_T1);
	struct itimerspec t1 = { .it_interval = { 7, 0 }, .it_value = { 1000, 0 } };
	ps_setup(timerfd_settime(FD_T1, 0, &t1, NULL) == 0, "timerfd_settime T1");
	at(timerfd_create(CLOCK_REALTIME, TFD_NONBLOCK), FD_T2);
	struct itimerspec t2 = { .it_interval = { 0, 50000000 }, .it_value = { 0, 50000000 } };
	ps_setup(timerfd_settime(FD_T2, 0, &t2, NULL) == 0, "timerfd_settime T2");

	int p[2];
	ps_setup(pipe(p) == 0, "pipe");
	at(p[0], FD_PR);
	at(p[1], FD_PW);
	ps_setup(fcntl(FD_PR, F_SETFL, O_NONBLOCK) == 0, "O_NONBLOCK pipe read end");
	unsigned char pbuf[PIPE_LEN];
	fill(pbuf, PIPE_LEN, 0, 7);
	ps_setup(write(FD_PW, pbuf, PIPE_LEN) == PIPE_LEN, "write pipe");

	at(epoll_create1(EPOLL_CLOEXEC), FD_EP);
	epoll_add(FD_EVA, EPOLLIN, DATA_A);
	epoll_add(FD_PR, EPOLLIN | EPOLLET, DATA_P);
	epoll_add(FD_EVB, EPOLLOUT, DATA_B);

	/*
	 * T2's expirations: fdinfo counts the ones since the last read only
	 * when the timer is asked (timerfd_gettime folds them into "ticks").
	 */
	double deadline = mono() + 5.0;
	for (;;) {
		struct itimerspec cur;
		ps_setup(timerfd_gettime(FD_T2, &cur) == 0, "timerfd_gettime T2");
		if (fdinfo_num(FD_T2, "ticks:", 10) >= 2)
			break;
		if (mono() > deadline)
			setup_fail("T2: 2 expirations not pending within 5 s");
		sleep_ms(10);
	}
	static const int fds[] = { FD_EVA, FD_EVB, FD_SIG, FD_T1, FD_T2, FD_EP, FD_PR, FD_PW };
	enum { NFDS = sizeof(fds) / sizeof(fds[0]) };
	struct fdflags saved[NFDS];
	record_flags(saved, fds, NFDS);

	ps_ready();
	if (ps_sabotage())
		ps_setup(write(FD_EVA, &one, 8) == 8, "sabotage write eventfd A");
	ps_wait_usr1();

	check_flags("", saved, NFDS);
	PS_CHECK_U64("fd 20 (eventfd A) O_NONBLOCK", O_NONBLOCK, fcntl(FD_EVA, F_GETFL) & O_NONBLOCK);
	PS_CHECK_U64("fd 21 (eventfd B) O_NONBLOCK", 0, fcntl(FD_EVB, F_GETFL) & O_NONBLOCK);
	PS_CHECK_U64("fd 23 (timerfd T1) FD_CLOEXEC", FD_CLOEXEC, fcntl(FD_T1, F_GETFD));
	PS_CHECK_U64("fd 25 (epoll) FD_CLOEXEC", FD_CLOEXEC, fcntl(FD_EP, F_GETFD));
	PS_CHECK_U64("fd 23 (timerfd T1) fdinfo clockid", CLOCK_MONOTONIC, fdinfo_num(FD_T1, "clockid:", 10));
	PS_CHECK_U64("fd 24 (timerfd T2) fdinfo clockid", CLOCK_REALTIME, fdinfo_num(FD_T2, "clockid:", 10));
	PS_CHECK_U64("fd 22 (signalfd) fdinfo sigmask", 1ull << (SIGUSR2 - 1),
		     fdinfo_num(FD_SIG, "sigmask:", 16));

	/* epoll first: reading A would take its EPOLLIN away */
	const struct evexp exp1[] = {
		{ DATA_A, EPOLLIN, "fd 20 (eventfd A)" },
		{ DATA_P, EPOLLIN, "fd 26 (pipe, EPOLLET)" },
		{ DATA_B, EPOLLOUT, "fd 21 (eventfd B)" },
	};
	check_epoll("epoll fd 25: first epoll_wait", exp1, 3);

	uint64_t v = 0;
	ssize_t r = read(FD_EVA, &v, 8);
	if (r != 8)
		ps_fail("eventfd A read", "expected 8 bytes found %zd (errno %d)", r, errno);
	else
		PS_CHECK_U64("eventfd A count", 7, v);
	expect_eagain_read("eventfd A second read", FD_EVA);

	for (int i = 0; i < 3; i++) {
		char what[64];
		v = 0;
		r = read(FD_EVB, &v, 8);
		snprintf(what, sizeof(what), "eventfd B (semaphore) read %d", i + 1);
		if (r != 8)
			ps_fail(what, "expected 8 bytes found %zd (errno %d)", r, errno);
		else
			PS_CHECK_U64(what, 1, v);
	}
	ps_setup(fcntl(FD_EVB, F_SETFL, O_NONBLOCK) == 0, "O_NONBLOCK eventfd B");
	expect_eagain_read("eventfd B read 4", FD_EVB);

	sigset_t pend, mask;
	sigpending(&pend);
	sigprocmask(SIG_BLOCK, NULL, &mask);
	PS_CHECK_U64("SIGUSR2 pending", 1, sigismember(&pend, SIGUSR2));
	PS_CHECK_U64("SIGUSR2 blocked", 1, sigismember(&mask, SIGUSR2));
	struct signalfd_siginfo si;
	memset(&si, 0, sizeof(si));
	r = read(FD_SIG, &si, sizeof(si));
	if (r != (ssize_t)sizeof(si)) {
		ps_fail("signalfd read", "expected %zu bytes found %zd (errno %d)", sizeof(si), r, errno);
	} else {
		PS_CHECK_U64("signalfd ssi_signo", SIGUSR2, si.ssi_signo);
		PS_CHECK_U64("signalfd ssi_code", (uint32_t)SI_QUEUE, (uint32_t)si.ssi_code);
		PS_CHECK_U64("signalfd ssi_int", SIG_VAL, si.ssi_int);
		PS_CHECK_U64("signalfd ssi_pid", me, si.ssi_pid);
		PS_CHECK_U64("signalfd ssi_uid", getuid(), si.ssi_uid);
	}
	expect_eagain_read("signalfd second read", FD_SIG);

	struct itimerspec cur;
	if (timerfd_gettime(FD_T1, &cur) != 0) {
		ps_fail("timerfd T1 gettime", "expected success found errno %d", errno);
	} else {
		PS_CHECK_U64("timerfd T1 interval tv_sec", 7, cur.it_interval.tv_sec);
		PS_CHECK_U64("timerfd T1 interval tv_nsec", 0, cur.it_interval.tv_nsec);
		if (cur.it_value.tv_sec < 900 || cur.it_value.tv_sec >= 1000)
			ps_fail("timerfd T1 time left", "expected 900..1000 s found %lld.%09ld s",
				(long long)cur.it_value.tv_sec, cur.it_value.tv_nsec);
	}
	if (timerfd_gettime(FD_T2, &cur) != 0) {
		ps_fail("timerfd T2 gettime", "expected success found errno %d", errno);
	} else {
		PS_CHECK_U64("timerfd T2 interval tv_sec", 0, cur.it_interval.tv_sec);
		PS_CHECK_U64("timerfd T2 interval tv_nsec", 50000000, cur.it_interval.tv_nsec);
	}
	v = 0;
	r = read(FD_T2, &v, 8);
	if (r != 8)
		ps_fail("timerfd T2 read", "expected 8 bytes found %zd (errno %d)", r, errno);
	else if (v < 2)
		ps_fail("timerfd T2 expirations", "expected >= 2 found %llu", (unsigned long long)v);

	struct epoll_event ev = { .events = EPOLLIN, .data.u64 = DATA_P2 };
	if (epoll_ctl(FD_EP, EPOLL_CTL_MOD, FD_PR, &ev) != 0)
		ps_fail("epoll_ctl MOD fd 26", "expected success found errno %d", errno);
	if (epoll_ctl(FD_EP, EPOLL_CTL_DEL, FD_EVA, NULL) != 0)
		ps_fail("epoll_ctl DEL fd 20", "expected success found errno %d", errno);
	const struct evexp exp2[] = {
		{ DATA_P2, EPOLLIN, "fd 26 (pipe, after MOD)" },
		{ DATA_B, EPOLLOUT, "fd 21 (eventfd B)" },
	};
	check_epoll("epoll fd 25: after MOD and DEL", exp2, 2);

	unsigned char got[64];
	r = read(FD_PR, got, sizeof(got));
	if (r != PIPE_LEN)
		ps_fail("pipe fd 26 read", "expected %d bytes found %zd (errno %d)", PIPE_LEN, r, errno);
	else
		check_pat("pipe fd 26 content", got, PIPE_LEN, 0, 7);
	expect_eagain_read("pipe fd 26 second read", FD_PR);
	return ps_finish();
}

/* ---------------------------------------------------------------- sockets */

#define FD_S0 20
#define FD_S1 21
#define FD_D0 22
#define FD_D1 23
#define FD_Q0 24
#define FD_Q1 25
#define STREAM_LEN 100000
#define BACK_LEN 3000
#define NDG 5
#define NSQ 3
#define LAST_DG_LEN 77
#define EXTRA_DG_LEN 60
#define MSGBUF 65536

static const int dg_len[NDG] = { 1, 100, 1000, 5000, 60 };
static const int sq_len[NSQ] = { 10, 2000, 3 };

/* control words in a shared page */
enum { K_CHILD_READY, K_SENT, K_READY, K_SABOTAGED };

static void sock_sabotage(void)
{
	unsigned char b[EXTRA_DG_LEN];
	fill(b, sizeof(b), 0, 15);
	ps_setup(send(FD_D1, b, sizeof(b), MSG_DONTWAIT) == (ssize_t)sizeof(b), "sabotage send");
}

/* recv one message with MSG_DONTWAIT; the length, -1 on error (errno) */
static ssize_t recv_now(int fd, unsigned char *b, size_t n, int *flags)
{
	struct iovec iov = { b, n };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };
	ssize_t r;
	while ((r = recvmsg(fd, &mh, MSG_DONTWAIT)) < 0 && errno == EINTR)
		;
	*flags = mh.msg_flags;
	return r;
}

/* messages of the given lengths (pattern seed base+i), in order, then EAGAIN */
static void check_messages(const char *name, int fd, const int *len, int n, unsigned base,
			   unsigned char *buf)
{
	char what[96];
	for (int i = 0; i < n; i++) {
		int fl = 0;
		ssize_t r = recv_now(fd, buf, MSGBUF, &fl);
		snprintf(what, sizeof(what), "%s message %d", name, i + 1);
		if (r < 0) {
			ps_fail(what, "expected %d bytes found errno %d", len[i], errno);
			return;
		}
		if (r != len[i] || (fl & MSG_TRUNC)) {
			ps_fail(what, "expected %d bytes found %zd (flags %#x)", len[i], r, fl);
			return;
		}
		snprintf(what, sizeof(what), "%s message %d content", name, i + 1);
		check_pat(what, buf, r, 0, base + i);
	}
	int fl = 0;
	ssize_t r = recv_now(fd, buf, MSGBUF, &fl);
	snprintf(what, sizeof(what), "%s after %d messages", name, n);
	if (r >= 0)
		ps_fail(what, "expected EAGAIN found a message of %zd bytes", r);
	else if (errno != EAGAIN)
		ps_fail(what, "expected EAGAIN found errno %d", errno);
}

/* exactly len bytes of the pattern (seed), then EAGAIN; all queued already */
static void check_stream(const char *name, int fd, size_t len, unsigned seed, unsigned char *buf)
{
	char what[96];
	size_t total = 0;
	int bad = 0;
	ssize_t r;
	for (;;) {
		int fl;
		r = recv_now(fd, buf, MSGBUF, &fl);
		if (r <= 0)
			break;
		if (!bad) {
			size_t n = total + r > len ? (total < len ? len - total : 0) : (size_t)r;
			long k = mismatch(buf, n, total, seed);
			if (k >= 0) {
				snprintf(what, sizeof(what), "%s content", name);
				ps_fail(what, "at byte %zu expected %#x found %#x", total + k,
					pat(total + k, seed), buf[k]);
				bad = 1;
			}
		}
		total += r;
	}
	snprintf(what, sizeof(what), "%s end of data", name);
	if (r == 0)
		ps_fail(what, "expected EAGAIN found EOF after %zu bytes", total);
	else if (errno != EAGAIN)
		ps_fail(what, "expected EAGAIN found errno %d after %zu bytes", errno, total);
	snprintf(what, sizeof(what), "%s bytes", name);
	PS_CHECK_U64(what, len, total);
}

static void check_sotype(const char *what, int fd, int type)
{
	int t = -1;
	socklen_t l = sizeof(t);
	if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &t, &l) != 0)
		ps_fail(what, "expected a socket found errno %d", errno);
	else
		PS_CHECK_U64(what, type, t);
}

__attribute__((noreturn)) static void sockets_child(uint64_t *k)
{
	close(FD_S0);
	close(FD_D0);
	close(FD_Q0);
	unsigned char *buf = malloc(STREAM_LEN > MSGBUF ? STREAM_LEN : MSGBUF);
	ps_setup(buf != NULL, "C: malloc");

	int sndbuf = 1 << 20;
	ps_setup(setsockopt(FD_S1, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof(sndbuf)) == 0,
		 "C: SO_SNDBUF");
	fill(buf, STREAM_LEN, 0, 1);
	size_t sent = 0;
	double deadline = mono() + 5.0;
	while (sent < STREAM_LEN) {
		ssize_t w = send(FD_S1, buf + sent, STREAM_LEN - sent, MSG_DONTWAIT);
		if (w > 0) {
			sent += w;
			continue;
		}
		ps_setup(w < 0 && (errno == EAGAIN || errno == EINTR), "C: send stream");
		if (mono() > deadline)
			setup_fail("C: 100000 bytes not into the stream socket within 5 s");
		sleep_ms(1);
	}
	for (int i = 0; i < NDG; i++) {
		fill(buf, dg_len[i], 0, 10 + i);
		ps_setup(send(FD_D1, buf, dg_len[i], MSG_DONTWAIT) == dg_len[i], "C: send datagram");
	}
	for (int i = 0; i < NSQ; i++) {
		fill(buf, sq_len[i], 0, 20 + i);
		ps_setup(send(FD_Q1, buf, sq_len[i], MSG_DONTWAIT) == sq_len[i], "C: send seqpacket");
	}
	static const int fds[] = { FD_S1, FD_D1, FD_Q1 };
	struct fdflags saved[3];
	record_flags(saved, fds, 3);
	__atomic_store_n(&k[K_SENT], sent, __ATOMIC_SEQ_CST);
	__atomic_store_n(&k[K_CHILD_READY], 1, __ATOMIC_SEQ_CST);

	child_wait_usr2(&k[K_READY], &k[K_SABOTAGED], sock_sabotage);

	check_flags("C: ", saved, 3);
	check_sotype("C: fd 21 SO_TYPE", FD_S1, SOCK_STREAM);
	check_sotype("C: fd 23 SO_TYPE", FD_D1, SOCK_DGRAM);
	check_sotype("C: fd 25 SO_TYPE", FD_Q1, SOCK_SEQPACKET);
	check_stream("C: stream fd 21", FD_S1, BACK_LEN, 2, buf);
	check_messages("C: dgram fd 23", FD_D1, NULL, 0, 0, buf);
	check_messages("C: seqpacket fd 25", FD_Q1, NULL, 0, 0, buf);
	fill(buf, LAST_DG_LEN, 0, 30);
	ssize_t w = send(FD_D1, buf, LAST_DG_LEN, MSG_DONTWAIT);
	if (w != LAST_DG_LEN)
		ps_fail("C: send datagram on fd 23", "expected %d found %zd (errno %d)", LAST_DG_LEN, w,
			errno);
	child_exit();
}

static int mode_sockets(void)
{
	uint64_t *k = shared_area(4096);
	int sv[2];
	ps_setup(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0, "socketpair stream");
	at(sv[0], FD_S0);
	at(sv[1], FD_S1);
	ps_setup(socketpair(AF_UNIX, SOCK_DGRAM, 0, sv) == 0, "socketpair dgram");
	at(sv[0], FD_D0);
	at(sv[1], FD_D1);
	ps_setup(socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) == 0,
		 "socketpair seqpacket");
	at(sv[0], FD_Q0);
	at(sv[1], FD_Q1);
	ps_setup(fcntl(FD_D0, F_SETFL, O_NONBLOCK) == 0, "O_NONBLOCK fd 22");

	pid_t c = fork_child();
	if (c == 0)
		sockets_child(k);
	close(FD_S1);
	close(FD_D1);
	close(FD_Q1);

	unsigned char *buf = malloc(MSGBUF);
	ps_setup(buf != NULL, "malloc");
	fill(buf, BACK_LEN, 0, 2);
	ps_setup(write(FD_S0, buf, BACK_LEN) == BACK_LEN, "write stream fd 20");

	double deadline = mono() + 5.0;
	while (!__atomic_load_n(&k[K_CHILD_READY], __ATOMIC_SEQ_CST)) {
		setup_alive(c, "C");
		if (mono() > deadline)
			setup_fail("C not ready within 5 s");
		sleep_ms(1);
	}
	size_t sent = __atomic_load_n(&k[K_SENT], __ATOMIC_SEQ_CST);
	static const int fds[] = { FD_S0, FD_D0, FD_Q0 };
	struct fdflags saved[3];
	record_flags(saved, fds, 3);

	ps_ready();
	root_await_sabotage(&k[K_READY], &k[K_SABOTAGED]);
	ps_wait_usr1();

	check_flags("root: ", saved, 3);
	PS_CHECK_U64("root: fd 22 O_NONBLOCK", O_NONBLOCK, fcntl(FD_D0, F_GETFL) & O_NONBLOCK);
	PS_CHECK_U64("root: fd 24 FD_CLOEXEC", FD_CLOEXEC, fcntl(FD_Q0, F_GETFD));
	check_sotype("root: fd 20 SO_TYPE", FD_S0, SOCK_STREAM);
	check_sotype("root: fd 22 SO_TYPE", FD_D0, SOCK_DGRAM);
	check_sotype("root: fd 24 SO_TYPE", FD_Q0, SOCK_SEQPACKET);
	PS_CHECK_U64("root: bytes C sent into the stream", STREAM_LEN, sent);
	check_stream("root: stream fd 20", FD_S0, sent, 1, buf);
	check_messages("root: dgram fd 22", FD_D0, dg_len, NDG, 10, buf);
	check_messages("root: seqpacket fd 24", FD_Q0, sq_len, NSQ, 20, buf);

	tell_and_reap(c, SIGUSR2, "C");

	static const int last_len[1] = { LAST_DG_LEN };
	check_messages("root: dgram fd 22 from C after the check", FD_D0, last_len, 1, 30, buf);
	int fl;
	ssize_t r = recv_now(FD_S0, buf, MSGBUF, &fl);
	if (r != 0)
		ps_fail("root: stream fd 20 after C exited", "expected EOF found %zd (errno %d)", r,
			r < 0 ? errno : 0);
	r = recv_now(FD_Q0, buf, MSGBUF, &fl);
	if (r != 0)
		ps_fail("root: seqpacket fd 24 after C exited", "expected EOF found %zd (errno %d)", r,
			r < 0 ? errno : 0);
	return ps_finish();
}

/* ------------------------------------------------------------------- fifo */

#define FD_FR 20
#define FD_FW 21
#define FD_MFD 22
#define FIFO_LEN 20000
#define MFD_LEN (256 << 10)
#define MFD_POS 4096
#define MFD_MAGIC_OFF 8192
#define PG 4096
#define AREA_LEN (1 << 20)
#define AREA_PAGES (AREA_LEN / PG)
#define ROOT_PG1 0
#define CHILD_PG 100
#define ROOT_PG2 200
#define MAGIC_MFD 0x6d656d66646d6167ull
#define MAGIC_AREA 0x616e6f6e6d616769ull

static void fifo_sabotage(void)
{
	ps_setup(write(FD_FW, "\xff", 1) == 1, "sabotage write FIFO");
}

/* C after SIGUSR2: both magics, pages 0/100/200, zeros elsewhere */
static void fifo_child_check(const unsigned char *m, const unsigned char *a, const char *fifo_path)
{
	check_link("C: /proc/self/fd/21", FD_FW, fifo_path);
	uint64_t w;
	memcpy(&w, m + MFD_MAGIC_OFF, 8);
	PS_CHECK_U64("C: root's magic in the memfd mapping", MAGIC_MFD, w);
	check_pat("C: memfd mapping before the magic", m, MFD_MAGIC_OFF, 0, 4);
	check_pat("C: memfd mapping after the magic", m + MFD_MAGIC_OFF + 8,
		  MFD_LEN - MFD_MAGIC_OFF - 8, MFD_MAGIC_OFF + 8, 4);

	memcpy(&w, a + ROOT_PG1 * PG, 8);
	PS_CHECK_U64("C: root's magic in shared page 0", MAGIC_AREA, w);
	check_pat("C: shared page 0", a + ROOT_PG1 * PG + 8, PG - 8, 8, 5);
	check_pat("C: shared page 100 (C's)", a + CHILD_PG * PG, PG, 0, 6);
	check_pat("C: shared page 200 (root's)", a + ROOT_PG2 * PG, PG, 0, 7);
	for (int p = 0; p < AREA_PAGES; p++) {
		if (p == ROOT_PG1 || p == CHILD_PG || p == ROOT_PG2)
			continue;
		for (int i = 0; i < PG; i++)
			if (a[p * PG + i]) {
				ps_fail("C: untouched shared page", "%d byte %d expected 0 found %#x", p,
					i, a[p * PG + i]);
				p = AREA_PAGES;
				break;
			}
	}
}

static int mode_fifo(const char *dir)
{
	ps_setup(dir != NULL, "argv[2] (scratch directory)");
	ps_setup(sysconf(_SC_PAGESIZE) == PG, "page size 4096");
	char rdir[PATH_MAX], fifo_path[PATH_MAX + 16];
	ps_setup(realpath(dir, rdir) != NULL, "realpath scratch directory");
	snprintf(fifo_path, sizeof(fifo_path), "%s/fifo", rdir);
	ps_setup(mkfifo(fifo_path, 0600) == 0, "mkfifo");
	at(open(fifo_path, O_RDONLY | O_NONBLOCK), FD_FR);

	uint64_t *k = shared_area(4096);
	unsigned char *buf = malloc(MFD_LEN);
	ps_setup(buf != NULL, "malloc");
	fill(buf, MFD_LEN, 0, 4);
	at(memfd_create("ipc-memfd", MFD_CLOEXEC), FD_MFD);
	ps_setup(write(FD_MFD, buf, MFD_LEN) == MFD_LEN, "write memfd");
	ps_setup(lseek(FD_MFD, MFD_POS, SEEK_SET) == MFD_POS, "lseek memfd");
	unsigned char *m = mmap(NULL, MFD_LEN, PROT_READ | PROT_WRITE, MAP_SHARED, FD_MFD, 0);
	ps_setup(m != MAP_FAILED, "mmap memfd");
	ps_setup(mismatch(m, MFD_LEN, 0, 4) < 0, "memfd mapping shows the pattern");

	unsigned char *a = shared_area(AREA_LEN);
	fill(a + ROOT_PG1 * PG, PG, 0, 5);
	fill(a + ROOT_PG2 * PG, PG, 0, 7);

	pid_t c = fork_child();
	if (c == 0) {
		close(FD_FR);
		close(FD_MFD);
		at(open(fifo_path, O_WRONLY), FD_FW);
		fill(a + CHILD_PG * PG, PG, 0, 6);
		fill(buf, FIFO_LEN, 0, 3);
		ps_setup(write(FD_FW, buf, FIFO_LEN) == FIFO_LEN, "C: write FIFO");
		int fl = fcntl(FD_FW, F_GETFL), fdfl = fcntl(FD_FW, F_GETFD);
		__atomic_store_n(&k[K_CHILD_READY], 1, __ATOMIC_SEQ_CST);
		child_wait_usr2(&k[K_READY], &k[K_SABOTAGED], fifo_sabotage);
		PS_CHECK_U64("C: fd 21 F_GETFL", fl, fcntl(FD_FW, F_GETFL));
		PS_CHECK_U64("C: fd 21 F_GETFD", fdfl, fcntl(FD_FW, F_GETFD));
		fifo_child_check(m, a, fifo_path);
		child_exit();
	}

	double deadline = mono() + 5.0;
	int queued = -1;
	while (!__atomic_load_n(&k[K_CHILD_READY], __ATOMIC_SEQ_CST) ||
	       ioctl(FD_FR, FIONREAD, &queued) != 0 || queued != FIFO_LEN) {
		setup_alive(c, "C");
		if (mono() > deadline)
			setup_fail("C: 20000 bytes not in the FIFO within 5 s");
		sleep_ms(1);
	}
	struct stat st;
	ps_setup(stat(fifo_path, &st) == 0, "stat fifo");
	ino_t fifo_ino = st.st_ino;
	static const int fds[] = { FD_FR, FD_MFD };
	struct fdflags saved[2];
	record_flags(saved, fds, 2);

	ps_ready();
	root_await_sabotage(&k[K_READY], &k[K_SABOTAGED]);
	ps_wait_usr1();

	/* the FIFO */
	check_flags("root: ", saved, 2);
	PS_CHECK_U64("root: fd 20 access mode|O_NONBLOCK", O_RDONLY | O_NONBLOCK,
		     fcntl(FD_FR, F_GETFL) & (O_ACCMODE | O_NONBLOCK));
	PS_CHECK_U64("root: fd 22 FD_CLOEXEC", FD_CLOEXEC, fcntl(FD_MFD, F_GETFD));
	check_link("root: /proc/self/fd/20", FD_FR, fifo_path);
	if (fstat(FD_FR, &st) != 0) {
		ps_fail("root: fstat fd 20", "expected success found errno %d", errno);
	} else {
		PS_CHECK_U64("root: fd 20 is a FIFO", 1, S_ISFIFO(st.st_mode));
		PS_CHECK_U64("root: fd 20 inode == DIR/fifo inode", fifo_ino, st.st_ino);
	}
	queued = -1;
	ioctl(FD_FR, FIONREAD, &queued);
	PS_CHECK_U64("root: FIFO bytes queued", FIFO_LEN, queued);
	size_t total = 0;
	for (;;) {
		ssize_t r = read(FD_FR, buf + total, FIFO_LEN - total);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0) {
			ps_fail("root: read FIFO", "expected %d bytes found %zu then %zd (errno %d)",
				FIFO_LEN, total, r, r < 0 ? errno : 0);
			break;
		}
		total += r;
		if (total == FIFO_LEN)
			break;
	}
	check_pat("root: FIFO content", buf, total, 0, 3);
	expect_eagain_read("root: FIFO after 20000 bytes", FD_FR);

	/* the memfd: fd, position, size, content through read() and the mapping */
	check_link("root: /proc/self/fd/22", FD_MFD, "/memfd:ipc-memfd (deleted)");
	PS_CHECK_U64("root: memfd position", MFD_POS, lseek(FD_MFD, 0, SEEK_CUR));
	if (fstat(FD_MFD, &st) != 0)
		ps_fail("root: fstat fd 22", "expected success found errno %d", errno);
	else
		PS_CHECK_U64("root: memfd size", MFD_LEN, st.st_size);
	total = 0;
	for (;;) {
		ssize_t r = read(FD_MFD, buf + total, MFD_LEN - MFD_POS - total);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			break;
		total += r;
	}
	PS_CHECK_U64("root: memfd bytes read from the position", MFD_LEN - MFD_POS, total);
	check_pat("root: memfd content read()", buf, total, MFD_POS, 4);
	PS_CHECK_U64("root: memfd position after reading", MFD_LEN, lseek(FD_MFD, 0, SEEK_CUR));
	PS_CHECK_U64("root: memfd read at the end", 0, read(FD_MFD, buf, 16));
	check_pat("root: memfd mapping", m, MFD_LEN, 0, 4);

	/* the anonymous shared area */
	check_pat("root: shared page 0", a + ROOT_PG1 * PG, PG, 0, 5);
	check_pat("root: shared page 100 (C's)", a + CHILD_PG * PG, PG, 0, 6);
	check_pat("root: shared page 200", a + ROOT_PG2 * PG, PG, 0, 7);

	/* magic words: through the memfd's own fd, and in C's mappings */
	uint64_t w = MAGIC_MFD;
	memcpy(m + MFD_MAGIC_OFF, &w, 8);
	w = MAGIC_AREA;
	memcpy(a + ROOT_PG1 * PG, &w, 8);
	w = 0;
	PS_CHECK_U64("root: pread memfd magic", 8, pread(FD_MFD, &w, 8, MFD_MAGIC_OFF));
	PS_CHECK_U64("root: magic written through the mapping, seen by pread", MAGIC_MFD, w);

	tell_and_reap(c, SIGUSR2, "C");

	ssize_t r;
	while ((r = read(FD_FR, buf, 16)) < 0 && errno == EINTR)
		;
	if (r != 0)
		ps_fail("root: FIFO after C exited", "expected EOF found %zd (errno %d)", r,
			r < 0 ? errno : 0);
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

	if (mode && !strcmp(mode, "anonfd"))
		return mode_anonfd();
	if (mode && !strcmp(mode, "sockets"))
		return mode_sockets();
	if (mode && !strcmp(mode, "fifo"))
		return mode_fifo(argc >= 3 ? argv[2] : NULL);
	ps_bad_mode(mode);
	return 2;
}
