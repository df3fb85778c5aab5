/* Benchmark target: SIZE MiB of anonymous memory, filled with pseudo-random
 * data (or half zeros), checked after restore. Handshake as in tests/targets. */
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static volatile sig_atomic_t go;
static void on_usr1(int s) { (void)s; go = 1; }

static uint64_t sum(const uint64_t *p, size_t n) {
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 1099511628211ULL;
    return h;
}

int main(int argc, char **argv) {
    size_t mib = argc > 1 ? strtoul(argv[1], 0, 10) : 1;
    int half_zero = argc > 2 && !strcmp(argv[2], "halfzero");
    size_t n = mib << 17; /* 8-byte words */
    uint64_t *p = mmap(0, n * 8, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return 2;
    uint64_t x = 88172645463325252ULL;
    for (size_t i = 0; i < n; i++) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        p[i] = (half_zero && (i / 512) % 2) ? 0 : x;
    }
    uint64_t h = sum(p, n);
    /* SIGUSR1 stays blocked except inside sigsuspend, so it cannot slip in
     * between the check of `go` and the wait (after a restore, too). */
    sigset_t block, old;
    sigemptyset(&block);
    sigaddset(&block, SIGUSR1);
    sigprocmask(SIG_BLOCK, &block, &old);
    signal(SIGUSR1, on_usr1);
    write(1, "READY\n", 6);
    while (!go) sigsuspend(&old);
    if (sum(p, n) != h) { write(1, "FAIL\n", 5); return 1; }
    write(1, "PASS\n", 5);
    return 0;
}
