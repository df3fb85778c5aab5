/*
 * mntns: the init of a container with a mount namespace of its own, as
 * `unshare --fork --pid --mount --mount-proc --uts --ipc ./mntns box DIR SRC`
 * makes it (DIR: a directory the test made, with empty t/ and b/, and u/
 * where the test mounted a tmpfs in the host; SRC: a host directory with
 * a file `hostfile`).
 *
 *   ./mntns box DIR SRC   mounts a tmpfs (size=2m, mode=0751, nosuid, nodev,
 *                         shared) on DIR/t and fills it: `data` (5000 bytes,
 *                         times set), `sparse` (4 KiB at 1 MiB, 3 MiB long),
 *                         `sub/` (0710) with `inner` (0640, uid 1234 gid
 *                         5678), `link` -> data; holds `data` open at 1234;
 *                         binds SRC on DIR/b, read-only (a remount), holds
 *                         DIR/b/hostfile open at 3; unmounts DIR/u.
 *                         After SIGUSR1 it checks every file, the fds'
 *                         positions and mounts, its mount table (t, b, u,
 *                         /proc of its own pid namespace) and that DIR/b
 *                         refuses a write.
 *   ./mntns root DIR SRC  the same in a root of its own: binds DIR on itself
 *                         and SRC read-only on DIR/b, pivot_root(2)s into DIR
 *                         (unmounting the old root), mounts a procfs on
 *                         /proc and execs /mntns (DIR/mntns, a static copy)
 *                         in mode `rootbox`: the tmpfs on /t as above; the
 *                         checks as above, but for u/.
 * Sabotage, right after READY: one byte of `data` changes.
 */
#include "target.h"
#include <fcntl.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/syscall.h>

#define DATA_LEN 5000
#define SPARSE_AT (1 << 20)
#define SPARSE_LEN (3 << 20)
#define DATA_MTIME 1700000000

static char dir_t[512], dir_b[512], dir_u[512];
static int in_own_root;

static void fill(char *buf, size_t n, unsigned seed)
{
	for (size_t i = 0; i < n; i++)
		buf[i] = (char)((i * 131 + seed) & 0xff);
}

static void path(char *out, size_t n, const char *dir, const char *name)
{
	snprintf(out, n, "%s/%s", dir, name);
}

static void setup(const char *dir, const char *src, int *data_fd, int *host_fd)
{
	char p[600], buf[DATA_LEN];
	snprintf(dir_t, sizeof(dir_t), "%s/t", dir);
	snprintf(dir_b, sizeof(dir_b), "%s/b", dir);
	snprintf(dir_u, sizeof(dir_u), "%s/u", dir);
	ps_setup(mount("boxfs", dir_t, "tmpfs", MS_NOSUID | MS_NODEV, "size=2m,mode=0751") == 0, "mount tmpfs");
	ps_setup(mount(NULL, dir_t, NULL, MS_SHARED, NULL) == 0, "make the tmpfs shared");
	path(p, sizeof(p), dir_t, "data");
	int fd = open(p, O_RDWR | O_CREAT, 0644);
	ps_setup(fd >= 0, "create data");
	fill(buf, sizeof(buf), 7);
	ps_setup(write(fd, buf, sizeof(buf)) == DATA_LEN, "write data");
	struct timespec times[2] = {{DATA_MTIME - 100, 5}, {DATA_MTIME, 42}};
	ps_setup(futimens(fd, times) == 0, "futimens data");
	ps_setup(lseek(fd, 1234, SEEK_SET) == 1234, "seek data");
	*data_fd = fd;
	path(p, sizeof(p), dir_t, "sparse");
	fd = open(p, O_WRONLY | O_CREAT, 0600);
	ps_setup(fd >= 0, "create sparse");
	fill(buf, 4096, 9);
	ps_setup(pwrite(fd, buf, 4096, SPARSE_AT) == 4096, "write sparse");
	ps_setup(ftruncate(fd, SPARSE_LEN) == 0, "truncate sparse");
	close(fd);
	path(p, sizeof(p), dir_t, "sub");
	ps_setup(mkdir(p, 0710) == 0 && chmod(p, 0710) == 0, "mkdir sub");
	path(p, sizeof(p), dir_t, "sub/inner");
	fd = open(p, O_WRONLY | O_CREAT, 0640);
	ps_setup(fd >= 0 && write(fd, "inner\n", 6) == 6 && fchown(fd, 1234, 5678) == 0, "create sub/inner");
	ps_setup(fchmod(fd, 0640) == 0, "chmod sub/inner");
	close(fd);
	path(p, sizeof(p), dir_t, "link");
	ps_setup(symlink("data", p) == 0, "symlink");
	if (!in_own_root) {
		ps_setup(mount(src, dir_b, NULL, MS_BIND, NULL) == 0, "bind mount");
		ps_setup(mount(NULL, dir_b, NULL, MS_REMOUNT | MS_BIND | MS_RDONLY, NULL) == 0, "remount ro");
		ps_setup(umount2(dir_u, MNT_DETACH) == 0, "umount u");
	}
	path(p, sizeof(p), dir_b, "hostfile");
	*host_fd = open(p, O_RDONLY);
	ps_setup(*host_fd >= 0 && lseek(*host_fd, 3, SEEK_SET) == 3, "open hostfile");
}

