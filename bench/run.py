"""make bench: procsnap beside CRIU, one table.

Each figure is measured for procsnap and, when CRIU=path names a binary
(../shared/anchors/criu-4.2), for CRIU in the same run, A B A B
interleaved, so that the machine's drift hits both alike. Printed: the
median [min-max] of each tool and the median [min-max] of the per-pair
ratio procsnap/CRIU (below 1: procsnap is faster).

Per run, on bench/filler.c holding SIZE MiB of pseudo-random data that it
checks itself after the restore (SIGUSR1 -> PASS, else the bench stops):
  - freeze: `dump -R` (leave-running), how long the target was stopped:
    procsnap's own "frozen for" (-v), CRIU's stats-dump (freezing_time +
    frozen_time);
  - dump: a kill-mode dump, the whole CLI run (Python start-up included);
  - restore: `restore -d`, the whole CLI run.
Rows: the small process (1 MiB) with images on tmpfs; bulk sizes on tmpfs
and on disk; then bench/manymaps.py's rows (10,000 VMAs, a 64-process
tree), when that script is there. Peak RSS is each tool's own (ru_maxrss).

Environment: CRIU (unset: CRIU skipped with a note), BENCH_RUNS (3 pairs;
the small process gets BENCH_SMALL_RUNS, 7; 0 leaves its row out), BENCH_SIZES (bulk MiB, 512;
4096 too with BENCH_SIZES=512,4096), BENCH_DIRS (tmpfs,disk),
BENCH_DISK_DIR (/var/tmp), BENCH_PATTERNS (random; random,halfzero adds
images whose every other page is zero), BENCH_QUICK=1 (2 small pairs, one 64 MiB pair
on tmpfs, no manymaps: a minute).
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
QUICK = os.environ.get("BENCH_QUICK") == "1"
RUNS = int(os.environ.get("BENCH_RUNS", "1" if QUICK else "3"))
SMALL_RUNS = int(os.environ.get("BENCH_SMALL_RUNS", "2" if QUICK else "7"))
SIZES = [int(s) for s in os.environ.get("BENCH_SIZES", "64" if QUICK else "512").split(",") if s]
DIRS = os.environ.get("BENCH_DIRS", "tmpfs" if QUICK else "tmpfs,disk").split(",")
PATTERNS = os.environ.get("BENCH_PATTERNS", "random").split(",")  # filler.c's: random, halfzero
DISK_DIR = os.environ.get("BENCH_DISK_DIR", "/var/tmp")
CRIU = os.environ.get("CRIU", "")
PR_SET_CHILD_SUBREAPER = 36


def timed(argv: list[str], cwd: str = ROOT) -> tuple[float, int, str, str]:
    """Run argv through a tiny wrapper that reports the child's own time and
    peak RSS: (seconds, KiB, stdout, stderr)."""
    code = ("import subprocess,sys,time,resource\n"
            "t=time.perf_counter()\n"
            "p=subprocess.run(sys.argv[1:],capture_output=True,text=True)\n"
            "e=time.perf_counter()-t\n"
            "r=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
            "sys.stdout.write(f'{e} {r} {p.returncode}\\n'+p.stdout); sys.stderr.write(p.stderr)\n")
    p = subprocess.run([sys.executable, "-c", code, *argv], cwd=cwd, capture_output=True, text=True)
    head, _, out = p.stdout.partition("\n")
    elapsed, rss, rc = head.split()
    if int(rc):
        raise SystemExit(f"{' '.join(argv)} failed: {p.stderr.strip()[-2000:]}")
    return float(elapsed), int(rss), out, p.stderr


class Procsnap:
    """procsnap of this tree, or of another (`root`: a base worktree, bench/small.py's)."""

    def __init__(self, root: str = ROOT, name: str = "procsnap"):
        self.root, self.name = root, name

    def freeze(self, pid: int, images: str) -> float:
        _, _, _, log = timed([sys.executable, "-m", "procsnap", "-v", "dump", "-R", "-t", str(pid), "-D", images],
                             self.root)
        return float(re.search(r"frozen for ([\d.]+) ms", log).group(1)) / 1000

    def dump(self, pid: int, images: str) -> tuple[float, int]:
        took, rss, _, _ = timed([sys.executable, "-m", "procsnap", "dump", "-t", str(pid), "-D", images], self.root)
        return took, rss

    def restore(self, images: str) -> tuple[float, int, int]:
        took, rss, out, _ = timed([sys.executable, "-m", "procsnap", "restore", "-d", "-D", images], self.root)
        return took, rss, int(out.split()[-1])


class Criu:
    name = "CRIU"

    def freeze(self, pid: int, images: str) -> float:
        timed([CRIU, "dump", "-R", "-t", str(pid), "-D", images])
        return sum(criu_dump_stats(os.path.join(images, "stats-dump"))[:2]) / 1e6

    def dump(self, pid: int, images: str) -> tuple[float, int]:
        took, rss, _, _ = timed([CRIU, "dump", "-t", str(pid), "-D", images])
        return took, rss

    def restore(self, images: str) -> tuple[float, int, int]:
        pidfile = os.path.join(images, "restored.pid")
        took, rss, _, _ = timed([CRIU, "restore", "-d", "-D", images, "--pidfile", pidfile])
        with open(pidfile) as f:
            return took, rss, int(f.read())


def criu_dump_stats(path: str) -> list[int]:
    """CRIU's stats-dump: two magics, a u32 size, then StatsEntry (images/
    stats.proto) whose field 1 is DumpStatsEntry: freezing_time (1),
    frozen_time (2), memdump_time (3), memwrite_time (4), in microseconds."""
    with open(path, "rb") as f:
        data = f.read()
    size = int.from_bytes(data[8:12], "little")
    outer = _proto_fields(data[12:12 + size])
    inner = _proto_fields(outer[1])
    return [inner.get(n, 0) for n in (1, 2, 3, 4)]


def _proto_fields(buf: bytes) -> dict[int, int | bytes]:
    """Varint and length-delimited fields of a protobuf message."""
    out: dict[int, int | bytes] = {}
    i = 0

    def varint() -> int:
        nonlocal i
        value = shift = 0
        while True:
            b = buf[i]
            i += 1
            value |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return value

    while i < len(buf):
        key = varint()
        if key & 7 == 0:
            out[key >> 3] = varint()
        elif key & 7 == 2:
            n = varint()
            out[key >> 3] = buf[i:i + n]
            i += n
        else:
            raise SystemExit(f"stats-dump: wire type {key & 7} not expected")
    return out


def start_filler(exe: str, mib: int, out: str, pattern: str = "random") -> subprocess.Popen:
    with open(out, "w") as f:
        p = subprocess.Popen([exe, str(mib), pattern], stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True, close_fds=True)
    deadline = time.monotonic() + 300
    while "READY" not in open(out).read():
        if time.monotonic() > deadline or p.poll() is not None:
            raise SystemExit(f"filler {mib} MiB did not start")
        time.sleep(0.005)
    return p


def gone(pid: int) -> None:
    """Until /proc/PID is gone, reaping it if it is ours (we are a subreaper)."""
    while os.path.exists(f"/proc/{pid}"):
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.002)


