"""make bench-encoded (and the end of make bench): plain, --compress,
--encrypt and both, on a python3 process (a heap of real objects) and on
random data (bench/filler.c), image on tmpfs. Each run dumps (kill mode)
and restores through the CLI; the restored process checks itself (PASS).
Encodings are interleaved run by run (plain, compress, encrypt, both, then
the reverse), as the README asks of memory timings here. Prints median
[min-max] ms, GiB/s of the process's stored page data, and the ratio of
pages.img to the plain image's, and the CPU seconds (user + system) of the
dump and restore commands (the restored process's own not included): less
swayed than wall time by what else the machine runs.

Environment: BENCH_RUNS (3), BENCH_RANDOM_MIB (512), BENCH_PYTHON_MIB (about 300).
"""

from __future__ import annotations

import ctypes
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from common import ROOT, wait_for
from run import finish

HERE = os.path.dirname(os.path.abspath(__file__))
RUNS = int(os.environ.get("BENCH_RUNS", "3"))
RANDOM_MIB = int(os.environ.get("BENCH_RANDOM_MIB", "512"))
PYTHON_MIB = int(os.environ.get("BENCH_PYTHON_MIB", "300"))
ENCODINGS = {"plain": [], "compress": ["--compress"], "encrypt": ["--encrypt", "KEY"],
             "both": ["--compress", "--encrypt", "KEY"]}

# A python3 process holding a heap of the kinds of objects programs hold:
# dicts of strings and ints, lists of floats, bytes of text. On SIGUSR1 it
# recomputes a digest of all of it and prints PASS if it is unchanged.
PY_TARGET = r"""
import hashlib, os, random, signal, sys, time
mib = int(sys.argv[1])
rng = random.Random(7)
words = [''.join(rng.choice('abcdefghijklmnopqrstuvwxyz') for _ in range(rng.randint(3, 12))) for _ in range(5000)]
data, size = [], 0
while size < mib << 20:
    rec = {"id": len(data), "name": rng.choice(words) + " " + rng.choice(words), "score": rng.random(),
           "tags": [rng.choice(words) for _ in range(4)], "blob": (" ".join(rng.choices(words, k=40))).encode()}
    data.append(rec)
    size += 900
def digest():
    h = hashlib.sha256()
    for r in data:
        h.update(repr(sorted(r.items())).encode())
    return h.hexdigest()
first = digest()
go = []
signal.signal(signal.SIGUSR1, lambda *a: go.append(1))
print("READY", flush=True)
while not go:
    time.sleep(0.05)
print("PASS" if digest() == first else "FAIL", flush=True)
"""


CPU = {}  # CPU seconds (user + system) of the last cli() run of each verb


def cli(*args: str) -> tuple[float, str]:
    t = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    p = subprocess.run([sys.executable, "-m", "procsnap", *args], cwd=ROOT, capture_output=True, text=True)
    took = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    CPU[args[0]] = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    if p.returncode:
        raise SystemExit(f"procsnap {' '.join(args)} failed: {p.stderr.strip()}")
    return took, p.stdout


def start(argv: list[str], out: str) -> subprocess.Popen:
    with open(out, "w") as f:
        p = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True, close_fds=True)
    wait_for(out, "READY", timeout=600)
    return p


def gone(pid: int) -> None:
    while os.path.exists(f"/proc/{pid}"):
        time.sleep(0.002)


def one_run(argv: list[str], flags: list[str], work: str) -> dict:
    images = tempfile.mkdtemp(prefix="img-", dir=work)
    out = os.path.join(work, "target.out")
    try:
        p = start(argv, out)
        t_dump, _ = cli("dump", "-t", str(p.pid), "-D", images, *flags)
        dump_cpu = CPU["dump"]
        p.wait()
        gone(p.pid)
        pages = os.path.getsize(os.path.join(images, "pages.img"))
        logical = int(subprocess.run([sys.executable, "-c", "import sys, procsnap\n"
                                      "from procsnap.image.sealing import read_key_file\n"
                                      "k = read_key_file(sys.argv[2]) if len(sys.argv) > 2 else None\n"
                                      "print(procsnap.open_image(sys.argv[1], key=k).pages_size)",
                                      images, *(flags[-1:] if "--encrypt" in flags else [])],
                                     cwd=ROOT, capture_output=True, text=True, check=True).stdout)
        open(out, "w").close()
        t_restore, text = cli("restore", "-d", "-D", images, *[f for f in flags if f != "--compress"])
        finish(int(text.split()[-1]), out)
        return {"dump": t_dump, "restore": t_restore, "pages": pages, "logical": logical,
                "dump_cpu": dump_cpu, "restore_cpu": CPU["restore"]}
    finally:
        shutil.rmtree(images, ignore_errors=True)


def med(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:7.0f} [{min(values) * 1000:.0f}-{max(values) * 1000:.0f}]"


def main() -> int:
    ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    work = tempfile.mkdtemp(prefix="procsnap-bench-enc-", dir="/dev/shm")
    try:
        key = os.path.join(work, "key")
        with open(key, "wb") as f:
            f.write(os.urandom(32))
        filler = os.path.join(work, "filler")
        subprocess.run(["gcc", "-O2", "-o", filler, os.path.join(HERE, "filler.c")], check=True)
        pyfile = os.path.join(work, "heap.py")
        with open(pyfile, "w") as f:
            f.write(PY_TARGET)
        loads = {f"python3 {PYTHON_MIB}M heap": ["python3", pyfile, str(PYTHON_MIB)],
                 f"random {RANDOM_MIB}M": [filler, str(RANDOM_MIB), "random"]}
        print(f"procsnap encoded images {time.strftime('%Y-%m-%d')} on {platform.node()}: {os.cpu_count()} cores, "
              f"kernel {platform.release()}; {RUNS} runs interleaved; image on tmpfs; whole CLI times, "
              f"median [min-max]; GiB/s of page data (uncompressed)")
        print(f"{'process':>20} {'encoding':>9} | {'dump ms':>18} | {'restore ms':>18} | {'pages MiB':>9} | "
              f"{'ratio':>5} | {'dump GiB/s':>10} | {'rest GiB/s':>10} | {'dump CPU s':>10} | {'rest CPU s':>10}")
        for name, argv in loads.items():
            order = list(ENCODINGS)
            runs: dict[str, list[dict]] = {e: [] for e in order}
            for i in range(RUNS):
                for enc in (order if i % 2 == 0 else order[::-1]):
                    flags = [key if f == "KEY" else f for f in ENCODINGS[enc]]
                    runs[enc].append(one_run(argv, flags, work))
            plain = statistics.median(r["pages"] for r in runs["plain"])
            for enc in order:
                rs = runs[enc]
                gib = statistics.median(r["logical"] for r in rs) / 2**30
                pages = statistics.median(r["pages"] for r in rs)
                print(f"{name:>20} {enc:>9} | {med([r['dump'] for r in rs])} | {med([r['restore'] for r in rs])} | "
                      f"{pages / 2**20:9.1f} | {pages / plain:5.2f} | "
                      f"{gib / statistics.median(r['dump'] for r in rs):10.2f} | "
                      f"{gib / statistics.median(r['restore'] for r in rs):10.2f} | "
                      f"{statistics.median(r['dump_cpu'] for r in rs):10.2f} | "
                      f"{statistics.median(r['restore_cpu'] for r in rs):10.2f}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
