/*
 * inet: sockets of the network stack that are not live connections, each
 * with options set, checked by the target itself after the restore.
 *
 *   ./inet all   t4  TCP 127.0.0.1:0 listening, backlog 7; SO_REUSEADDR,
 *                    SO_KEEPALIVE, TCP_KEEPIDLE 77 / KEEPINTVL 11 / KEEPCNT 5,
 *                    SO_LINGER {1, 13}, TCP_NODELAY, SO_MARK 42, SO_PRIORITY 5,
 *                    SO_BINDTODEVICE lo, IP_FREEBIND, IP_TRANSPARENT, IP_TTL 33,
 *                    IP_TOS 0x10, TCP_MAXSEG 1000, TCP_USER_TIMEOUT 12345,
 *                    TCP_CONGESTION reno, SO_SNDBUF 200000, SO_RCVBUF 100000
 *                t6  TCP [::1]:0 listening, backlog 3, IPV6_V6ONLY,
 *                    IPV6_UNICAST_HOPS 17, IPV6_TCLASS 0x20 (no SO_REUSEADDR)
 *                tm  TCP [::ffff:127.0.0.1]:0 listening (v4-mapped), backlog 4
 *                u1  UDP 127.0.0.1:0 with a BPF filter cutting datagrams to 4
 *                    bytes (12 with the UDP header), IP_MULTICAST_TTL 9, IP_MULTICAST_LOOP 0,
 *                    IP_RECVTOS, SO_BROADCAST
 *                u2  UDP 127.0.0.1:0 connected to u1
 *                ul  UDP-Lite [::1]:0, UDPLITE_SEND_CSCOV / RECV_CSCOV 20
 *                r   raw ICMP socket, ICMP_FILTER all types (nothing queues)
 *                p   packet socket (SOCK_DGRAM, ETH_P_IP) bound to lo,
 *                    PACKET_AUXDATA, a BPF filter dropping everything
 *                n   netlink route socket bound to group 19 (mask 1 << 18),
 *                    member of group 34 too, NETLINK_NO_ENOBUFS
 *                After SIGUSR1: every option read back; t4, t6 and tm accept
 *                a new connection (tm from an IPv4 client); u2 sends to u1,
 *                which gets 4 bytes from u2's port; u1 sends back to u2; ul
 *                sends to itself; p, n and r keep their addresses and filters.
 */
#include "target.h"

#include <arpa/inet.h>
#include <linux/filter.h>
#include <linux/if_ether.h>
#include <linux/netlink.h>
#include <linux/if_packet.h>
#include <net/if.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#ifndef IPPROTO_UDPLITE
#define IPPROTO_UDPLITE 136
#endif
#define UDPLITE_SEND_CSCOV 10
#define UDPLITE_RECV_CSCOV 11
#define SOL_UDPLITE 136
#define ICMP_FILTER 1 /* linux/icmp.h, which clashes with net/if.h */
struct icmp_filter { unsigned int data; };

static void set_int(int fd, int level, int opt, int value, const char *what)
{
	ps_setup(setsockopt(fd, level, opt, &value, sizeof(value)) == 0, what);
}

static int get_int(int fd, int level, int opt)
{
	int v = -1;
	socklen_t len = sizeof(v);
	if (getsockopt(fd, level, opt, &v, &len))
		return -errno;
	return v;
}

#define CHECK_OPT(fd, level, opt, want) PS_CHECK_U64(#fd " " #opt, (want), get_int(fd, level, opt))

/* The int options, set in this order before bind and read back after the
 * restore: {socket, level, option, value set, value read, name}. */
