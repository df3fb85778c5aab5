/*
 * waits: one blocking wait of WAIT_S seconds, interrupted by a checkpoint,
 * must carry on as the kernel would have carried it on: never an EINTR,
 * never a return before the time asked, and (the test checks this from the
 * elapsed time printed) a relative wait resumes with its remaining time.
 *
 *   ./waits nanosleep_rem   nanosleep(WAIT_S, &rem)
 *   ./waits nanosleep_null  nanosleep(WAIT_S, NULL)
 *   ./waits clock_abs       clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, now + WAIT_S)
 *   ./waits poll            poll() on a pipe nobody writes, timeout WAIT_S
 *   ./waits select          select() on it, timeout WAIT_S
 *   ./waits epoll           epoll_wait() on it, timeout WAIT_S
 *   ./waits futex           FUTEX_WAIT with a relative timeout WAIT_S
 *   ./waits read            read() on a pipe a child writes to after WAIT_S
 *
 * SIGUSR1 (the handshake's) is blocked during the wait, so only the
 * checkpoint can interrupt it; "ELAPSED s" is printed when it returns.
 * Sabotage: alarm(1) with a handler, a real EINTR.
 */
#include "target.h"
#include <linux/futex.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/select.h>
#include <sys/wait.h>
#include <time.h>

#define WAIT_S 4

static void on_alarm(int sig) { (void)sig; }

/* FUTEX_WAIT as glibc's own futex waits call it: an inline syscall, its
 * number loaded right before (syscall(2) takes it in a register). */
static long futex_wait(int *word, int val, const struct timespec *rel)
{
	long ret;
	register const struct timespec *r10 __asm__("r10") = rel;
	__asm__ volatile("mov $202, %%eax\n\tsyscall"
			 : "=a"(ret)
			 : "D"(word), "S"(FUTEX_WAIT_PRIVATE), "d"(val), "r"(r10)
			 : "rcx", "r11", "memory");
	return ret;
}

static double now_mono(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void check_ret(const char *call, long r, int err, long expected)
{
	if (r < 0 && err == EINTR)
		ps_fail(call, "expected no EINTR found EINTR");
	else if (r < 0 && err >= 512)
		ps_fail(call, "expected no error found leaked kernel errno %d", err);
	else if (r != expected)
		ps_fail(call, "expected %ld found %ld (errno %d)", expected, r, r < 0 ? err : 0);
}

int main(int argc, char **argv)
{
	const char *mode = argc >= 2 ? argv[1] : "";
	ps_install_usr1();
	sigset_t usr1;
	sigemptyset(&usr1);
	sigaddset(&usr1, SIGUSR1);
	ps_setup(sigprocmask(SIG_BLOCK, &usr1, NULL) == 0, "block SIGUSR1");
	if (ps_sabotage()) {
		struct sigaction sa = { .sa_handler = on_alarm };
		sigaction(SIGALRM, &sa, NULL);
		alarm(1);
	}
	int p[2];
	ps_setup(pipe(p) == 0, "pipe");
	pid_t child = -1;
	if (!strcmp(mode, "read")) {
		child = fork();
		ps_setup(child >= 0, "fork");
		if (child == 0) {
			struct timespec req = { WAIT_S, 0 };
			while (nanosleep(&req, &req) != 0 && errno == EINTR)
				;
			_exit(write(p[1], "x", 1) == 1 ? 0 : 1);
		}
	}
	double t0 = now_mono();
	ps_ready();
	long r;
	int err;
	if (!strcmp(mode, "nanosleep_rem")) {
		struct timespec req = { WAIT_S, 0 }, rem = { 0, 0 };
		r = nanosleep(&req, &rem), err = errno;
		check_ret("nanosleep", r, err, 0);
	} else if (!strcmp(mode, "nanosleep_null")) {
		struct timespec req = { WAIT_S, 0 };
		r = nanosleep(&req, NULL), err = errno;
		check_ret("nanosleep", r, err, 0);
	} else if (!strcmp(mode, "clock_abs")) {
		struct timespec dl;
		clock_gettime(CLOCK_MONOTONIC, &dl);
		dl.tv_sec += WAIT_S;
		r = clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &dl, NULL);
		check_ret("clock_nanosleep", r ? -1 : 0, r, 0);
	} else if (!strcmp(mode, "poll")) {
		struct pollfd pfd = { .fd = p[0], .events = POLLIN };
		r = poll(&pfd, 1, WAIT_S * 1000), err = errno;
		check_ret("poll", r, err, 0);
	} else if (!strcmp(mode, "select")) {
		fd_set rd;
		FD_ZERO(&rd);
		FD_SET(p[0], &rd);
		struct timeval tv = { WAIT_S, 0 };
		r = select(p[0] + 1, &rd, NULL, NULL, &tv), err = errno;
		check_ret("select", r, err, 0);
	} else if (!strcmp(mode, "epoll")) {
		int ep = epoll_create1(0);
		struct epoll_event ev = { .events = EPOLLIN }, out;
		ps_setup(ep >= 0 && epoll_ctl(ep, EPOLL_CTL_ADD, p[0], &ev) == 0, "epoll");
		r = epoll_wait(ep, &out, 1, WAIT_S * 1000), err = errno;
		check_ret("epoll_wait", r, err, 0);
	} else if (!strcmp(mode, "futex")) {
		static int word;
		struct timespec rel = { WAIT_S, 0 };
		r = futex_wait(&word, 0, &rel);
		err = r < 0 ? (int)-r : 0;
		check_ret("futex", r == -ETIMEDOUT ? 0 : (r == 0 ? 1 : -1), err, 0);
	} else if (!strcmp(mode, "read")) {
		char c = 0;
		r = read(p[0], &c, 1), err = errno;
		check_ret("read", r, err, 1);
		int status;
		ps_setup(waitpid(child, &status, 0) == child, "waitpid");
		PS_CHECK_U64("child exit status", 0, status);
	} else {
		ps_bad_mode(mode);
	}
	double elapsed = now_mono() - t0;
	dprintf(1, "ELAPSED %.3f\n", elapsed);
	if (elapsed < WAIT_S - 0.01)
		ps_fail("wait", "expected >= %d s found %.3f s", WAIT_S, elapsed);
	sigprocmask(SIG_UNBLOCK, &usr1, NULL);
	ps_wait_usr1();
	return ps_finish();
}
