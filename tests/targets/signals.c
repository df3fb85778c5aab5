/*
 * signals: dispositions, masks, the alternate stack and pending signals.
 *
 *   ./signals default|sigtrap
 *
 * Before READY: handlers with assorted sa_flags/sa_mask, SIGPIPE ignored,
 * sigaltstack, SIGUSR2 and SIGRTMIN+3 (and SIGWINCH) blocked, SIGUSR2 raised
 * once and SIGRTMIN+3 queued twice with sival_int 42 so they stay pending.
 * After SIGUSR1: every disposition, the mask, the altstack and the pending
 * set are unchanged; then unblocking delivers SIGUSR2 once (on the altstack)
 * and SIGRTMIN+3 twice with SI_QUEUE/42; SA_RESETHAND and SA_NODEFER still act.
 * Mode sigtrap also has a SIGTRAP handler, SIGTRAP blocked and raised once,
 * so pending (the signal ptrace's own traps use): after SIGUSR1 the handler
 * and the pending SIGTRAP are there, and unblocking runs the handler once
 * with the raise's siginfo (SI_TKILL from our own pid).
 * Sabotage: SIGTERM's sa_mask changes after READY.
 */
#include "target.h"

#ifndef SA_RESTORER
#define SA_RESTORER 0x04000000
#endif

static unsigned char altstack[65536] __attribute__((aligned(16)));
static volatile int usr2_runs, usr2_on_altstack, rt_runs, rt_bad, hup_runs, hup_self_blocked;
static volatile int hup_quit_blocked, int_runs, trap_runs, trap_bad;
static int rtsig;

static void h_usr2(int sig, siginfo_t *si, void *uc)
{
	(void)sig; (void)si; (void)uc;
	unsigned char here;
	usr2_runs++;
	usr2_on_altstack = &here >= altstack && &here < altstack + sizeof(altstack);
}

static void h_rt(int sig, siginfo_t *si, void *uc)
{
	(void)uc;
	rt_runs++;
	if (sig != rtsig || si->si_code != SI_QUEUE || si->si_value.sival_int != 42 ||
	    si->si_pid != getpid())
		rt_bad++;
}

static void h_hup(int sig)
{
	(void)sig;
	sigset_t cur;
	sigprocmask(SIG_BLOCK, NULL, &cur);
	hup_runs++;
	hup_self_blocked = sigismember(&cur, SIGHUP);
	hup_quit_blocked = sigismember(&cur, SIGQUIT);
}

static void h_int(int sig) { (void)sig; int_runs++; }

static void h_trap(int sig, siginfo_t *si, void *uc)
{
	(void)uc;
	trap_runs++;
	if (sig != SIGTRAP || si->si_code != SI_TKILL || si->si_pid != getpid())
		trap_bad++;
}
static void h_term(int sig) { (void)sig; }

struct disp {
	int sig;
	void *handler;
	int flags;
	int mask[4];
};

static struct disp disps[8];
static struct sigaction saved[8];
static int ndisps;

static void set(int sig, void *handler, int flags, int m0, int m1)
{
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	if (flags & SA_SIGINFO)
		sa.sa_sigaction = handler;
	else
		sa.sa_handler = handler;
	sa.sa_flags = flags;
	sigemptyset(&sa.sa_mask);
	if (m0)
		sigaddset(&sa.sa_mask, m0);
	if (m1)
		sigaddset(&sa.sa_mask, m1);
	ps_setup(sigaction(sig, &sa, NULL) == 0, "sigaction");
	disps[ndisps] = (struct disp){ sig, handler, flags, { m0, m1 } };
	memset(&saved[ndisps], 0, sizeof(saved[0]));
	sigaction(sig, NULL, &saved[ndisps]);
	ndisps++;
}

static void check_masks(const char *what, const sigset_t *exp, const sigset_t *got)
{
	for (int s = 1; s < 65; s++)
		if (sigismember(exp, s) != sigismember(got, s))
			ps_fail(what, "signal %d expected %s found %s", s,
				sigismember(exp, s) ? "set" : "clear",
				sigismember(got, s) ? "set" : "clear");
}

