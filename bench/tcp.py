"""The downtime a TCP peer sees while its server is dumped (kill mode,
--tcp-established), restored, and the lock removed: the longest gap
between two bytes arriving at the client, which reads a steady stream
(tests/targets/tcp.c, mode stream), and how long dump and restore took.
Several runs; medians and ranges (the machine is shared).

    .venv/bin/python bench/tcp.py [RUNS]
"""

from __future__ import annotations

import ctypes
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from common import ROOT, cli, gone, wait_for

PR_SET_CHILD_SUBREAPER = 36


def one_run(binary: str, work: str) -> tuple[float, float, float]:
    out = os.path.join(work, "out")
    images = os.path.join(work, "img")
    shutil.rmtree(images, ignore_errors=True)
    os.mkdir(images)
    with open(out, "w") as f:
        server = subprocess.Popen([binary, "127.0.0.1", str(1 << 40), "0", "stream"], stdout=f, stderr=f,
                                  stdin=subprocess.DEVNULL,
                                  start_new_session=True)
    port = int(wait_for(out, "PORT").split("PORT ")[1].split()[0])
    client = socket.create_connection(("127.0.0.1", port))
    wait_for(out, "READY")
    gaps = [0.0]
    stop = threading.Event()

    def read():
        last = time.monotonic()
        while not stop.is_set():
            if not client.recv(1 << 16):
                return
            now = time.monotonic()
            gaps[0] = max(gaps[0], now - last)
            last = now

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    time.sleep(0.5)
    gaps[0] = 0.0
    took_dump = cli("dump", "-t", str(server.pid), "-D", images, "--tcp-established")
    server.wait()
    gone([server.pid])
    took_restore = cli("restore", "-D", images, "-d", "--tcp-established")
    time.sleep(3)  # long enough for the peer's retransmission after any backoff seen here
    stop.set()
    gap = gaps[0]
    os.kill(server.pid, 9)
    os.waitpid(server.pid, 0)
    client.close()
    reader.join(5)
    return gap, took_dump, took_restore


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    with tempfile.TemporaryDirectory() as work:
        binary = os.path.join(work, "tcp")
        subprocess.run(["gcc", "-O1", "-o", binary, os.path.join(ROOT, "tests", "targets", "tcp.c")], check=True)
        results = [one_run(binary, work) for _ in range(runs)]
    for name, values in zip(("peer's longest gap", "dump (CLI)", "restore (CLI)"), zip(*results)):
        ms = sorted(v * 1000 for v in values)
        print(f"{name:20s} median {statistics.median(ms):7.0f} ms  range {ms[0]:.0f}-{ms[-1]:.0f} ms")


if __name__ == "__main__":
    main()
