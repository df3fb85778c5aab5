/*
 * opath: O_PATH fds of a file, a directory, a symlink itself (O_NOFOLLOW),
 * a FIFO and a device node.
 *
 *   ./opath default DIR     (DIR: a scratch directory made by the test)
 *
 * After SIGUSR1 each fd must still be O_PATH, of the same inode, and work
 * as one: the file read through /proc/self/fd, openat() under the
 * directory, readlinkat() of the symlink. Sabotage swaps the symlink's fd
 * for one that followed the link.
 */
#include "target.h"
#include <fcntl.h>
#include <sys/stat.h>

enum { F_FILE, F_DIR, F_LINK, F_FIFO, F_DEV, NFDS };
static const char *names[NFDS] = { "file", "dir", "link", "fifo", "/dev/null" };

int main(int argc, char **argv)
{
	if (argc < 3 || strcmp(argv[1], "default"))
		ps_bad_mode(argc > 1 ? argv[1] : NULL);
	ps_install_usr1();
	ps_setup(chdir(argv[2]) == 0, "chdir");
	int w = open("file", O_WRONLY | O_CREAT | O_TRUNC, 0644);
	ps_setup(w >= 0 && write(w, "opath-data", 10) == 10, "file");
	close(w);
	ps_setup(mkdir("dir", 0755) == 0 || errno == EEXIST, "mkdir");
	w = open("dir/inside", O_WRONLY | O_CREAT | O_TRUNC, 0644);
	ps_setup(w >= 0, "dir/inside");
	close(w);
	unlink("link");
	ps_setup(symlink("file", "link") == 0, "symlink");
	unlink("fifo");
	ps_setup(mkfifo("fifo", 0600) == 0, "mkfifo");
	int flags[NFDS] = { O_PATH, O_PATH | O_DIRECTORY, O_PATH | O_NOFOLLOW, O_PATH, O_PATH | O_CLOEXEC };
	int fds[NFDS];
	struct stat saved[NFDS];
	for (int i = 0; i < NFDS; i++) {
		fds[i] = open(names[i], flags[i]);
		ps_setup(fds[i] >= 0, names[i]);
		ps_setup(fstat(fds[i], &saved[i]) == 0, "fstat");
	}
	ps_ready();
	if (ps_sabotage()) {
		int followed = open("link", O_PATH);
		dup2(followed, fds[F_LINK]);
		close(followed);
	}
	ps_wait_usr1();
	for (int i = 0; i < NFDS; i++) {
		struct stat st;
		char what[64];
		snprintf(what, sizeof(what), "%s: fstat", names[i]);
		if (fstat(fds[i], &st) != 0) {
			ps_fail(what, "failed: %s", strerror(errno));
			continue;
		}
		snprintf(what, sizeof(what), "%s: inode", names[i]);
		PS_CHECK_U64(what, saved[i].st_ino, st.st_ino);
		snprintf(what, sizeof(what), "%s: file type", names[i]);
		PS_CHECK_U64(what, saved[i].st_mode & S_IFMT, st.st_mode & S_IFMT);
		snprintf(what, sizeof(what), "%s: O_PATH", names[i]);
		PS_CHECK_U64(what, O_PATH, fcntl(fds[i], F_GETFL) & O_PATH);
		snprintf(what, sizeof(what), "%s: FD_CLOEXEC", names[i]);
		PS_CHECK_U64(what, !!(flags[i] & O_CLOEXEC), !!(fcntl(fds[i], F_GETFD) & FD_CLOEXEC));
	}
	char buf[64] = "", proc[64];
	snprintf(proc, sizeof(proc), "/proc/self/fd/%d", fds[F_FILE]);
	int r = open(proc, O_RDONLY);
	if (r < 0 || read(r, buf, sizeof(buf) - 1) != 10)
		ps_fail("file: read through /proc/self/fd", "failed: %s", strerror(errno));
	else
		PS_CHECK_STR("file: contents", "opath-data", buf);
	if (r >= 0)
		close(r);
	int in = openat(fds[F_DIR], "inside", O_RDONLY);
	PS_CHECK_U64("dir: openat(inside) ok", 1, in >= 0);
	char target[64] = "";
	if (readlinkat(fds[F_LINK], "", target, sizeof(target) - 1) < 0)
		strcpy(target, "(not a symlink)");
	PS_CHECK_STR("link: readlinkat", "file", target);
	return ps_finish();
}
