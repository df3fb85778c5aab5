/*
 * ghosts: files unlinked while open.
 *
 *   ./ghosts default DIR
 *     fd 3  sparse.dat, O_RDWR at 12345, unlinked: 2 GiB, data only in
 *           [0, 256K), [1G, 1G+512K), [2G-256K, 2G); mode 0640, owner
 *           1234:5678, atime 1000000000.123456789, mtime 1100000000.5
 *     fd 4  null-node: a character device node 1:3 (/dev/null's), mode 0620,
 *           owner 42:43, same times, O_WRONLY, unlinked
 *     fd 5  fifo: a FIFO, mode 0640, owner 42:43, same times, O_RDWR, with
 *           "hello" in it, unlinked
 *     fd 6  a/linked.dat, O_RDWR at 77, unlinked, but still linked as
 *           keep/alias.dat: after restore the same inode as keep/alias.dat
 *   ./ghosts shared DIR
 *     root fd 3 and child fd 4: shared.dat opened apart (two open file
 *     descriptions, at 100 and 200), then unlinked. After restore both are
 *     one inode: each sees the other's writes.
 *
 * Each checks the stat (mode, owner, size, times, rdev) before reading, as
 * a read moves the atime. Sabotage: fd 3 moves by one byte (default), the
 * root's fd 3 does (shared).
 */
#include "target.h"
#include "family.h"
#include <fcntl.h>
#include <limits.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>

#define KIB 1024L
#define GIB (1024L * 1024 * 1024)
#define SPARSE_SIZE (2 * GIB)
#define ATIME_S 1000000000L
#define ATIME_NS 123456789L
#define MTIME_S 1100000000L
#define MTIME_NS 500000000L
#define LINKED_LEN 10000

struct extent {
	long off, len;
};
static const struct extent extents[] = {
	{ 0, 256 * KIB }, { GIB, 512 * KIB }, { SPARSE_SIZE - 256 * KIB, 256 * KIB },
};
#define NEXTENTS (int)(sizeof(extents) / sizeof(extents[0]))

static void at(int fd, int want)
{
	ps_setup(fd >= 0, "create fd");
	if (fd != want) {
		ps_setup(dup2(fd, want) == want, "dup2 to fixed number");
		close(fd);
	}
}

static void fill(unsigned char *b, long n, long off0, unsigned seed)
{
	for (long k = 0; k < n; k++)
		b[k] = pat(off0 + k, seed);
}

static void check_pat(const char *what, const unsigned char *b, long n, long off0, unsigned seed)
{
	for (long k = 0; k < n; k++)
		if (b[k] != pat(off0 + k, seed)) {
			ps_fail(what, "at byte %ld expected %#x found %#x", off0 + k, pat(off0 + k, seed), b[k]);
			return;
		}
}

static void set_times(const char *path)
{
	struct timespec ts[2] = { { ATIME_S, ATIME_NS }, { MTIME_S, MTIME_NS } };
	ps_setup(utimensat(AT_FDCWD, path, ts, 0) == 0, "utimensat");
}

/* type and permission bits, owner, times, no link left */
static void check_stat(const char *what, int fd, mode_t mode, uid_t uid, gid_t gid, nlink_t nlink,
		       struct stat *st)
{
	char w[128];
	if (fstat(fd, st) != 0) {
		ps_fail(what, "fstat expected success found errno %d", errno);
		memset(st, 0, sizeof(*st));
		return;
	}
	snprintf(w, sizeof(w), "%s st_mode", what);
	PS_CHECK_U64(w, mode, st->st_mode);
	snprintf(w, sizeof(w), "%s st_uid", what);
	PS_CHECK_U64(w, uid, st->st_uid);
	snprintf(w, sizeof(w), "%s st_gid", what);
	PS_CHECK_U64(w, gid, st->st_gid);
	snprintf(w, sizeof(w), "%s st_nlink", what);
	PS_CHECK_U64(w, nlink, st->st_nlink);
	if (nlink)
		return;  /* a linked file's times are its own business */
	snprintf(w, sizeof(w), "%s st_atim", what);
	PS_CHECK_U64(w, ATIME_S * 1000000000ull + ATIME_NS, st->st_atim.tv_sec * 1000000000ull + st->st_atim.tv_nsec);
	snprintf(w, sizeof(w), "%s st_mtim", what);
	PS_CHECK_U64(w, MTIME_S * 1000000000ull + MTIME_NS, st->st_mtim.tv_sec * 1000000000ull + st->st_mtim.tv_nsec);
}

static void check_seek(const char *what, int fd, long from, int whence, long expected)
{
	char w[128];
	snprintf(w, sizeof(w), "%s from %ld", what, from);
	PS_CHECK_U64(w, expected, lseek(fd, from, whence));
}

/* ------------------------------------------------------------------ default */

