/*
 * memfd: memfds with seals, modes and an executable one; memory areas whose
 * semantics are VMA flags (MADV_WIPEONFORK, MAP_DROPPABLE).
 *
 *   ./memfd default|wipe|future-mixed|secret|secret-mapped
 *
 * default: five memfds at fixed fds, each holding a pattern,
 *   20 "ps-plain"        no MFD_ALLOW_SEALING: seals F_SEAL_SEAL, mode 0777
 *   21 "ps-sealed"       fchmod 0640, then SHRINK|GROW|WRITE|SEAL, and a
 *                        read-only shared mapping made after the seals
 *                        (no VM_MAYWRITE: mprotect writable is refused)
 *   22 "ps-future"       a writable shared mapping, then F_SEAL_FUTURE_WRITE:
 *                        the mapping still writes, write() and new writable
 *                        mappings are refused
 *   23 "ps-noexec"       MFD_NOEXEC_SEAL: mode 0666, F_SEAL_EXEC (chmod +x refused)
 *   24 "ps exec image"   MFD_EXEC, a tiny static ELF that exits 42, fchmod
 *                        0750, then WRITE|SHRINK|GROW|EXEC (the kernel adds
 *                        FUTURE_WRITE); fexecve'd in a
 *                        child (before READY, and again after SIGUSR1)
 *   After SIGUSR1 each is checked: name, seals, mode, size, content, what the
 *   seals refuse, the mappings' VmFlags (mw), and the fexecve'd exit status.
 *   Sabotage: F_SEAL_GROW added to "ps-future" after READY.
 * wipe: 4 pages of private memory with MADV_WIPEONFORK and 4 pages of
 *   MAP_DROPPABLE memory, both written with a pattern. After SIGUSR1 each
 *   keeps its VmFlags (wf; dp), the wipe-on-fork area its pattern, the
 *   droppable area its pattern or zeros page by page (it may be dropped),
 *   and a forked child sees both areas zero.
 *   Sabotage: MADV_KEEPONFORK on the wipe-on-fork area after READY.
 * future-mixed: "ps-future" with a writable mapping made before the seal
 *   and a read-only one made after it (refused by dump).
 * secret: a memfd_secret fd; secret-mapped: a memfd_secret area, its fd
 *   closed (both refused by dump).
 */
#include "target.h"
#include <elf.h>
#include <fcntl.h>
#include <stddef.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>

#ifndef MFD_NOEXEC_SEAL
#define MFD_NOEXEC_SEAL 0x0008U
#define MFD_EXEC 0x0010U
#endif
#ifndef F_SEAL_FUTURE_WRITE
#define F_SEAL_FUTURE_WRITE 0x0010
#endif
#ifndef F_SEAL_EXEC
#define F_SEAL_EXEC 0x0020
#endif
#ifndef MAP_DROPPABLE
#define MAP_DROPPABLE 0x08
#endif
#ifndef SYS_memfd_secret
#define SYS_memfd_secret 447
#endif

#define PAGE 4096
#define LEN (4 * PAGE)
#define FD_PLAIN 20
#define FD_SEALED 21
#define FD_FUTURE 22
#define FD_NOEXEC 23
#define FD_EXEC 24
#define EXIT_CODE 42
#define SEALS_SEALED (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE | F_SEAL_SEAL)
#define SEALS_EXEC (F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_EXEC)
/* F_SEAL_EXEC on a memfd with exec bits makes it immutable: the kernel adds these */
#define SEALS_EXEC_GOT (SEALS_EXEC | F_SEAL_FUTURE_WRITE)

/* A static ELF of one PT_LOAD: mov edi, 42; mov eax, 60 (exit); syscall */
struct tiny_elf {
	Elf64_Ehdr e;
	Elf64_Phdr p;
	unsigned char code[12];
} __attribute__((packed));

static const unsigned char exit_code[12] = { 0xbf, EXIT_CODE, 0, 0, 0, 0xb8, 60, 0, 0, 0, 0x0f, 0x05 };

static void tiny_elf(struct tiny_elf *t)
{
	memset(t, 0, sizeof(*t));
	memcpy(t->e.e_ident, ELFMAG, SELFMAG);
	t->e.e_ident[EI_CLASS] = ELFCLASS64;
	t->e.e_ident[EI_DATA] = ELFDATA2LSB;
	t->e.e_ident[EI_VERSION] = EV_CURRENT;
	t->e.e_type = ET_EXEC;
	t->e.e_machine = EM_X86_64;
	t->e.e_version = EV_CURRENT;
	t->e.e_entry = 0x400000 + offsetof(struct tiny_elf, code);
	t->e.e_phoff = sizeof(Elf64_Ehdr);
	t->e.e_ehsize = sizeof(Elf64_Ehdr);
	t->e.e_phentsize = sizeof(Elf64_Phdr);
	t->e.e_phnum = 1;
	t->p.p_type = PT_LOAD;
	t->p.p_flags = PF_R | PF_X;
	t->p.p_vaddr = t->p.p_paddr = 0x400000;
	t->p.p_filesz = t->p.p_memsz = sizeof(*t);
	t->p.p_align = PAGE;
	memcpy(t->code, exit_code, sizeof(exit_code));
}

