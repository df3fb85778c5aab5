/*
 * cpu: register and per-thread kernel state.
 *
 *   ./cpu regs   r12-r15, ymm8-15, (AVX-512:) zmm16-31 and k1-k7 hold known
 *                values across a raw pause(2) loop; then fs_base, a __thread
 *                variable, rseq registration, robust list, clear_child_tid.
 *   ./cpu busy   pure userspace loop (no syscalls) keeping two counters, a
 *                running sum and an xmm counter in step; same thread checks.
 */
#include "target.h"
#include <asm/prctl.h>
#include <linux/futex.h>
#include <sys/prctl.h>
#include <sys/rseq.h>
#include <sys/syscall.h>

static __thread uint64_t tls_var = 0x1122334455667788ull;

struct thread_state {
	unsigned long fs_base;
	uint64_t *tls_addr;
	uint64_t tls_val;
	void *robust_head;
	size_t robust_len;
	int *tid_addr;
};

static void read_thread_state(struct thread_state *t)
{
	memset(t, 0, sizeof(*t));
	ps_setup(syscall(SYS_arch_prctl, ARCH_GET_FS, &t->fs_base) == 0, "arch_prctl");
	t->tls_addr = &tls_var;
	t->tls_val = tls_var;
	ps_setup(syscall(SYS_get_robust_list, 0, &t->robust_head, &t->robust_len) == 0,
		 "get_robust_list");
	ps_setup(prctl(PR_GET_TID_ADDRESS, &t->tid_addr) == 0, "PR_GET_TID_ADDRESS");
}

/* Registering the same area again fails with EBUSY only while it is registered. */
static void check_rseq(const char *when)
{
	unsigned size = __rseq_size < 32 ? 32 : __rseq_size;
	void *area = (char *)__builtin_thread_pointer() + __rseq_offset;
	long r = syscall(334, area, size, 0, 0x53053053);
	int e = errno;
	if (r != -1 || e != EBUSY)
		ps_fail("rseq registration", "(%s) expected EBUSY found r=%ld errno=%d", when, r, e);
}

static void check_thread_state(const struct thread_state *saved)
{
	struct thread_state now;
	read_thread_state(&now);
	PS_CHECK_U64("fs_base", saved->fs_base, now.fs_base);
	PS_CHECK_U64("__thread address", (uintptr_t)saved->tls_addr, (uintptr_t)now.tls_addr);
	PS_CHECK_U64("__thread value", saved->tls_val, now.tls_val);
	PS_CHECK_U64("robust list head", (uintptr_t)saved->robust_head, (uintptr_t)now.robust_head);
	PS_CHECK_U64("robust list len", saved->robust_len, now.robust_len);
	PS_CHECK_U64("clear_child_tid", (uintptr_t)saved->tid_addr, (uintptr_t)now.tid_addr);
	check_rseq("after");
}

static uint64_t vec_in[8 * 4] __attribute__((aligned(64)));   /* ymm8..15 */
static uint64_t vec_out[8 * 4] __attribute__((aligned(64)));
static uint64_t zmm_in[16 * 8] __attribute__((aligned(64)));  /* zmm16..31 */
static uint64_t zmm_out[16 * 8] __attribute__((aligned(64)));
static uint64_t gpr_out[4];
static uint16_t k_out[8];
static uint64_t sab[8] __attribute__((aligned(64)));          /* xor'ed in on sabotage */

#define R12 0x0123456789abcdefull
#define R13 0xfedcba9876543210ull
#define R14 0x0f1e2d3c4b5a6978ull
#define R15 0x8796a5b4c3d2e1f0ull

#define YMM_REGS "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15"
#define ZMM_REGS "xmm16", "xmm17", "xmm18", "xmm19", "xmm20", "xmm21", "xmm22", "xmm23", \
	"xmm24", "xmm25", "xmm26", "xmm27", "xmm28", "xmm29", "xmm30", "xmm31"

#define LOAD_GPR_YMM                                                          \
	"movabs $0x0123456789abcdef, %%r12\n movabs $0xfedcba9876543210, %%r13\n" \
	"movabs $0x0f1e2d3c4b5a6978, %%r14\n movabs $0x8796a5b4c3d2e1f0, %%r15\n" \
	"vmovdqa 0(%[vi]), %%ymm8\n vmovdqa 32(%[vi]), %%ymm9\n"                  \
	"vmovdqa 64(%[vi]), %%ymm10\n vmovdqa 96(%[vi]), %%ymm11\n"               \
	"vmovdqa 128(%[vi]), %%ymm12\n vmovdqa 160(%[vi]), %%ymm13\n"             \
	"vmovdqa 192(%[vi]), %%ymm14\n vmovdqa 224(%[vi]), %%ymm15\n"
