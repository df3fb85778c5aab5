/*
 * pty: a pseudo-terminal pair inside the tree, with bytes queued both ways.
 *
 *   ./pty cooked   R (the root) holds the master (packet mode, a window
 *   ./pty raw      size); C leads its own session with the slave as its
 *                  controlling terminal, termios canonical without echo
 *                  (cooked) or cfmakeraw with VMIN 3 VTIME 7 (raw), VERASE
 *                  ^H; GC, in a group of its own, is the foreground group
 *                  and holds /dev/tty. Queued at READY: C's output
 *                  "out: hello\n" (cooked: OPOST makes it "\r\n") for the
 *                  master; R's input for the slave: "first line\npart"
 *                  (cooked: one whole line and one partial) or
 *                  "raw\x01\x7f\x03bytes" (raw).
 * After SIGUSR1 R checks the pty index, packet mode, lock, window size,
 * termios and reads exactly C's output (after the packet byte); then it
 * completes the partial line (" end\n") and tells C (SIGUSR2), which checks
 * its session, controlling terminal (tcgetsid, tty_nr of /proc/self/stat),
 * foreground group, termios and reads its input line by line ("first
 * line\n", then "part end\n") once GC has checked that it is the foreground
 * through its /dev/tty fd and that /dev/tty opens again, and C has made its
 * own group the foreground again.
 * Sabotage, right after READY: R reads one byte of the master's queue.
 */
#include "target.h"
#include "family.h"
#include <fcntl.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <termios.h>

static volatile sig_atomic_t got_usr2;
static void on_usr2(int sig) { (void)sig; got_usr2 = 1; }

struct shared {
	int ready_c, ready_gc;
	pid_t gc;
	struct termios tio;
};

static int cooked;
static const char out_cooked[] = "out: hello\r\n", out_raw[] = "out: hello\n";
static const char in_cooked[] = "first line\npart", in_raw[] = "raw\x01\x7f\x03" "bytes";
static const struct winsize ws = { 33, 111, 7, 9 };

static ssize_t read_retry(int fd, char *buf, size_t len)
{
	ssize_t n;
	while ((n = read(fd, buf, len)) < 0 && errno == EINTR)
		;
	return n;
}

static void wait_usr2(void)
{
	while (!got_usr2)
		pause();
}

static int same_termios(const struct termios *a, const struct termios *b)
{
	return a->c_iflag == b->c_iflag && a->c_oflag == b->c_oflag && a->c_cflag == b->c_cflag &&
	       a->c_lflag == b->c_lflag && !memcmp(a->c_cc, b->c_cc, sizeof(a->c_cc)) &&
	       cfgetispeed(a) == cfgetispeed(b) && cfgetospeed(a) == cfgetospeed(b);
}

static unsigned stat_tty_nr(void)
{
	char buf[1024];
	int fd = open("/proc/self/stat", O_RDONLY);
	ssize_t n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		return 0;
	buf[n] = 0;
	char *p = strrchr(buf, ')');
	int pid_dummy, ppid, pgrp, sid;
	unsigned tty_nr = 0;
	char state;
	(void)pid_dummy;
	sscanf(p + 2, "%c %d %d %d %u", &state, &ppid, &pgrp, &sid, &tty_nr);
	return tty_nr;
}

static void gc_main(struct shared *sh)
{
	int t = open("/dev/tty", O_RDWR);
	ps_setup(t >= 0, "GC open /dev/tty");
	__atomic_store_n(&sh->ready_gc, 1, __ATOMIC_SEQ_CST);
	wait_usr2();
	PS_CHECK_U64("GC: getpgrp", getpid(), getpgrp());
	PS_CHECK_U64("GC: isatty(/dev/tty fd)", 1, isatty(t));
	PS_CHECK_U64("GC: tcgetpgrp(/dev/tty fd)", getpgrp(), tcgetpgrp(t));
	int again = open("/dev/tty", O_RDWR);
	if (again < 0)
		ps_fail("GC: open /dev/tty again", "expected an fd found errno %d", errno);
	_exit(ps_failures ? 1 : 0);
}

