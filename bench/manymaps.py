"""Many mappings and large trees (issue 12, goal 2), procsnap beside CRIU.

Two programs, each dumped (kill mode) and restored (-d) by whole CLI runs,
procsnap and CRIU interleaved (A B A B ...), BENCH_RUNS pairs:
  - tests/targets/manymaps.c: a process with BENCH_MAPS (10000) one-page
    VMAs, alternating rw-p / r--p, each page with its own contents;
  - bench/tree.py's python3 tree with BENCH_TREE_PROCS (64) processes (one
    thread and 1 MiB of its own each, 1 MiB shared).
After each restore the program checks itself (SIGUSR1 -> PASS) and the run
counts only if it passes. Prints median [min-max] ms of each tool and the
median and range of the per-pair ratio procsnap/CRIU (below 1: procsnap is
faster). CRIU=path names the binary (../shared/anchors/criu-4.2); unset,
CRIU is skipped with a note. Image directories on tmpfs.

`rows()` is what bench/run.py prints; `python bench/manymaps.py` prints it too.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from common import ROOT, cli, gone, kill_pids, wait_for
from tree import PROGRAM, descendants

RUNS = int(os.environ.get("BENCH_RUNS", "5"))
MAPS = int(os.environ.get("BENCH_MAPS", "10000"))
TREE_PROCS = int(os.environ.get("BENCH_TREE_PROCS", "64"))
CRIU = os.environ.get("CRIU", "")
# PROCSNAP_BASE=DIR: another procsnap tree (a `git worktree add --detach` of the
# base commit) run as a third tool, "base", interleaved with the two
BASE = os.environ.get("PROCSNAP_BASE", "")
PROGRAMS = os.environ.get("BENCH_PROGRAMS", "maps,tree").split(",")  # which of the two programs
PR_SET_CHILD_SUBREAPER = 36


def criu(*args: str) -> float:
    """Runs CRIU; seconds taken (whole run)."""
    t = time.perf_counter()
    p = subprocess.run([CRIU, *args], capture_output=True, text=True)
    took = time.perf_counter() - t
    if p.returncode:
        raise SystemExit(f"criu {' '.join(args)} failed: {p.stderr.strip()[-2000:]}")
    return took


def procsnap(*args: str) -> float:
    return cli(*args)


def base(*args: str) -> float:
    """procsnap as PROCSNAP_BASE has it."""
    return cli(*args, root=BASE)


def one_run(argv: list[str], work: str, tool) -> tuple[float, float]:
    """(dump, restore) seconds of `tool` for a fresh start of `argv`."""
    out = os.path.join(work, "out")
    images = os.path.join(work, "img")
    os.mkdir(images)
    with open(out, "w") as f:
        p = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True)
    if "READY" not in wait_for(out, "READY"):
        raise SystemExit(f"{argv[0]} did not start: {open(out).read()!r}")
    pids = [p.pid] + descendants(p.pid)
    try:  # the same pids before the dump and after the restore: none is left behind on a failure
        dump = tool("dump", "-t", str(p.pid), "-D", images)
        p.wait()
        gone(pids)
        restore = tool("restore", "-D", images, "-d")
        text = check(p.pid, out)
        gone(pids)
    except BaseException:
        kill_pids(pids)
        raise
    if "FAIL" in text or "PASS" not in text:
        raise SystemExit(f"{argv[0]} restored by {tool.__name__} failed its check: {text!r}")
    shutil.rmtree(images)
    return dump, restore


def check(pid: int, out: str) -> str:
    """SIGUSR1 until the program has said PASS or FAIL (a signal that comes
    between its flag test and pause() is not seen: the tests resend too)."""
    for _ in range(60):
        os.kill(pid, signal.SIGUSR1)
        deadline = time.monotonic() + 1
        while time.monotonic() < deadline:
            with open(out) as f:
                text = f.read()
            if "PASS" in text or "FAIL" in text:
                return text
            time.sleep(0.01)
    return text


def med(values: list[float], scale: float = 1000, fmt: str = ".0f") -> str:
    v = sorted(x * scale for x in values)
    return f"{statistics.median(v):{fmt}} [{v[0]:{fmt}}-{v[-1]:{fmt}}]"


def rows(runs: int = RUNS) -> list[str]:
    ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # restored processes come back to us
    tools = ([base] if BASE else []) + [procsnap] + ([criu] if CRIU else [])
    out = [f"many mappings and large trees: {runs} interleaved runs; median [min-max] ms of whole CLI runs; "
           f"ratio procsnap/CRIU per pair; images on tmpfs"]
    if not CRIU:
        out.append("CRIU: skipped (set CRIU=path, e.g. CRIU=../shared/anchors/criu-4.2)")
    with tempfile.TemporaryDirectory(dir="/dev/shm") as work:
        exe = os.path.join(work, "manymaps")
        subprocess.run(["gcc", "-O1", "-o", exe, os.path.join(ROOT, "tests", "targets", "manymaps.c")], check=True)
        programs = {f"{MAPS} VMAs (manymaps.c)": [exe, str(MAPS)],
                    f"python3 tree of {TREE_PROCS}": [sys.executable, "-c", PROGRAM, str(TREE_PROCS), "1", "1", "1"]}
        programs = {k: v for (k, v), p in zip(programs.items(), ("maps", "tree")) if p in PROGRAMS}
        for name, argv in programs.items():
            times: dict[str, list[tuple[float, float]]] = {t.__name__: [] for t in tools}
            for i in range(runs):
                for tool in tools:  # A B A B: the machine's drift hits both alike
                    run_dir = os.path.join(work, f"{tool.__name__}{i}")
                    os.mkdir(run_dir)
                    times[tool.__name__].append(one_run(argv, run_dir, tool))
                    shutil.rmtree(run_dir)
            for step, k in (("dump", 0), ("restore", 1)):
                line = f"{name:>28} {step:>8}: procsnap {med([r[k] for r in times['procsnap']]):>16}"
                if CRIU:
                    ratios = [a[k] / b[k] for a, b in zip(times["procsnap"], times["criu"])]
                    line += (f" | CRIU {med([r[k] for r in times['criu']]):>16} | "
                             f"ratio {med(ratios, 1, '.2f')}")
                if BASE:
                    line += f" | base {med([r[k] for r in times['base']]):>16}"
                    if CRIU:
                        ratios = [a[k] / b[k] for a, b in zip(times["base"], times["criu"])]
                        line += f" | base/CRIU {med(ratios, 1, '.2f')}"
                out.append(line)
    return out


def main() -> int:
    for line in rows():
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
