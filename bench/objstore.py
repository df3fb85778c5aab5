"""make bench-s3 (and the end of make bench): dump and restore through
-D s3://... against s3rver on loopback (the tests' server, installed by the
Makefile), beside the same on tmpfs; random data (bench/filler.c), each
restored process checks itself. Prints median [min-max] ms and the
upload (dump) / download (restore: its check and its fill both fetch the
pages) throughput in MiB/s of pages.img.

Environment: BENCH_RUNS (3), BENCH_S3_MIB (256).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from common import ROOT, wait_for
from run import finish, gone, start_filler

HERE = os.path.dirname(os.path.abspath(__file__))
RUNS = int(os.environ.get("BENCH_RUNS", "3"))
MIB = int(os.environ.get("BENCH_S3_MIB", "256"))
S3RVER = os.path.join(ROOT, ".venv", "s3rver", "node_modules", ".bin", "s3rver")


def timed(args: list[str], env: dict) -> tuple[float, str]:
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "procsnap", *args], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, **env})
    took = time.perf_counter() - t
    if p.returncode:
        raise SystemExit(f"procsnap {' '.join(args)} failed: {p.stderr.strip()}")
    return took, p.stdout


def main() -> int:
    if not os.path.exists(S3RVER):
        print(f"S3: skipped ({S3RVER} missing: make test installs it)")
        return 0
    ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    work = tempfile.mkdtemp(prefix="procsnap-bench-s3-", dir="/dev/shm")
    server = None
    try:
        log = os.path.join(work, "s3rver.log")
        with open(log, "w") as out:
            server = subprocess.Popen([S3RVER, "-d", os.path.join(work, "s3data"), "-a", "127.0.0.1", "-p", "0",
                                       "--configure-bucket", "bench"], stdout=out, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True)
        port = int(wait_for(log, "listening on").split("listening on ")[1].split(":")[1].split()[0])
        config = os.path.join(work, "aws-config")
        with open(config, "w") as f:
            f.write("[default]\ns3 =\n    addressing_style = path\n")
        env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "S3RVER",
               "AWS_SECRET_ACCESS_KEY": "S3RVER", "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": config}
        exe = os.path.join(work, "filler")
        subprocess.run(["gcc", "-O2", "-o", exe, os.path.join(HERE, "filler.c")], check=True)
        print(f"procsnap object storage {time.strftime('%Y-%m-%d')}: {MIB} MiB random, s3rver 3.7.1 on loopback "
              f"against tmpfs; {RUNS} runs interleaved; whole CLI times, median [min-max] ms")
        print(f"{'where':>6} | {'dump ms':>18} | {'restore ms':>18} | {'up MiB/s':>8} | {'down MiB/s':>10}")
        results: dict[str, list] = {"tmpfs": [], "s3": []}
        out = os.path.join(work, "filler.out")
        for i in range(RUNS):
            for where in (["tmpfs", "s3"] if i % 2 == 0 else ["s3", "tmpfs"]):
                images = os.path.join(work, f"img{i}") if where == "tmpfs" else f"s3://bench/run{i}"
                p = start_filler(exe, MIB, out)
                t_dump, _ = timed(["dump", "-t", str(p.pid), "-D", images], env)
                p.wait()
                gone(p.pid)
                open(out, "w").close()
                t_rest, text = timed(["restore", "-d", "-D", images], env)
                finish(int(text.split()[-1]), out)
                results[where].append((t_dump, t_rest))
                if where == "tmpfs":
                    shutil.rmtree(images)
        for where, rs in results.items():
            dumps, rests = [r[0] for r in rs], [r[1] for r in rs]
            fmt = lambda v: f"{statistics.median(v) * 1000:7.0f} [{min(v) * 1000:.0f}-{max(v) * 1000:.0f}]"  # noqa: E731
            print(f"{where:>6} | {fmt(dumps)} | {fmt(rests)} | {MIB / statistics.median(dumps):8.0f} | "
                  f"{MIB / statistics.median(rests):10.0f}", flush=True)
    finally:
        if server is not None:
            server.kill()
            server.wait()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
