/*
 * timers: interval timers (setitimer) survive a checkpoint with their time
 * left as of the dump and their interval.
 *
 *   ./timers itimers   ITIMER_REAL 60 s / 7 s, ITIMER_VIRTUAL 100 s / 3 s,
 *                      ITIMER_PROF 50 s once: armed, none fires during the test
 *   ./timers fires     ITIMER_REAL 1.5 s then every 0.5 s; prints "ALARMS n"
 *                      once n >= 4 SIGALRMs came (the test dumps it before)
 *   ./timers posix     POSIX timers on every clock, each notification kind
 *                      (SIGEV_SIGNAL with a value, SIGEV_THREAD_ID, SIGEV_NONE),
 *                      a gap in their ids; /proc/self/timers must read the
 *                      same after, each armed one keep its interval and time
 *                      left; one of them fires every 0.2 s with its value
 *
 * Checked at SIGUSR1: each timer armed with its interval exactly and a time
 * left no more than set and not too little (itimers). Sabotage: ITIMER_PROF
 * disarmed after READY.
 */
#include "target.h"
#include <sys/syscall.h>
#include <sys/time.h>
#include <time.h>
#include <fcntl.h>

static volatile sig_atomic_t alarms, rt_fired, rt_bad_value;
static void on_alarm(int sig) { (void)sig; alarms++; }
static void on_rt(int sig, siginfo_t *si, void *uc)
{
	(void)sig, (void)uc;
	if (si->si_value.sival_ptr != (void *)0x5eed)
		rt_bad_value = 1;
	rt_fired++;
}

#define NPOSIX 7
static timer_t posix[NPOSIX];
static const struct { int clock; int notify; long value_s, interval_ns; } SPEC[NPOSIX] = {
	{ CLOCK_REALTIME, SIGEV_SIGNAL, 60, 5000000000L },
	{ CLOCK_MONOTONIC, SIGEV_NONE, 30, 0 },
	{ CLOCK_BOOTTIME, SIGEV_THREAD_ID, 40, 1000000000L },
	{ CLOCK_PROCESS_CPUTIME_ID, SIGEV_SIGNAL, 100, 0 },
	{ CLOCK_THREAD_CPUTIME_ID, SIGEV_SIGNAL, 0, 0 },  /* disarmed */
	{ CLOCK_BOOTTIME_ALARM, SIGEV_NONE, 50, 0 },
	{ CLOCK_MONOTONIC, SIGEV_SIGNAL, -1, 200000000L },  /* fires: 0.2 s, SIGRTMIN+2 with a value */
};

static int read_file(const char *path, char *buf, int len)
{
	int fd = open(path, O_RDONLY), n = 0, r;
	ps_setup(fd >= 0, path);
	while (n < len - 1 && (r = read(fd, buf + n, len - 1 - n)) > 0)
		n += r;
	close(fd);
	buf[n] = 0;
	return n;
}

static void posix_timers(void)
{
	struct sigaction sa = { .sa_sigaction = on_rt, .sa_flags = SA_SIGINFO | SA_RESTART };
	sigemptyset(&sa.sa_mask);
	ps_setup(sigaction(SIGRTMIN + 2, &sa, NULL) == 0, "sigaction");
	timer_t gap;
	for (int i = 0; i < NPOSIX; i++) {
		struct sigevent sev = { .sigev_notify = SPEC[i].notify, .sigev_signo = SIGRTMIN + (i == 6 ? 2 : 1) };
		sev.sigev_value.sival_ptr = (void *)(i == 6 ? 0x5eedL : 0x1000L + i);
		if (SPEC[i].notify == SIGEV_THREAD_ID)
			sev._sigev_un._tid = (int)syscall(SYS_gettid);
		int r = timer_create(SPEC[i].clock, &sev, &posix[i]);
		if (r && errno == EOPNOTSUPP && SPEC[i].clock == CLOCK_BOOTTIME_ALARM) /* no RTC to wake: */
			r = timer_create(CLOCK_BOOTTIME, &sev, &posix[i]);               /* where allowed */
		ps_setup(r == 0, "timer_create");
		if (i == 2) { /* a hole in the ids */
			ps_setup(timer_create(CLOCK_MONOTONIC, NULL, &gap) == 0, "timer_create");
		}
		struct itimerspec its = { { SPEC[i].interval_ns / 1000000000L, SPEC[i].interval_ns % 1000000000L },
					  { SPEC[i].value_s, 0 } };
		if (SPEC[i].value_s < 0)
			its.it_value = its.it_interval;
		if (SPEC[i].value_s)
			ps_setup(timer_settime(posix[i], 0, &its, NULL) == 0, "timer_settime");
	}
	ps_setup(timer_delete(gap) == 0, "timer_delete");
}

