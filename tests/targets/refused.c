/*
 * refused: objects procsnap refuses at dump, each by its name. The target
 * makes one, says READY and, after SIGUSR1, checks that it still has it
 * (the refused dump left it alone).
 *
 *   ./refused io_uring | userfaultfd | bpf-map | perf_event | aio
 *
 * Sabotage closes the fd (or destroys the AIO context) after READY.
 */
#include "target.h"
#include <fcntl.h>
#include <linux/aio_abi.h>
#include <linux/bpf.h>
#include <linux/io_uring.h>
#include <linux/perf_event.h>
#include <sys/syscall.h>

static int make(const char *mode, aio_context_t *ctx)
{
	if (!strcmp(mode, "io_uring")) {
		struct io_uring_params p;
		memset(&p, 0, sizeof(p));
		return (int)syscall(SYS_io_uring_setup, 4, &p);
	}
	if (!strcmp(mode, "userfaultfd"))
		return (int)syscall(SYS_userfaultfd, O_CLOEXEC);
	if (!strcmp(mode, "bpf-map")) {
		union bpf_attr a;
		memset(&a, 0, sizeof(a));
		a.map_type = BPF_MAP_TYPE_ARRAY;
		a.key_size = a.value_size = 4;
		a.max_entries = 1;
		return (int)syscall(SYS_bpf, BPF_MAP_CREATE, &a, sizeof(a));
	}
	if (!strcmp(mode, "perf_event")) {
		struct perf_event_attr a;
		memset(&a, 0, sizeof(a));
		a.type = PERF_TYPE_SOFTWARE;
		a.config = PERF_COUNT_SW_TASK_CLOCK;
		a.size = sizeof(a);
		return (int)syscall(SYS_perf_event_open, &a, 0, -1, -1, 0);
	}
	if (!strcmp(mode, "aio")) {
		ps_setup(syscall(SYS_io_setup, 8, ctx) == 0, "io_setup");
		return 0;
	}
	ps_bad_mode(mode);
	return -1;
}

int main(int argc, char **argv)
{
	ps_install_usr1();
	const char *mode = argc > 1 ? argv[1] : "";
	aio_context_t ctx = 0;
	int fd = make(mode, &ctx);
	ps_setup(fd >= 0, mode);
	char link[64], want[256] = "", got[256] = "";
	snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
	if (!ctx)
		ps_setup(readlink(link, want, sizeof(want) - 1) > 0, "readlink");
	ps_ready();
	if (ps_sabotage()) {
		if (ctx)
			syscall(SYS_io_destroy, ctx);
		else
			close(fd);
	}
	ps_wait_usr1();
	if (ctx) {
		struct io_event ev;
		struct timespec zero = { 0, 0 };
		long n = syscall(SYS_io_getevents, ctx, 0, 1, &ev, &zero);
		PS_CHECK_U64("io_getevents on the context", 0, n);
	} else {
		if (readlink(link, got, sizeof(got) - 1) < 0)
			strcpy(got, "(closed)");
		PS_CHECK_STR("fd", want, got);
	}
	return ps_finish();
}
