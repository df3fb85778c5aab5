/*
 * tcp: one live TCP connection, with a byte stream each way that shows a
 * lost, duplicated or reordered byte: byte i from the client is
 * (i * 7 + 3) & 0xff, byte j to it (j * 13 + 5) & 0xff.
 *
 *   ./tcp ADDR OUT IN MODE
 *     listens on ADDR port 0 ("127.0.0.1", "::1", "::ffff:127.0.0.1"),
 *     prints "PORT n", accepts one client, prints READY. Until SIGUSR1 it
 *     sends what the socket takes of OUT bytes (poll, non-blocking) and,
 *     in MODE "stream", reads and checks what arrives; in MODE "stuffed"
 *     it reads nothing (the client's send queue and its own receive queue
 *     fill), in MODE "shut" it also shuts its write side down once all OUT
 *     bytes are queued (FIN_WAIT1/2 at the dump); in MODE "lastack" it
 *     shuts down only once the client's FIN has come (CLOSE_WAIT, then
 *     LAST_ACK behind a zero window).
 *     After SIGUSR1: sends the rest, reads and checks all IN bytes, then
 *     expects the client's EOF (nothing after the IN bytes), checks that
 *     its addresses (read at SIGUSR1) are those it had, and closes: PASS.
 */
#include "target.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>

static unsigned char in_byte(unsigned long long i) { return (unsigned char)(i * 7 + 3); }
static unsigned char out_byte(unsigned long long j) { return (unsigned char)(j * 13 + 5); }