def reap_nohang(pid: int):
    """The exit status of our child pid if it has ended (reaped), else None."""
    got, status = os.waitpid(pid, os.WNOHANG)
    return status if got else None


def finish(pid: int, out: str) -> None:
    """SIGUSR1 until it exits; it must have reported PASS. (The output file
    is not truncated before a restore: CRIU checks its size.)"""
    while True:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rpartition(")")[2].split()[0] == "Z":
                    break
            os.kill(pid, signal.SIGUSR1)
        except (FileNotFoundError, ProcessLookupError):
            break
        time.sleep(0.02)
    gone(pid)
    with open(out) as f:
        text = f.read()
    if not text.endswith("PASS\n"):
        raise SystemExit(f"pid {pid}: failed its memory check after restore: {text[-200:]!r}")


def one_run(tool, exe: str, mib: int, where: str, pattern: str = "random") -> dict:
    images = tempfile.mkdtemp(prefix="img-", dir=where)
    out = os.path.join(where, f"filler-{tool.name}.out")
    try:
        p = start_filler(exe, mib, out, pattern)
        frozen = tool.freeze(p.pid, images)
        p.kill()
        p.wait()
        gone(p.pid)
        shutil.rmtree(images)
        os.mkdir(images)
        p = start_filler(exe, mib, out, pattern)
        t_dump, rss_dump = tool.dump(p.pid, images)
        p.wait()
        gone(p.pid)
        t_restore, rss_restore, pid = tool.restore(images)
        finish(pid, out)
        return {"freeze": frozen, "dump": t_dump, "restore": t_restore, "rss": max(rss_dump, rss_restore)}
    finally:
        shutil.rmtree(images, ignore_errors=True)


