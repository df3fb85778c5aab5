"""The small process (bench/filler.c, 1 MiB, images on tmpfs), whole CLI runs:
a base tree, this tree and CRIU one after the other in each round (A B C A B C),
so that the machine's drift hits all alike (issue 12, goal 1).

Environment: PROCSNAP_ROOT (the base tree: a worktree of the base commit,
byte-compiled as `make` does; unset: the base is skipped), CRIU (path; unset:
skipped), BENCH_SMALL_RUNS (rounds, 9). Printed per figure: each tool's
median [min-max] and the per-round ratios this/base and this/CRIU.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import run  # noqa: E402 - bench/run.py's tools and one_run

BASE = os.environ.get("PROCSNAP_ROOT", "")
RUNS = int(os.environ.get("BENCH_SMALL_RUNS", "9"))


def main() -> int:
    ctypes.CDLL(None).prctl(run.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    tools = ([run.Procsnap(BASE, "base")] if BASE else []) + [run.Procsnap()]
    skipped = run.criu_status()
    if not skipped:
        tools.append(run.Criu())
    work = tempfile.mkdtemp(prefix="procsnap-small-", dir="/dev/shm")
    try:
        exe = os.path.join(work, "filler")
        subprocess.run(["gcc", "-O2", "-o", exe, os.path.join(HERE, "filler.c")], check=True)
        print(f"small process {time.strftime('%Y-%m-%d %H:%M')}, load {os.getloadavg()[0]:.1f}, {RUNS} rounds "
              f"of {' '.join(t.name for t in tools)}; ms, median [min-max]" + (f"; {skipped}" if skipped else ""))
        rounds = [{t.name: run.one_run(t, exe, 1, work) for t in tools} for _ in range(RUNS)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for key in ("dump", "restore", "freeze"):
        line = f"{key:>8}"
        for t in tools:
            line += f" | {t.name} {run.med([r[t.name][key] for r in rounds]):>22}"
        for other in ("base", "CRIU"):
            if other in rounds[0]:
                ratios = [r["procsnap"][key] / r[other][key] for r in rounds if r[other][key]]
                line += f" | /{other} {run.med(ratios, 1, '.2f'):>16}"
        print(line)
    print(f"{'load':>8} | {os.getloadavg()[0]:.1f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
