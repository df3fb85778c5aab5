/*
 * epollclosed: an epoll whose watched fds were closed while another fd
 * still holds their files.
 *
 *   ./epollclosed default
 *
 * eventfd at fd 10, watched (data 0xa1), dup'ed to fd 11, fd 10 closed;
 * a pipe's read end at fd 12, watched (data 0xc3), dup'ed to fd 13, fd 12
 * closed and then taken by an unrelated eventfd. After SIGUSR1 the epoll
 * (fd 20) must still list tfd 10 and tfd 12, report the eventfd as
 * readable with data 0xa1 once it is written through fd 11, and the pipe
 * with data 0xc3 once written; fd 12 must be the unrelated eventfd (count
 * 5). Sabotage removes the watch of fd 10.
 */
#include "target.h"
#include <fcntl.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>

static int watched_in_fdinfo(int tfd)
{
	char text[4096], want[32];
	int fd = open("/proc/self/fdinfo/20", O_RDONLY);
	ssize_t n = read(fd, text, sizeof(text) - 1);
	close(fd);
	text[n > 0 ? n : 0] = 0;
	snprintf(want, sizeof(want), "tfd: %8d ", tfd);
	return strstr(text, want) != NULL;
}

int main(int argc, char **argv)
{
	if (argc < 2 || strcmp(argv[1], "default"))
		ps_bad_mode(argc > 1 ? argv[1] : NULL);
	ps_install_usr1();
	int ep = epoll_create1(EPOLL_CLOEXEC);
	ps_setup(ep >= 0 && dup2(ep, 20) == 20, "epoll");
	close(ep);
	int ev = eventfd(0, EFD_NONBLOCK);
	ps_setup(ev >= 0 && dup2(ev, 10) == 10, "eventfd");
	close(ev);
	int p[2];
	ps_setup(pipe2(p, O_NONBLOCK) == 0 && dup2(p[0], 12) == 12 && dup2(p[1], 14) == 14, "pipe");
	close(p[0]);
	close(p[1]);
	struct epoll_event e = { .events = EPOLLIN, .data.u64 = 0xa1 };
	ps_setup(epoll_ctl(20, EPOLL_CTL_ADD, 10, &e) == 0, "add 10");
	e.data.u64 = 0xc3;
	ps_setup(epoll_ctl(20, EPOLL_CTL_ADD, 12, &e) == 0, "add 12");
	ps_setup(dup2(10, 11) == 11 && dup2(12, 13) == 13, "dup");
	close(10);
	close(12);
	int other = eventfd(5, 0);
	ps_setup(other >= 0 && dup2(other, 12) == 12, "unrelated eventfd at 12");
	close(other);
	ps_ready();
	if (ps_sabotage()) {
		dup2(11, 10);
		epoll_ctl(20, EPOLL_CTL_DEL, 10, NULL);
		close(10);
	}
	ps_wait_usr1();
	PS_CHECK_U64("fd 10 closed", 1, fcntl(10, F_GETFD) < 0 && errno == EBADF);
	PS_CHECK_U64("watch of tfd 10 listed", 1, watched_in_fdinfo(10));
	PS_CHECK_U64("watch of tfd 12 listed", 1, watched_in_fdinfo(12));
	uint64_t count = 0;
	PS_CHECK_U64("fd 12: the unrelated eventfd", 8, read(12, &count, 8));
	PS_CHECK_U64("fd 12: its count", 5, count);
	struct epoll_event out[4];
	PS_CHECK_U64("nothing ready yet", 0, epoll_wait(20, out, 4, 0));
	uint64_t one = 1;
	ps_setup(write(11, &one, 8) == 8, "write eventfd");
	int n = epoll_wait(20, out, 4, 0);
	PS_CHECK_U64("eventfd ready", 1, n);
	PS_CHECK_U64("eventfd data", 0xa1, n == 1 ? out[0].data.u64 : 0);
	ps_setup(read(11, &count, 8) == 8, "drain eventfd");
	ps_setup(write(14, "x", 1) == 1, "write pipe");
	n = epoll_wait(20, out, 4, 0);
	PS_CHECK_U64("pipe ready", 1, n);
	PS_CHECK_U64("pipe data", 0xc3, n == 1 ? out[0].data.u64 : 0);
	return ps_finish();
}
