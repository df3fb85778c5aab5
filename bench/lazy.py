"""make bench-lazy: restore --lazy-pages against a normal restore, for a
process with 256 MiB and 1 GiB of anonymous memory (tests/targets/lazy.c:
a pattern in 12 of 13 pages), image on /dev/shm, through the API in this
process:

    first instruction   restore() returns: the process runs (for a normal
                        restore its memory is in; for a lazy one only what
                        the restore itself touched)
    all pages in        lazy: the server exits (it pushed every page and
                        let go of the uffd); normal: the same as above

The process is left untouched until then, then checks every page (PASS).
Variants interleaved run by run (normal, lazy, lazy, normal, ...);
median [min-max] ms.

Environment: BENCH_RUNS (3), BENCH_SIZES (256,1024: MiB).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import tempfile
import time

from common import ROOT, wait_for
from run import finish, gone, med

sys.path.insert(0, ROOT)
import procsnap  # noqa: E402

RUNS = int(os.environ.get("BENCH_RUNS", "3"))
SIZES = [int(s) for s in os.environ.get("BENCH_SIZES", "256,1024").split(",")]


def one(images: str, pid: int, out: str, lazy: bool, log: str) -> tuple[float, float]:
    open(out, "w").close()
    servers: list[int] = []
    t0 = time.perf_counter()
    got = procsnap.restore(images, lazy_pages=lazy, lazy_log=log, lazy_server=servers.append)
    first = time.perf_counter() - t0
    assert got == pid
    total = first
    if lazy:
        os.waitpid(servers[0], 0)
        total = time.perf_counter() - t0
    finish(pid, out)
    return first, total


def main() -> int:
    ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: the restored processes come back to us
    work = tempfile.mkdtemp(prefix="procsnap-bench-lazy-", dir="/dev/shm")
    try:
        target = os.path.join(work, "lazy")
        subprocess.run(["gcc", "-O2", "-o", target, os.path.join(ROOT, "tests", "targets", "lazy.c")], check=True)
        print(f"restore --lazy-pages vs restore, {RUNS} runs each interleaved, median [min-max] ms; "
              f"load average {os.getloadavg()[0]:.1f}")
        for mib in SIZES:
            images = os.path.join(work, f"img-{mib}")
            os.mkdir(images)
            out = os.path.join(work, "target.out")
            with open(out, "w") as f:
                p = subprocess.Popen([target, "default", str(mib)], stdout=f, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
            wait_for(out, "READY", timeout=600)
            procsnap.dump(p.pid, images)
            p.wait()
            gone(p.pid)
            times = {False: ([], []), True: ([], [])}
            order = [False, True, True, False] * ((RUNS + 1) // 2)
            for lazy in order[:2 * RUNS]:
                first, total = one(images, p.pid, out, lazy, os.path.join(work, "lazy.log"))
                times[lazy][0].append(first)
                times[lazy][1].append(total)
            print(f"{mib:5d} MiB  restore         first instruction {med(times[False][0], fmt='.0f')}")
            print(f"{mib:5d} MiB  --lazy-pages    first instruction {med(times[True][0], fmt='.0f')}   "
                  f"all pages in {med(times[True][1], fmt='.0f')}")
            with open(os.path.join(work, "lazy.log")) as f:
                last = [line for line in f if "done in" in line][-1:]
            print("           last server: " + "".join(last).split(": ", 1)[-1].strip())
            shutil.rmtree(images)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
