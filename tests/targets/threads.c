/*
 * threads: one process, nine threads, each in a different state.
 *
 *   ./threads default
 *
 * Main starts 8 pthreads; every thread (main included) fills __thread data
 * (.tbss buffer, .tdata word) with its own pattern, records gettid(),
 * fs_base, clear_child_tid, its robust list, a stack array and a heap buffer
 * from its malloc arena, and sets its own signal mask (thread i blocks
 * SIGRTMIN+i; SIGUSR1 is blocked in all but main, so only main takes it).
 *   threads 0-3  lock a shared mutex, bump their own counter, the shared
 *                counter and a __thread copy; every 65536th increment
 *                bumps a generation and broadcasts a condvar
 *   threads 4-5  pthread_cond_wait for the next generation (mostly in futex)
 *   thread  6    nanosleep 5 ms / poll a pipe 250 ms, in a loop
 *   thread  7    pure userspace loop: an LCG x and an iteration count n in
 *                registers; x must equal the LCG jumped ahead n steps
 *   thread  2    also has a sigaltstack and the only unblocked SIGUSR2
 * READY once all 8 report in and each has made progress.  After SIGUSR1 main
 * stops everyone; every thread checks its own state (tid, TLS, fs_base,
 * clear_child_tid, robust list, rseq, mask, altstack, stack, heap, counters);
 * thread 2 then raises SIGUSR2, whose handler must run on the altstack.
 * Main checks its pid, 9 entries in /proc/self/task, counter sums, then
 * pthread_join()s all (needs the kernel to clear each tid on exit).
 * Sabotage: main flips a byte of thread 5's __thread buffer after READY.
 */
#include "target.h"
#include <asm/prctl.h>
#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sys/prctl.h>
#include <sys/rseq.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>

#define NTH 8
#define MAIN NTH
#define TLS_LEN 512
#define STK_LEN 3000
#define ALT_LEN 65536
#define TDATA_INIT 0x7464617461746c73ull
#define LCG_A 6364136223846793005ull
#define LCG_C 1442695040888963407ull
#define LCG_X0 0x243f6a8885a308d3ull
#define RET_BASE 0x7000

static __thread unsigned char tls_buf[TLS_LEN];     /* .tbss */
static __thread uint64_t tls_word = TDATA_INIT;      /* .tdata */
static __thread uint64_t tls_count;                  /* private copy of progress */

struct th {
	int idx;
	pthread_t pt;
	pid_t tid;
	unsigned char *tls_addr;
	uint64_t *tls_word_addr;
	unsigned long fs_base;
	int *tid_addr;
	void *robust_head;
	size_t robust_len;
	unsigned char *heap;
	size_t heap_len;
	uint64_t heap_hash;
	sigset_t mask;
	uint64_t progress;      /* __atomic: loops / increments / wakeups so far */
};

static struct th th[NTH + 1];
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static uint64_t counters[4], shared_count, gen;     /* under mu */
static int stop, reported, checked, release_;      /* __atomic */
static int wake_pipe[2];
static unsigned char *altstack;
static volatile int usr2_runs, usr2_on_alt;
static pthread_mutex_t fail_mu = PTHREAD_MUTEX_INITIALIZER;