int main(int argc, char **argv)
{
	if (argc != 5)
		ps_bad_mode(argc > 1 ? argv[1] : NULL);
	const char *addr = argv[1], *mode = argv[4];
	unsigned long long out_total = strtoull(argv[2], NULL, 0), in_total = strtoull(argv[3], NULL, 0);
	int stream = strcmp(mode, "stream") == 0, lastack = strcmp(mode, "lastack") == 0;
	int shut = strcmp(mode, "shut") == 0 || lastack;
	if (!stream && !shut && strcmp(mode, "stuffed") != 0)
		ps_bad_mode(mode);
	ps_install_usr1();

	struct sockaddr_storage ss;
	socklen_t sslen;
	memset(&ss, 0, sizeof(ss));
	int family = strchr(addr, ':') ? AF_INET6 : AF_INET;
	if (family == AF_INET) {
		struct sockaddr_in *a = (struct sockaddr_in *)&ss;
		a->sin_family = AF_INET;
		ps_setup(inet_pton(AF_INET, addr, &a->sin_addr) == 1, "inet_pton");
		sslen = sizeof(*a);
	} else {
		struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss;
		a->sin6_family = AF_INET6;
		ps_setup(inet_pton(AF_INET6, addr, &a->sin6_addr) == 1, "inet_pton");
		sslen = sizeof(*a);
	}
	int l = socket(family, SOCK_STREAM | SOCK_CLOEXEC, 0);
	ps_setup(l >= 0, "socket");
	ps_setup(bind(l, (struct sockaddr *)&ss, sslen) == 0, "bind");
	ps_setup(listen(l, 1) == 0, "listen");
	socklen_t len = sizeof(ss);
	ps_setup(getsockname(l, (struct sockaddr *)&ss, &len) == 0, "getsockname");
	dprintf(1, "PORT %d\n", ntohs(family == AF_INET ? ((struct sockaddr_in *)&ss)->sin_port
						    : ((struct sockaddr_in6 *)&ss)->sin6_port));
	int c = accept4(l, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
	ps_setup(c >= 0, "accept4");
	close(l);
	struct sockaddr_storage name0, peer0, name1, peer1;
	socklen_t nl0 = sizeof(name0), pl0 = sizeof(peer0), nl1 = sizeof(name1), pl1 = sizeof(peer1);
	ps_setup(getsockname(c, (struct sockaddr *)&name0, &nl0) == 0, "getsockname");
	ps_setup(getpeername(c, (struct sockaddr *)&peer0, &pl0) == 0, "getpeername");
	ps_ready();

	static unsigned char buf[65536];
	unsigned long long sent = 0, got = 0;
	int bad = 0, shut_done = 0, named = 0;
	for (;;) {
		int after = ps_usr1;
		if (after && !named) { /* restored, before the stream goes on (and a FIN may end it) */
			ps_setup(getsockname(c, (struct sockaddr *)&name1, &nl1) == 0, "getsockname");
			ps_setup(getpeername(c, (struct sockaddr *)&peer1, &pl1) == 0, "getpeername");
			named = 1;
		}
		if (after && sent == out_total && got == in_total)
			break;
		int reading = after || stream;
		struct pollfd p = { c, (short)((reading ? POLLIN : 0) | (sent < out_total ? POLLOUT : 0)), 0 };
		if (poll(&p, 1, 100) < 0 && errno != EINTR)
			ps_setup(0, "poll");
		if (sent < out_total && (p.revents & POLLOUT)) {
			size_t n = out_total - sent < sizeof(buf) ? (size_t)(out_total - sent) : sizeof(buf);
			for (size_t k = 0; k < n; k++)
				buf[k] = out_byte(sent + k);
			ssize_t w = send(c, buf, n, MSG_NOSIGNAL);
			if (w < 0 && errno != EAGAIN && errno != EINTR) {
				dprintf(1, "FAIL: send after %llu bytes: %s\n", sent, strerror(errno));
				return 1;
			}
			if (w > 0)
				sent += (unsigned long long)w;
		}
		if (shut && sent == out_total && !shut_done && lastack) {
			struct tcp_info ti;
			socklen_t tl = sizeof(ti);
			ps_setup(getsockopt(c, IPPROTO_TCP, TCP_INFO, &ti, &tl) == 0, "TCP_INFO");
			if (ti.tcpi_state != TCP_CLOSE_WAIT)
				continue;
		}
		if (shut && sent == out_total && !shut_done) {
			ps_setup(shutdown(c, SHUT_WR) == 0, "shutdown");
			shut_done = 1;
		}
		if (reading && (p.revents & (POLLIN | POLLHUP | POLLERR))) {
			ssize_t r = recv(c, buf, sizeof(buf), 0);
			if (r < 0 && errno != EAGAIN && errno != EINTR) {
				dprintf(1, "FAIL: recv after %llu bytes: %s\n", got, strerror(errno));
				return 1;
			}
			if (r == 0 && got < in_total) {
				dprintf(1, "FAIL: EOF after %llu of %llu bytes\n", got, in_total);
				return 1;
			}
			for (ssize_t k = 0; k < r; k++) {
				if (got + (unsigned long long)k >= in_total || buf[k] != in_byte(got + (unsigned long long)k)) {
					if (!bad++)
						dprintf(1, "FAIL: byte %llu is %#x, expected %#x\n", got + (unsigned long long)k,
							buf[k], in_byte(got + (unsigned long long)k));
				}
			}
			if (r > 0)
				got += (unsigned long long)r;
		}
	}
	if (bad)
		return 1;
	/* the client shuts down its write side after its IN bytes: nothing more comes */
	struct pollfd p = { c, POLLIN, 0 };
	int pr;
	do /* SIGUSR1 comes again while the client's FIN is still to come */
		pr = poll(&p, 1, 10000);
	while (pr < 0 && errno == EINTR);
	ps_setup(pr >= 0, "poll");
	ssize_t r = recv(c, buf, sizeof(buf), 0);
	if (r != 0)
		ps_fail("after the last byte:", "expected EOF found %zd (%s)", r, r < 0 ? strerror(errno) : "data");
	if (nl0 != nl1 || memcmp(&name0, &name1, nl0))
		ps_fail("getsockname", "changed");
	if (pl0 != pl1 || memcmp(&peer0, &peer1, pl0))
		ps_fail("getpeername", "changed");
	if (ps_sabotage())
		out_total++;
	PS_CHECK_U64("bytes sent", out_total, sent);
	PS_CHECK_U64("bytes received", in_total, got);
	close(c);
	return ps_finish();
}
