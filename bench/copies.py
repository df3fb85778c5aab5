"""Many copies of one container image (issue 15, part 4): the time until
N copies run, for N = 1, 4, 10.

The container is `unshare --fork --pid --uts --ipc` around python3: a root
holding MIB MiB of random data (a warmed-up service's heap) that forks
two workers, each sleeping. It is dumped once (kill mode); then, for each
N, `procsnap.restore_copies(DIR, N)` is timed (in-process: the time until
the N-th copy's last process is released), the copies are killed and
reaped, and the next N follows, interleaved (1 4 10 10 4 1 ...) over
BENCH_RUNS rounds. Figures only: median [min-max] seconds, and per copy.

Then the same for a serving container (`--mount --mount-proc --net` as
well): python3 mounts a tmpfs, puts a page in it and serves it on
127.0.0.1:8080 inside its own network namespace; timed until every copy
has answered a GET (made from a thread that entered the copy's network
namespace). BENCH_SERVING=0 skips it.

Environment: BENCH_RUNS (4), BENCH_MIB (64), BENCH_SERVING (1).
"""

from __future__ import annotations

import ctypes
import http.client
import os
import shutil
import signal
import statistics
import sys
import subprocess
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import procsnap  # noqa: E402
from procsnap.kernel.libc import prctl  # noqa: E402
from procsnap.kernel.structs import Prctl  # noqa: E402

from common import descendants, gone, wait_for  # noqa: E402

RUNS = int(os.environ.get("BENCH_RUNS", "4"))
MIB = int(os.environ.get("BENCH_MIB", "64"))
COUNTS = (1, 4, 10)
SERVING = os.environ.get("BENCH_SERVING", "1") != "0"
SERVER = f"""
import http.server, os, subprocess, sys
srv = sys.argv[1]
subprocess.run(["mount", "-t", "tmpfs", "webroot", srv], check=True)
open(srv + "/page.txt", "w").write("page")
os.chdir(srv)
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
data = os.urandom({MIB} << 20)
http.server.SimpleHTTPRequestHandler.log_message = lambda *args: None
server = http.server.HTTPServer(("127.0.0.1", 8080), http.server.SimpleHTTPRequestHandler)
print("READY", flush=True)
server.serve_forever()
"""
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _get_inside(pid: int, out: list) -> None:
    """In this thread: into the network namespace of `pid`, then GET its page until it answers."""
    fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")
    finally:
        os.close(fd)
    deadline = time.monotonic() + 30
    while True:
        try:
            c = http.client.HTTPConnection("127.0.0.1", 8080, timeout=10)
            c.request("GET", "/page.txt")
            out.append(c.getresponse().read())
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.001)


def serving(pids: list[int]) -> None:
    """Every copy answered a GET (one thread each)."""
    got: list[bytes] = []
    threads = [threading.Thread(target=_get_inside, args=(p, got)) for p in pids]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if got != [b"page"] * len(pids):
        raise SystemExit(f"copies answered {got}")
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
    one(["--uts", "--ipc"], ["-c", PROGRAM], "running", lambda pids: None, "3 processes")
    if SERVING:
        one(["--mount", "--mount-proc", "--net", "--uts", "--ipc"], ["-c", SERVER, "SRV"], "serving", serving,
            "a server on a tmpfs in its own mount and network namespaces")


def one(namespaces: list[str], program: list[str], what: str, ready, about: str) -> None:
    """Dump the container once, then time restore_copies(N) (and ready(pids)) for each N, interleaved."""
    work = tempfile.mkdtemp(prefix="procsnap-bench-copies-")
    out = os.path.join(work, "out")
    images = os.path.join(work, "img")
    os.mkdir(os.path.join(work, "srv"))
    program = [os.path.join(work, "srv") if a == "SRV" else a for a in program]
    with open(out, "w") as f:
        unshare = subprocess.Popen(["unshare", "--fork", "--pid", *namespaces, sys.executable, *program],
                                   stdout=f, stderr=f, stdin=subprocess.DEVNULL, cwd=work)
    wait_for(out, "READY")
    init = int(open(f"/proc/{unshare.pid}/task/{unshare.pid}/children").read().split()[0])
    others = descendants(init)
    t = time.perf_counter()
    procsnap.dump(init, images)
    print(f"{what}: dump {time.perf_counter() - t:.2f} s ({MIB} MiB, {about})")
    unshare.wait()
    gone([init, *others])
    times: dict[int, list[float]] = {n: [] for n in COUNTS}
    order = []
    for r in range(RUNS):
        order += list(COUNTS) if r % 2 == 0 else list(reversed(COUNTS))
    for n in order:
        t = time.perf_counter()
        pids = procsnap.restore_copies(images, n)
        ready(pids)
        times[n].append(time.perf_counter() - t)
        for pid in pids:  # each the init of its namespace: the whole copy goes
            os.kill(pid, signal.SIGKILL)
        for pid in pids:
            os.waitpid(pid, 0)
    shutil.rmtree(work)
    for n in COUNTS:
        med = statistics.median(times[n])
        print(f"N={n:2d}: {med:.2f} s [{min(times[n]):.2f}-{max(times[n]):.2f}] to {n} running, "
              f"{med / n:.2f} s a copy (median of {RUNS})".replace("running", what))


if __name__ == "__main__":
    main()
