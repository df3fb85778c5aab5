"""Many copies of one container image (issue 15, part 4): the time until
N copies run, for N = 1, 4, 10.

The container is `unshare --fork --pid --uts --ipc` around python3: a root
holding MIB MiB of random data (a warmed-up service's heap) that forks
two workers, each sleeping. It is dumped once (kill mode); then, for each
N, `procsnap.restore_copies(DIR, N)` is timed (in-process: the time until
the N-th copy's last process is released), the copies are killed and
reaped, and the next N follows, interleaved (1 4 10 10 4 1 ...) over
BENCH_RUNS rounds. Figures only: median [min-max] seconds, and per copy.

With BENCH_MOUNT_MIB=M (> 0) the container has a mount namespace of its
own (`--mount --mount-proc`) with a tmpfs holding a file of M MiB of random
data (objects/mountns.py): each copy makes its namespace and fills its
tmpfs again.

Environment: BENCH_RUNS (4), BENCH_MIB (64), BENCH_MOUNT_MIB (0).
"""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import procsnap  # noqa: E402
from procsnap.kernel.libc import prctl  # noqa: E402
from procsnap.kernel.structs import Prctl  # noqa: E402

from common import descendants, gone, wait_for  # noqa: E402

RUNS = int(os.environ.get("BENCH_RUNS", "4"))
MIB = int(os.environ.get("BENCH_MIB", "64"))
MOUNT_MIB = int(os.environ.get("BENCH_MOUNT_MIB", "0"))
COUNTS = (1, 4, 10)
PROGRAM = f"""
import os, time
data = os.urandom({MIB} << 20)
for _ in range(2):
    if os.fork() == 0:
        time.sleep(100000)
print("READY", flush=True)
time.sleep(100000)
"""


def main() -> None:
    prctl(Prctl.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    work = tempfile.mkdtemp(prefix="procsnap-bench-copies-")
    out = os.path.join(work, "out")
    images = os.path.join(work, "img")
    argv = ["unshare", "--fork", "--pid", "--uts", "--ipc", sys.executable, "-c", PROGRAM]
    if MOUNT_MIB:
        os.mkdir(os.path.join(work, "t"))
        argv[1:1] = ["--mount", "--mount-proc"]
        argv[-3:] = ["sh", "-c", f"mount -t tmpfs -o size={MOUNT_MIB + 1}m bench {work}/t && "
                     f"head -c {MOUNT_MIB << 20} /dev/urandom > {work}/t/data && exec {sys.executable} -c '{PROGRAM}'"]
    with open(out, "w") as f:
        unshare = __import__("subprocess").Popen(
            argv,
            stdout=f, stderr=f, stdin=__import__("subprocess").DEVNULL, cwd=work)
    wait_for(out, "READY")
    init = int(open(f"/proc/{unshare.pid}/task/{unshare.pid}/children").read().split()[0])
    others = descendants(init)
    t = time.perf_counter()
    procsnap.dump(init, images)
    print(f"dump: {time.perf_counter() - t:.2f} s ({MIB} MiB, 3 processes"
          f"{f', a tmpfs file of {MOUNT_MIB} MiB' if MOUNT_MIB else ''})")
    unshare.wait()
    gone([init, *others])
    times: dict[int, list[float]] = {n: [] for n in COUNTS}
    order = []
    for r in range(RUNS):
        order += list(COUNTS) if r % 2 == 0 else list(reversed(COUNTS))
    for n in order:
        t = time.perf_counter()
        pids = procsnap.restore_copies(images, n)
        times[n].append(time.perf_counter() - t)
        for pid in pids:  # each the init of its namespace: the whole copy goes
            os.kill(pid, signal.SIGKILL)
        for pid in pids:
            os.waitpid(pid, 0)
    shutil.rmtree(work)
    for n in COUNTS:
        med = statistics.median(times[n])
        print(f"N={n:2d}: {med:.2f} s [{min(times[n]):.2f}-{max(times[n]):.2f}] to {n} running, "
              f"{med / n:.2f} s a copy (median of {RUNS})")


if __name__ == "__main__":
    main()
