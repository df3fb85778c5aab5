"""make bench-stream: a 1 GiB process (bench/filler.c, random data) moved
by dump + restore on loopback, whole CLI runs:

    directory   dump -D DIR (tmpfs), then restore -D DIR -d
    tcp         restore --stream tcp://127.0.0.1:0 -d listening (its buffer
                directory on tmpfs), dump --stream tcp://... connecting
    tcp+tls     the same over TLS (a throwaway CA and certificates, openssl)
    pipe        dump --stream - | restore --stream - -d
    criu-ps     with CRIU=path: criu page-server -D DIR, criu dump
                --page-server into it (the rest of the image in the same
                DIR), then criu restore -D DIR -d

Variants interleaved run by run (then reversed), median [min-max] of the
time from the dump's start until the restored process runs (the restore's
exit), and GiB/s of the process's memory over that time. Every restored
process checks its memory (PASS).

Environment: BENCH_RUNS (3), BENCH_MIB (1024), CRIU (unset: no CRIU row).
"""

from __future__ import annotations

import ctypes
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from common import ROOT, gone
from encoded import start
from run import finish, reap_nohang

HERE = os.path.dirname(os.path.abspath(__file__))
RUNS = int(os.environ.get("BENCH_RUNS", "3"))
MIB = int(os.environ.get("BENCH_MIB", "1024"))
CRIU = os.environ.get("CRIU")
PROCSNAP = [sys.executable, "-m", "procsnap"]


def run(*argv: str, env=None) -> str:
    p = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env=env)
    if p.returncode:
        raise SystemExit(f"{' '.join(argv)} failed: {p.stderr.strip()[-2000:]}")
    return p.stdout


def listen_port(p: subprocess.Popen) -> int:
    line = p.stderr.readline()
    if "listening on" not in line:
        raise SystemExit(f"{p.args} did not listen: {line}{p.stderr.read()}")
    return int(line.split()[-1].rsplit(":", 1)[1])


def via_directory(pid: int, work: str, _tls) -> int:
    images = tempfile.mkdtemp(prefix="img-", dir=work)
    try:
        run(*PROCSNAP, "dump", "-t", str(pid), "-D", images)
        gone([pid])
        return int(run(*PROCSNAP, "restore", "-D", images, "-d").split()[-1])
    finally:
        shutil.rmtree(images, ignore_errors=True)


def via_tcp(pid: int, work: str, tls: dict | None) -> int:
    env = {**os.environ, "TMPDIR": work}
    server = ["--tls-cert", tls["server.pem"], "--tls-key", tls["server.key"]] if tls else []
    client = ["--tls-ca", tls["ca.pem"]] if tls else []
    rest = subprocess.Popen([*PROCSNAP, "restore", "--stream", "tcp://127.0.0.1:0", "-d", *server], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    port = listen_port(rest)
    run(*PROCSNAP, "dump", "-t", str(pid), "--stream", f"tcp://127.0.0.1:{port}", *client)
    reap_nohang(pid)
    out, err = rest.communicate(timeout=600)
    if rest.returncode:
        raise SystemExit(f"restore --stream failed: {err.strip()}")
    return int(out.split()[-1])


def via_pipe(pid: int, work: str, _tls) -> int:
    env = {**os.environ, "TMPDIR": work}
    dump = subprocess.Popen([*PROCSNAP, "dump", "-t", str(pid), "--stream", "-"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    rest = subprocess.Popen([*PROCSNAP, "restore", "--stream", "-", "-d"], cwd=ROOT, stdin=dump.stdout,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    dump.stdout.close()
    reaped = False
    while dump.poll() is None or rest.poll() is None:  # reap the source as soon as it is killed
        if not reaped:
            reaped = reap_nohang(pid) is not None
        time.sleep(0.005)
    if dump.returncode or rest.returncode:
        raise SystemExit(f"dump | restore failed: {dump.stderr.read()!r} {rest.stderr.read()!r}")
    return int(rest.stdout.read().split()[-1])


def via_criu_page_server(pid: int, work: str, _tls) -> int:
    images = tempfile.mkdtemp(prefix="criu-", dir=work)
    try:
        server = subprocess.Popen([CRIU, "page-server", "-D", images, "--address", "127.0.0.1", "--port", "27182"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(0.2)
        run(CRIU, "dump", "-t", str(pid), "-D", images, "--page-server", "--address", "127.0.0.1", "--port", "27182")
        server.communicate(timeout=600)
        gone([pid])
        run(CRIU, "restore", "-D", images, "-d")
        return pid
    finally:
        shutil.rmtree(images, ignore_errors=True)


def make_tls(work: str) -> dict:
    def ssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=work, check=True, capture_output=True)

    ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=bench ca",
        "-keyout", "ca.key", "-out", "ca.pem")
    ssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=server", "-keyout", "server.key", "-out", "server.csr")
    with open(os.path.join(work, "server.ext"), "w") as f:
        f.write("subjectAltName=IP:127.0.0.1\n")
    ssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "1",
        "-extfile", "server.ext", "-out", "server.pem")
    return {n: os.path.join(work, n) for n in ("ca.pem", "server.pem", "server.key")}


def med(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:7.0f} [{min(values) * 1000:.0f}-{max(values) * 1000:.0f}]"


def main() -> int:
    ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: the restored processes come back to us
    work = tempfile.mkdtemp(prefix="procsnap-bench-stream-", dir="/dev/shm")
    try:
        filler = os.path.join(work, "filler")
        subprocess.run(["gcc", "-O2", "-o", filler, os.path.join(HERE, "filler.c")], check=True)
        tls = make_tls(work)
        ways = {"directory": (via_directory, None), "tcp": (via_tcp, None), "tcp+tls": (via_tcp, tls),
                "pipe": (via_pipe, None)}
        if CRIU:
            ways["criu-ps"] = (via_criu_page_server, None)
        print(f"procsnap streamed dump+restore {time.strftime('%Y-%m-%d')} on {platform.node()}: "
              f"{os.cpu_count()} cores, kernel {platform.release()}; {MIB} MiB random; {RUNS} runs interleaved; "
              f"dump start to restored process running, median [min-max]")
        print(f"{'way':>10} | {'ms':>20} | {'GiB/s':>6}")
        times: dict[str, list[float]] = {w: [] for w in ways}
        out = os.path.join(work, "filler.out")
        for i in range(RUNS):
            for way in (list(ways) if i % 2 == 0 else list(ways)[::-1]):
                p = start([filler, str(MIB), "random"], out)
                fn, arg = ways[way]
                t = time.perf_counter()
                pid = fn(p.pid, work, arg)
                times[way].append(time.perf_counter() - t)
                p.returncode = 0  # reaped by us already (or restored and ours again)
                finish(pid, out)
        for way, ts in times.items():
            print(f"{way:>10} | {med(ts)} | {MIB / 1024 / statistics.median(ts):6.2f}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
