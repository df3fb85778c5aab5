/*
 * sleep: blocking syscalls interrupted by a checkpoint must be restarted
 * transparently.
 *
 *   ./sleep nanosleep   relative 30 s nanosleep in a loop
 *   ./sleep clock_abs   clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME) 60 s ahead
 *   ./sleep pause       pause()
 *   ./sleep poll        poll(NULL, 0, 30000)
 *   ./sleep sigsuspend  SIGUSR2 blocked, sigsuspend() with an empty mask in a
 *                       loop; after it returns, SIGUSR2 must be blocked again
 *   ./sleep ppoll       the same with ppoll(NULL, 0, NULL, empty mask): the
 *                       kernel keeps the mask to go back to where ptrace
 *                       cannot read it (saved_sigmask, TIF_RESTORE_SIGMASK)
 *   ./sleep read        reads sleep-read.dat (created in cwd, kept open at
 *                       fd 10) 16 bytes per 10 ms nanosleep, checking content
 *                       and offset continuity
 *
 * A call may return early only with EINTR once SIGUSR1's flag is set; any
 * other early return, or errno >= 512 (a leaked ERESTART* code), is a FAIL.
 * Sabotage: alarm(1) delivers a spurious EINTR (read mode: skews the offset).
 */
#include "target.h"
#include <fcntl.h>
#include <poll.h>
#include <time.h>

#define READ_FD 10
#define FILE_LEN 65536
#define CHUNK 16

static void on_alarm(int sig) { (void)sig; }

