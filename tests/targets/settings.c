/*
 * settings: per-thread and per-process settings that are not the defaults.
 *
 *   ./settings default|mdwe
 *
 * Before READY, two pthreads (created first, so they inherit nothing of
 * what main sets afterwards) set their own scheduling:
 *   thread "batch"  SCHED_BATCH, nice 7, CPU affinity {0}
 *   thread "fifo"   SCHED_FIFO priority 3
 * and main sets its own I/O priority (IOPRIO_CLASS_BE level 6), timer slack
 * 123456 ns, and for the process: PR_SET_CHILD_SUBREAPER 1,
 * PR_SET_THP_DISABLE 1, coredump_filter 0x3f, oom_score_adj 333, membarrier
 * REGISTER_PRIVATE_EXPEDITED, 32 private futex hash slots, PR_SET_DUMPABLE 0
 * and (mode mdwe) PR_SET_MDWE REFUSE_EXEC_GAIN.
 * Every thread records all of its own values once they are set.  After
 * SIGUSR1 each thread reads them all again and checks the ones set here
 * against their constants and every value against what it recorded.
 * Sabotage: main changes oom_score_adj to 334 after READY.
 */
#include "target.h"
#include <pthread.h>
#include <sched.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>

#define IOPRIO_WHO_PROCESS 1
#define IOPRIO_CLASS_BE 2
#define IOPRIO_PRIO_VALUE(cls, level) (((cls) << 13) | (level))
#define SLACK_NS 123456
#define NICE 7
#define FIFO_PRIO 3
#define COREDUMP_FILTER 0x3f
#define OOM_SCORE_ADJ 333
#define FUTEX_SLOTS 32
#define MEMBARRIER_CMD_GET_REGISTRATIONS (1 << 9)
#define MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED (1 << 4)
#ifndef PR_SET_MDWE
#define PR_SET_MDWE 65
#define PR_GET_MDWE 66
#endif
#ifndef PR_MDWE_REFUSE_EXEC_GAIN
#define PR_MDWE_REFUSE_EXEC_GAIN 1
#endif
#define PR_FUTEX_HASH 78
#define PR_FUTEX_HASH_SET_SLOTS 1
#define PR_FUTEX_HASH_GET_SLOTS 2

/* struct sched_attr (include/uapi/linux/sched/types.h), SCHED_ATTR_SIZE_VER1 */
struct sched_attr_v1 {
	uint32_t size, sched_policy;
	uint64_t sched_flags;
	int32_t sched_nice;
	uint32_t sched_priority;
	uint64_t sched_runtime, sched_deadline, sched_period;
	uint32_t sched_util_min, sched_util_max;
};

/* What one thread sees of its own settings. */
struct seen {
	struct sched_attr_v1 attr;
	int policy, nice;
	cpu_set_t cpus;
	long ioprio, slack;
};

static void see(struct seen *s)
{
	memset(s, 0, sizeof(*s));
	s->attr.size = sizeof(s->attr);
	if (syscall(SYS_sched_getattr, 0, &s->attr, sizeof(s->attr), 0))
		s->attr.size = 0;
	s->policy = sched_getscheduler(0);
	errno = 0;
	s->nice = getpriority(PRIO_PROCESS, gettid());
	if (errno)
		s->nice = -100;
	if (sched_getaffinity(0, sizeof(s->cpus), &s->cpus))
		CPU_ZERO(&s->cpus);
	s->ioprio = syscall(SYS_ioprio_get, IOPRIO_WHO_PROCESS, 0);
	s->slack = prctl(PR_GET_TIMERSLACK, 0, 0, 0, 0);
}

static void check_seen(const char *who, const struct seen *exp)
{
	struct seen now;
	char what[96];
	see(&now);
#define SAME(field) do {                                                       \
		snprintf(what, sizeof(what), "%s %s", who, #field);           \
		PS_CHECK_U64(what, exp->field, now.field);                    \
	} while (0)
	SAME(attr.size);
	SAME(attr.sched_policy);
	SAME(attr.sched_flags);
	SAME(attr.sched_nice);
	SAME(attr.sched_priority);
	SAME(attr.sched_runtime);
	SAME(attr.sched_deadline);
	SAME(attr.sched_period);
	SAME(attr.sched_util_min);
	SAME(attr.sched_util_max);
	SAME(policy);
	SAME(nice);
	SAME(ioprio);
	SAME(slack);
#undef SAME
	for (int c = 0; c < CPU_SETSIZE; c++)
		if (CPU_ISSET(c, &exp->cpus) != CPU_ISSET(c, &now.cpus)) {
			snprintf(what, sizeof(what), "%s affinity CPU %d", who, c);
			ps_fail(what, "expected %s found %s", CPU_ISSET(c, &exp->cpus) ? "set" : "clear",
				CPU_ISSET(c, &now.cpus) ? "set" : "clear");
		}
}

