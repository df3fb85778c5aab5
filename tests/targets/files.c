/*
 * files: the fd table.
 *
 *   ./files default DIR      (DIR: scratch directory for the files)
 *
 * fd  role                                  offset  flags
 * 3   ro.dat     O_RDONLY                   1000
 * 4   wo.dat     O_WRONLY                   4096 (after writing 4096)
 * 5   app.dat    O_WRONLY|O_APPEND          end
 * 6   rw.dat     O_RDWR|O_NONBLOCK          123
 * 7   cx.dat     O_RDONLY|O_CLOEXEC         77
 * 8   dup(3)                                shares 3's offset
 * 9   /dev/null O_WRONLY, 10 /dev/zero, 11 /dev/urandom
 * 12  ghost.dat  O_RDWR, unlinked           5000
 * 100 dup2(6, 100)                          shares 6's offset
 * No other fd above 2 may be open.  Sabotage: fd 3 moves by one byte.
 */
#include "target.h"
#include <fcntl.h>
#include <sys/stat.h>

struct fdspec {
	int fd;
	const char *name;
	long off;
	int fl;      /* O_ACCMODE | O_APPEND | O_NONBLOCK */
	int cloexec;
};

static const struct fdspec specs[] = {
	{ 3, "ro.dat", 1000, O_RDONLY, 0 },
	{ 4, "wo.dat", 4096, O_WRONLY, 0 },
	{ 5, "app.dat", 300, O_WRONLY | O_APPEND, 0 },
	{ 6, "rw.dat", 123, O_RDWR | O_NONBLOCK, 0 },
	{ 7, "cx.dat", 77, O_RDONLY, 1 },
	{ 8, "dup of 3", 1000, O_RDONLY, 0 },
	{ 9, "/dev/null", 0, O_WRONLY, 0 },
	{ 10, "/dev/zero", 0, O_RDONLY, 0 },
	{ 11, "/dev/urandom", 0, O_RDONLY, 0 },
	{ 12, "ghost.dat", 5000, O_RDWR, 0 },
	{ 100, "dup2 of 6", 123, O_RDWR | O_NONBLOCK, 0 },
};
#define NSPECS (int)(sizeof(specs) / sizeof(specs[0]))

static unsigned char pat(long off, int seed) { return (unsigned char)(off * 13 + seed + (off >> 9)); }

