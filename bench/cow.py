"""make bench-cow: the memory of a forked server before and after a restore.

bench/cowserver.c: a parent fills SIZE MiB (256) of private anonymous
memory with non-zero data and forks WORKERS (8) workers that only read it,
so every page is shared copy-on-write by the WORKERS+1 processes. The bench
measures the tree (the sum of Rss and Pss of /proc/PID/smaps_rollup over its
processes) and the machine (MemAvailable, against a baseline taken without
the tree), dumps it with procsnap (kill mode, image on tmpfs), restores it
(-d), measures again, then has every process check its memory (PASS).

The baseline after the dump is taken with the image in place (tmpfs holds
it in memory), so both MemAvailable figures are the tree's own; AnonPages
(the machine's anonymous memory, which the host's reclaim does not move)
says the same more steadily. Both are the whole machine's: anything else
running moves them; RSS and PSS are the tree's alone. Figures: median [min-max] of BENCH_RUNS (3).

With CRIU=path (e.g. ../shared/anchors/criu-4.2) the same runs are made
with CRIU's dump and restore -d too, for comparison.

Environment: BENCH_COW_MIB (256), BENCH_COW_WORKERS (8), BENCH_RUNS (3), CRIU.
"""

from __future__ import annotations

import ctypes
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from common import cli, gone, wait_for

HERE = os.path.dirname(os.path.abspath(__file__))
RUNS = int(os.environ.get("BENCH_RUNS", "3"))
CRIU = os.environ.get("CRIU", "")
MIB = int(os.environ.get("BENCH_COW_MIB", "256"))
WORKERS = int(os.environ.get("BENCH_COW_WORKERS", "8"))
PR_SET_CHILD_SUBREAPER = 36
SETTLE_S = 0.25
STEADY_S = 2.0
STEADY_KIB = 16384
SETTLE_TIMEOUT_S = 20


def tree_of(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for tid in os.listdir(f"/proc/{p}/task"):
            with open(f"/proc/{p}/task/{tid}/children") as f:
                todo += [int(k) for k in f.read().split()]
    return out


def rollup(pid: int) -> dict[str, int]:
    """Rss and Pss of one process, in KiB."""
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in ("Rss", "Pss"):
                out[name] = int(rest.split()[0])
    return out


def meminfo() -> dict[str, int]:
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            name, _, rest = line.partition(":")
            out[name] = int(rest.split()[0])
    return out


def machine() -> dict[str, int]:
    """MemAvailable and AnonPages (KiB) once MemAvailable has settled: memory
    freed just before (a tree that exited, an image removed) comes back to
    MemAvailable only over many seconds here (the host takes freed guest
    memory, ~10 MB/s), so it must hold still within STEADY_KIB for STEADY_S."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    window = [meminfo()["MemAvailable"]]
    while time.monotonic() < deadline:
        time.sleep(SETTLE_S)
        window = (window + [meminfo()["MemAvailable"]])[-int(STEADY_S / SETTLE_S) - 1:]
        if len(window) > STEADY_S / SETTLE_S and max(window) - min(window) < STEADY_KIB:
            break
    m = meminfo()
    return {"avail": m["MemAvailable"], "anon": m["AnonPages"]}


def measure(root: int, baseline: dict[str, int]) -> dict[str, float]:
    now = machine()
    pids = tree_of(root)
    rss = pss = 0
    for pid in pids:
        r = rollup(pid)
        rss, pss = rss + r["Rss"], pss + r["Pss"]
    return {"procs": len(pids), "rss": rss / 1024, "pss": pss / 1024,
            "used": (baseline["avail"] - now["avail"]) / 1024, "anon": (now["anon"] - baseline["anon"]) / 1024}


def run_criu(*args: str) -> float:
    t = time.perf_counter()
    p = subprocess.run([CRIU, *args], capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"criu {' '.join(args)} failed: {p.stderr.strip()[-2000:]}")
    return time.perf_counter() - t


def one_run(exe: str, work: str, tool) -> tuple[dict, dict, float, float]:
    out = os.path.join(work, "out")
    images = os.path.join(work, "img")
    base = machine()
    with open(out, "w") as f:
        p = subprocess.Popen([exe, str(MIB), str(WORKERS)], stdout=f, stderr=subprocess.STDOUT,
                             start_new_session=True)
    if "READY" not in wait_for(out, "READY"):
        raise SystemExit(f"the server did not start: {open(out).read()!r}")
    before = measure(p.pid, base)
    pids = tree_of(p.pid)
    os.mkdir(images)
    dump = tool("dump", "-t", str(p.pid), "-D", images)
    p.wait()
    gone(pids)
    base = machine()  # the image is in tmpfs now: part of the baseline
    restore = tool("restore", "-D", images, "-d")
    after = measure(p.pid, base)
    os.kill(p.pid, signal.SIGUSR1)
    text = wait_for(out, "PASS")
    gone(pids)
    if "PASS" not in text:
        raise SystemExit(f"the restored server failed its check: {text!r}")
    return before, after, dump, restore


def med(values: list[float], fmt: str = ".0f") -> str:
    v = sorted(values)
    if len(v) == 1:
        return format(v[0], fmt)
    return f"{statistics.median(v):{fmt}} [{v[0]:{fmt}}-{v[-1]:{fmt}}]"


def report(name: str, runs: list) -> None:
    print(f"{name:>22} | {'before dump':>22} | {'after restore':>22}")
    for key, label in (("rss", "tree RSS (sum)"), ("pss", "tree PSS (sum)"), ("used", "MemAvailable drop"),
                       ("anon", "AnonPages growth")):
        print(f"{label:>22} | {med([r[0][key] for r in runs]):>22} | {med([r[1][key] for r in runs]):>22}")
    print(f"{'processes':>22} | {runs[0][0]['procs']:>22} | {runs[0][1]['procs']:>22}")
    print(f"dump {med([r[2] * 1000 for r in runs])} ms, restore {med([r[3] * 1000 for r in runs])} ms "
          "(whole CLI runs)")


def main() -> int:
    ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # orphans of the restored tree come back to us
    tools = {"procsnap": cli} | ({"CRIU": run_criu} if CRIU else {})
    runs: dict[str, list] = {name: [] for name in tools}
    with tempfile.TemporaryDirectory(dir="/dev/shm") as work:
        exe = os.path.join(work, "cowserver")
        subprocess.run(["gcc", "-O2", "-o", exe, os.path.join(HERE, "cowserver.c")], check=True)
        for i in range(RUNS):
            for name, tool in tools.items():  # interleaved: the machine's drift hits both alike
                run_dir = os.path.join(work, f"{name}{i}")
                os.mkdir(run_dir)
                runs[name].append(one_run(exe, run_dir, tool))
                subprocess.run(["rm", "-rf", run_dir], check=True)
    print(f"procsnap cow bench {time.strftime('%Y-%m-%d')}: {os.cpu_count()} cores, kernel {os.uname().release}; "
          f"a server of {MIB} MiB shared copy-on-write by {WORKERS} workers ({WORKERS + 1} processes); "
          f"{RUNS} runs; median [min-max] MiB; image on tmpfs")
    for name in tools:
        report(name, runs[name])
    return 0


if __name__ == "__main__":
    sys.exit(main())
