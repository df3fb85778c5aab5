"""make bench: dump and restore real processes, side by side with `cp`.

For each size (random data, and half zeros) and each image directory
(tmpfs, and a disk-backed one), RUNS times, interleaved:
  - start bench/filler.c holding SIZE of memory it checksums itself,
  - `procsnap -v dump -R` (leave-running: how long the target is frozen),
  - `procsnap dump` (kill), `procsnap restore -d`, SIGUSR1: the restored
    process must pass its own memory check,
  - `cp` of a same-size file in the same directory.
Times are whole CLI runs (Python start-up included). Peak RSS is the
procsnap process's own (ru_maxrss). Prints median [min-max]; figures only.

Environment: BENCH_SIZES (MiB, default 1,256,1024,4096), BENCH_RUNS (3),
BENCH_PATTERNS (random,halfzero), BENCH_DIRS (tmpfs,disk), BENCH_DISK_DIR
(/var/tmp).
"""

from __future__ import annotations

import ctypes
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RUNS = int(os.environ.get("BENCH_RUNS", "3"))
SIZES = [int(s) for s in os.environ.get("BENCH_SIZES", "1,256,1024,4096").split(",")]
PATTERNS = os.environ.get("BENCH_PATTERNS", "random,halfzero").split(",")
DIRS = os.environ.get("BENCH_DIRS", "tmpfs,disk").split(",")
DISK_DIR = os.environ.get("BENCH_DISK_DIR", "/var/tmp")


def timed_cli(*args: str) -> tuple[float, int, str]:
    """Run the CLI through a tiny wrapper that reports the child's own peak RSS."""
    code = ("import os,subprocess,sys,time,resource\n"
            "t=time.perf_counter()\n"
            "p=subprocess.run(sys.argv[1:],capture_output=True,text=True)\n"
            "e=time.perf_counter()-t\n"
            "r=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
            "sys.stdout.write(f'{e} {r} {p.returncode}\\n'+p.stdout); sys.stderr.write(p.stderr)\n")
    p = subprocess.run([sys.executable, "-c", code, sys.executable, "-m", "procsnap", *args], cwd=ROOT,
                       capture_output=True, text=True)
    head, _, rest = p.stdout.partition("\n")
    elapsed, rss, rc = head.split()
    if int(rc):
        raise SystemExit(f"procsnap {' '.join(args)} failed: {p.stderr.strip()}")
    return float(elapsed), int(rss), p.stderr + rest


def start_filler(exe: str, mib: int, pattern: str, out: str) -> subprocess.Popen:
    f = open(out, "w")
    p = subprocess.Popen([exe, str(mib), pattern], stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                         start_new_session=True, close_fds=True)
    deadline = time.monotonic() + 300
    while "READY" not in open(out).read():
        if time.monotonic() > deadline or p.poll() is not None:
            raise SystemExit(f"filler {mib} MiB did not start")
        time.sleep(0.01)
    return p


def wait_gone(pid: int) -> None:
    while os.path.exists(f"/proc/{pid}"):
        time.sleep(0.002)


def finish(pid: int, out: str, reap) -> None:
    """SIGUSR1 until it exits; it must report PASS."""
    while True:
        os.kill(pid, signal.SIGUSR1)
        try:
            status = reap(pid)
            if status is not None:
                break
        except ChildProcessError:
            break
        time.sleep(0.05)
    if "PASS" not in open(out).read():
        raise SystemExit(f"pid {pid}: failed its memory check after restore: {open(out).read()!r}")


def reap_nohang(pid: int):
    got, status = os.waitpid(pid, os.WNOHANG)
    return status if got else None


