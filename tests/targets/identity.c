/*
 * identity: what ps/proc shows about a process.
 *
 *   ./identity default DIR     chdir(DIR) (an existing directory)
 *
 * comm "ps-ident", umask 027, cwd DIR, soft RLIMIT_NOFILE 777, a lowered soft
 * RLIMIT_CORE, RLIMIT_STACK as-is, personality |= ADDR_NO_RANDOMIZE; pid,
 * sid == pgid == pid (started with setsid), /proc/self/{cmdline,environ,auxv},
 * /proc/self/exe and getcwd() are saved and compared after SIGUSR1.
 * Sabotage: umask(022) after READY.
 */
#include "target.h"
#include <fcntl.h>
#include <sys/personality.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>

#define BIG 65536

struct ident {
	pid_t pid, sid, pgid;
	char comm[17];
	mode_t umask;
	char cwd[4096], exe[4096];
	int pers;
	struct rlimit nofile, core, stack;
	char cmdline[BIG], environ_[BIG], auxv[BIG];
	ssize_t cmdline_len, environ_len, auxv_len;
};

static ssize_t slurp(const char *path, char *buf)
{
	int fd = open(path, O_RDONLY);
	ps_setup(fd >= 0, path);
	ssize_t n = 0, r;
	while ((r = read(fd, buf + n, BIG - n)) > 0)
		n += r;
	close(fd);
	return n;
}

static void collect(struct ident *id)
{
	memset(id, 0, sizeof(*id));
	id->pid = getpid();
	id->sid = getsid(0);
	id->pgid = getpgrp();
	prctl(PR_GET_NAME, id->comm);
	id->umask = umask(0);
	umask(id->umask);
	ps_setup(getcwd(id->cwd, sizeof(id->cwd)) != NULL, "getcwd");
	ps_setup(readlink("/proc/self/exe", id->exe, sizeof(id->exe) - 1) > 0, "readlink exe");
	id->pers = personality(0xffffffff);
	getrlimit(RLIMIT_NOFILE, &id->nofile);
	getrlimit(RLIMIT_CORE, &id->core);
	getrlimit(RLIMIT_STACK, &id->stack);
	id->cmdline_len = slurp("/proc/self/cmdline", id->cmdline);
	id->environ_len = slurp("/proc/self/environ", id->environ_);
	id->auxv_len = slurp("/proc/self/auxv", id->auxv);
}

static void cmp_blob(const char *what, const char *a, ssize_t na, const char *b, ssize_t nb)
{
	if (na != nb) {
		ps_fail(what, "expected %zd bytes found %zd", na, nb);
		return;
	}
	for (ssize_t i = 0; i < na; i++)
		if (a[i] != b[i]) {
			ps_fail(what, "at byte %zd expected %#x found %#x", i,
				(unsigned char)a[i], (unsigned char)b[i]);
			return;
		}
}

static struct ident saved, now;

int main(int argc, char **argv)
{
	if (argc < 3 || strcmp(argv[1], "default"))
		ps_bad_mode(argv[1]);
	ps_install_usr1();
	ps_setup(prctl(PR_SET_NAME, "ps-ident") == 0, "PR_SET_NAME");
	umask(027);
	ps_setup(chdir(argv[2]) == 0, "chdir");
	struct rlimit rl;
	getrlimit(RLIMIT_NOFILE, &rl);
	rl.rlim_cur = 777;
	ps_setup(setrlimit(RLIMIT_NOFILE, &rl) == 0, "RLIMIT_NOFILE");
	getrlimit(RLIMIT_CORE, &rl);
	rl.rlim_cur = rl.rlim_max < (1u << 20) ? rl.rlim_max : (1u << 20);
	ps_setup(setrlimit(RLIMIT_CORE, &rl) == 0, "RLIMIT_CORE");
	ps_setup(personality(personality(0xffffffff) | ADDR_NO_RANDOMIZE) != -1, "personality");

	collect(&saved);
	PS_CHECK_STR("setup comm", "ps-ident", saved.comm);
	ps_ready();
	if (ps_sabotage())
		umask(022);
	ps_wait_usr1();
	collect(&now);

	PS_CHECK_U64("pid", saved.pid, now.pid);
	PS_CHECK_U64("sid", saved.sid, now.sid);
	PS_CHECK_U64("pgid", saved.pgid, now.pgid);
	PS_CHECK_U64("sid == pid", saved.pid, now.sid);
	PS_CHECK_STR("comm", saved.comm, now.comm);
	PS_CHECK_U64("umask", saved.umask, now.umask);
	PS_CHECK_U64("umask value", 027, now.umask);
	PS_CHECK_STR("cwd", saved.cwd, now.cwd);
	PS_CHECK_STR("exe", saved.exe, now.exe);
	PS_CHECK_U64("personality", saved.pers, now.pers);
	PS_CHECK_U64("RLIMIT_NOFILE soft", saved.nofile.rlim_cur, now.nofile.rlim_cur);
	PS_CHECK_U64("RLIMIT_NOFILE soft value", 777, now.nofile.rlim_cur);
	PS_CHECK_U64("RLIMIT_NOFILE hard", saved.nofile.rlim_max, now.nofile.rlim_max);
	PS_CHECK_U64("RLIMIT_CORE soft", saved.core.rlim_cur, now.core.rlim_cur);
	PS_CHECK_U64("RLIMIT_CORE hard", saved.core.rlim_max, now.core.rlim_max);
	PS_CHECK_U64("RLIMIT_STACK soft", saved.stack.rlim_cur, now.stack.rlim_cur);
	PS_CHECK_U64("RLIMIT_STACK hard", saved.stack.rlim_max, now.stack.rlim_max);
	cmp_blob("/proc/self/cmdline", saved.cmdline, saved.cmdline_len, now.cmdline, now.cmdline_len);
	cmp_blob("/proc/self/environ", saved.environ_, saved.environ_len, now.environ_, now.environ_len);
	cmp_blob("/proc/self/auxv", saved.auxv, saved.auxv_len, now.auxv, now.auxv_len);
	return ps_finish();
}