static double now_mono(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* r is -1/errno style (err = errno) or 0 meaning "returned without error". */
static int interrupted(const char *call, int failed, int err)
{
	if (!failed)
		return 0;
	if (err >= 512)
		ps_fail(call, "expected EINTR found leaked kernel errno %d", err);
	else if (err != EINTR)
		ps_fail(call, "expected EINTR found errno %d", err);
	else if (!ps_usr1)
		ps_fail(call, "expected EINTR only after SIGUSR1 found spurious EINTR (errno %d)", err);
	return 1;
}

static unsigned char pattern(long off) { return (unsigned char)(off * 7 + (off >> 8) + 3); }

static int setup_read_file(void)
{
	unsigned char *buf = malloc(FILE_LEN);
	ps_setup(buf != NULL, "malloc");
	for (long i = 0; i < FILE_LEN; i++)
		buf[i] = pattern(i);
	int fd = open("sleep-read.dat", O_RDWR | O_CREAT | O_TRUNC, 0644);
	ps_setup(fd >= 0, "create sleep-read.dat");
	ps_setup(write(fd, buf, FILE_LEN) == FILE_LEN, "write sleep-read.dat");
	free(buf);
	close(fd);
	fd = open("sleep-read.dat", O_RDONLY);
	ps_setup(fd >= 0 && dup2(fd, READ_FD) == READ_FD, "open sleep-read.dat");
	close(fd);
	return READ_FD;
}

int main(int argc, char **argv)
{
	const char *mode = argc >= 2 ? argv[1] : NULL;
	ps_install_usr1();
	int sab = ps_sabotage();
	int is_read = mode && !strcmp(mode, "read");
	if (sab && !is_read) {
		struct sigaction sa = { .sa_handler = on_alarm };
		sigaction(SIGALRM, &sa, NULL);
	}
	int fd = is_read ? setup_read_file() : -1;

	if (mode && !strcmp(mode, "nanosleep")) {
		ps_ready();
		if (sab)
			alarm(1);
		while (!ps_usr1) {
			struct timespec req = { 30, 0 }, rem;
			int r = nanosleep(&req, &rem);
			if (interrupted("nanosleep", r != 0, errno))
				break;
		}
	} else if (mode && !strcmp(mode, "clock_abs")) {
		struct timespec dl;
		clock_gettime(CLOCK_MONOTONIC, &dl);
		dl.tv_sec += 60;
		ps_ready();
		if (sab)
			alarm(1);
		while (!ps_usr1) {
			int r = clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &dl, NULL);
			if (interrupted("clock_nanosleep", r != 0, r))
				break;
			struct timespec now;
			clock_gettime(CLOCK_MONOTONIC, &now);
			if (now.tv_sec < dl.tv_sec || (now.tv_sec == dl.tv_sec && now.tv_nsec < dl.tv_nsec))
				ps_fail("clock_nanosleep", "expected return after deadline %ld found now %ld",
					(long)dl.tv_sec, (long)now.tv_sec);
			dl.tv_sec += 60;
		}
	} else if (mode && !strcmp(mode, "pause")) {
		ps_ready();
		if (sab)
			alarm(1);
		while (!ps_usr1) {
			int r = pause();
			if (interrupted("pause", r != 0, errno))
				break;
		}
	} else if (mode && !strcmp(mode, "poll")) {
		ps_ready();
		if (sab)
			alarm(1);
		while (!ps_usr1) {
			double t0 = now_mono();
			int r = poll(NULL, 0, 30000);
			if (interrupted("poll", r < 0, errno))
				break;
			if (r != 0)
				ps_fail("poll", "expected 0 found %d", r);
			/* a restore restarts the full 30 s: never shorter than asked */
			if (now_mono() - t0 < 29.9)
				ps_fail("poll", "expected >= 30 s found %.3f s", now_mono() - t0);
		}
	} else if (mode && (!strcmp(mode, "sigsuspend") || !strcmp(mode, "ppoll"))) {
		int is_ppoll = !strcmp(mode, "ppoll");
		sigset_t blocked, none, now;
		sigemptyset(&blocked);
		sigaddset(&blocked, SIGUSR2);
		sigemptyset(&none);
		ps_setup(sigprocmask(SIG_BLOCK, &blocked, NULL) == 0, "block SIGUSR2");
		ps_ready();
		if (sab)
			alarm(1);
		while (!ps_usr1) {
			int r = is_ppoll ? ppoll(NULL, 0, NULL, &none) : sigsuspend(&none);
			if (interrupted(mode, r != 0, errno))
				break;
		}
		ps_setup(sigprocmask(SIG_BLOCK, NULL, &now) == 0, "sigprocmask");
		PS_CHECK_U64("SIGUSR2 blocked again after the call", 1, sigismember(&now, SIGUSR2));
		PS_CHECK_U64("SIGUSR1 not blocked after the call", 0, sigismember(&now, SIGUSR1));
	} else if (is_read) {
		long pos = CHUNK;
		unsigned char first[CHUNK];
		ps_setup(read(fd, first, CHUNK) == CHUNK && first[CHUNK - 1] == pattern(CHUNK - 1),
			 "first chunk");
		ps_ready();
		if (sab)
			lseek(fd, 1, SEEK_CUR);
		while (!ps_usr1) {
			struct timespec req = { 0, 10 * 1000 * 1000 };
			int r = nanosleep(&req, NULL);
			if (interrupted("nanosleep", r != 0, errno))
				break;
			unsigned char buf[CHUNK];
			ssize_t n = read(fd, buf, CHUNK);
			if (n < 0) {
				interrupted("read", 1, errno);
				ps_fail("read", "expected data found errno %d", errno);
				break;
			}
			if (n == 0) { /* EOF: start over */
				if (pos != FILE_LEN)
					ps_fail("read EOF", "expected at %d found at %ld", FILE_LEN, pos);
				ps_setup(lseek(fd, 0, SEEK_SET) == 0, "lseek");
				pos = 0;
				continue;
			}
			if (n != CHUNK)
				ps_fail("read", "expected %d bytes found %zd", CHUNK, n);
			for (ssize_t i = 0; i < n; i++)
				if (buf[i] != pattern(pos + i)) {
					ps_fail("read content", "at offset %ld expected %#x found %#x",
						pos + i, pattern(pos + i), buf[i]);
					break;
				}
			pos += n;
			if (ps_failures)
				break;
		}
		PS_CHECK_U64("read fd offset", pos, lseek(fd, 0, SEEK_CUR));
	} else {
		ps_bad_mode(mode);
	}
	return ps_finish();
}