int main(int argc, char **argv)
{
	int trap = 0;
	if (argc < 2)
		ps_bad_mode(NULL);
	if (!strcmp(argv[1], "sigtrap"))
		trap = 1;
	else if (strcmp(argv[1], "default"))
		ps_bad_mode(argv[1]);
	ps_install_usr1();
	rtsig = SIGRTMIN + 3;

	set(SIGUSR2, h_usr2, SA_SIGINFO | SA_RESTART | SA_ONSTACK, SIGINT, SIGTERM);
	set(rtsig, h_rt, SA_SIGINFO | SA_RESTART, SIGHUP, 0);
	set(SIGHUP, h_hup, SA_NODEFER, SIGQUIT, 0);
	set(SIGINT, h_int, SA_RESETHAND, 0, 0);
	set(SIGTERM, h_term, SA_RESTART | SA_ONSTACK | SA_NODEFER, SIGUSR2, SIGALRM);
	set(SIGPIPE, SIG_IGN, 0, 0, 0);
	if (trap)
		set(SIGTRAP, h_trap, SA_SIGINFO | SA_RESTART, SIGHUP, 0);

	stack_t ss = { .ss_sp = altstack, .ss_size = sizeof(altstack), .ss_flags = 0 }, oss;
	ps_setup(sigaltstack(&ss, NULL) == 0, "sigaltstack");

	sigset_t block, mask_saved, pend;
	sigemptyset(&block);
	sigaddset(&block, SIGUSR2);
	sigaddset(&block, rtsig);
	sigaddset(&block, SIGWINCH);
	if (trap)
		sigaddset(&block, SIGTRAP);
	ps_setup(sigprocmask(SIG_BLOCK, &block, NULL) == 0, "sigprocmask");
	sigprocmask(SIG_BLOCK, NULL, &mask_saved);

	raise(SIGUSR2);
	if (trap)
		raise(SIGTRAP);
	union sigval v = { .sival_int = 42 };
	ps_setup(sigqueue(getpid(), rtsig, v) == 0, "sigqueue");
	ps_setup(sigqueue(getpid(), rtsig, v) == 0, "sigqueue");
	sigset_t pend_saved;
	sigemptyset(&pend_saved);
	sigaddset(&pend_saved, SIGUSR2);
	sigaddset(&pend_saved, rtsig);
	if (trap)
		sigaddset(&pend_saved, SIGTRAP);
	sigpending(&pend);
	check_masks("setup pending", &pend_saved, &pend);

	ps_ready();
	if (ps_sabotage()) {
		struct sigaction sa = saved[4];
		sigaddset(&sa.sa_mask, SIGQUIT);
		sigaction(SIGTERM, &sa, NULL);
	}
	ps_wait_usr1();

	char what[64];
	for (int i = 0; i < ndisps; i++) {
		struct sigaction now;
		memset(&now, 0, sizeof(now));
		sigaction(disps[i].sig, NULL, &now);
		snprintf(what, sizeof(what), "sig %d handler", disps[i].sig);
		PS_CHECK_U64(what, (uintptr_t)disps[i].handler, (uintptr_t)now.sa_sigaction);
		snprintf(what, sizeof(what), "sig %d sa_flags", disps[i].sig);
		PS_CHECK_U64(what, (unsigned)saved[i].sa_flags, (unsigned)now.sa_flags);
		if ((now.sa_flags & ~SA_RESTORER) != disps[i].flags)
			ps_fail(what, "expected %#x found %#x", disps[i].flags, now.sa_flags & ~SA_RESTORER);
		snprintf(what, sizeof(what), "sig %d sa_restorer", disps[i].sig);
		PS_CHECK_U64(what, (uintptr_t)saved[i].sa_restorer, (uintptr_t)now.sa_restorer);
		snprintf(what, sizeof(what), "sig %d sa_mask", disps[i].sig);
		check_masks(what, &saved[i].sa_mask, &now.sa_mask);
	}
	sigset_t mask_now;
	sigprocmask(SIG_BLOCK, NULL, &mask_now);
	check_masks("blocked mask", &mask_saved, &mask_now);
	sigpending(&pend);
	check_masks("pending", &pend_saved, &pend);
	memset(&oss, 0, sizeof(oss));
	sigaltstack(NULL, &oss);
	PS_CHECK_U64("sigaltstack sp", (uintptr_t)altstack, (uintptr_t)oss.ss_sp);
	PS_CHECK_U64("sigaltstack size", sizeof(altstack), oss.ss_size);
	PS_CHECK_U64("sigaltstack flags", 0, oss.ss_flags);

	/* now let the pending ones in */
	sigprocmask(SIG_UNBLOCK, &block, NULL);
	PS_CHECK_U64("SIGUSR2 handler runs", 1, usr2_runs);
	PS_CHECK_U64("SIGUSR2 ran on altstack", 1, usr2_on_altstack);
	PS_CHECK_U64("SIGRTMIN+3 handler runs", 2, rt_runs);
	PS_CHECK_U64("SIGRTMIN+3 bad siginfo (code/value/pid)", 0, rt_bad);
	PS_CHECK_U64("SIGTRAP handler runs", trap, trap_runs);
	PS_CHECK_U64("SIGTRAP bad siginfo (code/pid)", 0, trap_bad);

	raise(SIGHUP);
	PS_CHECK_U64("SIGHUP runs", 1, hup_runs);
	PS_CHECK_U64("SIGHUP blocked in own SA_NODEFER handler", 0, hup_self_blocked);
	PS_CHECK_U64("SIGQUIT blocked by SIGHUP sa_mask", 1, hup_quit_blocked);
	raise(SIGINT);
	PS_CHECK_U64("SIGINT runs", 1, int_runs);
	struct sigaction after_int;
	sigaction(SIGINT, NULL, &after_int);
	PS_CHECK_U64("SIGINT SA_RESETHAND -> SIG_DFL", (uintptr_t)SIG_DFL, (uintptr_t)after_int.sa_handler);
	return ps_finish();
}
