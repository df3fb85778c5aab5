"""make bench: dump and restore real processes of several sizes to tmpfs,
side by side with `cp` of a same-size file in the same run.

Prints median and range over RUNS runs; every restored process must pass
its own memory check. Figures only, no assertions.
"""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import procsnap  # noqa: E402

RUNS = int(os.environ.get("BENCH_RUNS", "3"))
SIZES_MIB = [int(s) for s in os.environ.get("BENCH_SIZES", "1,256,1024").split(",")]


def build(tmp: str) -> str:
    exe = os.path.join(tmp, "filler")
    subprocess.run(["gcc", "-O2", "-o", exe, os.path.join(HERE, "filler.c")], check=True)
    return exe


def start(exe: str, mib: int, out: str) -> subprocess.Popen:
    f = open(out, "w")
    p = subprocess.Popen([exe, str(mib)], stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                         start_new_session=True)
    deadline = time.monotonic() + 120
    while "READY" not in open(out).read():
        if time.monotonic() > deadline or p.poll() is not None:
            raise SystemExit(f"filler {mib} MiB did not start")
        time.sleep(0.01)
    return p


def wait_gone(pid: int) -> None:
    while os.path.exists(f"/proc/{pid}"):
        time.sleep(0.005)


def one_run(exe: str, mib: int, work: str) -> dict:
    out = os.path.join(work, "out.txt")
    images = os.path.join(work, "img")
    shutil.rmtree(images, ignore_errors=True)
    os.makedirs(images)
    p = start(exe, mib, out)
    t0 = time.perf_counter()
    procsnap.dump(p.pid, images)
    t_dump = time.perf_counter() - t0
    p.wait()
    wait_gone(p.pid)
    size = sum(os.path.getsize(os.path.join(images, f)) for f in os.listdir(images))
    t0 = time.perf_counter()
    pid = procsnap.restore(images)
    t_restore = time.perf_counter() - t0
    os.kill(pid, signal.SIGUSR1)
    _, status = os.waitpid(pid, 0)
    ok = os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 and "PASS" in open(out).read()
    if not ok:
        raise SystemExit(f"{mib} MiB: restored process failed its memory check")
    src = os.path.join(work, "cp-src")
    with open(src, "wb") as f:
        f.truncate(0)
        chunk = os.urandom(1 << 20)
        for _ in range(mib):
            f.write(chunk)
    t0 = time.perf_counter()
    shutil.copyfile(src, src + ".copy")
    t_cp = time.perf_counter() - t0
    os.unlink(src)
    os.unlink(src + ".copy")
    return {"dump": t_dump, "restore": t_restore, "cp": t_cp, "size": size}


def fmt(values: list[float], unit_ms: bool = True) -> str:
    med = statistics.median(values)
    return f"{med * 1000:8.1f} ms [{min(values) * 1000:.1f}-{max(values) * 1000:.1f}]"


def main() -> int:
    work = tempfile.mkdtemp(prefix="procsnap-bench-", dir="/dev/shm")
    try:
        exe = build(work)
        print(f"procsnap bench, {RUNS} runs each, images on tmpfs ({work}); median [min-max]")
        print(f"{'size':>8} | {'dump':>26} | {'restore':>26} | {'cp same size':>26} | {'image':>9} | dump GiB/s | restore GiB/s | cp GiB/s")
        for mib in SIZES_MIB:
            runs = [one_run(exe, mib, work) for _ in range(RUNS)]
            d = [r["dump"] for r in runs]
            r_ = [r["restore"] for r in runs]
            c = [r["cp"] for r in runs]
            gib = mib / 1024
            print(f"{mib:>5} MiB | {fmt(d)} | {fmt(r_)} | {fmt(c)} | {runs[0]['size'] / 2**20:7.1f} M |"
                  f" {gib / statistics.median(d):10.2f} | {gib / statistics.median(r_):13.2f} | {gib / statistics.median(c):8.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