static void make(const char *name, long len, int seed)
{
	unsigned char buf[16384];
	for (long i = 0; i < len; i++)
		buf[i] = pat(i, seed);
	int fd = open(name, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	ps_setup(fd >= 0 && write(fd, buf, len) == len, name);
	close(fd);
}

static void at(int fd, int want)
{
	if (fd != want) {
		ps_setup(dup2(fd, want) == want, "dup2 to fixed number");
		close(fd);
	}
}

static void expect_bytes(const char *what, int fd, long off, int seed, int n)
{
	unsigned char buf[256];
	ssize_t r = read(fd, buf, n);
	if (r != n) {
		ps_fail(what, "expected %d bytes found %zd (errno %d)", n, r, errno);
		return;
	}
	for (int i = 0; i < n; i++)
		if (buf[i] != pat(off + i, seed)) {
			ps_fail(what, "at %ld expected %#x found %#x", off + i, pat(off + i, seed), buf[i]);
			return;
		}
}

int main(int argc, char **argv)
{
	if (argc < 3 || strcmp(argv[1], "default"))
		ps_bad_mode(argv[1]);
	ps_install_usr1();
	ps_setup(chdir(argv[2]) == 0, "chdir");
	make("ro.dat", 8192, 1);
	make("app.dat", 300, 2);
	make("rw.dat", 300, 3);
	make("cx.dat", 200, 4);
	make("ghost.dat", 3 * 4096, 5);

	at(open("ro.dat", O_RDONLY), 3);
	ps_setup(lseek(3, 1000, SEEK_SET) == 1000, "lseek");
	at(open("wo.dat", O_WRONLY | O_CREAT | O_TRUNC, 0644), 4);
	unsigned char page[4096];
	for (int i = 0; i < 4096; i++)
		page[i] = pat(i, 6);
	ps_setup(write(4, page, 4096) == 4096, "write wo.dat");
	at(open("app.dat", O_WRONLY | O_APPEND), 5);
	ps_setup(lseek(5, 0, SEEK_END) == 300, "lseek app.dat");
	at(open("rw.dat", O_RDWR | O_NONBLOCK), 6);
	ps_setup(lseek(6, 123, SEEK_SET) == 123, "lseek");
	at(open("cx.dat", O_RDONLY | O_CLOEXEC), 7);
	ps_setup(lseek(7, 77, SEEK_SET) == 77, "lseek");
	ps_setup(dup(3) == 8, "dup(3) == 8");
	at(open("/dev/null", O_WRONLY), 9);
	at(open("/dev/zero", O_RDONLY), 10);
	at(open("/dev/urandom", O_RDONLY), 11);
	at(open("ghost.dat", O_RDWR), 12);
	ps_setup(lseek(12, 5000, SEEK_SET) == 5000, "lseek");
	ps_setup(unlink("ghost.dat") == 0, "unlink ghost.dat");
	ps_setup(dup2(6, 100) == 100, "dup2(6, 100)");

	ps_ready();
	if (ps_sabotage())
		lseek(3, 1, SEEK_CUR);
	ps_wait_usr1();

	char what[96];
	for (int i = 0; i < NSPECS; i++) {
		const struct fdspec *s = &specs[i];
		int fl = fcntl(s->fd, F_GETFL), fdfl = fcntl(s->fd, F_GETFD);
		if (fl < 0 || fdfl < 0) {
			snprintf(what, sizeof(what), "fd %d (%s)", s->fd, s->name);
			ps_fail(what, "expected open found errno %d", errno);
			continue;
		}
		snprintf(what, sizeof(what), "fd %d (%s) offset", s->fd, s->name);
		PS_CHECK_U64(what, s->off, lseek(s->fd, 0, SEEK_CUR));
		snprintf(what, sizeof(what), "fd %d (%s) F_GETFL access|append|nonblock", s->fd, s->name);
		PS_CHECK_U64(what, s->fl, fl & (O_ACCMODE | O_APPEND | O_NONBLOCK));
		snprintf(what, sizeof(what), "fd %d (%s) FD_CLOEXEC", s->fd, s->name);
		PS_CHECK_U64(what, s->cloexec, fdfl & FD_CLOEXEC);
	}
	for (int fd = 3; fd < 1024; fd++) {
		int known = 0;
		for (int i = 0; i < NSPECS; i++)
			known |= specs[i].fd == fd;
		if (!known && fcntl(fd, F_GETFD) >= 0) {
			char link[64], target[512] = "?";
			snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
			ssize_t n = readlink(link, target, sizeof(target) - 1);
			target[n > 0 ? n : 1] = 0;
			snprintf(what, sizeof(what), "fd %d", fd);
			ps_fail(what, "expected closed found open (%s)", target);
		}
	}

	/* content from the current positions, then shared offsets */
	expect_bytes("read ro.dat at 1000", 3, 1000, 1, 100);
	PS_CHECK_U64("dup 8 follows 3", 1100, lseek(8, 0, SEEK_CUR));
	lseek(8, 2000, SEEK_SET);
	PS_CHECK_U64("3 follows dup 8", 2000, lseek(3, 0, SEEK_CUR));
	expect_bytes("read rw.dat at 123", 6, 123, 3, 50);
	PS_CHECK_U64("100 follows 6", 173, lseek(100, 0, SEEK_CUR));
	expect_bytes("read cx.dat at 77", 7, 77, 4, 50);
	expect_bytes("read ghost at 5000", 12, 5000, 5, 200);

	struct stat st;
	fstat(12, &st);
	PS_CHECK_U64("ghost nlink", 0, st.st_nlink);
	PS_CHECK_U64("ghost size", 3 * 4096, st.st_size);
	unsigned char *g = malloc(3 * 4096);
	ps_setup(g && pread(12, g, 3 * 4096, 0) == 3 * 4096, "pread ghost");
	for (long i = 0; i < 3 * 4096; i++)
		if (g[i] != pat(i, 5)) {
			ps_fail("ghost content", "at %ld expected %#x found %#x", i, pat(i, 5), g[i]);
			break;
		}

	/* O_APPEND: lands at the end whatever the offset says */
	fstat(5, &st);
	off_t end = st.st_size;
	lseek(5, 0, SEEK_SET);
	ps_setup(write(5, "XYZ", 3) == 3, "write app.dat");
	char xyz[4] = { 0 };
	int rfd = open("app.dat", O_RDONLY);
	ps_setup(rfd >= 0 && pread(rfd, xyz, 3, end) == 3, "pread app.dat");
	close(rfd);
	PS_CHECK_STR("O_APPEND write at end", "XYZ", xyz);

	/* wo.dat: writing goes on at 4096 */
	ps_setup(write(4, "W", 1) == 1, "write wo.dat");
	fstat(4, &st);
	PS_CHECK_U64("wo.dat size after write at 4096", 4097, st.st_size);

	unsigned char z[4096];
	memset(z, 0xff, sizeof(z));
	PS_CHECK_U64("/dev/zero read", sizeof(z), read(10, z, sizeof(z)));
	for (size_t i = 0; i < sizeof(z); i++)
		if (z[i]) {
			ps_fail("/dev/zero", "expected zeros found %#x", z[i]);
			break;
		}
	PS_CHECK_U64("/dev/urandom read", 16, read(11, z, 16));
	PS_CHECK_U64("/dev/null write", 5, write(9, "hello", 5));
	return ps_finish();
}
