"""make bench-predump: what dirty tracking costs the tracked process, and
what pre-dump passes buy the final dump (notes/issue-13-predump.md).

1. Slowdown. bench/dirtier.c writes one byte to each page of SIZE MiB in
   turn, as fast as it can, counting page writes. Its rate is measured
   over WINDOW_S windows: untracked; tracked (a pre-dump pass registered
   its memory) without re-arming; tracked with the tracking re-armed every
   REARM_MS (PAGEMAP_SCAN with write-protect, from outside, as every pass
   does): after a re-arm, the first write to each page is a write-protect
   fault the kernel resolves itself. The modes alternate (A B C, C B A ...);
   medians and ranges of BENCH_RUNS windows each. Then the CPU time the
   dirtier spends writing RATE MiB/s at random pages (utime + stime per
   second), untracked and re-armed every REARM_MS: what a process that
   writes at a steady rate pays.
2. Passes. The dirtier writes RATE MiB/s at random pages of SIZE MiB;
   PASSES pre-dump passes back to back, then the final dump (kill mode):
   each pass's pages copied, its freeze and its time; the final dump's
   freeze against a dump of the same process without pre-dump; for both
   dirty trackings (uffd-wp, hashes).

Environment: BENCH_PREDUMP_MIB (1024; the slowdown uses a quarter), BENCH_PREDUMP_RATE (50),
BENCH_PREDUMP_PASSES (3), BENCH_RUNS (5), BENCH_PREDUMP_REARM_MS (100). Images on /dev/shm,
each series removed once measured.
"""

from __future__ import annotations

import mmap
import os
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time

from common import gone, wait_for

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import procsnap  # noqa: E402
from procsnap.dumper.predump import pre_dump, untrack_image  # noqa: E402
from procsnap.kernel import uffdwp  # noqa: E402
from procsnap.kernel.probes import probe_dirty_tracking  # noqa: E402

MIB = int(os.environ.get("BENCH_PREDUMP_MIB", "1024"))
RATE = float(os.environ.get("BENCH_PREDUMP_RATE", "50"))
PASSES = int(os.environ.get("BENCH_PREDUMP_PASSES", "3"))
RUNS = int(os.environ.get("BENCH_RUNS", "5"))
REARM_MS = int(os.environ.get("BENCH_PREDUMP_REARM_MS", "100"))
WINDOW_S = 1.0
PR_SET_CHILD_SUBREAPER = 36