#define PAUSE_LOOP                                                            \
	"1: cmpl $0, %[flag]\n jne 2f\n mov $34, %%eax\n syscall\n jmp 1b\n 2:\n" \
	"xor %[s], %%r13\n vpxor (%[sab]), %%ymm9, %%ymm9\n"
#define STORE_GPR_YMM                                                         \
	"mov %%r12, 0(%[go])\n mov %%r13, 8(%[go])\n"                             \
	"mov %%r14, 16(%[go])\n mov %%r15, 24(%[go])\n"                           \
	"vmovdqa %%ymm8, 0(%[vo])\n vmovdqa %%ymm9, 32(%[vo])\n"                  \
	"vmovdqa %%ymm10, 64(%[vo])\n vmovdqa %%ymm11, 96(%[vo])\n"               \
	"vmovdqa %%ymm12, 128(%[vo])\n vmovdqa %%ymm13, 160(%[vo])\n"             \
	"vmovdqa %%ymm14, 192(%[vo])\n vmovdqa %%ymm15, 224(%[vo])\n"

__attribute__((target("avx")))
static void regs_avx(unsigned long s)
{
	asm volatile(LOAD_GPR_YMM PAUSE_LOOP STORE_GPR_YMM "vzeroupper\n"
		     : [flag] "+m"(ps_usr1)
		     : [vi] "r"(vec_in), [vo] "r"(vec_out), [go] "r"(gpr_out),
		       [s] "r"(s), [sab] "r"(sab)
		     : "rax", "rcx", "r11", "r12", "r13", "r14", "r15", "memory", "cc", YMM_REGS);
}

#define Z(n, off) "vmovdqa64 " #off "(%[zi]), %%zmm" #n "\n"
#define ZS(n, off) "vmovdqa64 %%zmm" #n ", " #off "(%[zo])\n"
#define K(n) "mov $(0x1111 * " #n " + 0x0f0f), %%eax\n kmovw %%eax, %%k" #n "\n"
#define KS(n) "kmovw %%k" #n ", %%eax\n mov %%ax, 2*" #n "(%[ko])\n"

__attribute__((target("avx512f")))
static void regs_avx512(unsigned long s)
{
	asm volatile(LOAD_GPR_YMM
		     Z(16, 0) Z(17, 64) Z(18, 128) Z(19, 192) Z(20, 256) Z(21, 320) Z(22, 384) Z(23, 448)
		     Z(24, 512) Z(25, 576) Z(26, 640) Z(27, 704) Z(28, 768) Z(29, 832) Z(30, 896) Z(31, 960)
		     K(1) K(2) K(3) K(4) K(5) K(6) K(7)
		     PAUSE_LOOP
		     "vpxorq (%[sab]), %%zmm17, %%zmm17\n kmovw (%[sab]), %%k0\n kxorw %%k0, %%k3, %%k3\n"
		     STORE_GPR_YMM
		     ZS(16, 0) ZS(17, 64) ZS(18, 128) ZS(19, 192) ZS(20, 256) ZS(21, 320) ZS(22, 384) ZS(23, 448)
		     ZS(24, 512) ZS(25, 576) ZS(26, 640) ZS(27, 704) ZS(28, 768) ZS(29, 832) ZS(30, 896) ZS(31, 960)
		     KS(1) KS(2) KS(3) KS(4) KS(5) KS(6) KS(7) "vzeroupper\n"
		     : [flag] "+m"(ps_usr1)
		     : [vi] "r"(vec_in), [vo] "r"(vec_out), [go] "r"(gpr_out), [zi] "r"(zmm_in),
		       [zo] "r"(zmm_out), [ko] "r"(k_out), [s] "r"(s), [sab] "r"(sab)
		     : "rax", "rcx", "r11", "r12", "r13", "r14", "r15", "memory", "cc", YMM_REGS, ZMM_REGS,
		       "k0", "k1", "k2", "k3", "k4", "k5", "k6", "k7");
}