enum { BATCH, FIFO, NTH };
static const char *names[NTH] = { "thread batch", "thread fifo" };

struct th {
	int idx;
	pthread_t pt;
	int go[2], ready[2];
	struct seen seen;
};
static struct th th[NTH];

static void set_sched(int policy, int nice, int prio, const char *what)
{
	struct sched_attr_v1 a;
	memset(&a, 0, sizeof(a));
	a.size = sizeof(a);
	a.sched_policy = policy;
	a.sched_nice = nice;
	a.sched_priority = prio;
	ps_setup(syscall(SYS_sched_setattr, 0, &a, 0) == 0, what);
}

static void check_thread(const struct th *t)
{
	const struct seen *s = &t->seen;
	char what[96];
	struct seen now;
	see(&now);
	if (t->idx == BATCH) {
		snprintf(what, sizeof(what), "%s sched_getscheduler", names[t->idx]);
		PS_CHECK_U64(what, SCHED_BATCH, now.policy);
		snprintf(what, sizeof(what), "%s nice", names[t->idx]);
		PS_CHECK_U64(what, NICE, now.nice);
		snprintf(what, sizeof(what), "%s CPUs in affinity", names[t->idx]);
		PS_CHECK_U64(what, 1, CPU_COUNT(&now.cpus));
		snprintf(what, sizeof(what), "%s CPU 0 in affinity", names[t->idx]);
		PS_CHECK_U64(what, 1, !!CPU_ISSET(0, &now.cpus));
	} else {
		snprintf(what, sizeof(what), "%s sched_getscheduler", names[t->idx]);
		PS_CHECK_U64(what, SCHED_FIFO, now.policy);
		snprintf(what, sizeof(what), "%s sched_priority", names[t->idx]);
		PS_CHECK_U64(what, FIFO_PRIO, now.attr.sched_priority);
	}
	check_seen(names[t->idx], s);
}

static void *thread_main(void *arg)
{
	struct th *t = arg;
	char c;
	if (t->idx == BATCH) {
		set_sched(SCHED_BATCH, NICE, 0, "sched_setattr(SCHED_BATCH, nice 7)");
		cpu_set_t one;
		CPU_ZERO(&one);
		CPU_SET(0, &one);
		ps_setup(sched_setaffinity(0, sizeof(one), &one) == 0, "sched_setaffinity({0})");
	} else {
		set_sched(SCHED_FIFO, 0, FIFO_PRIO, "sched_setattr(SCHED_FIFO, 3)");
	}
	see(&t->seen);
	ps_setup(write(t->ready[1], "r", 1) == 1, "write ready");
	/* blocked in read(2) until main has its SIGUSR1 */
	while (read(t->go[0], &c, 1) != 1)
		ps_setup(errno == EINTR, "read go");
	check_thread(t);
	return NULL;
}

static long read_proc_long(const char *path, int base)
{
	char buf[64] = "";
	FILE *f = fopen(path, "r");
	if (!f)
		return -1;
	if (!fgets(buf, sizeof(buf), f))
		buf[0] = 0;
	fclose(f);
	return strtol(buf, NULL, base);
}

static void write_proc(const char *path, const char *text)
{
	FILE *f = fopen(path, "w");
	ps_setup(f != NULL, path);
	ps_setup(fputs(text, f) >= 0 && fclose(f) == 0, path);
}

static int get_int_prctl(int option)
{
	int v = -1;
	if (prctl(option, &v, 0, 0, 0))
		return -1000 - errno;
	return v;
}