static void tfail(int idx, const char *what, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
static void tfail(int idx, const char *what, const char *fmt, ...)
{
	char w[128], msg[384];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	if (idx == MAIN)
		snprintf(w, sizeof(w), "main: %s", what);
	else
		snprintf(w, sizeof(w), "thread %d: %s", idx, what);
	pthread_mutex_lock(&fail_mu);
	ps_fail(w, "%s", msg);
	pthread_mutex_unlock(&fail_mu);
}

static void tcheck(int idx, const char *what, uint64_t exp, uint64_t got)
{
	if (exp != got)
		tfail(idx, what, "expected %#llx found %#llx", (unsigned long long)exp,
		      (unsigned long long)got);
}

static unsigned char tls_pat(int idx, int k) { return (unsigned char)(k * 37 + idx * 101 + 7 + (k >> 7)); }
static uint64_t tdata_exp(int idx) { return TDATA_INIT ^ ((uint64_t)(idx + 1) * 0x0101010101010101ull); }

static void sleep_ms(long ms)
{
	struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
	nanosleep(&ts, NULL);
}

static double mono(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void on_usr2(int sig, siginfo_t *si, void *uc)
{
	(void)sig; (void)si; (void)uc;
	unsigned char here;
	usr2_runs++;
	usr2_on_alt = altstack && &here >= altstack && &here < altstack + ALT_LEN;
}

static void fill(unsigned char *p, size_t n, unsigned seed)
{
	for (size_t i = 0; i < n; i++)
		p[i] = (unsigned char)(i * 151u + seed * 29u + (i >> 10));
}

static void set_mask(struct th *t)
{
	sigset_t m;
	sigemptyset(&m);
	if (t->idx == MAIN) {
		sigaddset(&m, SIGUSR2);
		sigaddset(&m, SIGRTMIN + NTH);
	} else {
		sigaddset(&m, SIGUSR1);
		sigaddset(&m, SIGRTMIN + t->idx);
		if (t->idx != 2)
			sigaddset(&m, SIGUSR2);
	}
	ps_setup(pthread_sigmask(SIG_SETMASK, &m, NULL) == 0, "pthread_sigmask");
	ps_setup(pthread_sigmask(SIG_BLOCK, NULL, &t->mask) == 0, "pthread_sigmask get");
}

/* Everything every thread owns; runs in the thread itself. */
static void common_setup(struct th *t)
{
	t->tid = gettid();
	for (int k = 0; k < TLS_LEN; k++)
		tls_buf[k] = tls_pat(t->idx, k);
	ps_setup(tls_word == TDATA_INIT, "__thread initial value");
	tls_word = tdata_exp(t->idx);
	t->tls_addr = tls_buf;
	t->tls_word_addr = &tls_word;
	ps_setup(syscall(SYS_arch_prctl, ARCH_GET_FS, &t->fs_base) == 0, "arch_prctl");
	ps_setup(prctl(PR_GET_TID_ADDRESS, &t->tid_addr) == 0, "PR_GET_TID_ADDRESS");
	ps_setup(syscall(SYS_get_robust_list, 0, &t->robust_head, &t->robust_len) == 0,
		 "get_robust_list");
	t->heap_len = 40000 + 1000 * t->idx;
	t->heap = malloc(t->heap_len);
	ps_setup(t->heap != NULL, "malloc");
	fill(t->heap, t->heap_len, t->idx);
	t->heap_hash = ps_hash(t->heap, t->heap_len);
	set_mask(t);
	if (t->idx == 2) {
		altstack = malloc(ALT_LEN);
		ps_setup(altstack != NULL, "malloc altstack");
		stack_t ss = { .ss_sp = altstack, .ss_size = ALT_LEN, .ss_flags = 0 };
		ps_setup(sigaltstack(&ss, NULL) == 0, "sigaltstack");
	}
}

static void check_rseq(int idx)
{
	unsigned size = __rseq_size < 32 ? 32 : __rseq_size;
	void *area = (char *)__builtin_thread_pointer() + __rseq_offset;
	long r = syscall(334, area, size, 0, 0x53053053);
	int e = errno;
	if (r != -1 || e != EBUSY)
		tfail(idx, "rseq registration", "expected EBUSY found r=%ld errno=%d", r, e);
}

static void common_check(struct th *t)
{
	int i = t->idx;
	tcheck(i, "gettid", t->tid, gettid());
	for (int k = 0; k < TLS_LEN; k++)
		if (tls_buf[k] != tls_pat(i, k)) {
			tfail(i, "__thread buffer", "at byte %d expected %#x found %#x", k,
			      tls_pat(i, k), tls_buf[k]);
			break;
		}
	tcheck(i, "__thread buffer address", (uintptr_t)t->tls_addr, (uintptr_t)tls_buf);
	tcheck(i, "__thread .tdata word", tdata_exp(i), tls_word);
	tcheck(i, "__thread .tdata address", (uintptr_t)t->tls_word_addr, (uintptr_t)&tls_word);

	unsigned long fs = 0;
	int *tid_addr = NULL;
	void *rh = NULL;
	size_t rl = 0;
	syscall(SYS_arch_prctl, ARCH_GET_FS, &fs);
	prctl(PR_GET_TID_ADDRESS, &tid_addr);
	syscall(SYS_get_robust_list, 0, &rh, &rl);
	tcheck(i, "fs_base", t->fs_base, fs);
	tcheck(i, "clear_child_tid", (uintptr_t)t->tid_addr, (uintptr_t)tid_addr);
	tcheck(i, "robust list head", (uintptr_t)t->robust_head, (uintptr_t)rh);
	tcheck(i, "robust list len", t->robust_len, rl);
	check_rseq(i);
	tcheck(i, "heap buffer hash", t->heap_hash, ps_hash(t->heap, t->heap_len));

	sigset_t now;
	sigemptyset(&now);
	pthread_sigmask(SIG_BLOCK, NULL, &now);
	for (int s = 1; s < 65; s++)
		if (sigismember(&t->mask, s) != sigismember(&now, s))
			tfail(i, "signal mask", "signal %d expected %s found %s", s,
			      sigismember(&t->mask, s) ? "blocked" : "unblocked",
			      sigismember(&now, s) ? "blocked" : "unblocked");

	stack_t ss;
	memset(&ss, 0, sizeof(ss));
	sigaltstack(NULL, &ss);
	if (i == 2) {
		tcheck(i, "sigaltstack sp", (uintptr_t)altstack, (uintptr_t)ss.ss_sp);
		tcheck(i, "sigaltstack size", ALT_LEN, ss.ss_size);
		tcheck(i, "sigaltstack flags", 0, ss.ss_flags);
	} else {
		tcheck(i, "sigaltstack flags (none set)", SS_DISABLE, ss.ss_flags);
	}
}

/* affine map x -> a*x + c composed n times, by squaring (mod 2^64) */
static uint64_t lcg_jump(uint64_t x, uint64_t n)
{
	uint64_t a = LCG_A, c = LCG_C, ra = 1, rc = 0;
	while (n) {
		if (n & 1) {
			ra = a * ra;
			rc = a * rc + c;
		}
		c = a * c + c;
		a = a * a;
		n >>= 1;
	}
	return ra * x + rc;
}

static void report_in(void) { __atomic_add_fetch(&reported, 1, __ATOMIC_SEQ_CST); }
static int stopping(void) { return __atomic_load_n(&stop, __ATOMIC_ACQUIRE); }
static void set_progress(struct th *t, uint64_t v) { __atomic_store_n(&t->progress, v, __ATOMIC_RELAXED); }

static void run_worker(struct th *t)
{
	int i = t->idx;
	report_in();
	while (!stopping()) {
		pthread_mutex_lock(&mu);
		__atomic_store_n(&counters[i], counters[i] + 1, __ATOMIC_RELAXED);
		shared_count++;
		tls_count++;
		if ((shared_count & 0xffff) == 0) {
			gen++;
			pthread_cond_broadcast(&cv);
		}
		pthread_mutex_unlock(&mu);
		set_progress(t, tls_count);
	}
	pthread_mutex_lock(&mu);
	tcheck(i, "own counter == __thread copy", tls_count, counters[i]);
	pthread_mutex_unlock(&mu);
}

static void run_waiter(struct th *t)
{
	int i = t->idx;
	uint64_t seen = 0;
	report_in();
	pthread_mutex_lock(&mu);
	while (!stop) {
		while (gen == seen && !stop)
			pthread_cond_wait(&cv, &mu);
		if (gen < seen)
			tfail(i, "generation", "expected >= %llu found %llu",
			      (unsigned long long)seen, (unsigned long long)gen);
		seen = gen;
		tls_count++;
		set_progress(t, tls_count);
	}
	tcheck(i, "generation seen <= current", 1, seen <= gen);
	pthread_mutex_unlock(&mu);
	tcheck(i, "wakeups == __thread copy", tls_count, __atomic_load_n(&t->progress, __ATOMIC_RELAXED));
}

static void run_sleeper(struct th *t)
{
	int i = t->idx, errs = 0;
	char got = 0;
	report_in();
	for (;;) {
		struct timespec ts = { 0, 5 * 1000 * 1000 }, rem;
		if (nanosleep(&ts, &rem) != 0 && errs++ < 3)
			tfail(i, "nanosleep", "expected 0 found errno %d", errno);
		tls_count++;
		set_progress(t, tls_count);
		struct pollfd p = { .fd = wake_pipe[0], .events = POLLIN };
		int r = poll(&p, 1, 250);
		if (r < 0 && errs++ < 3)
			tfail(i, "poll", "expected >= 0 found errno %d", errno);
		if (r == 1) {
			if (read(wake_pipe[0], &got, 1) != 1)
				tfail(i, "read wake pipe", "expected 1 byte found errno %d", errno);
			break;
		}
	}
	tcheck(i, "wake byte", 'S', got);
	tcheck(i, "loops == __thread copy", tls_count, __atomic_load_n(&t->progress, __ATOMIC_RELAXED));
}

static void run_busy(struct th *t)
{
	int i = t->idx;
	uint64_t x = LCG_X0, n = 0, m = 0;
	report_in();
	for (;;) {
		x = x * LCG_A + LCG_C;
		n++;
		m += 3;
		if ((n & 0xffff) == 0) {
			set_progress(t, n);
			if (stopping())
				break;
		}
	}
	tcheck(i, "LCG state after n steps", lcg_jump(LCG_X0, n), x);
	tcheck(i, "second counter == 3 * n", 3 * n, m);
	tcheck(i, "published progress", n, __atomic_load_n(&t->progress, __ATOMIC_RELAXED));
}

static void *thread_main(void *arg)
{
	struct th *t = arg;
	unsigned char stk[STK_LEN];
	fill(stk, sizeof(stk), 50 + t->idx);
	uint64_t stk_hash = ps_hash(stk, sizeof(stk));
	common_setup(t);

	switch (t->idx) {
	case 0: case 1: case 2: case 3:
		run_worker(t);
		break;
	case 4: case 5:
		run_waiter(t);
		break;
	case 6:
		run_sleeper(t);
		break;
	default:
		run_busy(t);
		break;
	}

	common_check(t);
	tcheck(t->idx, "stack array hash", stk_hash, ps_hash(stk, sizeof(stk)));
	if (t->idx == 2) {
		pthread_kill(pthread_self(), SIGUSR2);
		tcheck(2, "SIGUSR2 handler runs", 1, usr2_runs);
		tcheck(2, "SIGUSR2 handler ran on the altstack", 1, usr2_on_alt);
	}
	__atomic_add_fetch(&checked, 1, __ATOMIC_SEQ_CST);
	while (!__atomic_load_n(&release_, __ATOMIC_ACQUIRE))
		sleep_ms(1);
	return (void *)(uintptr_t)(RET_BASE + t->idx);
}

static int count_tasks(void)
{
	DIR *d = opendir("/proc/self/task");
	if (!d)
		return -1;
	int n = 0;
	struct dirent *e;
	while ((e = readdir(d)) != NULL)
		if (e->d_name[0] != '.')
			n++;
	closedir(d);
	return n;
}

int main(int argc, char **argv)
{
	if (argc < 2 || strcmp(argv[1], "default"))
		ps_bad_mode(argv[1]);
	ps_install_usr1();
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_sigaction = on_usr2;
	sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
	sigemptyset(&sa.sa_mask);
	ps_setup(sigaction(SIGUSR2, &sa, NULL) == 0, "sigaction SIGUSR2");
	ps_setup(pipe(wake_pipe) == 0, "pipe");

	/* new threads inherit this; each then sets its own mask */
	sigset_t block;
	sigemptyset(&block);
	sigaddset(&block, SIGUSR1);
	sigaddset(&block, SIGUSR2);
	ps_setup(sigprocmask(SIG_BLOCK, &block, NULL) == 0, "sigprocmask");

	pid_t pid = getpid();
	for (int i = 0; i < NTH; i++) {
		th[i].idx = i;
		errno = pthread_create(&th[i].pt, NULL, thread_main, &th[i]);
		ps_setup(errno == 0, "pthread_create");
	}
	th[MAIN].idx = MAIN;
	common_setup(&th[MAIN]);        /* sets main's final mask: SIGUSR1 unblocked */

	double deadline = mono() + 10.0;
	for (;;) {
		int ok = __atomic_load_n(&reported, __ATOMIC_SEQ_CST) == NTH;
		for (int i = 0; i < NTH && ok; i++)
			ok = __atomic_load_n(&th[i].progress, __ATOMIC_RELAXED) > 0;
		if (ok)
			break;
		if (mono() > deadline) {
			dprintf(1, "SETUP ERROR: threads not all running after 10 s (%d reported)\n",
				__atomic_load_n(&reported, __ATOMIC_SEQ_CST));
			_exit(2);
		}
		sleep_ms(1);
	}
	ps_setup(count_tasks() == NTH + 1, "/proc/self/task has 9 entries");

	ps_ready();
	if (ps_sabotage())
		th[5].tls_addr[17] ^= 0x40;
	ps_wait_usr1();

	pthread_mutex_lock(&mu);
	__atomic_store_n(&stop, 1, __ATOMIC_RELEASE);
	pthread_cond_broadcast(&cv);
	pthread_mutex_unlock(&mu);
	ps_setup(write(wake_pipe[1], "S", 1) == 1, "write wake pipe");

	deadline = mono() + 10.0;
	while (__atomic_load_n(&checked, __ATOMIC_SEQ_CST) < NTH && mono() < deadline)
		sleep_ms(1);
	int nchecked = __atomic_load_n(&checked, __ATOMIC_SEQ_CST);
	if (nchecked != NTH) {
		tfail(MAIN, "threads done checking after 10 s", "expected %d found %d", NTH, nchecked);
		return ps_finish();     /* exit_group takes the stragglers */
	}

	tcheck(MAIN, "getpid", pid, getpid());
	tcheck(MAIN, "gettid == getpid", getpid(), gettid());
	common_check(&th[MAIN]);
	tcheck(MAIN, "/proc/self/task entries", NTH + 1, count_tasks());
	for (int i = 0; i < NTH; i++) {
		char path[64];
		struct stat st;
		snprintf(path, sizeof(path), "/proc/self/task/%d", (int)th[i].tid);
		if (stat(path, &st) != 0)
			tfail(MAIN, path, "expected to exist found errno %d", errno);
		for (int j = 0; j < i; j++)
			if (th[j].tid == th[i].tid)
				tfail(MAIN, "thread ids", "expected distinct found %d twice", (int)th[i].tid);
	}

	pthread_mutex_lock(&mu);
	uint64_t sum = counters[0] + counters[1] + counters[2] + counters[3];
	tcheck(MAIN, "sum of worker counters == shared counter", shared_count, sum);
	tcheck(MAIN, "generation == shared counter / 65536", shared_count >> 16, gen);
	pthread_mutex_unlock(&mu);

	__atomic_store_n(&release_, 1, __ATOMIC_RELEASE);
	for (int i = 0; i < NTH; i++) {
		struct timespec dl;
		clock_gettime(CLOCK_REALTIME, &dl);
		dl.tv_sec += 10;
		void *ret = NULL;
		int r = pthread_timedjoin_np(th[i].pt, &ret, &dl);
		if (r != 0) {
			char what[64];
			snprintf(what, sizeof(what), "pthread_join(thread %d)", i);
			tfail(MAIN, what, "expected 0 found %d (tid never cleared?)", r);
			return ps_finish();
		}
		char what[64];
		snprintf(what, sizeof(what), "thread %d return value", i);
		tcheck(MAIN, what, RET_BASE + i, (uintptr_t)ret);
	}
	tcheck(MAIN, "/proc/self/task entries after join", 1, count_tasks());
	return ps_finish();
}
