"""make bench-memory: the peak memory of procsnap itself (issue 12, goal 5).

bench/filler.c holds SIZE MiB of PATTERN data (random; halfzero: every
other page zero, so the image has a page run per page, the worst case for
procsnap's own bookkeeping); it is dumped (kill mode) and restored (-d)
with the image on /dev/shm, each a whole CLI run, and each run's peak RSS
(ru_maxrss of the run: VmHWM) is printed, then the restored filler checks
its memory (PASS). With CRIU=path the same is done with CRIU in the same
run, A B A B.

4 GiB needs about 9 GiB free (the target, its image on tmpfs, the restored
target): check `free -g` first.

Environment: BENCH_MEMORY (1024:halfzero,1024:random: SIZE:PATTERN,...),
BENCH_RUNS (1), CRIU, PROCSNAP_ROOT (the procsnap tree to run, default
this one: an older commit's tree gives the "before" figure).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import run  # noqa: E402

CASES = [(int(s.split(":")[0]), s.split(":")[1]) for s in
         os.environ.get("BENCH_MEMORY", "1024:halfzero,1024:random").split(",") if s]
RUNS = int(os.environ.get("BENCH_RUNS", "1"))


def main() -> int:
    ctypes.CDLL(None).prctl(run.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # restored processes come back to us
    if os.environ.get("PROCSNAP_ROOT"):
        run.ROOT = os.environ["PROCSNAP_ROOT"]  # timed() runs `python -m procsnap` from there
    skipped = run.criu_status()
    tools = [run.Procsnap()] + ([] if skipped else [run.Criu()])
    work = tempfile.mkdtemp(prefix="procsnap-bench-memory-", dir="/dev/shm")
    try:
        exe = os.path.join(work, "filler")
        subprocess.run(["gcc", "-O2", "-o", exe, os.path.join(HERE, "filler.c")], check=True)
        print(f"peak RSS (MiB) of each whole CLI run, image on /dev/shm, procsnap from {run.ROOT}, "
              f"load {os.getloadavg()[0]:.1f}")
        if skipped:
            print(skipped)
        for mib, pattern in CASES:
            for i in range(RUNS):
                for tool in tools:
                    images = tempfile.mkdtemp(prefix="img-", dir=work)
                    out = os.path.join(work, f"filler-{tool.name}.out")
                    try:
                        p = run.start_filler(exe, mib, out, pattern)
                        _, rss_dump = tool.dump(p.pid, images)
                        p.wait()
                        run.gone(p.pid)
                        _, rss_restore, pid = tool.restore(images)
                        run.finish(pid, out)
                    finally:
                        shutil.rmtree(images, ignore_errors=True)
                    print(f"{mib} MiB {pattern:>8} run {i + 1} | {tool.name:>8} dump {rss_dump / 1024:6.0f} "
                          f"| restore {rss_restore / 1024:6.0f}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
