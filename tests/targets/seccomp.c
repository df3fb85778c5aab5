/*
 * seccomp: filters and strict mode that must still act after a restore.
 *
 *   ./seccomp filter   two stacked filters: getpid -> EPERM; the second (with
 *                      SECCOMP_FILTER_FLAG_LOG) uname -> ENOSYS and kills the
 *                      process on ptrace. After SIGUSR1: getpid and uname fail
 *                      so, getppid works, 2 filters in status, and a forked
 *                      child (which inherits them) that calls ptrace dies of SIGSYS.
 *   ./seccomp threads  main installs getpid -> EPERM, then makes threads A and B;
 *                      A stacks its own getppid -> ENOENT. Each checks its own
 *                      calls after SIGUSR1 (A: both fail; B and main: only getpid).
 *   ./seccomp tsync    threads A and B made first, then main installs getpid -> EPERM
 *                      with TSYNC (all three share it). After SIGUSR1, main stacks
 *                      getppid -> ENOENT with TSYNC again, which the kernel allows
 *                      only if the threads still share main's filter, and every
 *                      thread sees both.
 *   ./seccomp fork     main installs getpid -> EPERM and forks a child that stacks
 *                      getppid -> ENOENT; each checks its calls after SIGUSR1
 *                      (main forwards it, then reaps the child's result).
 *   ./seccomp strict   thread S enters strict mode and blocks in read(2) on a pipe.
 *                      After SIGUSR1 main sees S in mode 1, wakes it; S writes the
 *                      byte back, then calls getpid, which must kill S (only S).
 * Sabotage: the process (thread A / the child / thread S) that holds the filter
 * that must act is given none: filter mode installs only its first filter;
 * tsync: thread B stacks a filter of its own, so main's TSYNC must fail.
 */
#include "target.h"
#include <dirent.h>
#include <fcntl.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <pthread.h>
#include <stddef.h>
#include <sys/prctl.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/utsname.h>
#include <sys/wait.h>

/* nr == NR -> ret, else allow */
static int install(int nr, unsigned int ret, unsigned int flags)
{
	struct sock_filter insns[] = {
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (unsigned int)nr, 0, 1),
		BPF_STMT(BPF_RET | BPF_K, ret),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
	};
	struct sock_fprog prog = { sizeof(insns) / sizeof(insns[0]), insns };
	return (int)syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, flags, &prog);
}

/* A bigger one (3000 instructions: more than procsnap's scratch area holds):
 * uname -> ENOSYS, ptrace -> kill the process. */
static int install_big(void)
{
	enum { N = 3000 };
	static struct sock_filter insns[N];
	int i = 0;
	insns[i++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr));
	while (i < N - 5)
		insns[i++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, 100000 + i, 0, 0);
	insns[i++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_uname, 2, 0);
	insns[i++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_ptrace, 2, 0);
	insns[i++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW);
	insns[i++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | ENOSYS);
	insns[i++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS);
	struct sock_fprog prog = { N, insns };
	return (int)syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_LOG, &prog);
}

static long errno_of(long ret) { return ret < 0 ? errno : 0; }

static void check_calls(const char *who, int pid_errno, int ppid_errno)
{
	char what[64];
	snprintf(what, sizeof(what), "%s getpid errno", who);
	PS_CHECK_U64(what, pid_errno, errno_of(syscall(SYS_getpid)));
	snprintf(what, sizeof(what), "%s getppid errno", who);
	PS_CHECK_U64(what, ppid_errno, errno_of(syscall(SYS_getppid)));
}

static int status_field(pid_t tid, const char *key)
{
	char path[64], line[256];
	snprintf(path, sizeof(path), "/proc/self/task/%d/status", tid);
	FILE *f = fopen(path, "r");
	int v = -1;
	if (!f)
		return -2;
	while (fgets(line, sizeof(line), f))
		if (strncmp(line, key, strlen(key)) == 0 && line[strlen(key)] == ':')
			v = atoi(line + strlen(key) + 1);
	fclose(f);
	return v;
}

static pthread_barrier_t ready_bar, check_bar, done_bar;
static int own_filter_a;   /* thread A stacks its own */
static volatile int stacked;

