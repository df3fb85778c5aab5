/*
 * locks: file locks held across a checkpoint.
 *
 *   ./locks default DIR
 *
 * In DIR it holds:
 *   a.dat  flock LOCK_EX
 *   b.dat  POSIX write lock on bytes 0-99, POSIX read lock from 200 to EOF
 *   c.dat  OFD write lock on bytes 10-19
 *   d.dat  flock LOCK_SH through one description open as two fds (dup)
 *   e.dat  POSIX write lock on byte 0, held by a child process
 * and a thread of its own holds none (POSIX locks belong to the process).
 *
 * After SIGUSR1 a fresh checker process (another lock owner) probes each
 * lock from outside: F_GETLK / F_OFD_GETLK / flock(LOCK_NB) must find every
 * one of them held, by the right owner, and nothing else locked.
 * Sabotage: the flock on a.dat is released after READY.
 */
#include "target.h"
#include <fcntl.h>
#include <sys/file.h>
#include <sys/wait.h>

static const char *dir;

static int open_in(const char *name, int flags)
{
	char path[4096];
	snprintf(path, sizeof(path), "%s/%s", dir, name);
	int fd = open(path, flags | O_CREAT, 0644);
	ps_setup(fd >= 0, path);
	return fd;
}

static int posix_lock(int fd, int cmd, short type, off_t start, off_t len)
{
	struct flock fl = { .l_type = type, .l_whence = SEEK_SET, .l_start = start, .l_len = len };
	return fcntl(fd, cmd, &fl);
}

/* Who holds a lock conflicting with `type` on [start, start+len): l_type and l_pid. */
static struct flock probe(int fd, int cmd, short type, off_t start, off_t len)
{
	struct flock fl = { .l_type = type, .l_whence = SEEK_SET, .l_start = start, .l_len = len };
	if (fcntl(fd, cmd, &fl) < 0) {
		ps_fail("probe", "fcntl(%d) errno %d", cmd, errno);
		fl.l_type = -1;
	}
	return fl;
}

static void expect(const char *what, struct flock fl, short type, pid_t pid)
{
	if (fl.l_type != type)
		ps_fail(what, "expected lock type %d found %d", type, fl.l_type);
	else if (type != F_UNLCK && fl.l_pid != pid)
		ps_fail(what, "expected owner %d found %d", pid, fl.l_pid);
}

static int check_from_outside(pid_t owner, pid_t child)
{
	int a = open_in("a.dat", O_RDWR), b = open_in("b.dat", O_RDWR), c = open_in("c.dat", O_RDWR);
	int d = open_in("d.dat", O_RDWR), e = open_in("e.dat", O_RDWR);
	if (flock(a, LOCK_EX | LOCK_NB) == 0)
		ps_fail("a.dat flock", "expected held (EWOULDBLOCK) found free");
	expect("b.dat bytes 0-99", probe(b, F_GETLK, F_RDLCK, 0, 100), F_WRLCK, owner);
	expect("b.dat bytes 100-199", probe(b, F_GETLK, F_WRLCK, 100, 100), F_UNLCK, 0);
	expect("b.dat byte 1000000 (read lock to EOF)", probe(b, F_GETLK, F_WRLCK, 1000000, 1), F_RDLCK, owner);
	expect("b.dat byte 1000000 shared", probe(b, F_GETLK, F_RDLCK, 1000000, 1), F_UNLCK, 0);
	expect("c.dat bytes 10-19 (OFD)", probe(c, F_OFD_GETLK, F_RDLCK, 15, 1), F_WRLCK, -1);
	expect("c.dat byte 20", probe(c, F_OFD_GETLK, F_WRLCK, 20, 1), F_UNLCK, 0);
	if (flock(d, LOCK_SH | LOCK_NB) != 0)
		ps_fail("d.dat flock", "expected shared lock possible found errno %d", errno);
	flock(d, LOCK_UN);
	if (flock(d, LOCK_EX | LOCK_NB) == 0)
		ps_fail("d.dat flock", "expected exclusive refused (shared lock held) found granted");
	expect("e.dat byte 0 (child's)", probe(e, F_GETLK, F_RDLCK, 0, 1), F_WRLCK, child);
	return ps_failures;
}

int main(int argc, char **argv)
{
	const char *mode = argc >= 2 ? argv[1] : NULL;
	if (!mode || strcmp(mode, "default") || argc < 3)
		ps_bad_mode(mode);
	dir = argv[2];
	ps_install_usr1();

	int a = open_in("a.dat", O_RDWR);
	ps_setup(flock(a, LOCK_EX | LOCK_NB) == 0, "flock a.dat");
	int b = open_in("b.dat", O_RDWR);
	ps_setup(posix_lock(b, F_SETLK, F_WRLCK, 0, 100) == 0, "POSIX lock b.dat 0-99");
	ps_setup(posix_lock(b, F_SETLK, F_RDLCK, 200, 0) == 0, "POSIX lock b.dat 200-EOF");
	int c = open_in("c.dat", O_RDWR);
	ps_setup(posix_lock(c, F_OFD_SETLK, F_WRLCK, 10, 10) == 0, "OFD lock c.dat 10-19");
	int d = open_in("d.dat", O_RDWR);
	ps_setup(dup2(d, 20) == 20, "dup d.dat");
	ps_setup(flock(20, LOCK_SH | LOCK_NB) == 0, "flock d.dat");

	int ready[2];
	ps_setup(pipe(ready) == 0, "pipe");
	pid_t child = fork();
	ps_setup(child >= 0, "fork");
	if (child == 0) {
		int e = open_in("e.dat", O_RDWR);
		if (posix_lock(e, F_SETLK, F_WRLCK, 0, 1) != 0)
			_exit(2);
		ps_setup(write(ready[1], "k", 1) == 1, "child ready");
		for (;;)
			pause();
	}
	char k;
	ps_setup(read(ready[0], &k, 1) == 1, "child lock");
	close(ready[0]);
	close(ready[1]);

	ps_ready();
	if (ps_sabotage())
		flock(a, LOCK_UN);
	ps_wait_usr1();

	pid_t checker = fork();
	ps_setup(checker >= 0, "fork checker");
	if (checker == 0)
		_exit(check_from_outside(getpid() == 0 ? 0 : getppid(), child) ? 1 : 0);
	int status;
	ps_setup(waitpid(checker, &status, 0) == checker, "wait checker");
	if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
		ps_fail("locks", "the checker found %s", "locks missing (see above)");
	kill(child, SIGKILL);
	waitpid(child, NULL, 0);
	return ps_finish();
}
