/*
 * What a process shares with its tree or the system beyond its memory:
 *
 *   fown        signal-driven I/O: a pipe with O_ASYNC, owner = this process
 *               and F_SETSIG SIGRTMIN+1 (checked by a write that must queue
 *               that signal with si_fd); a socket owned by this thread (TID)
 *   chroot DIR  chroot into DIR/jail, working directory /sub in it
 *   sharefiles  a child made with clone(CLONE_FILES): one fd table for two
 *   sharefs     a child made with clone(CLONE_FS): one root/cwd/umask for two
 */
#include "target.h"

#include <fcntl.h>
#include <sched.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>

#define KCMP_FILES 2
#define KCMP_FS 3

static int mode_fown(void)
{
	int p[2], s[2];
	int sig = SIGRTMIN + 1;
	pid_t me = getpid();
	ps_setup(pipe(p) == 0, "pipe");
	ps_setup(socketpair(AF_UNIX, SOCK_STREAM, 0, s) == 0, "socketpair");
	sigset_t set;
	sigemptyset(&set);
	sigaddset(&set, sig);
	ps_setup(sigprocmask(SIG_BLOCK, &set, NULL) == 0, "block the I/O signal");
	struct f_owner_ex own = { F_OWNER_PID, me };
	ps_setup(fcntl(p[0], F_SETOWN_EX, &own) == 0, "F_SETOWN_EX pipe");
	ps_setup(fcntl(p[0], F_SETSIG, sig) == 0, "F_SETSIG");
	ps_setup(fcntl(p[0], F_SETFL, O_ASYNC | O_NONBLOCK) == 0, "O_ASYNC");
	struct f_owner_ex town = { F_OWNER_TID, (pid_t)syscall(SYS_gettid) };
	ps_setup(fcntl(s[0], F_SETOWN_EX, &town) == 0, "F_SETOWN_EX socket");

	ps_ready();
	if (ps_sabotage()) {
		struct f_owner_ex none = { F_OWNER_PID, 0 };
		fcntl(s[0], F_SETOWN_EX, &none);
	}
	ps_wait_usr1();

	struct f_owner_ex got;
	ps_setup(fcntl(p[0], F_GETOWN_EX, &got) == 0, "F_GETOWN_EX pipe");
	PS_CHECK_U64("pipe: owner type", F_OWNER_PID, got.type);
	PS_CHECK_U64("pipe: owner", me, got.pid);
	PS_CHECK_U64("pipe: F_GETSIG", sig, fcntl(p[0], F_GETSIG));
	PS_CHECK_U64("pipe: O_ASYNC", O_ASYNC, fcntl(p[0], F_GETFL) & O_ASYNC);
	ps_setup(fcntl(s[0], F_GETOWN_EX, &got) == 0, "F_GETOWN_EX socket");
	PS_CHECK_U64("socket: owner type", F_OWNER_TID, got.type);
	PS_CHECK_U64("socket: owner", town.pid, got.pid);
	ps_setup(write(p[1], "x", 1) == 1, "write the pipe");
	siginfo_t si;
	struct timespec ts = { 2, 0 };
	int r = sigtimedwait(&set, &si, &ts);
	if (r != sig)
		ps_fail("pipe: signal after a write", "expected %d found %d (errno %d)", sig, r, errno);
	else
		PS_CHECK_U64("pipe: si_fd", p[0], si.si_fd);
	return ps_finish();
}

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
	if (mode && !strcmp(mode, "fown"))
		return mode_fown();
	if (mode && !strcmp(mode, "chroot") && argc >= 3)
		return mode_chroot(argv[2]);
	if (mode && !strcmp(mode, "sharefiles"))
		return mode_share(CLONE_FILES, KCMP_FILES, "fd table");
	if (mode && !strcmp(mode, "sharefs"))
		return mode_share(CLONE_FS, KCMP_FS, "fs struct");
	ps_bad_mode(mode);
	return 2;
}