class Dirtier:
    def __init__(self, exe: str, work: str, rate: float, mib: int = MIB):
        self.counter_path = os.path.join(work, f"counter-{time.monotonic_ns()}")
        with open(self.counter_path, "wb") as f:
            f.write(bytes(4096))
        self.out = self.counter_path + ".out"
        with open(self.out, "w") as out:
            self.p = subprocess.Popen([exe, str(mib), self.counter_path, str(rate)], stdout=out,
                                      stdin=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        wait_for(self.out, "READY")
        f = open(self.counter_path, "r+b")
        self.map = mmap.mmap(f.fileno(), 4096)
        f.close()
        self.pid = self.p.pid

    def count(self) -> int:
        return struct.unpack_from("<Q", self.map)[0]

    def rate(self, seconds: float, during=None) -> float:
        """Page writes per second over `seconds`; `during()` called meanwhile every REARM_MS."""
        start, t0 = self.count(), time.perf_counter()
        while (elapsed := time.perf_counter() - t0) < seconds:
            if during:
                during()
            time.sleep(min(REARM_MS / 1000, max(0.0, seconds - elapsed)))
        return (self.count() - start) / (time.perf_counter() - t0)

    def stop(self) -> None:
        with_kill(self.pid)
        self.map.close()


def with_kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    gone([pid])


def track(pid: int, images: str, want: bool, tracked: bool) -> bool:
    """Tracking on (a pre-dump pass into `images`) or off (--untrack) as `want` says."""
    if want and not tracked:
        pre_dump(pid, images)
    elif tracked and not want:
        untrack_image(pid, images)
    return want


def rearmer(pid: int, images: str):
    """rearm(): what each pass does to the tracking of the pre-dump in `images`, from outside."""
    ranges = [tuple(r) for r in procsnap.open_image(images).checkpoint.tracking[0].ranges]
    pagemap = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
    counts = []

    def rearm():
        n = 0
        for start, end in ranges:
            n += sum(e - s for s, e in uffdwp.written_ranges(pagemap, start, end, protect=True)) // 4096
        counts.append(n)

    return rearm, counts, lambda: os.close(pagemap)


def fmt(values, unit="", scale=1.0, digits=1) -> str:
    v = [x * scale for x in values]
    return f"{statistics.median(v):.{digits}f}{unit} [{min(v):.{digits}f}-{max(v):.{digits}f}]"


def slowdown(exe: str, work: str) -> None:
    mib = max(1, MIB // 4)
    d = Dirtier(exe, work, 0, mib)
    try:
        images = os.path.join(work, "slow")
        rates = {"untracked": [], "tracked": [], f"re-armed/{REARM_MS}ms": []}
        faults: list[int] = []
        tracked = False
        for run in range(RUNS):
            order = list(rates) if run % 2 == 0 else list(reversed(rates))
            for mode in order:
                was, tracked = tracked, track(d.pid, images, mode != "untracked", tracked)
                if tracked and not was:
                    time.sleep(0.2)
                if mode.startswith("re-armed"):
                    rearm, counts, close = rearmer(d.pid, images)
                    rearm()
                    rates[mode].append(d.rate(WINDOW_S, rearm))
                    close()
                    faults += counts[1:]
                else:
                    if mode == "tracked":
                        d.rate(0.2)  # the first pass re-armed every page: let that settle
                    rates[mode].append(d.rate(WINDOW_S))
        base = statistics.median(rates["untracked"])
        print(f"slowdown, {mib} MiB written page after page, {RUNS} windows of {WINDOW_S:.0f} s each:")
        for mode, values in rates.items():
            print(f"  {mode:>18}: {fmt(values, ' M page writes/s', 1e-6, 2)}  "
                  f"({statistics.median(values) / base * 100:.0f}% of untracked)")
        re = statistics.median(rates[f"re-armed/{REARM_MS}ms"])
        per_rearm = statistics.median(faults) if faults else 0
        if per_rearm:
            lost_s = (1 / re - 1 / base) * re * WINDOW_S  # seconds of the window not spent writing at base speed
            rearms = WINDOW_S * 1000 / REARM_MS
            print(f"  pages re-armed each time: {per_rearm:.0f} (median); cost per write-protect fault: "
                  f"{lost_s / (rearms * per_rearm) * 1e6:.2f} us")
    finally:
        d.stop()


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (fields 14, 15)


def steady_cost(exe: str, work: str) -> None:
    mib = max(1, MIB // 4)
    d = Dirtier(exe, work, RATE, mib)
    images = os.path.join(work, "steady")
    try:
        cost = {"untracked": [], f"re-armed/{REARM_MS}ms": []}
        tracked = False
        for run in range(RUNS):
            for mode in (cost if run % 2 == 0 else reversed(list(cost))):
                tracked = track(d.pid, images, mode != "untracked", tracked)
                rearm = None
                if tracked:
                    rearm, _, close = rearmer(d.pid, images)
                    rearm()
                c0, t0 = cpu_s(d.pid), time.perf_counter()
                d.rate(WINDOW_S * 2, rearm)
                cost[mode].append((cpu_s(d.pid) - c0) / (time.perf_counter() - t0))
                if rearm:
                    close()
        print(f"steady writer, {RATE:.0f} MiB/s at random pages of {mib} MiB, CPU time per second "
              f"({RUNS} windows of {WINDOW_S * 2:.0f} s):")
        for mode, values in cost.items():
            print(f"  {mode:>18}: {fmt(values, ' ms/s', 1000, 1)}")
    finally:
        d.stop()
        shutil.rmtree(images, ignore_errors=True)


def passes(exe: str, work: str, method: str) -> None:
    print(f"passes, {MIB} MiB written at {RATE:.0f} MiB/s (random pages), dirty tracking {method}:")
    d = Dirtier(exe, work, RATE)
    series = os.path.join(work, f"series-{method}")
    try:
        time.sleep(0.5)
        prev = None
        for n in range(1, PASSES + 1):
            t0 = time.perf_counter()
            s = pre_dump(d.pid, os.path.join(series, str(n)), prev_images_dir=prev, method=method)
            took = time.perf_counter() - t0
            print(f"  pass {n}: {s.copied * 4096 / 2**20:7.1f} MiB copied, {s.referred * 4096 / 2**20:7.1f} MiB "
                  f"referred, frozen {s.frozen_s * 1000:6.1f} ms, took {took:5.2f} s")
            prev = f"../{n}"
        t0 = time.perf_counter()
        st = procsnap.dump(d.pid, os.path.join(series, "final"), prev_images_dir=prev)
        took = time.perf_counter() - t0
        print(f"  final dump: {st.pages_bytes / 2**20:7.1f} MiB stored, frozen {st.frozen_s * 1000:6.1f} ms "
              f"(the downtime), took {took:5.2f} s")
    finally:
        d.stop()
        shutil.rmtree(series, ignore_errors=True)
    d = Dirtier(exe, work, RATE)
    plain = os.path.join(work, f"plain-{method}")
    try:
        time.sleep(0.5)
        st = procsnap.dump(d.pid, plain)
        print(f"  without pre-dump: {st.pages_bytes / 2**20:7.1f} MiB stored, frozen {st.frozen_s * 1000:6.1f} ms")
    finally:
        d.stop()
        shutil.rmtree(plain, ignore_errors=True)


def main() -> None:
    import ctypes

    ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(dir=base) as work:
        exe = os.path.join(work, "dirtier")
        subprocess.run(["gcc", "-O2", "-o", exe, os.path.join(HERE, "dirtier.c")], check=True)
        print(f"dirty tracking here: {probe_dirty_tracking().detail}; load average {os.getloadavg()[0]:.1f}")
        slowdown(exe, work)
        steady_cost(exe, work)
        for method in ("uffd-wp", "hashes"):
            passes(exe, work, method)


if __name__ == "__main__":
    main()