static void c_main(struct shared *sh, const char *slave_name, int index)
{
	ps_setup(setsid() == getpid(), "C setsid");
	int s = open(slave_name, O_RDWR);
	ps_setup(s >= 0, "C open slave");
	ps_setup(ioctl(s, TIOCSCTTY, 0) == 0, "C TIOCSCTTY");
	struct termios tio;
	ps_setup(tcgetattr(s, &tio) == 0, "C tcgetattr");
	if (cooked) {
		tio.c_lflag |= ICANON;
		tio.c_lflag &= ~(ECHO | ECHOE | ECHOK);
	} else {
		cfmakeraw(&tio);
		tio.c_cc[VMIN] = 3;
		tio.c_cc[VTIME] = 7;
	}
	tio.c_cc[VERASE] = 0x08;
	ps_setup(tcsetattr(s, TCSANOW, &tio) == 0, "C tcsetattr");
	ps_setup(tcgetattr(s, &sh->tio) == 0, "C tcgetattr again");
	pid_t gc = fork_child();
	if (gc == 0)
		gc_main(sh);
	setpgid(gc, gc);
	sh->gc = gc;
	ps_setup(tcsetpgrp(s, gc) == 0, "C tcsetpgrp(GC)");
	const char *out = "out: hello\n";
	ps_setup(write(s, out, strlen(out)) == (ssize_t)strlen(out), "C write output");
	double deadline = mono() + 5.0;
	int want = cooked ? 11 : (int)sizeof(in_raw) - 1, have = 0;
	while (!__atomic_load_n(&sh->ready_gc, __ATOMIC_SEQ_CST) || (ioctl(s, FIONREAD, &have), have) != want) {
		if (mono() > deadline)
			setup_fail("C: GC or the input not there within 5 s");
		sleep_ms(1);
	}
	__atomic_store_n(&sh->ready_c, 1, __ATOMIC_SEQ_CST);
	wait_usr2();

	char buf[256];
	PS_CHECK_U64("C: getsid", getpid(), getsid(0));
	PS_CHECK_U64("C: tcgetsid", getpid(), tcgetsid(s));
	PS_CHECK_U64("C: tcgetpgrp", gc, tcgetpgrp(s));
	PS_CHECK_STR("C: ttyname", slave_name, ttyname(s) ? ttyname(s) : "(none)");
	PS_CHECK_U64("C: tty_nr", (136u << 8) | (unsigned)index, stat_tty_nr());
	struct termios now;
	tcgetattr(s, &now);
	PS_CHECK_U64("C: termios as set", 1, same_termios(&sh->tio, &now));
	tell_and_reap(gc, SIGUSR2, "GC");
	/* C's group is in the background (and orphaned: a read would fail with EIO): the foreground back */
	sigset_t ttou;
	sigemptyset(&ttou);
	sigaddset(&ttou, SIGTTOU);
	sigprocmask(SIG_BLOCK, &ttou, NULL);
	PS_CHECK_U64("C: tcsetpgrp(C)", 0, tcsetpgrp(s, getpgrp()));
	if (cooked) {
		ssize_t n = read_retry(s, buf, sizeof(buf));
		if (n != 11 || memcmp(buf, "first line\n", 11))
			ps_fail("C: first line", "expected 'first line\\n' found %zd bytes '%.*s'", n, (int)(n > 0 ? n : 0), buf);
		n = read_retry(s, buf, sizeof(buf));
		if (n != 9 || memcmp(buf, "part end\n", 9))
			ps_fail("C: second line", "expected 'part end\\n' found %zd bytes '%.*s'", n, (int)(n > 0 ? n : 0), buf);
	} else {
		ssize_t n = read_retry(s, buf, sizeof(buf));
		if (n != (ssize_t)sizeof(in_raw) - 1 || memcmp(buf, in_raw, sizeof(in_raw) - 1))
			ps_fail("C: raw input", "expected %zu bytes found %zd", sizeof(in_raw) - 1, n);
	}
	_exit(ps_failures ? 1 : 0);
}