static void fill(unsigned char *p, size_t n, unsigned seed)
{
	for (size_t i = 0; i < n; i++)
		p[i] = (unsigned char)(i * 7 + seed);
}

static void at(int fd, int want)
{
	ps_setup(fd >= 0, "memfd_create");
	if (fd != want) {
		ps_setup(dup2(fd, want) == want, "dup2");
		close(fd);
	}
}

static void make_memfd(const char *name, unsigned flags, int want, unsigned seed)
{
	unsigned char buf[LEN];
	at(memfd_create(name, flags), want);
	fill(buf, LEN, seed);
	ps_setup(write(want, buf, LEN) == LEN, "write memfd");
}

/* VmFlags of the VMA starting at `addr`, from /proc/self/smaps */
static void vmflags(const void *addr, char *out, size_t n)
{
	char buf[1 << 16], want[32];
	static char text[1 << 20];
	size_t len = 0;
	ssize_t r;
	int fd = open("/proc/self/smaps", O_RDONLY);
	out[0] = 0;
	if (fd < 0)
		return;
	while ((r = read(fd, buf, sizeof(buf))) > 0 && len + r < sizeof(text)) {
		memcpy(text + len, buf, r);
		len += r;
	}
	close(fd);
	text[len] = 0;
	snprintf(want, sizeof(want), "%lx-", (unsigned long)addr);
	for (char *line = text; line && *line; line = strchr(line, '\n') ? strchr(line, '\n') + 1 : NULL) {
		if (strncmp(line, want, strlen(want)) || (line != text && line[-1] != '\n'))
			continue;
		char *vf = strstr(line, "VmFlags:");
		if (!vf)
			return;
		vf += strlen("VmFlags:");
		size_t k = strcspn(vf, "\n");
		snprintf(out, n, " %.*s ", (int)k, vf);
		return;
	}
}

static void check_vmflag(const char *what, const void *addr, const char *flag, int want)
{
	char flags[256], needle[8];
	vmflags(addr, flags, sizeof(flags));
	snprintf(needle, sizeof(needle), " %s ", flag);
	if (!flags[0])
		ps_fail(what, "no VMA at %p in smaps", addr);
	else if (!!strstr(flags, needle) != want)
		ps_fail(what, "expected VmFlags %s'%s' found '%s'", want ? "with " : "without ", flag, flags);
}

static void check_link(const char *what, int fd, const char *want)
{
	char path[64], got[256];
	snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
	ssize_t n = readlink(path, got, sizeof(got) - 1);
	got[n < 0 ? 0 : n] = 0;
	PS_CHECK_STR(what, want, got);
}

static void check_memfd(const char *name, int fd, unsigned seals, unsigned mode, unsigned seed)
{
	char what[128], link[128];
	unsigned char want[LEN], got[LEN];
	struct stat st;
	snprintf(link, sizeof(link), "/memfd:%s (deleted)", name);
	snprintf(what, sizeof(what), "%s: fd %d", name, fd);
	check_link(what, fd, link);
	snprintf(what, sizeof(what), "%s: F_GET_SEALS", name);
	PS_CHECK_U64(what, seals, fcntl(fd, F_GET_SEALS));
	if (fstat(fd, &st) == 0) {
		snprintf(what, sizeof(what), "%s: mode", name);
		PS_CHECK_U64(what, mode, st.st_mode & 07777);
		snprintf(what, sizeof(what), "%s: size", name);
		PS_CHECK_U64(what, LEN, st.st_size);
	}
	fill(want, LEN, seed);
	snprintf(what, sizeof(what), "%s: content", name);
	if (pread(fd, got, LEN, 0) != LEN || memcmp(want, got, LEN))
		ps_fail(what, "differs from the pattern (seed %u)", seed);
}

static void expect_errno(const char *what, long ret, int err)
{
	if (ret != -1 || errno != err)
		ps_fail(what, "expected -1 errno %d found %ld errno %d", err, ret, ret == -1 ? errno : 0);
}

/* fork + fexecve(fd): the exit status, or -1 */
static int run_memfd(int fd)
{
	char *argv[] = { "ps-exec", NULL }, *envp[] = { NULL };
	pid_t pid = fork();
	if (pid == 0) {
		fexecve(fd, argv, envp);
		dprintf(1, "FAIL: fexecve errno %d\n", errno);
		_exit(99);
	}
	int status;
	if (pid < 0 || waitpid(pid, &status, 0) != pid || !WIFEXITED(status))
		return -1;
	return WEXITSTATUS(status);
}

