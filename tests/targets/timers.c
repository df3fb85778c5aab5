/*
 * timers: interval timers (setitimer) survive a checkpoint with their time
 * left as of the dump and their interval.
 *
 *   ./timers itimers   ITIMER_REAL 60 s / 7 s, ITIMER_VIRTUAL 100 s / 3 s,
 *                      ITIMER_PROF 50 s once: armed, none fires during the test
 *   ./timers fires     ITIMER_REAL 1.5 s then every 0.5 s; prints "ALARMS n"
 *                      once n >= 4 SIGALRMs came (the test dumps it before)
 *
 * Checked at SIGUSR1: each timer armed with its interval exactly and a time
 * left no more than set and not too little (itimers). Sabotage: ITIMER_PROF
 * disarmed after READY.
 */
#include "target.h"
#include <sys/time.h>
#include <time.h>

static volatile sig_atomic_t alarms;
static void on_alarm(int sig) { (void)sig; alarms++; }

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