def med(values: list[float], scale: float = 1000, fmt: str = ".1f") -> str:
    return f"{statistics.median(values) * scale:{fmt}} [{min(values) * scale:{fmt}}-{max(values) * scale:{fmt}}]"


def criu_status() -> str | None:
    """Why CRIU is skipped, or None when it runs."""
    if not CRIU:
        return "CRIU: skipped (set CRIU=path, e.g. CRIU=../shared/anchors/criu-4.2)"
    if not (os.path.isfile(CRIU) and os.access(CRIU, os.X_OK)):
        return f"CRIU: skipped ({CRIU} is not an executable file)"
    check = subprocess.run([CRIU, "check"], capture_output=True, text=True)
    if check.returncode:
        return f"CRIU: skipped (`{CRIU} check` failed: {(check.stderr.strip().splitlines() or [''])[-1]})"
    return None


def rows(label: str, runs: list[dict]) -> list[str]:
    """One line per figure: procsnap, CRIU, ratio."""
    out = []
    for key in ("dump", "restore", "freeze"):
        ours = [r["procsnap"][key] for r in runs]
        line = f"{label:>22} {key:>8} | procsnap {med(ours):>24}"
        if "CRIU" in runs[0]:
            theirs = [r["CRIU"][key] for r in runs]
            ratios = [r["procsnap"][key] / r["CRIU"][key] for r in runs if r["CRIU"][key]]
            line += f" | CRIU {med(theirs):>24} | ratio {med(ratios, 1, '.2f') if ratios else '-':>18}"
        out.append(line)
    rss = f"{max(r['procsnap']['rss'] for r in runs) / 1024:.0f} MiB"
    if "CRIU" in runs[0]:
        rss += f", CRIU {max(r['CRIU']['rss'] for r in runs) / 1024:.0f} MiB"
    out.append(f"{label:>22} {'peak RSS':>8} | procsnap {rss}")
    return out


def main() -> int:
    ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # restored processes come back to us
    skipped = criu_status()
    tools = [Procsnap()] + ([] if skipped else [Criu()])
    work = {"tmpfs": tempfile.mkdtemp(prefix="procsnap-bench-", dir="/dev/shm")}
    if "disk" in DIRS:
        work["disk"] = tempfile.mkdtemp(prefix="procsnap-bench-", dir=DISK_DIR)
    try:
        exe = os.path.join(work["tmpfs"], "filler")
        subprocess.run(["gcc", "-O2", "-o", exe, os.path.join(HERE, "filler.c")], check=True)
        print(f"procsnap bench {time.strftime('%Y-%m-%d %H:%M')} on {platform.node()}: {os.cpu_count()} cores, "
              f"kernel {platform.release()}, load {os.getloadavg()[0]:.1f}; whole CLI runs (freeze: the time "
              f"the target was stopped); ms, median [min-max]; ratio procsnap/CRIU per pair")
        if skipped:
            print(skipped)
        cases = [(1, "random", "tmpfs", SMALL_RUNS)] * bool(SMALL_RUNS) + [(mib, pattern, d, RUNS) for mib in SIZES
                                                        for pattern in PATTERNS for d in DIRS]
        for mib, pattern, d, n in cases:
            runs = []
            for _ in range(n):
                runs.append({tool.name: one_run(tool, exe, mib, work[d], pattern) for tool in tools})  # A B A B
            label = f"{'small ' if mib == 1 else ''}{mib} MiB {'' if pattern == 'random' else pattern + ' '}{d} x{n}"
            for line in rows(label, runs):
                print(line, flush=True)
    finally:
        for w in work.values():
            shutil.rmtree(w, ignore_errors=True)
    if QUICK:
        print("many mappings and large trees: skipped (BENCH_QUICK=1)")
    elif os.path.exists(os.path.join(HERE, "manymaps.py")):
        sys.path.insert(0, HERE)
        import manymaps  # the batch restore's figures (issue 12, goal 2), with CRIU beside them

        for line in manymaps.rows():
            print(line, flush=True)
    else:
        print("many mappings and large trees: skipped (no bench/manymaps.py)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