static void check_posix_timers(void)
{
	for (int i = 0; i < NPOSIX; i++) {
		struct itimerspec its;
		if (timer_gettime(posix[i], &its) != 0) {
			ps_fail("timer_gettime", "expected timer %d found errno %d", i, errno);
			continue;
		}
		long interval = its.it_interval.tv_sec * 1000000000L + its.it_interval.tv_nsec;
		long left = its.it_value.tv_sec * 1000000000L + its.it_value.tv_nsec;
		char what[32];
		snprintf(what, sizeof(what), "timer %d", i);
		if (interval != SPEC[i].interval_ns && !(SPEC[i].clock == CLOCK_PROCESS_CPUTIME_ID))
			ps_fail(what, "expected interval %ld ns found %ld", SPEC[i].interval_ns, interval);
		if (SPEC[i].value_s == 0 && left != 0)
			ps_fail(what, "expected disarmed found %ld ns left", left);
		if (SPEC[i].value_s > 0 && (left <= 0 || left > SPEC[i].value_s * 1000000000L + 20000000L ||
					    left < (SPEC[i].value_s - 30) * 1000000000L))
			ps_fail(what, "expected about %ld s left found %ld ns", SPEC[i].value_s, left);
	}
}

static void arm(int which, long value_s, long interval_s)
{
	struct itimerval it = { { interval_s, 0 }, { value_s, 0 } };
	ps_setup(setitimer(which, &it, NULL) == 0, "setitimer");
}

static void check(const char *name, int which, long value_s, long interval_us)
{
	struct itimerval it;
	ps_setup(getitimer(which, &it) == 0, "getitimer");
	long left_us = it.it_value.tv_sec * 1000000L + it.it_value.tv_usec;
	if (it.it_interval.tv_sec * 1000000L + it.it_interval.tv_usec != interval_us)
		ps_fail(name, "expected interval %ld us found %ld.%06ld s", interval_us,
			(long)it.it_interval.tv_sec, (long)it.it_interval.tv_usec);
	/* CPU-time timers are kept in ticks: each setitimer may round up by one */
	if (left_us <= 0 || left_us > value_s * 1000000L + 20000 || left_us < (value_s - 30) * 1000000L)
		ps_fail(name, "expected %ld s left (less the test's time) found %ld us", value_s, left_us);
}

int main(int argc, char **argv)
{
	const char *mode = argc >= 2 ? argv[1] : "";
	ps_install_usr1();
	struct sigaction sa = { .sa_handler = on_alarm, .sa_flags = SA_RESTART };
	sigemptyset(&sa.sa_mask);
	ps_setup(sigaction(SIGALRM, &sa, NULL) == 0 && sigaction(SIGVTALRM, &sa, NULL) == 0 &&
		 sigaction(SIGPROF, &sa, NULL) == 0, "sigaction");
	if (!strcmp(mode, "itimers")) {
		arm(ITIMER_REAL, 60, 7);
		arm(ITIMER_VIRTUAL, 100, 3);
		arm(ITIMER_PROF, 50, 0);
		ps_ready();
		if (ps_sabotage())
			arm(ITIMER_PROF, 0, 0);
		ps_wait_usr1();
		check("ITIMER_REAL", ITIMER_REAL, 60, 7000000);
		check("ITIMER_VIRTUAL", ITIMER_VIRTUAL, 100, 3000000);
		check("ITIMER_PROF", ITIMER_PROF, 50, 0);
		PS_CHECK_U64("signals from the timers", 0, alarms);
	} else if (!strcmp(mode, "posix")) {
		static char before[4096], after[4096];
		posix_timers();
		read_file("/proc/self/timers", before, sizeof(before));
		ps_ready();
		if (ps_sabotage())
			timer_delete(posix[1]);
		ps_wait_usr1();
		int fired = rt_fired;
		struct timespec req = { 0, 500000000 };
		while (nanosleep(&req, &req) != 0 && errno == EINTR)
			;
		read_file("/proc/self/timers", after, sizeof(after));
		PS_CHECK_STR("/proc/self/timers", before, after);
		check_posix_timers();
		if (rt_fired < fired + 1)
			ps_fail("timer 6", "expected it to fire in 0.5 s found %d more", rt_fired - fired);
		PS_CHECK_U64("timer 6 sigev_value wrong", 0, rt_bad_value);
	} else if (!strcmp(mode, "fires")) {
		struct itimerval it = { { 0, 500000 }, { 1, 500000 } };
		ps_setup(setitimer(ITIMER_REAL, &it, NULL) == 0, "setitimer");
		ps_ready();
		while (alarms < 4)
			pause();
		dprintf(1, "ALARMS %d\n", (int)alarms);
		ps_wait_usr1();
		check("ITIMER_REAL", ITIMER_REAL, 1, 500000);
	} else {
		ps_bad_mode(mode);
	}
	return ps_finish();
}
