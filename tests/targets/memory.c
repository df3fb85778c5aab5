/*
 * memory: every kind of mapping a dumper must get right.
 *
 *   ./memory default        (cwd: a scratch dir; creates priv.dat, shared.dat)
 *
 * brk heap (sbrk + small mallocs), an 8 MiB malloc (mmap'd by glibc), a fully
 * written anonymous area, a 64 MiB anonymous area with 5 touched pages (the
 * rest must stay absent: checked with mincore), a read-only area, a PROT_NONE
 * guard page inside an RW area, a MAP_PRIVATE file mapping with 2 COW pages,
 * a MAP_SHARED file mapping, a stack array, .data and .bss.
 * After SIGUSR1 it also grows the heap and writes through the shared mapping.
 */
#include "target.h"
#include <fcntl.h>
#include <sys/mman.h>

#define PG 4096ul
#define SPARSE_LEN (64ul << 20)
#define BIG_LEN (8ul << 20)

static unsigned char gdata[3 * 4096] = { [0 ... 3 * 4096 - 1] = 0x5a };
static unsigned char gbss[1 << 20];
static const unsigned long sparse_pages[] = { 0, 1, 4097, 8000, 16383 };
#define NSPARSE (sizeof(sparse_pages) / sizeof(sparse_pages[0]))

static void fill(void *p, size_t n, unsigned seed)
{
	unsigned char *b = p;
	for (size_t i = 0; i < n; i++)
		b[i] = (unsigned char)(i * 131u + seed + (i >> 12));
}

static int make_file(const char *name, size_t len, unsigned seed)
{
	unsigned char *buf = malloc(len);
	ps_setup(buf != NULL, "malloc file buffer");
	fill(buf, len, seed);
	int fd = open(name, O_RDWR | O_CREAT | O_TRUNC, 0644);
	ps_setup(fd >= 0, name);
	ps_setup(pwrite(fd, buf, len, 0) == (ssize_t)len, "write file");
	free(buf);
	return fd;
}

static unsigned long resident(void *p, size_t len)
{
	unsigned char vec[SPARSE_LEN / PG];
	ps_setup(mincore(p, len, vec) == 0, "mincore");
	unsigned long n = 0;
	for (size_t i = 0; i < len / PG; i++)
		n += vec[i] & 1;
	return n;
}

struct sums {
	uint64_t brk_small, mallocs, big, full, sparse, ro, guard_lo, guard_hi;
	uint64_t priv, shared, stack, data, bss;
};

static unsigned char *brk_small, *big, *full, *sparse, *ro, *guard, *priv, *shr;
static unsigned char *smalls[64];
static void *brk_end;

static void sum_all(struct sums *s, const unsigned char *stack, size_t stack_len)
{
	s->brk_small = ps_hash(brk_small, 3 * PG + 100);
	s->mallocs = 0;
	for (int i = 0; i < 64; i++)
		s->mallocs = s->mallocs * 31 + ps_hash(smalls[i], 1000);
	s->big = ps_hash(big, BIG_LEN);
	s->full = ps_hash(full, 1 << 20);
	s->sparse = 0;
	for (size_t i = 0; i < NSPARSE; i++)
		s->sparse = s->sparse * 31 + ps_hash(sparse + sparse_pages[i] * PG, PG);
	s->ro = ps_hash(ro, 4 * PG);
	s->guard_lo = ps_hash(guard, 8 * PG);
	s->guard_hi = ps_hash(guard + 9 * PG, 7 * PG);
	s->priv = ps_hash(priv, 16 * PG);
	s->shared = ps_hash(shr, 3 * PG);
	s->stack = ps_hash(stack, stack_len);
	s->data = ps_hash(gdata, sizeof(gdata));
	s->bss = ps_hash(gbss, sizeof(gbss));
}

