/*
 * Helpers of the targets that are process trees (tree.c, ipc.c): time,
 * shared pages, a data pattern, children that die with their parent, and
 * telling a child to check itself and reaping it.
 */
#ifndef PS_FAMILY_H
#define PS_FAMILY_H

#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>

static double mono(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void sleep_ms(long ms)
{
	struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
	nanosleep(&ts, NULL);   /* EINTR just ends it early */
}

static void setup_fail(const char *what)
{
	dprintf(1, "SETUP ERROR: %s\n", what);
	_exit(2);
}

static void *shared_area(size_t len)
{
	void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	ps_setup(p != MAP_FAILED, "mmap shared");
	return p;
}

static unsigned char pat(uint64_t off, unsigned seed)
{
	uint64_t x = (off + (uint64_t)seed * 0x10001ull) * 0x9e3779b97f4a7c15ull;
	return (unsigned char)(x >> 56) ^ (unsigned char)(off >> 12);
}

/* fork; in the child: die with the parent, and make sure it was not gone already */
static pid_t fork_child(void)
{
	pid_t parent = getpid();
	pid_t pid = fork();
	ps_setup(pid >= 0, "fork");
	if (pid == 0) {
		if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0)
			_exit(2);
		if (getppid() != parent)
			_exit(2);
	}
	return pid;
}

/* Before READY: a child that is already gone is a setup error. */
static void setup_alive(pid_t pid, const char *who)
{
	int st;
	pid_t r = waitpid(pid, &st, WNOHANG);
	if (r == pid) {
		dprintf(1, "SETUP ERROR: %s exited during setup (status %#x)\n", who, st);
		_exit(2);
	}
}

/*
 * Send sig (0: none) every 20 ms until pid exits, reap it and check it
 * exited with 0.  Gives up after 5 s (then SIGKILL + reap).
 */
static void tell_and_reap(pid_t pid, int sig, const char *who)
{
	double deadline = mono() + 5.0;
	int st = 0;
	for (;;) {
		if (sig)
			kill(pid, sig);
		pid_t r = waitpid(pid, &st, WNOHANG);
		if (r == pid)
			break;
		if (r < 0 && errno != EINTR) {
			ps_fail(who, "waitpid expected our child found errno %d", errno);
			return;
		}
		if (mono() > deadline) {
			ps_fail(who, "expected exit within 5 s found %s", "still running");
			kill(pid, SIGKILL);
			while (waitpid(pid, &st, 0) < 0 && errno == EINTR)
				;
			return;
		}
		sleep_ms(20);
	}
	if (WIFSIGNALED(st))
		ps_fail(who, "expected exit status 0 found signal %d", WTERMSIG(st));
	else if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
		ps_fail(who, "expected exit status 0 found %d", WEXITSTATUS(st));
}

#endif