def one_run(exe: str, mib: int, pattern: str, where: str) -> dict:
    images = tempfile.mkdtemp(prefix="img-", dir=where)
    out = os.path.join(where, "filler.out")
    try:
        # leave-running: the frozen time
        p = start_filler(exe, mib, pattern, out)
        _, _, log = timed_cli("-v", "dump", "-R", "-t", str(p.pid), "-D", images)
        frozen = float(re.search(r"frozen for ([\d.]+) ms", log).group(1)) / 1000
        p.kill()
        p.wait()
        wait_gone(p.pid)
        shutil.rmtree(images)
        os.mkdir(images)
        # kill mode, then restore
        p = start_filler(exe, mib, pattern, out)
        t_dump, rss_dump, _ = timed_cli("dump", "-t", str(p.pid), "-D", images)
        p.wait()
        wait_gone(p.pid)
        size = sum(os.path.getsize(os.path.join(images, f)) for f in os.listdir(images))
        open(out, "w").close()
        t_restore, rss_restore, text = timed_cli("restore", "-d", "-D", images)
        pid = int(text.split()[-1])
        finish(pid, out, reap_nohang)
        shutil.rmtree(images)
        # cp of a same-size file, same directory
        src = os.path.join(where, "cp-src")
        chunk = os.urandom(1 << 20)
        with open(src, "wb") as f:
            for _ in range(mib):
                f.write(chunk)
            os.fsync(f.fileno())
        t0 = time.perf_counter()
        subprocess.run(["cp", src, src + ".copy"], check=True)
        t_cp = time.perf_counter() - t0
        os.unlink(src)
        os.unlink(src + ".copy")
        return {"dump": t_dump, "restore": t_restore, "frozen": frozen, "cp": t_cp, "size": size,
                "rss": max(rss_dump, rss_restore)}
    finally:
        shutil.rmtree(images, ignore_errors=True)


def med(values: list[float], scale: float = 1000) -> str:
    return f"{statistics.median(values) * scale:7.1f} [{min(values) * scale:.1f}-{max(values) * scale:.1f}]"


def criu_status() -> str:
    criu = shutil.which("criu")
    if not criu:
        return "CRIU: skipped (no criu on PATH)"
    check = subprocess.run([criu, "check"], capture_output=True, text=True)
    if check.returncode:
        return f"CRIU: skipped (`criu check` failed: {check.stderr.strip().splitlines()[-1:]})"
    return "CRIU: found and `criu check` passes, but this script does not drive it yet"


def main() -> int:
    libc = ctypes.CDLL(None)
    libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: restored processes come back to us
    work = {"tmpfs": tempfile.mkdtemp(prefix="procsnap-bench-", dir="/dev/shm"),
            "disk": tempfile.mkdtemp(prefix="procsnap-bench-", dir=DISK_DIR)}
    try:
        exe = os.path.join(work["tmpfs"], "filler")
        subprocess.run(["gcc", "-O2", "-o", exe, os.path.join(HERE, "filler.c")], check=True)
        print(f"procsnap bench {time.strftime('%Y-%m-%d')} on {platform.node()}: {os.cpu_count()} cores, "
              f"kernel {platform.release()}; {RUNS} runs; whole CLI times; median [min-max]")
        print(criu_status())
        print(f"{'size':>6} {'data':>8} {'dir':>5} | {'dump ms':>21} | {'frozen -R ms':>19} | {'restore ms':>21} | "
              f"{'cp ms':>21} | {'image MiB':>9} | {'dump GiB/s':>10} | {'rest GiB/s':>10} | {'cp GiB/s':>8} | {'peak RSS':>8}")
        for mib in SIZES:
            for pattern in PATTERNS:
                for d in DIRS:
                    runs = [one_run(exe, mib, pattern, work[d]) for _ in range(RUNS)]
                    col = lambda k: [r[k] for r in runs]  # noqa: E731
                    gib = mib / 1024
                    print(f"{mib:>4} M {pattern:>8} {d:>5} | {med(col('dump'))} | {med(col('frozen'))} | "
                          f"{med(col('restore'))} | {med(col('cp'))} | {statistics.median(col('size')) / 2**20:9.1f} | "
                          f"{gib / statistics.median(col('dump')):10.2f} | {gib / statistics.median(col('restore')):10.2f} | "
                          f"{gib / statistics.median(col('cp')):8.2f} | {max(col('rss')) / 1024:6.1f} M", flush=True)
    finally:
        for w in work.values():
            shutil.rmtree(w, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