static int mode_default(void)
{
	unsigned char *buf = malloc(512 * KIB);
	ps_setup(buf != NULL, "malloc");

	/* fd 3: sparse */
	at(open("sparse.dat", O_RDWR | O_CREAT | O_EXCL, 0600), 3);
	for (int i = 0; i < NEXTENTS; i++) {
		fill(buf, extents[i].len, extents[i].off, 1);
		ps_setup(pwrite(3, buf, extents[i].len, extents[i].off) == extents[i].len, "pwrite sparse");
	}
	ps_setup(ftruncate(3, SPARSE_SIZE) == 0, "ftruncate sparse");
	ps_setup(fchown(3, 1234, 5678) == 0 && fchmod(3, 0640) == 0, "chown/chmod sparse");
	set_times("sparse.dat");
	ps_setup(lseek(3, 12345, SEEK_SET) == 12345, "lseek sparse");
	ps_setup(unlink("sparse.dat") == 0, "unlink sparse.dat");

	/* fd 4: a device node */
	ps_setup(mknod("null-node", S_IFCHR | 0600, makedev(1, 3)) == 0, "mknod");
	ps_setup(chown("null-node", 42, 43) == 0 && chmod("null-node", 0620) == 0, "chown/chmod node");
	set_times("null-node");
	at(open("null-node", O_WRONLY), 4);
	ps_setup(unlink("null-node") == 0, "unlink null-node");

	/* fd 5: a FIFO with bytes in it */
	ps_setup(mkfifo("fifo", 0600) == 0, "mkfifo");
	ps_setup(chown("fifo", 42, 43) == 0 && chmod("fifo", 0640) == 0, "chown/chmod fifo");
	at(open("fifo", O_RDWR), 5);
	ps_setup(write(5, "hello", 5) == 5, "write fifo");
	set_times("fifo");
	ps_setup(unlink("fifo") == 0, "unlink fifo");

	/* fd 6: unlinked from one name, still linked by another */
	ps_setup(mkdir("a", 0755) == 0 && mkdir("keep", 0755) == 0, "mkdir");
	fill(buf, LINKED_LEN, 0, 2);
	at(open("a/linked.dat", O_RDWR | O_CREAT | O_EXCL, 0644), 6);
	ps_setup(write(6, buf, LINKED_LEN) == LINKED_LEN, "write linked");
	ps_setup(link("a/linked.dat", "keep/alias.dat") == 0, "link");
	ps_setup(lseek(6, 77, SEEK_SET) == 77, "lseek linked");
	ps_setup(unlink("a/linked.dat") == 0, "unlink a/linked.dat");

	ps_ready();
	if (ps_sabotage())
		lseek(3, 1, SEEK_CUR);
	ps_wait_usr1();

	struct stat st;
	check_stat("fd 3 (sparse)", 3, S_IFREG | 0640, 1234, 5678, 0, &st);
	PS_CHECK_U64("fd 3 (sparse) st_size", SPARSE_SIZE, st.st_size);
	check_stat("fd 4 (device node)", 4, S_IFCHR | 0620, 42, 43, 0, &st);
	PS_CHECK_U64("fd 4 (device node) st_rdev", makedev(1, 3), st.st_rdev);
	check_stat("fd 5 (FIFO)", 5, S_IFIFO | 0640, 42, 43, 0, &st);
	check_stat("fd 6 (linked elsewhere)", 6, S_IFREG | 0644, 0, 0, 1, &st);
	struct stat alias;
	if (stat("keep/alias.dat", &alias) != 0)
		ps_fail("keep/alias.dat", "stat expected success found errno %d", errno);
	else
		PS_CHECK_U64("fd 6 inode == keep/alias.dat inode", alias.st_ino, st.st_ino);

	/* holes where they were, the data in between */
	PS_CHECK_U64("fd 3 offset", 12345, lseek(3, 0, SEEK_CUR));
	long pos = 0;
	for (int i = 0; i < NEXTENTS; i++) {
		check_seek("fd 3 SEEK_DATA", 3, pos, SEEK_DATA, extents[i].off);
		check_seek("fd 3 SEEK_HOLE", 3, extents[i].off, SEEK_HOLE, extents[i].off + extents[i].len);
		pos = extents[i].off + extents[i].len;
		ps_setup(pread(3, buf, extents[i].len, extents[i].off) == extents[i].len, "pread sparse");
		check_pat("fd 3 (sparse) data", buf, extents[i].len, extents[i].off, 1);
	}

	PS_CHECK_U64("fd 4 write", 3, write(4, "abc", 3));

	int queued = -1;
	ioctl(5, FIONREAD, &queued);
	PS_CHECK_U64("fd 5 (FIFO) bytes queued", 5, queued);
	char got[16] = { 0 };
	PS_CHECK_U64("fd 5 (FIFO) read", 5, read(5, got, 5));
	PS_CHECK_STR("fd 5 (FIFO) bytes", "hello", got);
	PS_CHECK_U64("fd 5 (FIFO) write", 5, write(5, "again", 5));
	memset(got, 0, sizeof(got));
	PS_CHECK_U64("fd 5 (FIFO) read again", 5, read(5, got, 5));
	PS_CHECK_STR("fd 5 (FIFO) bytes again", "again", got);

	PS_CHECK_U64("fd 6 offset", 77, lseek(6, 0, SEEK_CUR));
	ps_setup(pread(6, buf, LINKED_LEN, 0) == LINKED_LEN, "pread linked");
	check_pat("fd 6 (linked elsewhere) data", buf, LINKED_LEN, 0, 2);
	ps_setup(pwrite(6, "LINK", 4, 500) == 4, "pwrite linked");
	int afd = open("keep/alias.dat", O_RDONLY);
	memset(got, 0, sizeof(got));
	ps_setup(afd >= 0 && pread(afd, got, 4, 500) == 4, "pread keep/alias.dat");
	close(afd);
	PS_CHECK_STR("fd 6 write seen through keep/alias.dat", "LINK", got);
	return ps_finish();
}