struct int_opt {
	int *fd;
	int level, opt, set, want;
	const char *name;
};
static int t4, t6, tm, u1;
static const struct int_opt INT_OPTS[] = {
	{&t4, SOL_SOCKET, SO_REUSEADDR, 1, 1, "t4 SO_REUSEADDR"},
	{&t4, SOL_SOCKET, SO_KEEPALIVE, 1, 1, "t4 SO_KEEPALIVE"},
	{&t4, IPPROTO_TCP, TCP_KEEPIDLE, 77, 77, "t4 TCP_KEEPIDLE"},
	{&t4, IPPROTO_TCP, TCP_KEEPINTVL, 11, 11, "t4 TCP_KEEPINTVL"},
	{&t4, IPPROTO_TCP, TCP_KEEPCNT, 5, 5, "t4 TCP_KEEPCNT"},
	{&t4, IPPROTO_TCP, TCP_NODELAY, 1, 1, "t4 TCP_NODELAY"},
	{&t4, SOL_SOCKET, SO_MARK, 42, 42, "t4 SO_MARK"},
	{&t4, IPPROTO_IP, IP_FREEBIND, 1, 1, "t4 IP_FREEBIND"},
	{&t4, IPPROTO_IP, IP_TRANSPARENT, 1, 1, "t4 IP_TRANSPARENT"},
	{&t4, IPPROTO_IP, IP_TTL, 33, 33, "t4 IP_TTL"},
	{&t4, IPPROTO_IP, IP_TOS, 0x10, 0x10, "t4 IP_TOS"},  /* sets the priority to 6 (rt_tos2priority) ... */
	{&t4, SOL_SOCKET, SO_PRIORITY, 5, 5, "t4 SO_PRIORITY"},  /* ... which this overrides */
	{&t4, IPPROTO_TCP, TCP_MAXSEG, 1000, 1000, "t4 TCP_MAXSEG"},
	{&t4, IPPROTO_TCP, TCP_USER_TIMEOUT, 12345, 12345, "t4 TCP_USER_TIMEOUT"},
	{&t4, SOL_SOCKET, SO_SNDBUF, 200000, 400000, "t4 SO_SNDBUF"},  /* the kernel doubles it */
	{&t4, SOL_SOCKET, SO_RCVBUF, 100000, 200000, "t4 SO_RCVBUF"},
	{&t6, IPPROTO_IPV6, IPV6_V6ONLY, 1, 1, "t6 IPV6_V6ONLY"},
	{&t6, IPPROTO_IPV6, IPV6_UNICAST_HOPS, 17, 17, "t6 IPV6_UNICAST_HOPS"},
	{&t6, IPPROTO_IPV6, IPV6_TCLASS, 0x20, 0x20, "t6 IPV6_TCLASS"},
	{&t6, SOL_SOCKET, SO_REUSEADDR, 0, 0, "t6 SO_REUSEADDR"},  /* the restore's bind sets it, then puts it back */
	{&tm, IPPROTO_IPV6, IPV6_V6ONLY, 0, 0, "tm IPV6_V6ONLY"},
	{&u1, IPPROTO_IP, IP_MULTICAST_TTL, 9, 9, "u1 IP_MULTICAST_TTL"},
	{&u1, IPPROTO_IP, IP_MULTICAST_LOOP, 0, 0, "u1 IP_MULTICAST_LOOP"},
	{&u1, IPPROTO_IP, IP_RECVTOS, 1, 1, "u1 IP_RECVTOS"},
	{&u1, SOL_SOCKET, SO_BROADCAST, 1, 1, "u1 SO_BROADCAST"},
};

static unsigned short port_of(int fd)
{
	struct sockaddr_storage ss;
	socklen_t len = sizeof(ss);
	ps_setup(getsockname(fd, (struct sockaddr *)&ss, &len) == 0, "getsockname");
	return ntohs(ss.ss_family == AF_INET ? ((struct sockaddr_in *)&ss)->sin_port
					     : ((struct sockaddr_in6 *)&ss)->sin6_port);
}

static int tcp_backlog(int fd)
{
	struct tcp_info ti;
	socklen_t len = sizeof(ti);
	if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &ti, &len))
		return -errno;
	return ti.tcpi_state == 10 ? (int)ti.tcpi_sacked : -1000 - ti.tcpi_state;
}