int main(int argc, char **argv)
{
	if (argc < 2 || strcmp(argv[1], "default"))
		ps_bad_mode(argv[1]);
	ps_install_usr1();

	/* brk heap: raw sbrk plus small mallocs from the main arena */
	brk_small = sbrk(3 * PG + 100);
	ps_setup(brk_small != (void *)-1, "sbrk");
	fill(brk_small, 3 * PG + 100, 1);
	for (int i = 0; i < 64; i++) {
		smalls[i] = malloc(1000);
		ps_setup(smalls[i] != NULL, "malloc small");
		fill(smalls[i], 1000, 100 + i);
	}
	big = malloc(BIG_LEN);
	ps_setup(big != NULL, "malloc 8 MiB");
	fill(big, BIG_LEN, 2);
	brk_end = sbrk(0);

	full = mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	ps_setup(full != MAP_FAILED, "mmap full");
	fill(full, 1 << 20, 3);

	sparse = mmap(NULL, SPARSE_LEN, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	ps_setup(sparse != MAP_FAILED, "mmap sparse");
	ps_setup(madvise(sparse, SPARSE_LEN, MADV_NOHUGEPAGE) == 0, "madvise nohugepage");
	for (size_t i = 0; i < NSPARSE; i++)
		fill(sparse + sparse_pages[i] * PG, PG, 4 + i);

	ro = mmap(NULL, 4 * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	ps_setup(ro != MAP_FAILED, "mmap ro");
	fill(ro, 4 * PG, 5);
	ps_setup(mprotect(ro, 4 * PG, PROT_READ) == 0, "mprotect ro");

	guard = mmap(NULL, 16 * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	ps_setup(guard != MAP_FAILED, "mmap guard");
	fill(guard, 16 * PG, 6);
	ps_setup(mprotect(guard + 8 * PG, PG, PROT_NONE) == 0, "mprotect guard");

	int pfd = make_file("priv.dat", 16 * PG, 7);
	priv = mmap(NULL, 16 * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE, pfd, 0);
	ps_setup(priv != MAP_FAILED, "mmap priv.dat");
	close(pfd);
	for (size_t i = 0; i < 16; i++)
		(void)*(volatile unsigned char *)(priv + i * PG); /* clean file pages */
	fill(priv + 3 * PG, PG, 8);
	fill(priv + 10 * PG, PG, 9);

	int sfd = make_file("shared.dat", 4 * PG, 10);
	shr = mmap(NULL, 4 * PG, PROT_READ | PROT_WRITE, MAP_SHARED, sfd, 0);
	ps_setup(shr != MAP_FAILED, "mmap shared.dat");
	fill(shr + PG, PG, 11); /* reaches the file */

	unsigned char stack[16384];
	fill(stack, sizeof(stack), 12);
	memset(gdata, 0xa5, 100);
	fill(gbss + 4096, 65536, 13);

	struct sums before, after;
	sum_all(&before, stack, sizeof(stack));
	unsigned long sparse_res = resident(sparse, SPARSE_LEN);
	PS_CHECK_U64("setup sparse resident pages", NSPARSE, sparse_res);

	ps_ready();
	if (ps_sabotage())
		big[BIG_LEN / 2] ^= 1;
	ps_wait_usr1();

	/* before anything touches the sparse area again */
	PS_CHECK_U64("sparse resident pages", sparse_res, resident(sparse, SPARSE_LEN));
	PS_CHECK_U64("brk end", (uintptr_t)brk_end, (uintptr_t)sbrk(0));

	sum_all(&after, stack, sizeof(stack));
	static const char *names[] = { "brk sbrk area", "brk mallocs", "malloc 8MiB",
		"anon full", "anon sparse touched", "read-only area", "guard low",
		"guard high", "private file map", "shared file map", "stack array",
		".data", ".bss" };
	uint64_t *b = (uint64_t *)&before, *a = (uint64_t *)&after;
	for (size_t i = 0; i < sizeof(before) / 8; i++)
		if (b[i] != a[i])
			ps_fail(names[i], "checksum expected %#llx found %#llx",
				(unsigned long long)b[i], (unsigned long long)a[i]);

	unsigned char zero[PG] = { 0 };
	if (memcmp(sparse + 2 * PG, zero, PG) || memcmp(sparse + 9000 * PG, zero, PG))
		ps_fail("sparse untouched page", "expected zeros found data");

	/* the file under the private mapping never saw the COW writes */
	unsigned char *pbuf = malloc(16 * PG);
	int fd = open("priv.dat", O_RDONLY);
	ps_setup(fd >= 0 && pbuf && pread(fd, pbuf, 16 * PG, 0) == 16 * PG, "read priv.dat");
	close(fd);
	if (memcmp(pbuf, priv, 3 * PG) || memcmp(pbuf + 4 * PG, priv + 4 * PG, 6 * PG))
		ps_fail("private map clean pages", "expected file content found other");
	if (!memcmp(pbuf + 3 * PG, priv + 3 * PG, PG))
		ps_fail("private map COW page 3", "expected private copy found file content");

	/* heap still grows from where it was */
	unsigned char *more = sbrk(1 << 20);
	if (more == (void *)-1) {
		ps_fail("sbrk 1MiB after restore", "expected success found errno %d", errno);
	} else {
		PS_CHECK_U64("sbrk grow start", (uintptr_t)brk_end, (uintptr_t)more);
		fill(more, 1 << 20, 14);
		unsigned char *chk = malloc(1 << 20);
		fill(chk, 1 << 20, 14);
		if (memcmp(chk, more, 1 << 20))
			ps_fail("grown heap", "expected pattern found other");
	}

	/* the shared mapping still reaches the file (page 3 is not in the sums) */
	fill(shr + 3 * PG, PG, 15);
	unsigned char page[PG];
	ps_setup(pread(sfd, page, PG, 3 * PG) == PG, "pread shared.dat");
	if (memcmp(page, shr + 3 * PG, PG))
		ps_fail("shared map write", "expected in file found old content");
	ps_setup(pread(sfd, page, PG, PG) == PG, "pread shared.dat");
	if (memcmp(page, shr + PG, PG))
		ps_fail("shared map page 1", "expected file == mapping found different");
	return ps_finish();
}