/* Into a root of its own, DIR, with SRC bound read-only on DIR/b; then exec /mntns rootbox. */
static void pivot(const char *dir, const char *src)
{
	char b[600];
	snprintf(b, sizeof(b), "%s/b", dir);
	ps_setup(mount(dir, dir, NULL, MS_BIND, NULL) == 0, "bind the root on itself");
	ps_setup(mount(src, b, NULL, MS_BIND, NULL) == 0, "bind mount");
	ps_setup(mount(NULL, b, NULL, MS_REMOUNT | MS_BIND | MS_RDONLY, NULL) == 0, "remount ro");
	ps_setup(chdir(dir) == 0, "chdir to the new root");
	ps_setup(syscall(SYS_pivot_root, ".", ".") == 0, "pivot_root");
	ps_setup(umount2(".", MNT_DETACH) == 0, "unmount the old root");
	ps_setup(chdir("/") == 0, "chdir /");
	ps_setup(mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) == 0, "mount /proc");
	char *args[] = {"/mntns", "rootbox", "", "", NULL};
	execv("/mntns", args);
	ps_setup(0, "exec /mntns");
}

/* The mountinfo line of the mount at `point` (the last one there), or "". */
static void mount_line(const char *point, char *out, size_t n)
{
	char line[1024], mp[600];
	out[0] = 0;
	FILE *f = fopen("/proc/self/mountinfo", "r");
	if (!f)
		return;
	while (fgets(line, sizeof(line), f))
		if (sscanf(line, "%*s %*s %*s %*s %599s", mp) == 1 && strcmp(mp, point) == 0)
			snprintf(out, n, "%s", line);
	fclose(f);
}

static void check_mounts(void)
{
	char line[1024];
	mount_line(dir_t, line, sizeof(line));
	if (!strstr(line, " rw,nosuid,nodev") || !strstr(line, " shared:") || !strstr(line, "- tmpfs boxfs ") ||
	    !strstr(line, "size=2048k") || !strstr(line, "mode=751"))
		ps_fail("mount t", "expected a shared nosuid,nodev tmpfs of 2048k, mode 751 found '%s'", line);
	mount_line(dir_b, line, sizeof(line));
	if (!strstr(line, " ro,"))
		ps_fail("mount b", "expected a read-only bind mount found '%s'", line);
	mount_line(dir_u, line, sizeof(line));
	if (line[0] && !in_own_root)
		ps_fail("mount u", "expected none (unmounted inside) found '%s'", line);
	mount_line("/proc", line, sizeof(line));
	if (!strstr(line, " rw,nosuid,nodev,noexec") || !strstr(line, "- proc "))
		ps_fail("mount /proc", "expected the container's procfs found '%s'", line);
	char self[32] = "";
	ssize_t n = readlink("/proc/self", self, sizeof(self) - 1);
	self[n > 0 ? n : 0] = 0;
	PS_CHECK_STR("/proc/self (the procfs of its own pid namespace)", "1", self);
}

