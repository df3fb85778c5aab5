/*
 * What a process shares with its tree or the system beyond its memory:
 *
 *   chroot DIR  chroot into DIR/jail, working directory /sub in it
 *   sharefiles  a child made with clone(CLONE_FILES): one fd table for two
 *   sharefs     a child made with clone(CLONE_FS): one root/cwd/umask for two
 */
#include "target.h"

#include <fcntl.h>
#include <sched.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <sys/stat.h>
#include <sys/syscall.h>

#define KCMP_FILES 2
#define KCMP_FS 3

static int mode_chroot(const char *dir)
{
	char jail[4096];
	snprintf(jail, sizeof(jail), "%s/jail", dir);
	mkdir(jail, 0755);
	char sub[4200];
	snprintf(sub, sizeof(sub), "%s/sub", jail);
	mkdir(sub, 0755);
	char marker[4200];
	snprintf(marker, sizeof(marker), "%s/marker", jail);
	int fd = open(marker, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	ps_setup(fd >= 0, "create marker");
	ps_setup(write(fd, "inside", 6) == 6, "write marker");
	close(fd);
	struct stat jst;
	ps_setup(stat(jail, &jst) == 0, "stat jail");
	ps_setup(chroot(jail) == 0, "chroot");
	ps_setup(chdir("/sub") == 0, "chdir /sub");

	ps_ready();
	if (ps_sabotage())
		ps_setup(chdir("/") == 0, "sabotage chdir");
	ps_wait_usr1();

	struct stat rst;
	ps_setup(stat("/", &rst) == 0, "stat /");
	PS_CHECK_U64("root: inode", jst.st_ino, rst.st_ino);
	PS_CHECK_U64("root: device", jst.st_dev, rst.st_dev);
	char cwd[256] = "";
	if (!getcwd(cwd, sizeof(cwd)))
		snprintf(cwd, sizeof(cwd), "<errno %d>", errno);
	PS_CHECK_STR("cwd", "/sub", cwd);
	char buf[16] = "";
	fd = open("/marker", O_RDONLY);
	if (fd < 0 || read(fd, buf, sizeof(buf) - 1) < 0)
		ps_fail("/marker", "expected readable found errno %d", errno);
	PS_CHECK_STR("/marker", "inside", buf);
	return ps_finish();
}

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
	if (mode && !strcmp(mode, "chroot") && argc >= 3)
		return mode_chroot(argv[2]);
	if (mode && !strcmp(mode, "sharefiles"))
		return mode_share(CLONE_FILES, KCMP_FILES, "fd table");
	if (mode && !strcmp(mode, "sharefs"))
		return mode_share(CLONE_FS, KCMP_FS, "fs struct");
	ps_bad_mode(mode);
	return 2;
}
