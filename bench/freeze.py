"""make bench-freeze: the --leave-running freeze window, in process (issue 12, goal 4).

bench/filler.c holding SIZE MiB of pseudo-random data is dumped with
procsnap.dump(leave_running=True) into a directory on /dev/shm; the figure
is DumpStats.frozen_s (from the freeze to the thaw), median [min-max] over
BENCH_RUNS runs per size. The CLI's start is not in it: the window opens
after the imports.

With BENCH_PROFILE=1 one more run per size is made under cProfile enabled
only inside the window (from the first freeze to the last thaw) and its
top functions by cumulative time are printed: where the window goes.

Environment: BENCH_FREEZE_MIB (1,1024), BENCH_RUNS (5), BENCH_PROFILE,
PROCSNAP_ROOT (the procsnap tree to import, default this one: an older
commit's tree gives the "before" figure).
"""

from __future__ import annotations

import cProfile
import ctypes
import io
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.environ.get("PROCSNAP_ROOT", os.path.dirname(HERE)))
sys.path.insert(1, HERE)

import procsnap  # noqa: E402
from procsnap import dumper  # noqa: E402
from run import gone, start_filler  # noqa: E402

SIZES = [int(s) for s in os.environ.get("BENCH_FREEZE_MIB", "1,1024").split(",") if s]
RUNS = int(os.environ.get("BENCH_RUNS", "5"))
PROFILE = os.environ.get("BENCH_PROFILE") == "1"
PR_SET_CHILD_SUBREAPER = 36


def one(exe: str, mib: int, work: str, profiler: cProfile.Profile | None = None) -> float:
    images = tempfile.mkdtemp(prefix="img-", dir=work)
    p = start_filler(exe, mib, os.path.join(work, "filler.out"))
    try:
        if profiler is None:
            return procsnap.dump(p.pid, images, leave_running=True).frozen_s
        freeze, thaw = dumper.FrozenTask.freeze, dumper.FrozenTask.thaw

        def profiled_freeze(task):
            profiler.enable()
            freeze(task)

        def profiled_thaw(task):
            thaw(task)
            profiler.disable()

        dumper.FrozenTask.freeze, dumper.FrozenTask.thaw = profiled_freeze, profiled_thaw
        try:
            return procsnap.dump(p.pid, images, leave_running=True).frozen_s
        finally:
            profiler.disable()
            dumper.FrozenTask.freeze, dumper.FrozenTask.thaw = freeze, thaw
    finally:
        p.kill()
        p.wait()
        gone(p.pid)
        shutil.rmtree(images, ignore_errors=True)


def main() -> int:
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    work = tempfile.mkdtemp(prefix="bench-freeze-", dir="/dev/shm")
    try:
        exe = os.path.join(work, "filler")
        subprocess.run(["gcc", "-O2", "-o", exe, os.path.join(HERE, "filler.c")], check=True)
        print(f"procsnap {os.path.dirname(procsnap.__file__)}, load {os.getloadavg()[0]:.1f}")
        for mib in SIZES:
            one(exe, mib, work)  # warm: the first run pays for the imports' caches
            frozen = [one(exe, mib, work) * 1000 for _ in range(RUNS)]
            print(f"freeze {mib} MiB: {statistics.median(frozen):.1f} ms "
                  f"[{min(frozen):.1f}-{max(frozen):.1f}] over {RUNS} runs")
            if PROFILE:
                profiler = cProfile.Profile()
                took = one(exe, mib, work, profiler) * 1000
                out = io.StringIO()
                pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(30)
                print(f"-- profile of one window at {mib} MiB ({took:.1f} ms under cProfile)")
                print("\n".join(line for line in out.getvalue().splitlines() if line.strip()))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