static void accepts(int listener, int family, const char *host, const char *what)
{
	int c = socket(family, SOCK_STREAM, 0);
	struct sockaddr_storage ss;
	socklen_t len;
	memset(&ss, 0, sizeof(ss));
	if (family == AF_INET) {
		struct sockaddr_in *a = (struct sockaddr_in *)&ss;
		a->sin_family = AF_INET;
		a->sin_port = htons(port_of(listener));
		inet_pton(AF_INET, host, &a->sin_addr);
		len = sizeof(*a);
	} else {
		struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss;
		a->sin6_family = AF_INET6;
		a->sin6_port = htons(port_of(listener));
		inet_pton(AF_INET6, host, &a->sin6_addr);
		len = sizeof(*a);
	}
	if (connect(c, (struct sockaddr *)&ss, len)) {
		ps_fail(what, "connect errno %d", errno);
		close(c);
		return;
	}
	int s = accept(listener, NULL, NULL);
	if (s < 0)
		ps_fail(what, "accept errno %d", errno);
	else if (write(c, "ping", 4) != 4 || read(s, (char[8]){0}, 8) != 4)
		ps_fail(what, "no data through the accepted connection (errno %d)", errno);
	close(s);
	close(c);
}

static int bind_loopback(int fd, int family, const char *host)
{
	if (family == AF_INET) {
		struct sockaddr_in a = {.sin_family = AF_INET};
		inet_pton(AF_INET, host, &a.sin_addr);
		return bind(fd, (struct sockaddr *)&a, sizeof(a));
	}
	struct sockaddr_in6 a = {.sin6_family = AF_INET6};
	inet_pton(AF_INET6, host, &a.sin6_addr);
	return bind(fd, (struct sockaddr *)&a, sizeof(a));
}

