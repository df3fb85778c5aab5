/*
 * container: the init of a pid namespace of its own, with children, as
 * `unshare --fork --pid --uts --ipc [--time ...] ./container init` makes it.
 *
 *   ./container init   the root records getpid (1) and getppid (0), sets
 *                      the hostname and domainname (UTS namespace) and
 *                      kernel.msgmax and attaches a 64 KiB SysV segment
 *                      filled with a pattern (IPC namespace), reads
 *                      CLOCK_MONOTONIC and CLOCK_BOOTTIME; forks C1 and
 *                      C2, C2 forks G; each records its getpid/getppid,
 *                      tells its pid on a pipe, and waits for SIGUSR2.
 *                      After SIGUSR1 the root checks its own pid, ppid, the
 *                      pids it was told, the hostname, domainname,
 *                      msgmax, the segment's id (by its key) and bytes,
 *                      the namespace's ns_last_pid, /proc/self/cgroup (its paths are
 *                      relative to its cgroup namespace's root, if it has one of its own),
 *                      that neither clock went back nor jumped
 *                      more than a day (a time namespace's offsets lost
 *                      would move them by the offset), then SIGUSR2s its
 *                      children, which check their own ids (G: also C2's
 *                      pid as its parent) and exit 0 or 1; the root folds
 *                      their statuses into its own.
 * Sabotage, right after READY: the root changes its hostname.
 */
#include "target.h"
#include <sys/prctl.h>
#include <sys/shm.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <fcntl.h>
#include <time.h>

#define HOST "procsnap-box"
#define DOMAIN "procsnap.test"
#define MSGMAX "12345"
#define SHM_KEY 0x15c0de15
#define SHM_LEN (64 << 10)

static volatile sig_atomic_t got_usr2;
static void on_usr2(int sig) { (void)sig; got_usr2 = 1; }

static void check_ids(const char *who, pid_t pid, pid_t ppid)
{
	char what[64];
	snprintf(what, sizeof(what), "%s: getpid", who);
	PS_CHECK_U64(what, pid, getpid());
	snprintf(what, sizeof(what), "%s: getppid", who);
	PS_CHECK_U64(what, ppid, getppid());
}

/* SIGUSR2 to a child until it exits (the flag test races pause()); its status folded into ours. */
static void tell_and_reap(pid_t child)
{
	for (;;) {
		int st;
		kill(child, SIGUSR2);
		pid_t got = waitpid(child, &st, WNOHANG);
		if (got == child) {
			if (!WIFEXITED(st) || WEXITSTATUS(st))
				ps_fail("a child's check", "pid %d: status %#x", child, st);
			return;
		}
		if (got < 0) {
			ps_fail("a child's check", "pid %d: waitpid errno %d", child, errno);
			return;
		}
		usleep(20000);
	}
}

/* A child: records its ids (and forks G), reports its pid, waits for
 * SIGUSR2, checks, tells G. */
static pid_t spawn(const char *who, int report, int grandchild)
{
	pid_t p = fork();
	ps_setup(p >= 0, "fork");
	if (p)
		return p;
	prctl(PR_SET_PDEATHSIG, SIGKILL);
	pid_t me = getpid(), parent = getppid();
	pid_t g = grandchild ? spawn("G", report, 0) : 0;
	ps_setup(write(report, &me, sizeof(me)) == sizeof(me), "report pid");
	while (!got_usr2)
		pause();
	check_ids(who, me, parent);
	if (g)
		tell_and_reap(g);
	_exit(ps_failures ? 1 : 0);
}

static void read_file(const char *path, char *buf, size_t n)
{
	int fd = open(path, O_RDONLY);
	ssize_t got = fd >= 0 ? read(fd, buf, n - 1) : -1;
	buf[got > 0 ? got : 0] = 0;
	if (got > 0 && buf[got - 1] == '\n')
		buf[got - 1] = 0;
	if (fd >= 0)
		close(fd);
}

