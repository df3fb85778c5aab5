"""make bench-tree: dump and restore process trees, side by side with
building the same tree from scratch and with `cp -r` of the image.

Each tree is python3: a root holding SHARED MiB (random, written before
the forks, so shared copy-on-write by every process) forks PROCS-1
children; every process holds PRIVATE MiB of its own data and runs
THREADS-1 extra threads. After the restore every process checks its
memory (SHA-256) and thread count; the root reports PASS only if all do.
Times are whole CLI runs; figures only, median [min-max] of BENCH_RUNS.

Environment: BENCH_TREES ("procs x threads x private MiB x shared MiB",
comma separated), BENCH_RUNS (3).
"""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

from common import cli, descendants, gone, wait_for

HERE = os.path.dirname(os.path.abspath(__file__))
RUNS = int(os.environ.get("BENCH_RUNS", "3"))
TREES = [tuple(int(x) for x in t.split("x")) for t in
         os.environ.get("BENCH_TREES", "4x4x64x64,16x4x16x64,64x2x4x16").split(",")]

PROGRAM = textwrap.dedent("""\
    import hashlib, os, signal, sys, threading, time
    procs, threads, private, shared = (int(x) for x in sys.argv[1:5])
    t0 = time.monotonic()
    common = os.urandom(shared << 20)
    def spin():
        while True:
            time.sleep(0.05)
    def body(ready_w):
        own = os.urandom(private << 20)
        digest = hashlib.sha256(own + common).digest()
        for _ in range(threads - 1):
            threading.Thread(target=spin, daemon=True).start()
        return own, digest
    def check(own, digest):
        return hashlib.sha256(own + common).digest() == digest and threading.active_count() == threads
    r, w = os.pipe()
    kids = []
    for i in range(procs - 1):
        pid = os.fork()
        if pid == 0:
            os.close(r)
            signal.signal(signal.SIGUSR2, lambda *a: None)
            own, digest = body(w)
            os.write(w, b"k")
            signal.pause()
            os._exit(0 if check(own, digest) else 1)
        kids.append(pid)
    os.close(w)
    own, digest = body(None)
    got = 0
    while got < procs - 1:
        got += len(os.read(r, 4096))
    signal.signal(signal.SIGUSR1, lambda *a: None)
    os.write(1, f"READY {(time.monotonic() - t0) * 1000:.1f}\\n".encode())
    signal.pause()
    ok = check(own, digest)
    for pid in kids:
        os.kill(pid, signal.SIGUSR2)
        _, st = os.waitpid(pid, 0)
        ok = ok and st == 0
    os.write(1, b"PASS\\n" if ok else b"FAIL\\n")
    """)


def one_run(procs: int, threads: int, private: int, shared: int, work: str) -> dict:
    out = os.path.join(work, "out")
    images = os.path.join(work, "img")
    os.mkdir(images)
    with open(out, "w") as f:
        p = subprocess.Popen([sys.executable, "-c", PROGRAM, str(procs), str(threads), str(private), str(shared)],
                             stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    built = float(wait_for(out, "READY").split()[1]) / 1000
    pids = [p.pid] + descendants(p.pid)
    dump = cli("dump", "-t", str(p.pid), "-D", images)
    p.wait()
    gone(pids)
    size = sum(os.path.getsize(os.path.join(d, n)) for d, _, ns in os.walk(images) for n in ns)
    t = time.perf_counter()
    subprocess.run(["cp", "-r", images, images + ".cp"], check=True)
    copy = time.perf_counter() - t
    shutil.rmtree(images + ".cp")
    restore = cli("restore", "-D", images, "-d")
    os.kill(p.pid, signal.SIGUSR1)
    text = wait_for(out, "PASS")
    if "FAIL" in text:
        raise SystemExit(f"restored tree failed its check: {text}")
    gone(pids)
    shutil.rmtree(images)
    return {"built": built, "dump": dump, "restore": restore, "cp": copy, "image": size / (1 << 20)}


def med(values: list[float], scale: float = 1000) -> str:
    v = sorted(x * scale for x in values)
    return f"{statistics.median(v):.0f} [{v[0]:.0f}-{v[-1]:.0f}]"


def main() -> int:
    # orphans of the restored trees come back to us, to be reaped
    import ctypes
    ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    print(f"procsnap tree bench {time.strftime('%Y-%m-%d')}: {os.cpu_count()} cores, kernel {os.uname().release}; "
          f"{RUNS} runs; median [min-max] ms; image on tmpfs")
    print(f"{'procs':>5} {'thr':>4} {'priv':>5} {'shared':>6} | {'built from scratch':>18} | {'dump':>16} | "
          f"{'restore':>16} | {'cp -r image':>14} | {'image MiB':>9} | {'no dedup MiB':>12}")
    for procs, threads, private, shared in TREES:
        runs = []
        for _ in range(RUNS):
            with tempfile.TemporaryDirectory(dir="/dev/shm") as work:
                runs.append(one_run(procs, threads, private, shared, work))
        print(f"{procs:>5} {threads:>4} {private:>4}M {shared:>5}M | {med([r['built'] for r in runs]):>18} | "
              f"{med([r['dump'] for r in runs]):>16} | {med([r['restore'] for r in runs]):>16} | "
              f"{med([r['cp'] for r in runs]):>14} | {runs[0]['image']:>9.0f} | "
              f"{procs * (private + shared):>12}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