static unsigned char *sealed_map, *future_map;

static void setup_memfds(void)
{
	struct tiny_elf elf;
	make_memfd("ps-plain", 0, FD_PLAIN, 1);
	make_memfd("ps-sealed", MFD_ALLOW_SEALING, FD_SEALED, 2);
	ps_setup(fchmod(FD_SEALED, 0640) == 0, "fchmod ps-sealed 0640");
	ps_setup(fcntl(FD_SEALED, F_ADD_SEALS, SEALS_SEALED) == 0, "F_ADD_SEALS ps-sealed");
	sealed_map = mmap(NULL, LEN, PROT_READ, MAP_SHARED, FD_SEALED, 0);
	ps_setup(sealed_map != MAP_FAILED, "mmap ps-sealed");
	make_memfd("ps-future", MFD_ALLOW_SEALING, FD_FUTURE, 3);
	future_map = mmap(NULL, LEN, PROT_READ | PROT_WRITE, MAP_SHARED, FD_FUTURE, 0);
	ps_setup(future_map != MAP_FAILED, "mmap ps-future");
	ps_setup(fcntl(FD_FUTURE, F_ADD_SEALS, F_SEAL_FUTURE_WRITE) == 0, "F_ADD_SEALS ps-future");
	make_memfd("ps-noexec", MFD_NOEXEC_SEAL, FD_NOEXEC, 4);
	at(memfd_create("ps exec image", MFD_EXEC | MFD_ALLOW_SEALING), FD_EXEC);
	tiny_elf(&elf);
	ps_setup(write(FD_EXEC, &elf, sizeof(elf)) == sizeof(elf), "write ps exec image");
	ps_setup(fchmod(FD_EXEC, 0750) == 0, "fchmod ps exec image 0750");
	ps_setup(fcntl(FD_EXEC, F_ADD_SEALS, SEALS_EXEC) == 0, "F_ADD_SEALS ps exec image");
	ps_setup(run_memfd(FD_EXEC) == EXIT_CODE, "fexecve the memfd before READY");
}

static void check_memfds(void)
{
	unsigned char want[LEN];
	check_memfd("ps-plain", FD_PLAIN, F_SEAL_SEAL, 0777, 1);
	expect_errno("ps-plain: F_ADD_SEALS without MFD_ALLOW_SEALING", fcntl(FD_PLAIN, F_ADD_SEALS, F_SEAL_GROW),
		     EPERM);

	check_memfd("ps-sealed", FD_SEALED, SEALS_SEALED, 0640, 2);
	expect_errno("ps-sealed: pwrite", pwrite(FD_SEALED, "x", 1, 0), EPERM);
	expect_errno("ps-sealed: ftruncate smaller", ftruncate(FD_SEALED, PAGE), EPERM);
	expect_errno("ps-sealed: ftruncate bigger", ftruncate(FD_SEALED, 2 * LEN), EPERM);
	fill(want, LEN, 2);
	if (memcmp(sealed_map, want, LEN))
		ps_fail("ps-sealed: mapping", "differs from the pattern");
	check_vmflag("ps-sealed: mapping made after F_SEAL_WRITE", sealed_map, "mw", 0);
	expect_errno("ps-sealed: mprotect writable", mprotect(sealed_map, LEN, PROT_READ | PROT_WRITE), EACCES);

	check_memfd("ps-future", FD_FUTURE, F_SEAL_FUTURE_WRITE, 0777, 3);
	check_vmflag("ps-future: mapping made before the seal", future_map, "mw", 1);
	future_map[5] = 0xee;
	unsigned char c = 0;
	PS_CHECK_U64("ps-future: pread of a byte written through the old mapping", 1, pread(FD_FUTURE, &c, 1, 5));
	PS_CHECK_U64("ps-future: that byte", 0xee, c);
	future_map[5] = (unsigned char)(5 * 7 + 3);
	expect_errno("ps-future: pwrite", pwrite(FD_FUTURE, "x", 1, 0), EPERM);
	void *m = mmap(NULL, LEN, PROT_READ | PROT_WRITE, MAP_SHARED, FD_FUTURE, 0);
	expect_errno("ps-future: a new writable mapping", m == MAP_FAILED ? -1 : 0, EPERM);
	if (m != MAP_FAILED)
		munmap(m, LEN);

	check_memfd("ps-noexec", FD_NOEXEC, F_SEAL_EXEC, 0666, 4);
	expect_errno("ps-noexec: fchmod 0755", fchmod(FD_NOEXEC, 0755), EPERM);

	struct stat st;
	check_link("ps exec image: fd 24", FD_EXEC, "/memfd:ps exec image (deleted)");
	PS_CHECK_U64("ps exec image: F_GET_SEALS", SEALS_EXEC_GOT, fcntl(FD_EXEC, F_GET_SEALS));
	if (fstat(FD_EXEC, &st) == 0) {
		PS_CHECK_U64("ps exec image: mode", 0750, st.st_mode & 07777);
		PS_CHECK_U64("ps exec image: size", sizeof(struct tiny_elf), st.st_size);
	}
	PS_CHECK_U64("ps exec image: exit status of its fexecve", EXIT_CODE, run_memfd(FD_EXEC));
}