int main(int argc, char **argv)
{
	int mdwe = 0;
	if (argc < 2)
		ps_bad_mode(NULL);
	if (!strcmp(argv[1], "mdwe"))
		mdwe = 1;
	else if (strcmp(argv[1], "default"))
		ps_bad_mode(argv[1]);
	ps_install_usr1();

	/* only main takes SIGUSR1 */
	sigset_t usr1, old;
	sigemptyset(&usr1);
	sigaddset(&usr1, SIGUSR1);
	pthread_sigmask(SIG_BLOCK, &usr1, &old);
	for (int i = 0; i < NTH; i++) {
		th[i].idx = i;
		ps_setup(pipe(th[i].go) == 0 && pipe(th[i].ready) == 0, "pipe");
		ps_setup(pthread_create(&th[i].pt, NULL, thread_main, &th[i]) == 0, "pthread_create");
	}
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	for (int i = 0; i < NTH; i++) {
		char c;
		ps_setup(read(th[i].ready[0], &c, 1) == 1, "read ready");
	}

	ps_setup(syscall(SYS_ioprio_set, IOPRIO_WHO_PROCESS, 0, IOPRIO_PRIO_VALUE(IOPRIO_CLASS_BE, 6)) == 0,
		 "ioprio_set(BE, 6)");
	ps_setup(prctl(PR_SET_TIMERSLACK, SLACK_NS, 0, 0, 0) == 0, "PR_SET_TIMERSLACK");
	ps_setup(prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0, "PR_SET_CHILD_SUBREAPER");
	ps_setup(prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0) == 0, "PR_SET_THP_DISABLE");
	write_proc("/proc/self/coredump_filter", "0x3f");
	write_proc("/proc/self/oom_score_adj", "333");
	ps_setup(syscall(SYS_membarrier, MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED, 0, 0) == 0,
		 "membarrier(REGISTER_PRIVATE_EXPEDITED)");
	ps_setup(prctl(PR_FUTEX_HASH, PR_FUTEX_HASH_SET_SLOTS, FUTEX_SLOTS, 0, 0) == 0,
		 "prctl(PR_FUTEX_HASH, SET_SLOTS, 32)");
	if (mdwe)
		ps_setup(prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) == 0, "PR_SET_MDWE");
	ps_setup(prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) == 0, "PR_SET_DUMPABLE 0");
	struct seen main_seen;
	see(&main_seen);
	long membarrier_saved = syscall(SYS_membarrier, MEMBARRIER_CMD_GET_REGISTRATIONS, 0, 0);
	long mdwe_saved = prctl(PR_GET_MDWE, 0, 0, 0, 0);

	ps_ready();
	if (ps_sabotage())
		write_proc("/proc/self/oom_score_adj", "334");
	ps_wait_usr1();

	PS_CHECK_U64("main ioprio", IOPRIO_PRIO_VALUE(IOPRIO_CLASS_BE, 6),
		     syscall(SYS_ioprio_get, IOPRIO_WHO_PROCESS, 0));
	PS_CHECK_U64("main PR_GET_TIMERSLACK", SLACK_NS, prctl(PR_GET_TIMERSLACK, 0, 0, 0, 0));
	PS_CHECK_U64("main sched_getscheduler", SCHED_OTHER, sched_getscheduler(0));
	check_seen("main", &main_seen);
	PS_CHECK_U64("PR_GET_CHILD_SUBREAPER", 1, get_int_prctl(PR_GET_CHILD_SUBREAPER));
	PS_CHECK_U64("PR_GET_THP_DISABLE", 1, prctl(PR_GET_THP_DISABLE, 0, 0, 0, 0));
	PS_CHECK_U64("coredump_filter", COREDUMP_FILTER, read_proc_long("/proc/self/coredump_filter", 16));
	PS_CHECK_U64("oom_score_adj", OOM_SCORE_ADJ, read_proc_long("/proc/self/oom_score_adj", 10));
	long regs = syscall(SYS_membarrier, MEMBARRIER_CMD_GET_REGISTRATIONS, 0, 0);
	PS_CHECK_U64("membarrier registrations", membarrier_saved, regs);
	PS_CHECK_U64("membarrier PRIVATE_EXPEDITED registered", 1,
		     regs >= 0 && (regs & MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED));
	PS_CHECK_U64("membarrier PRIVATE_EXPEDITED works", 0,
		     syscall(SYS_membarrier, 1 << 3 /* PRIVATE_EXPEDITED */, 0, 0));
	PS_CHECK_U64("PR_GET_DUMPABLE", 0, prctl(PR_GET_DUMPABLE, 0, 0, 0, 0));
	PS_CHECK_U64("PR_FUTEX_HASH GET_SLOTS", FUTEX_SLOTS, prctl(PR_FUTEX_HASH, PR_FUTEX_HASH_GET_SLOTS, 0, 0, 0));
	PS_CHECK_U64("PR_GET_MDWE", mdwe_saved, prctl(PR_GET_MDWE, 0, 0, 0, 0));
	if (mdwe)
		PS_CHECK_U64("PR_GET_MDWE REFUSE_EXEC_GAIN", PR_MDWE_REFUSE_EXEC_GAIN,
			     prctl(PR_GET_MDWE, 0, 0, 0, 0) & PR_MDWE_REFUSE_EXEC_GAIN);

	/* one thread at a time: their FAIL lines do not interleave */
	for (int i = 0; i < NTH; i++) {
		ps_setup(write(th[i].go[1], "g", 1) == 1, "write go");
		ps_setup(pthread_join(th[i].pt, NULL) == 0, "pthread_join");
	}
	return ps_finish();
}
