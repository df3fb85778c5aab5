/*
 * Shared handshake for procsnap test targets (see STYLE.md section 10).
 *
 *   ./target MODE [ARGS...]
 *   set up state -> "READY\n" -> wait for SIGUSR1 -> check -> "PASS\n" | "FAIL: ...\n"
 *
 * All output goes through write(2)/dprintf(1, ...): never stdio buffers,
 * which a checkpoint would capture half-written.  PS_TARGET_SABOTAGE=1 makes
 * a target corrupt one piece of its own state after READY, so the tests can
 * prove that the checks are able to fail.
 */
#ifndef PS_TARGET_H
#define PS_TARGET_H

#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static volatile sig_atomic_t ps_usr1;
static int ps_failures;

static inline void ps_on_usr1(int sig) { (void)sig; ps_usr1 = 1; }

/* SIGUSR1 without SA_RESTART: it must interrupt the blocking syscalls. */
static inline void ps_install_usr1(void)
{
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = ps_on_usr1;
	sigemptyset(&sa.sa_mask);
	if (sigaction(SIGUSR1, &sa, NULL)) {
		dprintf(1, "FAIL: setup sigaction(SIGUSR1) errno %d\n", errno);
		_exit(2);
	}
}

static inline int ps_sabotage(void)
{
	const char *s = getenv("PS_TARGET_SABOTAGE");
	return s && strcmp(s, "1") == 0;
}

static inline void ps_say(const char *s)
{
	size_t n = strlen(s);
	while (n) {
		ssize_t w = write(1, s, n);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			_exit(3);
		s += w;
		n -= (size_t)w;
	}
}

static inline void ps_ready(void) { ps_say("READY\n"); }

/* A setup step that fails is not a test result: exit 2 with a reason. */
static inline void ps_setup(int ok, const char *what)
{
	if (!ok) {
		dprintf(1, "SETUP ERROR: %s: %s\n", what, strerror(errno));
		_exit(2);
	}
}

/*
 * The test re-sends SIGUSR1 until the target exits, which covers the race
 * between the flag test and pause() entering the kernel.
 */
static inline void ps_wait_usr1(void)
{
	while (!ps_usr1)
		pause();
}

static inline void ps_fail(const char *what, const char *fmt_expected_found, ...)
	__attribute__((format(printf, 2, 3)));
static inline void ps_fail(const char *what, const char *fmt, ...)
{
	char buf[512];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	dprintf(1, "FAIL: %s %s\n", what, buf);
	ps_failures++;
}

#define PS_CHECK_U64(what, exp, got)                                          \
	do {                                                                  \
		unsigned long long e_ = (unsigned long long)(exp);            \
		unsigned long long g_ = (unsigned long long)(got);            \
		if (e_ != g_)                                                 \
			ps_fail(what, "expected %#llx found %#llx", e_, g_);  \
	} while (0)

#define PS_CHECK_STR(what, exp, got)                                          \
	do {                                                                  \
		if (strcmp((exp), (got)) != 0)                                \
			ps_fail(what, "expected '%s' found '%s'", (exp), (got)); \
	} while (0)

static inline int ps_finish(void)
{
	if (ps_failures)
		return 1;
	ps_say("PASS\n");
	return 0;
}

/* 64-bit FNV-1a over bytes; fast enough for the few MiB the targets own. */
static inline uint64_t ps_hash(const void *p, size_t n)
{
	const unsigned char *b = p;
	uint64_t h = 0xcbf29ce484222325ull;
	for (size_t i = 0; i < n; i++) {
		h ^= b[i];
		h *= 0x100000001b3ull;
	}
	return h;
}

static inline void ps_bad_mode(const char *mode)
{
	dprintf(1, "SETUP ERROR: unknown mode '%s'\n", mode ? mode : "(none)");
	_exit(2);
}

#endif