static void check_files(int data_fd, int host_fd)
{
	char p[600], want[DATA_LEN], got[DATA_LEN], buf[64];
	struct stat st;
	fill(want, sizeof(want), 7);
	PS_CHECK_U64("data fd position", 1234, lseek(data_fd, 0, SEEK_CUR));
	PS_CHECK_U64("data size", DATA_LEN, pread(data_fd, got, sizeof(got), 0));
	PS_CHECK_U64("data contents", ps_hash(want, sizeof(want)), ps_hash(got, sizeof(got)));
	path(p, sizeof(p), dir_t, "data");
	ps_setup(stat(p, &st) == 0, "stat data");
	PS_CHECK_U64("data mtime", DATA_MTIME, st.st_mtim.tv_sec);
	PS_CHECK_U64("data mtime ns", 42, st.st_mtim.tv_nsec);
	struct stat fst;
	ps_setup(fstat(data_fd, &fst) == 0, "fstat data");
	PS_CHECK_U64("data fd is the file at its path (inode)", st.st_ino, fst.st_ino);
	PS_CHECK_U64("data fd is the file at its path (device)", st.st_dev, fst.st_dev);
	path(p, sizeof(p), dir_t, "sparse");
	int fd = open(p, O_RDONLY);
	ps_setup(fd >= 0 && fstat(fd, &st) == 0, "open sparse");
	PS_CHECK_U64("sparse size", SPARSE_LEN, st.st_size);
	if (st.st_blocks * 512 > 64 * 1024)
		ps_fail("sparse", "expected at most 64 KiB allocated found %lld bytes", (long long)st.st_blocks * 512);
	fill(want, 4096, 9);
	PS_CHECK_U64("sparse data", 4096, pread(fd, got, 4096, SPARSE_AT));
	PS_CHECK_U64("sparse contents", ps_hash(want, 4096), ps_hash(got, 4096));
	char zero[16] = {0};
	if (pread(fd, got, 16, 4096) != 16 || memcmp(got, zero, 16))
		ps_fail("sparse hole", "expected 16 zero bytes at 4096");
	close(fd);
	path(p, sizeof(p), dir_t, "sub");
	ps_setup(stat(p, &st) == 0, "stat sub");
	PS_CHECK_U64("sub mode", 040710, st.st_mode);
	path(p, sizeof(p), dir_t, "sub/inner");
	ps_setup(stat(p, &st) == 0, "stat sub/inner");
	PS_CHECK_U64("inner mode", 0100640, st.st_mode);
	PS_CHECK_U64("inner uid", 1234, st.st_uid);
	PS_CHECK_U64("inner gid", 5678, st.st_gid);
	ps_setup(stat(dir_t, &st) == 0, "stat t");
	PS_CHECK_U64("tmpfs root mode", 040751, st.st_mode);
	path(p, sizeof(p), dir_t, "link");
	ssize_t n = readlink(p, buf, sizeof(buf) - 1);
	buf[n > 0 ? n : 0] = 0;
	PS_CHECK_STR("link", "data", buf);
	PS_CHECK_U64("hostfile fd position", 3, lseek(host_fd, 0, SEEK_CUR));
	n = pread(host_fd, buf, sizeof(buf) - 1, 0);
	buf[n > 0 ? n : 0] = 0;
	PS_CHECK_STR("hostfile", "from the host\n", buf);
	path(p, sizeof(p), dir_b, "new");
	fd = open(p, O_WRONLY | O_CREAT, 0600);
	if (fd >= 0 || errno != EROFS)
		ps_fail("b is read-only", "expected EROFS found fd %d errno %d", fd, errno);
}

int main(int argc, char **argv)
{
	if (argc < 4 || (strcmp(argv[1], "box") && strcmp(argv[1], "root") && strcmp(argv[1], "rootbox")))
		ps_bad_mode(argc > 1 ? argv[1] : NULL);
	if (!strcmp(argv[1], "root"))
		pivot(argv[2], argv[3]);
	in_own_root = !strcmp(argv[1], "rootbox");
	int data_fd, host_fd;
	ps_install_usr1();
	setup(argv[2], argv[3], &data_fd, &host_fd);
	ps_ready();
	if (ps_sabotage())
		ps_setup(pwrite(data_fd, "X", 1, 10) == 1, "sabotage");
	ps_wait_usr1();
	check_mounts();
	check_files(data_fd, host_fd);
	return ps_finish();
}
