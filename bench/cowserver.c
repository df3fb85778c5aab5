/* make bench-cow target: a forked server. The parent fills SIZE MiB of
 * private anonymous memory with non-zero data, then forks WORKERS workers
 * that only read it (so every page stays shared copy-on-write) and wait.
 * On SIGUSR1 the parent tells the workers, each checks its checksum, and the
 * parent prints PASS only if all did. Handshake as in tests/targets. */
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

static volatile sig_atomic_t go;
static void on_usr1(int s) { (void)s; go = 1; }

static uint64_t sum(const volatile uint64_t *p, size_t n) {
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 1099511628211ULL;
    return h;
}

static void wait_usr1(void) {
    /* SIGUSR1 blocked except inside sigsuspend (after a restore, too) */
    sigset_t block, old;
    sigemptyset(&block);
    sigaddset(&block, SIGUSR1);
    sigprocmask(SIG_BLOCK, &block, &old);
    while (!go) sigsuspend(&old);
}

int main(int argc, char **argv) {
    size_t mib = argc > 1 ? strtoul(argv[1], 0, 10) : 256;
    int workers = argc > 2 ? atoi(argv[2]) : 8;
    size_t n = mib << 17; /* 8-byte words */
    uint64_t *p = mmap(0, n * 8, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return 2;
    uint64_t x = 88172645463325252ULL;
    for (size_t i = 0; i < n; i++) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        p[i] = x | 1; /* never a zero page */
    }
    uint64_t h = sum(p, n);
    signal(SIGUSR1, on_usr1);
    int ready[2];
    if (pipe(ready)) return 2;
    pid_t kids[64];
    for (int i = 0; i < workers && i < 64; i++) {
        kids[i] = fork();
        if (kids[i] == 0) {
            close(ready[0]);
            int ok = sum(p, n) == h; /* reads every page: the sharing stays */
            write(ready[1], ok ? "k" : "f", 1);
            close(ready[1]);
            wait_usr1();
            _exit(sum(p, n) == h ? 0 : 1);
        }
    }
    close(ready[1]);
    int got = 0, bad = 0;
    char c;
    while (got < workers && read(ready[0], &c, 1) == 1) { got++; bad += c != 'k'; }
    close(ready[0]);
    if (bad) { write(1, "FAIL\n", 5); return 1; }
    write(1, "READY\n", 6);
    wait_usr1();
    int ok = sum(p, n) == h;
    for (int i = 0; i < workers; i++) {
        int st;
        kill(kids[i], SIGUSR1);
        if (waitpid(kids[i], &st, 0) != kids[i] || !WIFEXITED(st) || WEXITSTATUS(st)) ok = 0;
    }
    write(1, ok ? "PASS\n" : "FAIL\n", 5);
    return !ok;
}