static int run(void)
{
	struct shared *sh = shared_area(4096);
	int m = posix_openpt(O_RDWR | O_NOCTTY);
	ps_setup(m >= 0, "posix_openpt");
	ps_setup(grantpt(m) == 0 && unlockpt(m) == 0, "grantpt/unlockpt");
	int index = -1;
	ps_setup(ioctl(m, TIOCGPTN, &index) == 0, "TIOCGPTN");
	char slave_name[64];
	snprintf(slave_name, sizeof(slave_name), "/dev/pts/%d", index);
	int one = 1;
	ps_setup(ioctl(m, TIOCPKT, &one) == 0, "TIOCPKT");
	ps_setup(ioctl(m, TIOCSWINSZ, &ws) == 0, "TIOCSWINSZ");
	pid_t c = fork_child();
	if (c == 0)
		c_main(sh, slave_name, index);
	const char *out = cooked ? out_cooked : out_raw;
	size_t out_len = strlen(out);
	double deadline = mono() + 5.0;
	int have = 0;
	for (;;) {
		setup_alive(c, "C");
		struct pollfd p = { m, POLLPRI, 0 };
		if (poll(&p, 1, 0) == 1 && (p.revents & POLLPRI)) {  /* a status byte (termios change): read it */
			char st;
			ps_setup(read(m, &st, 1) == 1, "read packet status");
			continue;
		}
		ioctl(m, FIONREAD, &have);
		if (have == (int)out_len && __atomic_load_n(&sh->ready_c, __ATOMIC_SEQ_CST) == 0 && sh->gc) {
			const char *in = cooked ? in_cooked : in_raw;
			size_t in_len = cooked ? strlen(in_cooked) : sizeof(in_raw) - 1;
			ps_setup(write(m, in, in_len) == (ssize_t)in_len, "write input");
			break;
		}
		if (mono() > deadline)
			setup_fail("C's output not there within 5 s");
		sleep_ms(1);
	}
	while (!__atomic_load_n(&sh->ready_c, __ATOMIC_SEQ_CST)) {
		setup_alive(c, "C");
		if (mono() > deadline)
			setup_fail("C not ready within 5 s");
		sleep_ms(1);
	}
	ps_ready();
	if (ps_sabotage()) {
		char b[2];
		ps_setup(read(m, b, 2) == 2, "sabotage read");
	}
	ps_wait_usr1();

	int now_index = -1, pkt = -1, lck = -1;
	ioctl(m, TIOCGPTN, &now_index);
	PS_CHECK_U64("R: TIOCGPTN", index, now_index);
	ioctl(m, TIOCGPKT, &pkt);
	PS_CHECK_U64("R: packet mode", 1, pkt);
	ioctl(m, TIOCGPTLCK, &lck);
	PS_CHECK_U64("R: locked", 0, lck);
	struct winsize w;
	ioctl(m, TIOCGWINSZ, &w);
	PS_CHECK_U64("R: window rows", ws.ws_row, w.ws_row);
	PS_CHECK_U64("R: window cols", ws.ws_col, w.ws_col);
	PS_CHECK_U64("R: window xpixel", ws.ws_xpixel, w.ws_xpixel);
	PS_CHECK_U64("R: window ypixel", ws.ws_ypixel, w.ws_ypixel);
	struct termios tio;
	tcgetattr(m, &tio);
	PS_CHECK_U64("R: termios as C set it", 1, same_termios(&sh->tio, &tio));
	char buf[256];
	int fl = fcntl(m, F_GETFL);
	fcntl(m, F_SETFL, fl | O_NONBLOCK);
	ssize_t n = read(m, buf, sizeof(buf));
	if (n != (ssize_t)out_len + 1 || buf[0] != TIOCPKT_DATA || memcmp(buf + 1, out, out_len))
		ps_fail("R: C's output", "expected packet byte + %zu bytes found %zd", out_len, n);
	n = read(m, buf, sizeof(buf));
	if (!(n < 0 && errno == EAGAIN))
		ps_fail("R: after C's output", "expected EAGAIN found %zd", n);
	fcntl(m, F_SETFL, fl);
	if (cooked)
		ps_setup(write(m, " end\n", 5) == 5, "write line end");
	tell_and_reap(c, SIGUSR2, "C");
	return ps_finish();
}

int main(int argc, char **argv)
{
	const char *mode = argc >= 2 ? argv[1] : NULL;
	(void)pat;
	ps_install_usr1();
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_usr2;
	sigemptyset(&sa.sa_mask);
	ps_setup(sigaction(SIGUSR2, &sa, NULL) == 0, "sigaction SIGUSR2");
	if (mode && !strcmp(mode, "cooked"))
		cooked = 1;
	else if (!mode || strcmp(mode, "raw"))
		ps_bad_mode(mode);
	return run();
}
