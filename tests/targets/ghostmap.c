/*
 * ghostmap: private mappings of files unlinked while mapped (a library an
 * upgrade replaced), one also still open.
 *
 *   ./ghostmap default DIR     (DIR: a scratch directory made by the test)
 *
 * DIR/lib.dat (4 pages) is mapped MAP_PRIVATE read-write, page 1 written
 * (a copy-on-write page), the fd closed and the file unlinked; DIR/open.dat
 * (2 pages, a hole between) is mapped read-only and kept open at fd 30, then
 * unlinked. After SIGUSR1 every page must read as before (file pages from
 * the file, the written one as written), maps must show "(deleted)", and
 * fd 30 and the mapping must be one file. Sabotage writes into page 2.
 */
#include "target.h"
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>

#define PG 4096ul

static void fill(char *p, size_t n, unsigned seed)
{
	for (size_t i = 0; i < n; i++)
		p[i] = (char)(i * 13 + seed + (i >> 12));
}

static int make(const char *dir, const char *name, size_t len, unsigned seed, int hole)
{
	char path[4200];
	snprintf(path, sizeof(path), "%s/%s", dir, name);
	int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0640);
	ps_setup(fd >= 0, path);
	char *buf = malloc(len);
	fill(buf, len, seed);
	for (size_t off = 0; off < len; off += PG)
		if (!(hole && off == PG))
			ps_setup(pwrite(fd, buf + off, PG, (off_t)off) == (ssize_t)PG, "pwrite");
	ps_setup(ftruncate(fd, (off_t)len) == 0, "ftruncate");
	free(buf);
	ps_setup(unlink(path) == 0, "unlink");
	return fd;
}

static int deleted_in_maps(void *addr)
{
	char text[1 << 16], want[32];
	int fd = open("/proc/self/maps", O_RDONLY);
	ssize_t n = read(fd, text, sizeof(text) - 1);
	close(fd);
	text[n > 0 ? n : 0] = 0;
	snprintf(want, sizeof(want), "%lx-", (unsigned long)addr);
	char *line = strstr(text, want);
	char *end = line ? strchr(line, '\n') : NULL;
	if (end)
		*end = 0;
	return line && strstr(line, " (deleted)") != NULL;
}

int main(int argc, char **argv)
{
	if (argc < 3 || strcmp(argv[1], "default"))
		ps_bad_mode(argc > 1 ? argv[1] : NULL);
	ps_install_usr1();
	int fd = make(argv[2], "lib.dat", 4 * PG, 1, 0);
	char *lib = mmap(NULL, 4 * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
	ps_setup(lib != MAP_FAILED, "mmap lib");
	close(fd);
	memset(lib + PG, 0x77, 100);
	int open_fd = make(argv[2], "open.dat", 3 * PG, 2, 1);
	ps_setup(dup2(open_fd, 30) == 30, "dup2");
	close(open_fd);
	char *ro = mmap(NULL, 3 * PG, PROT_READ, MAP_PRIVATE, 30, 0);
	ps_setup(ro != MAP_FAILED, "mmap open.dat");
	uint64_t sums[4], ro_sum = ps_hash(ro, 3 * PG);
	for (int i = 0; i < 4; i++)
		sums[i] = ps_hash(lib + i * PG, PG);
	ps_ready();
	if (ps_sabotage())
		lib[2 * PG + 5] ^= 1;
	ps_wait_usr1();
	for (int i = 0; i < 4; i++) {
		char what[32];
		snprintf(what, sizeof(what), "lib page %d", i);
		PS_CHECK_U64(what, sums[i], ps_hash(lib + i * PG, PG));
	}
	PS_CHECK_U64("open.dat pages", ro_sum, ps_hash(ro, 3 * PG));
	PS_CHECK_U64("lib.dat mapping (deleted)", 1, deleted_in_maps(lib));
	PS_CHECK_U64("open.dat mapping (deleted)", 1, deleted_in_maps(ro));
	struct stat a, b;
	char mf[64];
	snprintf(mf, sizeof(mf), "/proc/self/map_files/%lx-%lx", (unsigned long)ro, (unsigned long)(ro + 3 * PG));
	ps_setup(fstat(30, &a) == 0 && stat(mf, &b) == 0, "stat fd 30 and its mapping");
	PS_CHECK_U64("fd 30 and its mapping: one inode", a.st_ino, b.st_ino);
	PS_CHECK_U64("fd 30: nlink", 0, a.st_nlink);
	PS_CHECK_U64("fd 30: size", 3 * PG, a.st_size);
	PS_CHECK_U64("fd 30: mode", S_IFREG | 0640, a.st_mode);
	return ps_finish();
}