static unsigned char *wipe, *drop;

static void setup_wipe(void)
{
	wipe = mmap(NULL, LEN, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	ps_setup(wipe != MAP_FAILED, "mmap wipe-on-fork area");
	fill(wipe, LEN, 5);
	ps_setup(madvise(wipe, LEN, MADV_WIPEONFORK) == 0, "MADV_WIPEONFORK");
	drop = mmap(NULL, LEN, PROT_READ | PROT_WRITE, MAP_DROPPABLE | MAP_ANONYMOUS, -1, 0);
	ps_setup(drop != MAP_FAILED, "mmap MAP_DROPPABLE");
	fill(drop, LEN, 6);
}

static int all_zero(const unsigned char *p, size_t n)
{
	for (size_t i = 0; i < n; i++)
		if (p[i])
			return 0;
	return 1;
}

static void check_wipe(void)
{
	unsigned char want[LEN];
	check_vmflag("wipe-on-fork area", wipe, "wf", 1);
	check_vmflag("MAP_DROPPABLE area", drop, "dp", 1);
	fill(want, LEN, 5);
	if (memcmp(wipe, want, LEN))
		ps_fail("wipe-on-fork area", "differs from the pattern");
	fill(want, LEN, 6);
	for (int i = 0; i < LEN / PAGE; i++)
		if (memcmp(drop + i * PAGE, want + i * PAGE, PAGE) && !all_zero(drop + i * PAGE, PAGE))
			ps_fail("MAP_DROPPABLE area", "page %d neither the pattern nor dropped (zero)", i);
	pid_t pid = fork();
	if (pid == 0)
		_exit((all_zero(wipe, LEN) ? 0 : 1) | (all_zero(drop, LEN) ? 0 : 2));
	int status = -1;
	if (pid < 0 || waitpid(pid, &status, 0) != pid || !WIFEXITED(status))
		ps_fail("forked child", "did not exit (status %#x)", status);
	else if (WEXITSTATUS(status) & 1)
		ps_fail("wipe-on-fork area", "not zero in a forked child");
	else if (WEXITSTATUS(status) & 2)
		ps_fail("MAP_DROPPABLE area", "not zero in a forked child");
}

int main(int argc, char **argv)
{
	const char *mode = argc > 1 ? argv[1] : NULL;
	if (!mode || (strcmp(mode, "default") && strcmp(mode, "wipe") && strcmp(mode, "future-mixed") &&
		      strncmp(mode, "secret", 6)))
		ps_bad_mode(mode);
	ps_install_usr1();
	if (!strcmp(mode, "default")) {
		setup_memfds();
	} else if (!strcmp(mode, "wipe")) {
		setup_wipe();
	} else if (!strcmp(mode, "future-mixed")) {
		make_memfd("ps-future", MFD_ALLOW_SEALING, FD_FUTURE, 3);
		future_map = mmap(NULL, LEN, PROT_READ | PROT_WRITE, MAP_SHARED, FD_FUTURE, 0);
		ps_setup(future_map != MAP_FAILED, "mmap ps-future");
		ps_setup(fcntl(FD_FUTURE, F_ADD_SEALS, F_SEAL_FUTURE_WRITE) == 0, "F_ADD_SEALS ps-future");
		ps_setup(mmap(NULL, LEN, PROT_READ, MAP_SHARED, FD_FUTURE, 0) != MAP_FAILED, "mmap ps-future again");
	} else {
		int fd = (int)syscall(SYS_memfd_secret, 0);
		ps_setup(fd >= 0, "memfd_secret");
		ps_setup(ftruncate(fd, PAGE) == 0, "ftruncate memfd_secret");
		if (!strcmp(mode, "secret-mapped")) {
			unsigned char *s = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
			ps_setup(s != MAP_FAILED, "mmap memfd_secret");
			s[0] = 1;
			close(fd);
		}
	}
	ps_ready();
	if (ps_sabotage()) {
		if (!strcmp(mode, "default"))
			fcntl(FD_FUTURE, F_ADD_SEALS, F_SEAL_GROW);
		else if (!strcmp(mode, "wipe"))
			madvise(wipe, LEN, MADV_KEEPONFORK);
	}
	ps_wait_usr1();
	if (!strcmp(mode, "default"))
		check_memfds();
	else if (!strcmp(mode, "wipe"))
		check_wipe();
	return ps_finish();
}