static void *worker(void *arg)
{
	const char *name = arg;
	int a = strcmp(name, "thread A") == 0;
	if (a && own_filter_a && !ps_sabotage())
		ps_setup(install(SYS_getppid, SECCOMP_RET_ERRNO | ENOENT, 0) == 0, "thread A filter");
	pthread_barrier_wait(&ready_bar);
	if (!a && !own_filter_a && ps_sabotage())   /* B leaves main's filter: TSYNC must fail */
		ps_setup(install(SYS_getuid, SECCOMP_RET_ERRNO | EPERM, 0) == 0, "thread B filter");
	pthread_barrier_wait(&check_bar);
	if (stacked)
		check_calls(name, EPERM, ENOENT);
	else
		check_calls(name, EPERM, a && own_filter_a ? ENOENT : 0);
	pthread_barrier_wait(&done_bar);
	return NULL;
}

static void run_threads(int tsync)
{
	pthread_t ta, tb;
	sigset_t usr1;
	sigemptyset(&usr1);
	sigaddset(&usr1, SIGUSR1);
	pthread_sigmask(SIG_BLOCK, &usr1, NULL);   /* only main takes it */
	own_filter_a = !tsync;
	pthread_barrier_init(&ready_bar, NULL, 3);
	pthread_barrier_init(&check_bar, NULL, 3);
	pthread_barrier_init(&done_bar, NULL, 3);
	if (!tsync)
		ps_setup(install(SYS_getpid, SECCOMP_RET_ERRNO | EPERM, 0) == 0, "main filter");
	ps_setup(pthread_create(&ta, NULL, worker, "thread A") == 0, "pthread_create");
	ps_setup(pthread_create(&tb, NULL, worker, "thread B") == 0, "pthread_create");
	if (tsync)
		ps_setup(install(SYS_getpid, SECCOMP_RET_ERRNO | EPERM, SECCOMP_FILTER_FLAG_TSYNC) == 0, "tsync filter");
	pthread_barrier_wait(&ready_bar);
	pthread_sigmask(SIG_UNBLOCK, &usr1, NULL);
	ps_ready();
	ps_wait_usr1();
	if (tsync) {
		int r = install(SYS_getppid, SECCOMP_RET_ERRNO | ENOENT, SECCOMP_FILTER_FLAG_TSYNC);
		if (r != 0)
			ps_fail("TSYNC filter after restore", "expected 0 found %d (errno %d): the threads no "
				"longer share main's filter", r, errno);
		else
			stacked = 1;
	}
	pthread_barrier_wait(&check_bar);
	check_calls("main", EPERM, stacked ? ENOENT : 0);
	pthread_barrier_wait(&done_bar);
	pthread_join(ta, NULL);
	pthread_join(tb, NULL);
}

static void run_filter(void)
{
	struct utsname u;
	ps_setup(install(SYS_getpid, SECCOMP_RET_ERRNO | EPERM, 0) == 0, "first filter");
	if (!ps_sabotage())
		ps_setup(install_big() == 0, "second filter");
	ps_ready();
	ps_wait_usr1();
	check_calls("main", EPERM, 0);
	PS_CHECK_U64("uname errno", ENOSYS, errno_of(uname(&u)));
	PS_CHECK_U64("Seccomp", 2, status_field(syscall(SYS_gettid), "Seccomp"));
	PS_CHECK_U64("Seccomp_filters", 2, status_field(syscall(SYS_gettid), "Seccomp_filters"));
	pid_t c = fork();
	if (c == 0) {
		syscall(SYS_ptrace, PTRACE_TRACEME, 0, 0, 0);
		_exit(0);
	}
	int st = 0;
	ps_setup(c > 0 && waitpid(c, &st, 0) == c, "fork/wait");
	if (!WIFSIGNALED(st) || WTERMSIG(st) != SIGSYS)
		ps_fail("child calling ptrace", "expected killed by SIGSYS found status %#x", st);
}

