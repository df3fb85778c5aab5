/*
 * File descriptors in flight (SCM_RIGHTS) on a unix socket pair:
 *
 *   ./scmrights FILE
 *
 * One message carries a regular file (offset 5, the same open file
 * description as fd `f` kept here), the write end of a pipe and one end of
 * a socket pair; a second message carries the file again; a seqpacket
 * pair carries the pipe's read end. The sender keeps
 * its fds open; nothing is received before the restore. After it: the
 * received file shares its offset with `f` (one open file description),
 * writing to the received pipe end arrives at the pipe's read end, the
 * received socket end talks to its pair, the received read end reads the pipe.
 */
#include "target.h"

#include <fcntl.h>
#include <sys/socket.h>

static void send_fds(int sk, const char *msg, const int *fds, int n)
{
	char ctl[CMSG_SPACE(3 * sizeof(int))];
	struct iovec iov = { (void *)msg, strlen(msg) };
	struct msghdr mh = { 0 };
	mh.msg_iov = &iov;
	mh.msg_iovlen = 1;
	mh.msg_control = ctl;
	mh.msg_controllen = CMSG_SPACE(n * sizeof(int));
	struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
	c->cmsg_level = SOL_SOCKET;
	c->cmsg_type = SCM_RIGHTS;
	c->cmsg_len = CMSG_LEN(n * sizeof(int));
	memcpy(CMSG_DATA(c), fds, n * sizeof(int));
	ps_setup(sendmsg(sk, &mh, 0) == (ssize_t)strlen(msg), "sendmsg");
}

static int recv_fds(int sk, char *buf, size_t size, int *fds, int max)
{
	char ctl[CMSG_SPACE(8 * sizeof(int))];
	struct iovec iov = { buf, size - 1 };
	struct msghdr mh = { 0 };
	mh.msg_iov = &iov;
	mh.msg_iovlen = 1;
	mh.msg_control = ctl;
	mh.msg_controllen = sizeof(ctl);
	ssize_t n = recvmsg(sk, &mh, MSG_DONTWAIT);
	if (n < 0)
		return -1;
	buf[n] = 0;
	int got = 0;
	for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c))
		if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS)
			for (size_t i = 0; i < (c->cmsg_len - CMSG_LEN(0)) / sizeof(int) && got < max; i++)
				memcpy(&fds[got++], CMSG_DATA(c) + i * sizeof(int), sizeof(int));
	return got;
}

int main(int argc, char **argv)
{
	ps_install_usr1();
	ps_setup(argc == 2, "usage: scmrights FILE");
	int f = open(argv[1], O_RDWR | O_CREAT | O_TRUNC, 0600);
	ps_setup(f >= 0, "open FILE");
	ps_setup(write(f, "0123456789", 10) == 10 && lseek(f, 5, SEEK_SET) == 5, "write FILE");
	int p[2], sp[2], ch[2], sq[2];
	ps_setup(pipe(p) == 0, "pipe");
	ps_setup(socketpair(AF_UNIX, SOCK_STREAM, 0, sp) == 0, "socketpair sp");
	ps_setup(socketpair(AF_UNIX, SOCK_DGRAM, 0, ch) == 0, "socketpair ch");
	ps_setup(socketpair(AF_UNIX, SOCK_SEQPACKET, 0, sq) == 0, "socketpair sq");
	int three[3] = { f, p[1], sp[1] };
	send_fds(ch[0], "three", three, 3);
	send_fds(ch[0], "again", &f, 1);
	send_fds(sq[0], "seq", &p[0], 1);
	ps_ready();
	ps_wait_usr1();

	char buf[64];
	int fds[8];
	int n = recv_fds(ch[1], buf, sizeof(buf), fds, 8);
	PS_CHECK_U64("fds in the first message", 3, n);
	PS_CHECK_STR("first message", "three", buf);
	if (n == 3) {
		/* one open file description: the offset moves for both */
		PS_CHECK_U64("offset of the received file", 5, lseek(fds[0], 0, SEEK_CUR));
		char c[3] = { 0 };
		PS_CHECK_U64("read of the received file", 2, read(fds[0], c, 2));
		PS_CHECK_STR("bytes at offset 5", "56", c);
		PS_CHECK_U64("offset of f after reading the received one", 7, lseek(f, 0, SEEK_CUR));
		PS_CHECK_U64("write to the received pipe end", 4, write(fds[1], "pipe", 4));
		memset(buf, 0, sizeof(buf));
		PS_CHECK_U64("read at the pipe's read end", 4, read(p[0], buf, sizeof(buf)));
		PS_CHECK_STR("pipe bytes", "pipe", buf);
		PS_CHECK_U64("write to the received socket end", 4, write(fds[2], "sock", 4));
		memset(buf, 0, sizeof(buf));
		PS_CHECK_U64("read at its pair", 4, read(sp[0], buf, sizeof(buf)));
		PS_CHECK_STR("socket bytes", "sock", buf);
	}
	int m = recv_fds(ch[1], buf, sizeof(buf), fds + 3, 5);
	PS_CHECK_U64("fds in the second message", 1, m);
	PS_CHECK_STR("second message", "again", buf);
	if (m == 1)
		PS_CHECK_U64("offset of the file received again", 7, lseek(fds[3], 0, SEEK_CUR));
	PS_CHECK_U64("nothing more queued", -1, recv_fds(ch[1], buf, sizeof(buf), fds, 8));
	int q = recv_fds(sq[1], buf, sizeof(buf), fds + 4, 4);
	PS_CHECK_U64("fds in the seqpacket message", 1, q);
	PS_CHECK_STR("seqpacket message", "seq", buf);
	if (q == 1) {
		PS_CHECK_U64("write to the pipe", 4, write(p[1], "more", 4));
		memset(buf, 0, sizeof(buf));
		PS_CHECK_U64("read at the received read end", 4, read(fds[4], buf, sizeof(buf)));
		PS_CHECK_STR("pipe bytes through the received end", "more", buf);
	}
	return ps_finish();
}