static double now(clockid_t clock)
{
	struct timespec ts;
	clock_gettime(clock, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
	if (argc < 2 || strcmp(argv[1], "init"))
		ps_bad_mode(argc > 1 ? argv[1] : NULL);
	ps_install_usr1();
	signal(SIGUSR2, on_usr2);
	pid_t me = getpid(), parent = getppid();
	ps_setup(sethostname(HOST, strlen(HOST)) == 0, "sethostname");
	ps_setup(setdomainname(DOMAIN, strlen(DOMAIN)) == 0, "setdomainname");
	int fd = open("/proc/sys/kernel/msgmax", O_WRONLY);
	ps_setup(fd >= 0 && write(fd, MSGMAX, strlen(MSGMAX)) > 0, "write kernel.msgmax");
	close(fd);
	int shmid = shmget(SHM_KEY, SHM_LEN, IPC_CREAT | IPC_EXCL | 0600);
	ps_setup(shmid >= 0, "shmget");
	unsigned char *seg = shmat(shmid, NULL, 0);
	ps_setup(seg != (void *)-1, "shmat");
	for (int i = 0; i < SHM_LEN; i++)
		seg[i] = (unsigned char)(i * 7 + 3);
	uint64_t seg_hash = ps_hash(seg, SHM_LEN);
	int pipefd[2];
	ps_setup(pipe(pipefd) == 0, "pipe");
	pid_t c1 = spawn("C1", pipefd[1], 0), c2 = spawn("C2", pipefd[1], 1);
	pid_t told[3];
	for (int i = 0; i < 3; i++)
		ps_setup(read(pipefd[0], &told[i], sizeof(told[i])) == sizeof(told[i]), "read a pid");
	double mono = now(CLOCK_MONOTONIC), boot = now(CLOCK_BOOTTIME);
	char cgroups[2048];  /* relative to the cgroup namespace's root */
	read_file("/proc/self/cgroup", cgroups, sizeof(cgroups));
	char last_pid[32];  /* where the namespace's next pid is sought from */
	read_file("/proc/sys/kernel/ns_last_pid", last_pid, sizeof(last_pid));
	ps_ready();
	if (ps_sabotage())
		sethostname("sabotaged", 9);
	ps_wait_usr1();
	check_ids("root", me, parent);
	PS_CHECK_U64("root: getpid is the namespace's init", 1, getpid());
	int seen_c1 = 0, seen_c2 = 0;
	for (int i = 0; i < 3; i++) {
		seen_c1 |= told[i] == c1;
		seen_c2 |= told[i] == c2;
		if (kill(told[i], 0))
			ps_fail("a child's pid", "%d: kill(0) errno %d", told[i], errno);
	}
	PS_CHECK_U64("C1 told its fork pid", 1, seen_c1);
	PS_CHECK_U64("C2 told its fork pid", 1, seen_c2);
	struct utsname u;
	uname(&u);
	PS_CHECK_STR("hostname", HOST, u.nodename);
	PS_CHECK_STR("domainname", DOMAIN, u.domainname);
	char buf[64];
	read_file("/proc/sys/kernel/msgmax", buf, sizeof(buf));
	PS_CHECK_STR("kernel.msgmax", MSGMAX, buf);
	read_file("/proc/sys/kernel/ns_last_pid", buf, sizeof(buf));
	PS_CHECK_STR("ns_last_pid", last_pid, buf);
	char cgroups_now[2048];
	read_file("/proc/self/cgroup", cgroups_now, sizeof(cgroups_now));
	PS_CHECK_STR("/proc/self/cgroup", cgroups, cgroups_now);
	PS_CHECK_U64("SysV segment id by its key", shmid, shmget(SHM_KEY, 0, 0));
	PS_CHECK_U64("SysV segment bytes", seg_hash, ps_hash(seg, SHM_LEN));
	double mono2 = now(CLOCK_MONOTONIC), boot2 = now(CLOCK_BOOTTIME);
	if (mono2 < mono || mono2 - mono > 86400)
		ps_fail("CLOCK_MONOTONIC", "was %.3f at READY, %.3f now", mono, mono2);
	if (boot2 < boot || boot2 - boot > 86400)
		ps_fail("CLOCK_BOOTTIME", "was %.3f at READY, %.3f now", boot, boot2);
	tell_and_reap(c1);
	tell_and_reap(c2);
	return ps_finish();
}
