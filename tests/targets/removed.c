/*
 * removed: a working directory and a directory fd whose directories were
 * removed (rmdir) while in use.
 *
 *   ./removed default DIR     (DIR: a scratch directory made by the test)
 *
 * DIR/gone-cwd is entered and removed; DIR/gone-fd is opened at fd 20 and
 * removed. After SIGUSR1 both must still be removed directories (nlink 0,
 * mode as set, /proc shows "PATH (deleted)", nothing can be made in them)
 * and fd 20 still O_DIRECTORY. Sabotage leaves the cwd for DIR.
 */
#include "target.h"
#include <fcntl.h>
#include <sys/stat.h>

static void check_removed(const char *what, int fd, mode_t mode)
{
	struct stat st;
	char label[96];
	if (fstat(fd, &st) != 0) {
		ps_fail(what, "fstat failed: %s", strerror(errno));
		return;
	}
	snprintf(label, sizeof(label), "%s: nlink", what);
	PS_CHECK_U64(label, 0, st.st_nlink);
	snprintf(label, sizeof(label), "%s: mode", what);
	PS_CHECK_U64(label, S_IFDIR | mode, st.st_mode);
	snprintf(label, sizeof(label), "%s: create inside fails with ENOENT", what);
	int c = openat(fd, "new", O_WRONLY | O_CREAT, 0600);
	PS_CHECK_U64(label, ENOENT, c < 0 ? errno : 0);
}

int main(int argc, char **argv)
{
	if (argc < 3 || strcmp(argv[1], "default"))
		ps_bad_mode(argc > 1 ? argv[1] : NULL);
	ps_install_usr1();
	char cwd_path[4096], fd_path[4096], want_cwd[4200], want_fd[4200], got[4200];
	snprintf(cwd_path, sizeof(cwd_path), "%s/gone-cwd", argv[2]);
	snprintf(fd_path, sizeof(fd_path), "%s/gone-fd", argv[2]);
	ps_setup(mkdir(cwd_path, 0751) == 0 && chmod(cwd_path, 0751) == 0, "mkdir gone-cwd");
	ps_setup(mkdir(fd_path, 0705) == 0 && chmod(fd_path, 0705) == 0, "mkdir gone-fd");
	int fd = open(fd_path, O_RDONLY | O_DIRECTORY);
	ps_setup(fd >= 0 && dup2(fd, 20) == 20, "open gone-fd");
	close(fd);
	ps_setup(chdir(cwd_path) == 0, "chdir");
	ps_setup(rmdir(cwd_path) == 0 && rmdir(fd_path) == 0, "rmdir");
	snprintf(want_cwd, sizeof(want_cwd), "%s (deleted)", cwd_path);
	snprintf(want_fd, sizeof(want_fd), "%s (deleted)", fd_path);
	ps_ready();
	if (ps_sabotage())
		ps_setup(chdir(argv[2]) == 0, "sabotage chdir");
	ps_wait_usr1();
	ssize_t n = readlink("/proc/self/cwd", got, sizeof(got) - 1);
	got[n > 0 ? n : 0] = 0;
	PS_CHECK_STR("cwd link", want_cwd, got);
	n = readlink("/proc/self/fd/20", got, sizeof(got) - 1);
	got[n > 0 ? n : 0] = 0;
	PS_CHECK_STR("fd 20 link", want_fd, got);
	int here = open(".", O_RDONLY | O_DIRECTORY);
	if (here < 0)
		ps_fail("open .", "failed: %s", strerror(errno));
	else
		check_removed("cwd", here, 0751);
	check_removed("fd 20", 20, 0705);
	PS_CHECK_U64("fd 20 O_DIRECTORY", O_DIRECTORY, fcntl(20, F_GETFL) & O_DIRECTORY);
	return ps_finish();
}
