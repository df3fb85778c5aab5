/*
 * What a process shares with its tree or the system beyond its memory:
 *
 *   sharefiles  a child made with clone(CLONE_FILES): one fd table for two
 *   sharefs     a child made with clone(CLONE_FS): one root/cwd/umask for two
 */
#include "target.h"

#include <fcntl.h>
#include <sched.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <sys/syscall.h>

#define KCMP_FILES 2
#define KCMP_FS 3

static int mode_share(unsigned long flag, int kind, const char *what)
{
	pid_t parent = getpid();
	int up[2];
	char ch;
	ps_setup(pipe(up) == 0, "pipe");
	pid_t c = (pid_t)syscall(SYS_clone, flag | SIGCHLD, 0, 0, 0, 0);
	ps_setup(c >= 0, "clone");
	if (c == 0) {
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		if (getppid() != parent || write(up[1], "c", 1) != 1)
			_exit(2);
		for (;;)
			pause();
	}
	ps_setup(read(up[0], &ch, 1) == 1, "the child set up");
	ps_ready();
	if (ps_sabotage()) {
		kill(c, SIGKILL);
		waitpid(c, NULL, 0);
	}
	ps_wait_usr1();
	long r = syscall(SYS_kcmp, getpid(), c, kind, 0, 0);
	if (r != 0)
		ps_fail(what, "expected shared with the child found kcmp %ld (errno %d)", r, errno);
	kill(c, SIGKILL);
	waitpid(c, NULL, 0);
	return ps_finish();
}

int main(int argc, char **argv)
{
	const char *mode = argc >= 2 ? argv[1] : NULL;
	ps_install_usr1();
	if (mode && !strcmp(mode, "sharefiles"))
		return mode_share(CLONE_FILES, KCMP_FILES, "fd table");
	if (mode && !strcmp(mode, "sharefs"))
		return mode_share(CLONE_FS, KCMP_FS, "fs struct");
	ps_bad_mode(mode);
	return 2;
}
