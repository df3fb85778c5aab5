/*
 * stopped: a process stopped (SIGSTOP, or SIGTSTP as by Ctrl-Z) when it is
 * dumped comes back stopped, runs nothing until SIGCONT, then carries on
 * where it was; its parent is told of nothing but that SIGCONT.
 *
 *   ./stopped ticker    a "TICK n" line every 20 ms
 *   ./stopped threads   the same from 3 threads ("TICK t n")
 *   ./stopped parent    forks a ticker child in a process group of its own (a
 *                       shell's job: SIGTSTP stops it) and reports each wait
 *                       event of it ("EVENT stopped SIG", "EVENT continued")
 *
 * Checked at SIGUSR1: a ticker saw SIGCONT exactly once and its ticks never
 * went back; the parent saw exactly one stop and one continue of its child,
 * one SIGCHLD for each and one for the child's exit (status 0: its own PASS).
 */
#include "target.h"
#include <pthread.h>
#include <sys/wait.h>
#include <time.h>

#define THREADS 3

static volatile sig_atomic_t conts, chlds;
static volatile long ticks[THREADS];

static void on_cont(int sig) { (void)sig; conts++; }
static void on_chld(int sig) { (void)sig; chlds++; }

static void handle(int sig, void (*fn)(int), int flags)
{
	struct sigaction sa = { .sa_handler = fn, .sa_flags = flags };
	sigemptyset(&sa.sa_mask);
	ps_setup(sigaction(sig, &sa, NULL) == 0, "sigaction");
}

static void tick(int i, int threads)
{
	struct timespec req = { 0, 20 * 1000 * 1000 };
	long before = ticks[i];
	nanosleep(&req, NULL);
	ticks[i] = before + 1;
	if (threads)
		dprintf(1, "TICK %d %ld\n", i, ticks[i]);
	else
		dprintf(1, "TICK %ld\n", ticks[i]);
}

static void *ticker_thread(void *arg)
{
	int i = (int)(long)arg;
	while (!ps_usr1)
		tick(i, 1);
	return NULL;
}

static int ticker(int threads)
{
	handle(SIGCONT, on_cont, SA_RESTART);
	pthread_t th[THREADS];
	if (threads)
		for (long i = 0; i < THREADS; i++)
			ps_setup(pthread_create(&th[i], NULL, ticker_thread, (void *)i) == 0, "pthread_create");
	ps_ready();
	if (threads) {
		ps_wait_usr1();
		for (int i = 0; i < THREADS; i++)
			pthread_join(th[i], NULL);
	} else {
		while (!ps_usr1)
			tick(0, 0);
	}
	PS_CHECK_U64("SIGCONTs seen", 1, conts);
	for (int i = 0; i < (threads ? THREADS : 1); i++)
		if (ticks[i] < 2)
			ps_fail("ticks", "expected >= 2 found %ld", ticks[i]);
	return ps_finish();
}

static int parent(void)
{
	handle(SIGCHLD, on_chld, SA_RESTART);
	pid_t child = fork();
	ps_setup(child >= 0, "fork");
	if (child == 0) {
		ps_setup(setpgid(0, 0) == 0, "setpgid");
		signal(SIGCHLD, SIG_DFL);
		_exit(ticker(0));
	}
	setpgid(child, child);
	int stops = 0, continues = 0;
	while (!ps_usr1) {
		int st;
		pid_t r = waitpid(child, &st, WUNTRACED | WCONTINUED);
		if (r < 0 && errno == EINTR)
			continue;
		ps_setup(r == child, "waitpid");
		if (WIFSTOPPED(st)) {
			stops++;
			dprintf(1, "EVENT stopped %d\n", WSTOPSIG(st));
		} else if (WIFCONTINUED(st)) {
			continues++;
			dprintf(1, "EVENT continued\n");
		} else {
			ps_fail("child", "expected it alive found status %#x", st);
			return ps_finish();
		}
	}
	kill(child, SIGUSR1);
	int st = 0;
	for (int tries = 0; tries < 200; tries++) {
		struct timespec req = { 0, 10 * 1000 * 1000 };
		if (waitpid(child, &st, WNOHANG) == child)
			break;
		kill(child, SIGUSR1);  /* it may have been between its flag test and its sleep */
		nanosleep(&req, NULL);
	}
	PS_CHECK_U64("child exit status", 0, st);
	PS_CHECK_U64("stops of the child seen", 1, stops);
	PS_CHECK_U64("continues of the child seen", 1, continues);
	PS_CHECK_U64("SIGCHLDs", 3, chlds);
	return ps_finish();
}

int main(int argc, char **argv)
{
	const char *mode = argc >= 2 ? argv[1] : "";
	ps_install_usr1();
	if (!strcmp(mode, "ticker"))
		return ticker(0);
	if (!strcmp(mode, "threads"))
		return ticker(1);
	if (!strcmp(mode, "parent")) {
		ps_ready();
		return parent();
	}
	ps_bad_mode(mode);
}
