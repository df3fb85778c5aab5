/*
 * debuggee: a program to look at in an image and in gdb (tests/test_views.py).
 *
 *   ./debuggee default
 *
 * Globals with known values (core_magic in .data, heap_note pointing to a
 * malloc'd string, quiet[] a 64 KiB .bss buffer written once) and three
 * threads, each in a function of its own name:
 *   spin_worker   a userspace loop bumping `spins` (its page changes all the time)
 *   nap_worker    nanosleep 2 ms in a loop, bumping `naps`
 *   wait_worker   pthread_cond_wait until told to stop
 * Main waits for SIGUSR1 in main_wait(). READY once every thread runs.
 * After SIGUSR1: main stops and joins the threads, then checks the globals,
 * the heap string, quiet[]'s pattern and that spins and naps went on.
 * Sabotage: main changes core_magic after READY.
 */
#include "target.h"
#include <pthread.h>
#include <time.h>

#define QUIET_LEN 65536
#define CORE_MAGIC 0x600dc0de12345678ull
#define HEAP_NOTE "procsnap heap note 0451"

uint64_t core_magic = CORE_MAGIC;
char *heap_note;
unsigned char quiet[QUIET_LEN];
volatile uint64_t spins, naps;
static int stop, started;  /* __atomic */
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;

static unsigned char quiet_pat(size_t i) { return (unsigned char)(i * 193u + 11 + (i >> 9)); }

__attribute__((noinline)) static void *spin_worker(void *arg)
{
	(void)arg;
	__atomic_add_fetch(&started, 1, __ATOMIC_SEQ_CST);
	while (!__atomic_load_n(&stop, __ATOMIC_RELAXED))
		spins++;
	return NULL;
}

__attribute__((noinline)) static void *nap_worker(void *arg)
{
	(void)arg;
	struct timespec ts = { 0, 2000000L };
	__atomic_add_fetch(&started, 1, __ATOMIC_SEQ_CST);
	while (!__atomic_load_n(&stop, __ATOMIC_RELAXED)) {
		nanosleep(&ts, NULL);
		naps++;
	}
	return NULL;
}

__attribute__((noinline)) static void *wait_worker(void *arg)
{
	(void)arg;
	pthread_mutex_lock(&mu);
	__atomic_add_fetch(&started, 1, __ATOMIC_SEQ_CST);
	while (!__atomic_load_n(&stop, __ATOMIC_RELAXED))
		pthread_cond_wait(&cv, &mu);
	pthread_mutex_unlock(&mu);
	return NULL;
}

__attribute__((noinline)) static void main_wait(void)
{
	ps_wait_usr1();
}

int main(int argc, char **argv)
{
	void *(*workers[])(void *) = { spin_worker, nap_worker, wait_worker };
	pthread_t pt[3];

	if (argc < 2 || strcmp(argv[1], "default") != 0)
		ps_bad_mode(argc > 1 ? argv[1] : NULL);
	ps_install_usr1();
	sigset_t usr1;
	sigemptyset(&usr1);
	sigaddset(&usr1, SIGUSR1);
	heap_note = malloc(64);
	ps_setup(heap_note != NULL, "malloc heap_note");
	strcpy(heap_note, HEAP_NOTE);
	for (size_t i = 0; i < QUIET_LEN; i++)
		quiet[i] = quiet_pat(i);
	/* only main takes SIGUSR1: the threads start with it blocked */
	ps_setup(pthread_sigmask(SIG_BLOCK, &usr1, NULL) == 0, "block SIGUSR1");
	for (int i = 0; i < 3; i++)
		ps_setup(pthread_create(&pt[i], NULL, workers[i], NULL) == 0, "pthread_create");
	ps_setup(pthread_sigmask(SIG_UNBLOCK, &usr1, NULL) == 0, "unblock SIGUSR1");
	while (__atomic_load_n(&started, __ATOMIC_SEQ_CST) < 3 || !spins || !naps)
		usleep(1000);
	uint64_t spins0 = spins, naps0 = naps;
	ps_ready();
	if (ps_sabotage())
		core_magic ^= 1;

	main_wait();

	pthread_mutex_lock(&mu);
	__atomic_store_n(&stop, 1, __ATOMIC_SEQ_CST);
	pthread_cond_broadcast(&cv);
	pthread_mutex_unlock(&mu);
	for (int i = 0; i < 3; i++)
		ps_setup(pthread_join(pt[i], NULL) == 0, "pthread_join");
	PS_CHECK_U64("core_magic", CORE_MAGIC, core_magic);
	PS_CHECK_STR("heap_note", HEAP_NOTE, heap_note);
	for (size_t i = 0; i < QUIET_LEN; i++)
		if (quiet[i] != quiet_pat(i)) {
			ps_fail("quiet", "byte %zu: expected %#x found %#x", i, quiet_pat(i), quiet[i]);
			break;
		}
	if (spins <= spins0 || naps <= naps0)
		ps_fail("progress", "spins %llu -> %llu, naps %llu -> %llu", (unsigned long long)spins0,
			(unsigned long long)spins, (unsigned long long)naps0, (unsigned long long)naps);
	return ps_finish();
}