static void run_fork(void)
{
	int res[2];
	ps_setup(pipe(res) == 0, "pipe");
	ps_setup(install(SYS_getpid, SECCOMP_RET_ERRNO | EPERM, 0) == 0, "main filter");
	int go[2];
	ps_setup(pipe(go) == 0, "pipe");
	pid_t c = fork();
	ps_setup(c >= 0, "fork");
	if (c == 0) {
		char b;
		if (!ps_sabotage())
			ps_setup(install(SYS_getppid, SECCOMP_RET_ERRNO | ENOENT, 0) == 0, "child filter");
		close(go[1]);
		dprintf(res[1], "R");
		while (read(go[0], &b, 1) < 0 && errno == EINTR)
			;
		check_calls("child", EPERM, ENOENT);
		if (status_field(syscall(SYS_gettid), "Seccomp_filters") != 2)
			ps_fail("child Seccomp_filters", "expected 2 found %d",
				status_field(syscall(SYS_gettid), "Seccomp_filters"));
		_exit(ps_failures ? 1 : 0);
	}
	close(go[0]);
	char b;
	ps_setup(read(res[0], &b, 1) == 1, "child ready");
	ps_ready();
	ps_wait_usr1();
	check_calls("main", EPERM, 0);
	ps_setup(write(go[1], "G", 1) == 1, "wake child");
	int st = 0;
	ps_setup(waitpid(c, &st, 0) == c, "waitpid");
	if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
		ps_fail("child", "expected exit 0 found status %#x", st);
}

static int strict_in[2], strict_out[2];
static pid_t strict_tid;

static void *strict_thread(void *arg)
{
	(void)arg;
	char b;
	strict_tid = (pid_t)syscall(SYS_gettid);
	if (!ps_sabotage())
		prctl(PR_SET_SECCOMP, SECCOMP_MODE_STRICT);
	write(strict_out[1], "R", 1);
	while (read(strict_in[0], &b, 1) != 1)
		;
	write(strict_out[1], &b, 1);
	syscall(SYS_getpid);   /* strict mode: this thread dies here */
	write(strict_out[1], "X", 1);
	for (;;)
		syscall(SYS_exit, 0);
	return NULL;
}

static void run_strict(void)
{
	pthread_t t;
	char b;
	sigset_t usr1;
	sigemptyset(&usr1);
	sigaddset(&usr1, SIGUSR1);
	ps_setup(pipe(strict_in) == 0 && pipe(strict_out) == 0, "pipes");
	pthread_sigmask(SIG_BLOCK, &usr1, NULL);
	ps_setup(pthread_create(&t, NULL, strict_thread, NULL) == 0, "pthread_create");
	pthread_sigmask(SIG_UNBLOCK, &usr1, NULL);
	ps_setup(read(strict_out[0], &b, 1) == 1, "strict thread ready");
	ps_ready();
	ps_wait_usr1();
	PS_CHECK_U64("strict thread Seccomp", 1, status_field(strict_tid, "Seccomp"));
	ps_setup(write(strict_in[1], "W", 1) == 1, "wake");
	b = 0;
	ps_setup(read(strict_out[0], &b, 1) == 1, "strict thread answer");
	PS_CHECK_U64("strict thread echo", 'W', b);
	for (int i = 0; i < 5000 && status_field(strict_tid, "Seccomp") != -2; i++)
		usleep(1000);
	fcntl(strict_out[0], F_SETFL, O_NONBLOCK);
	b = 0;
	if (read(strict_out[0], &b, 1) == 1 && b == 'X')
		ps_fail("strict thread", "expected to be killed by getpid, found it carried on%s", "");
	if (status_field(strict_tid, "Seccomp") != -2)
		ps_fail("strict thread", "expected gone after its getpid, found it in /proc%s", "");
}

int main(int argc, char **argv)
{
	const char *mode = argc > 1 ? argv[1] : NULL;
	ps_install_usr1();
	ps_setup(prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0, "no_new_privs");
	if (mode && strcmp(mode, "filter") == 0)
		run_filter();
	else if (mode && strcmp(mode, "threads") == 0)
		run_threads(0);
	else if (mode && strcmp(mode, "tsync") == 0)
		run_threads(1);
	else if (mode && strcmp(mode, "fork") == 0)
		run_fork();
	else if (mode && strcmp(mode, "strict") == 0)
		run_strict();
	else
		ps_bad_mode(mode);
	return ps_finish();
}