static int mode_regs(void)
{
	int avx512 = __builtin_cpu_supports("avx512f");
	if (!__builtin_cpu_supports("avx")) {
		dprintf(1, "SETUP ERROR: no AVX\n");
		return 2;
	}
	for (int i = 0; i < 32; i++)
		vec_in[i] = 0xa5a5000000000000ull ^ ((uint64_t)i * 0x0101010101010101ull);
	for (int i = 0; i < 128; i++)
		zmm_in[i] = 0x5a5a000000000000ull ^ ((uint64_t)i * 0x0001000100010001ull) ^ (uint64_t)i << 40;

	struct thread_state saved;
	read_thread_state(&saved);
	check_rseq("before READY");
	if (!avx512)
		dprintf(1, "NOTE: no avx512f, zmm16-31 and k1-k7 not checked\n");
	ps_ready();
	unsigned long s = 0;
	if (ps_sabotage()) {
		s = 1;
		sab[0] = 1;
	}
	if (avx512)
		regs_avx512(s);
	else
		regs_avx(s);

	static const uint64_t gpr_exp[4] = { R12, R13, R14, R15 };
	char what[32];
	for (int i = 0; i < 4; i++) {
		snprintf(what, sizeof(what), "r%d", 12 + i);
		PS_CHECK_U64(what, gpr_exp[i], gpr_out[i]);
	}
	for (int i = 0; i < 32; i++) {
		snprintf(what, sizeof(what), "ymm%d[%d]", 8 + i / 4, i % 4);
		PS_CHECK_U64(what, vec_in[i], vec_out[i]);
	}
	if (avx512) {
		for (int i = 0; i < 128; i++) {
			snprintf(what, sizeof(what), "zmm%d[%d]", 16 + i / 8, i % 8);
			PS_CHECK_U64(what, zmm_in[i], zmm_out[i]);
		}
		for (int k = 1; k <= 7; k++) {
			snprintf(what, sizeof(what), "k%d", k);
			PS_CHECK_U64(what, (0x1111u * k + 0x0f0f) & 0xffff, k_out[k]);
		}
	}
	check_thread_state(&saved);
	return ps_finish();
}

static uint64_t mem_count;

static int mode_busy(void)
{
	struct thread_state saved;
	read_thread_state(&saved);
	check_rseq("before READY");
	uint64_t c1 = 0, c2 = 0, sum = 0, xmm_lo = 0;
	uint64_t one[2] __attribute__((aligned(16))) = { 1, 1 }, xo[2] __attribute__((aligned(16)));
	ps_ready();
	if (ps_sabotage())
		tls_var ^= 1;
	/* r12/r13/r14 and xmm8 live only in registers while spinning */
	asm volatile("xor %%r12, %%r12\n xor %%r13, %%r13\n xor %%r14, %%r14\n"
		     "pxor %%xmm8, %%xmm8\n movdqa (%[one]), %%xmm9\n"
		     "1: cmpl $0, %[flag]\n jne 2f\n"
		     "inc %%r12\n add %%r12, %%r13\n paddq %%xmm9, %%xmm8\n inc %%r14\n"
		     "mov %%r12, %[mem]\n jmp 1b\n"
		     "2: mov %%r12, %[c1]\n mov %%r14, %[c2]\n mov %%r13, %[sum]\n"
		     "movdqa %%xmm8, (%[xo])\n"
		     : [flag] "+m"(ps_usr1), [mem] "=m"(mem_count), [c1] "=m"(c1), [c2] "=m"(c2),
		       [sum] "=m"(sum)
		     : [one] "r"(one), [xo] "r"(xo)
		     : "r12", "r13", "r14", "xmm8", "xmm9", "memory", "cc");
	xmm_lo = xo[0];
	PS_CHECK_U64("counter 2", c1, c2);
	PS_CHECK_U64("memory counter", c1, mem_count);
	/* the sum wraps mod 2^64 as the loop adds: halve the even factor first, so that no bit is lost */
	PS_CHECK_U64("running sum", c1 % 2 ? c1 * ((c1 + 1) / 2) : c1 / 2 * (c1 + 1), sum);
	PS_CHECK_U64("xmm8 counter low", c1, xmm_lo);
	PS_CHECK_U64("xmm8 counter high", c1, xo[1]);
	if (c1 == 0)
		ps_fail("busy loop", "expected iterations found %d", 0);
	check_thread_state(&saved);
	return ps_finish();
}

int main(int argc, char **argv)
{
	ps_install_usr1();
	if (argc >= 2 && !strcmp(argv[1], "regs"))
		return mode_regs();
	if (argc >= 2 && !strcmp(argv[1], "busy"))
		return mode_busy();
	ps_bad_mode(argv[1]);
}