/* ------------------------------------------------------------------- shared */

#define SHARED_LEN (64 * KIB)
enum { K_CHILD_READY, K_ROOT_INO };

static int mode_shared(void)
{
	unsigned char *buf = malloc(SHARED_LEN);
	ps_setup(buf != NULL, "malloc");
	uint64_t *k = shared_area(4096);
	fill(buf, SHARED_LEN, 0, 3);
	at(open("shared.dat", O_RDWR | O_CREAT | O_EXCL, 0600), 3);
	ps_setup(write(3, buf, SHARED_LEN) == SHARED_LEN, "write shared.dat");
	ps_setup(lseek(3, 100, SEEK_SET) == 100, "lseek");

	pid_t c = fork_child();
	if (c == 0) {
		close(3);
		at(open("shared.dat", O_RDWR), 4);
		ps_setup(lseek(4, 200, SEEK_SET) == 200, "C: lseek");
		__atomic_store_n(&k[K_CHILD_READY], 1, __ATOMIC_SEQ_CST);
		ps_wait_usr1();
		struct stat st;
		ps_setup(fstat(4, &st) == 0, "C: fstat");
		PS_CHECK_U64("C: fd 4 inode == root's fd 3 inode", __atomic_load_n(&k[K_ROOT_INO], __ATOMIC_SEQ_CST),
			     st.st_ino);
		PS_CHECK_U64("C: fd 4 st_nlink", 0, st.st_nlink);
		PS_CHECK_U64("C: fd 4 offset", 200, lseek(4, 0, SEEK_CUR));
		char got[8] = { 0 };
		PS_CHECK_U64("C: pread fd 4", 4, pread(4, got, 4, 1000));
		PS_CHECK_STR("C: the root's write through fd 4", "ROOT", got);
		ps_setup(pwrite(4, "KID!", 4, 2000) == 4, "C: pwrite");
		_exit(ps_failures ? 1 : 0);
	}
	double deadline = mono() + 5.0;
	while (!__atomic_load_n(&k[K_CHILD_READY], __ATOMIC_SEQ_CST)) {
		setup_alive(c, "C");
		if (mono() > deadline)
			setup_fail("C: not ready within 5 s");
		sleep_ms(1);
	}
	ps_setup(unlink("shared.dat") == 0, "unlink shared.dat");

	ps_ready();
	if (ps_sabotage())
		lseek(3, 1, SEEK_CUR);
	ps_wait_usr1();

	struct stat st;
	ps_setup(fstat(3, &st) == 0, "fstat");
	PS_CHECK_U64("root: fd 3 st_nlink", 0, st.st_nlink);
	PS_CHECK_U64("root: fd 3 offset", 100, lseek(3, 0, SEEK_CUR));
	__atomic_store_n(&k[K_ROOT_INO], st.st_ino, __ATOMIC_SEQ_CST);
	ps_setup(pwrite(3, "ROOT", 4, 1000) == 4, "pwrite");
	tell_and_reap(c, SIGUSR1, "C");
	char got[8] = { 0 };
	PS_CHECK_U64("root: pread fd 3", 4, pread(3, got, 4, 2000));
	PS_CHECK_STR("root: the child's write through fd 3", "KID!", got);
	ps_setup(pread(3, buf, 1000, 0) == 1000, "pread");
	check_pat("root: shared.dat before the writes", buf, 1000, 0, 3);
	return ps_finish();
}

int main(int argc, char **argv)
{
	if (argc < 3)
		ps_bad_mode(argv[1]);
	ps_install_usr1();
	ps_setup(chdir(argv[2]) == 0, "chdir");
	if (!strcmp(argv[1], "default"))
		return mode_default();
	if (!strcmp(argv[1], "shared"))
		return mode_shared();
	ps_bad_mode(argv[1]);
	return 2;
}
