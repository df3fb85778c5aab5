/*
 * inherit: an fd whose file the restore is given by its caller
 * (restore --inherit-fd fd[N]:RESOURCE).
 *
 *   ./inherit pipe EXPECTED   fd 5 is the read end of a pipe of its own
 *                             (its write end closed: the tree alone holds
 *                             it). After SIGUSR1, reads fd 5 to EOF: that
 *                             must be EXPECTED (a caller's pipe, written
 *                             after the restore; a pipe made again would
 *                             give EOF at once).
 *   ./inherit file PATH EXPECTED
 *                             fd 5 is PATH opened read-only. After
 *                             SIGUSR1, reads fd 5 from its position to EOF:
 *                             that must be EXPECTED (what the caller's
 *                             file holds; PATH held something else).
 * Sabotage, right after READY: fd 5 is closed.
 */
#include "target.h"
#include <fcntl.h>

static void check_reads(const char *expected)
{
	char buf[256];
	size_t got = 0;
	for (;;) {
		ssize_t n = read(5, buf + got, sizeof(buf) - 1 - got);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			break;
		got += (size_t)n;
	}
	buf[got] = 0;
	PS_CHECK_STR("fd 5 reads", expected, buf);
}

int main(int argc, char **argv)
{
	const char *mode = argc > 1 ? argv[1] : NULL;
	ps_install_usr1();
	const char *expected;
	if (mode && !strcmp(mode, "pipe") && argc == 3) {
		int p[2];
		ps_setup(pipe(p) == 0 && dup2(p[0], 5) == 5, "pipe at fd 5");
		close(p[0]);
		close(p[1]);
		expected = argv[2];
	} else if (mode && !strcmp(mode, "file") && argc == 4) {
		int fd = open(argv[2], O_RDONLY);
		ps_setup(fd >= 0 && dup2(fd, 5) == 5, "open PATH at fd 5");
		close(fd);
		expected = argv[3];
	} else {
		ps_bad_mode(mode);
	}
	ps_ready();
	if (ps_sabotage())
		close(5);
	ps_wait_usr1();
	check_reads(expected);
	return ps_finish();
}