int main(int argc, char **argv)
{
	if (argc < 2 || strcmp(argv[1], "all"))
		ps_bad_mode(argc > 1 ? argv[1] : NULL);
	ps_install_usr1();

	t4 = socket(AF_INET, SOCK_STREAM, 0);
	t6 = socket(AF_INET6, SOCK_STREAM, 0);
	tm = socket(AF_INET6, SOCK_STREAM, 0);
	u1 = socket(AF_INET, SOCK_DGRAM, 0);
	for (size_t i = 0; i < sizeof(INT_OPTS) / sizeof(INT_OPTS[0]); i++)
		set_int(*INT_OPTS[i].fd, INT_OPTS[i].level, INT_OPTS[i].opt, INT_OPTS[i].set, INT_OPTS[i].name);
	struct linger lg = {1, 13};
	ps_setup(setsockopt(t4, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg)) == 0, "SO_LINGER");
	ps_setup(setsockopt(t4, SOL_SOCKET, SO_BINDTODEVICE, "lo", 3) == 0, "SO_BINDTODEVICE");
	ps_setup(setsockopt(t4, IPPROTO_TCP, TCP_CONGESTION, "reno", 4) == 0, "TCP_CONGESTION");
	ps_setup(bind_loopback(t4, AF_INET, "127.0.0.1") == 0, "bind t4");
	ps_setup(listen(t4, 7) == 0, "listen t4");

	ps_setup(bind_loopback(t6, AF_INET6, "::1") == 0, "bind t6");
	ps_setup(listen(t6, 3) == 0, "listen t6");

	ps_setup(bind_loopback(tm, AF_INET6, "::ffff:127.0.0.1") == 0, "bind tm");
	ps_setup(listen(tm, 4) == 0, "listen tm");

	int u2 = socket(AF_INET, SOCK_DGRAM, 0);
	struct sock_filter cut[] = {BPF_STMT(BPF_RET | BPF_K, 12)};  /* the UDP header and 4 bytes */
	struct sock_fprog cutprog = {1, cut};
	ps_setup(setsockopt(u1, SOL_SOCKET, SO_ATTACH_FILTER, &cutprog, sizeof(cutprog)) == 0, "u1 filter");
	ps_setup(bind_loopback(u1, AF_INET, "127.0.0.1") == 0, "bind u1");
	ps_setup(bind_loopback(u2, AF_INET, "127.0.0.1") == 0, "bind u2");
	struct sockaddr_in u1a = {.sin_family = AF_INET, .sin_port = htons(port_of(u1))};
	inet_pton(AF_INET, "127.0.0.1", &u1a.sin_addr);
	ps_setup(connect(u2, (struct sockaddr *)&u1a, sizeof(u1a)) == 0, "connect u2");
	unsigned short u1port = port_of(u1), u2port = port_of(u2);

	int ul = socket(AF_INET6, SOCK_DGRAM, IPPROTO_UDPLITE);
	ps_setup(ul >= 0, "UDP-Lite socket");
	set_int(ul, SOL_UDPLITE, UDPLITE_SEND_CSCOV, 20, "UDPLITE_SEND_CSCOV");
	set_int(ul, SOL_UDPLITE, UDPLITE_RECV_CSCOV, 20, "UDPLITE_RECV_CSCOV");
	ps_setup(bind_loopback(ul, AF_INET6, "::1") == 0, "bind ul");

	int r = socket(AF_INET, SOCK_RAW, IPPROTO_ICMP);
	ps_setup(r >= 0, "raw socket");
	struct icmp_filter all = {~0u};
	ps_setup(setsockopt(r, SOL_RAW, ICMP_FILTER, &all, sizeof(all)) == 0, "ICMP_FILTER");

	int p = socket(AF_PACKET, SOCK_DGRAM, 0);  /* protocol 0: it receives nothing until bound */
	struct sock_filter drop[] = {BPF_STMT(BPF_RET | BPF_K, 0)};
	struct sock_fprog dropprog = {1, drop};
	ps_setup(setsockopt(p, SOL_SOCKET, SO_ATTACH_FILTER, &dropprog, sizeof(dropprog)) == 0, "p filter");
	set_int(p, SOL_PACKET, PACKET_AUXDATA, 1, "PACKET_AUXDATA");
	struct sockaddr_ll ll = {.sll_family = AF_PACKET, .sll_protocol = htons(ETH_P_IP),
				 .sll_ifindex = (int)if_nametoindex("lo")};
	ps_setup(bind(p, (struct sockaddr *)&ll, sizeof(ll)) == 0, "bind p");

	int n = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE);
	struct sockaddr_nl nl = {.nl_family = AF_NETLINK, .nl_groups = 1u << 18};
	ps_setup(bind(n, (struct sockaddr *)&nl, sizeof(nl)) == 0, "bind n");
	set_int(n, SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, 34, "NETLINK_ADD_MEMBERSHIP");
	set_int(n, SOL_NETLINK, NETLINK_NO_ENOBUFS, 1, "NETLINK_NO_ENOBUFS");
	struct sockaddr_nl nl_before;
	socklen_t nllen = sizeof(nl_before);
	ps_setup(getsockname(n, (struct sockaddr *)&nl_before, &nllen) == 0, "getsockname n");

	unsigned short t4port = port_of(t4), t6port = port_of(t6), tmport = port_of(tm), ulport = port_of(ul);
	if (ps_sabotage()) {
		set_int(t4, IPPROTO_TCP, TCP_KEEPIDLE, 78, "sabotage");
	}
	ps_ready();
	ps_wait_usr1();

	for (size_t i = 0; i < sizeof(INT_OPTS) / sizeof(INT_OPTS[0]); i++)
		PS_CHECK_U64(INT_OPTS[i].name, INT_OPTS[i].want, get_int(*INT_OPTS[i].fd, INT_OPTS[i].level, INT_OPTS[i].opt));

	struct linger lg2 = {0, 0};
	socklen_t lglen = sizeof(lg2);
	getsockopt(t4, SOL_SOCKET, SO_LINGER, &lg2, &lglen);
	PS_CHECK_U64("t4 SO_LINGER", 0x10000000dull, ((unsigned long long)lg2.l_onoff << 32) | lg2.l_linger);
	char dev[IFNAMSIZ] = "", cc[16] = "";
	socklen_t devlen = sizeof(dev), cclen = sizeof(cc);
	getsockopt(t4, SOL_SOCKET, SO_BINDTODEVICE, dev, &devlen);
	PS_CHECK_STR("t4 SO_BINDTODEVICE", "lo", dev);
	getsockopt(t4, IPPROTO_TCP, TCP_CONGESTION, cc, &cclen);
	PS_CHECK_STR("t4 TCP_CONGESTION", "reno", cc);
	PS_CHECK_U64("t4 port", t4port, port_of(t4));
	PS_CHECK_U64("t4 backlog", 7, tcp_backlog(t4));
	accepts(t4, AF_INET, "127.0.0.1", "t4");

	PS_CHECK_U64("t6 port", t6port, port_of(t6));
	PS_CHECK_U64("t6 backlog", 3, tcp_backlog(t6));
	accepts(t6, AF_INET6, "::1", "t6");

	PS_CHECK_U64("tm port", tmport, port_of(tm));
	PS_CHECK_U64("tm backlog", 4, tcp_backlog(tm));
	accepts(tm, AF_INET, "127.0.0.1", "tm from IPv4");

	PS_CHECK_U64("u1 port", u1port, port_of(u1));
	PS_CHECK_U64("u2 port", u2port, port_of(u2));
	char buf[64];
	struct sockaddr_in from;
	socklen_t fromlen = sizeof(from);
	if (send(u2, "hello-udp", 9, 0) != 9)
		ps_fail("u2 send", "errno %d", errno);
	ssize_t got = recvfrom(u1, buf, sizeof(buf), 0, (struct sockaddr *)&from, &fromlen);
	PS_CHECK_U64("u1 received (cut to 4 by its filter)", 4, got);
	PS_CHECK_U64("u1 sender port", u2port, ntohs(from.sin_port));
	if (sendto(u1, "back", 4, 0, (struct sockaddr *)&from, fromlen) != 4)
		ps_fail("u1 sendto", "errno %d", errno);
	PS_CHECK_U64("u2 received", 4, recv(u2, buf, sizeof(buf), 0));

	CHECK_OPT(ul, SOL_UDPLITE, UDPLITE_SEND_CSCOV, 20);
	CHECK_OPT(ul, SOL_UDPLITE, UDPLITE_RECV_CSCOV, 20);
	PS_CHECK_U64("ul port", ulport, port_of(ul));
	struct sockaddr_in6 self = {.sin6_family = AF_INET6, .sin6_port = htons(ulport)};
	inet_pton(AF_INET6, "::1", &self.sin6_addr);
	if (sendto(ul, "lite-datagram-of-thirty-bytes!", 30, 0, (struct sockaddr *)&self, sizeof(self)) != 30)
		ps_fail("ul sendto", "errno %d", errno);
	PS_CHECK_U64("ul received", 30, recv(ul, buf, sizeof(buf), 0));

	struct icmp_filter f = {0};
	socklen_t flen = sizeof(f);
	getsockopt(r, SOL_RAW, ICMP_FILTER, &f, &flen);
	PS_CHECK_U64("r ICMP_FILTER", ~0u, f.data);

	struct sockaddr_ll ll2;
	socklen_t lllen = sizeof(ll2);
	getsockname(p, (struct sockaddr *)&ll2, &lllen);
	PS_CHECK_U64("p ifindex", if_nametoindex("lo"), ll2.sll_ifindex);
	PS_CHECK_U64("p protocol", htons(ETH_P_IP), ll2.sll_protocol);
	CHECK_OPT(p, SOL_PACKET, PACKET_AUXDATA, 1);
	struct sock_filter prog[4];
	socklen_t plen = 4;  /* SO_GET_FILTER counts in instructions */
	PS_CHECK_U64("p filter read", 0, getsockopt(p, SOL_SOCKET, SO_GET_FILTER, prog, &plen));
	PS_CHECK_U64("p filter length", 1, plen);
	PS_CHECK_U64("p filter", BPF_RET | BPF_K, prog[0].code);
	plen = 4;
	getsockopt(u1, SOL_SOCKET, SO_GET_FILTER, prog, &plen);
	PS_CHECK_U64("u1 filter k", 12, plen == 1 ? prog[0].k : 0);

	struct sockaddr_nl nl_after;
	nllen = sizeof(nl_after);
	getsockname(n, (struct sockaddr *)&nl_after, &nllen);
	PS_CHECK_U64("n portid", nl_before.nl_pid, nl_after.nl_pid);
	PS_CHECK_U64("n groups", 1u << 18, nl_after.nl_groups);
	unsigned int groups[4] = {0};
	socklen_t glen = sizeof(groups);
	getsockopt(n, SOL_NETLINK, NETLINK_LIST_MEMBERSHIPS, groups, &glen);
	PS_CHECK_U64("n memberships", (1ull << 18) | (2ull << 32), groups[0] | ((unsigned long long)groups[1] << 32));
	CHECK_OPT(n, SOL_NETLINK, NETLINK_NO_ENOBUFS, 1);
	return ps_finish();
}
