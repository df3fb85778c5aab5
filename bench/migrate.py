"""make bench-migrate: the downtime of `procsnap migrate` between two test
hosts (tests/hosts.py: network, pid and mount namespaces on this machine,
joined by a veth pair), with and without pre-copy, against the model
(notes/issue-13-migrate.md).

The target is tests/targets/migrator.c: SIZE MiB, every page written once,
then RATE MiB/s of pages picked at random, each checked against the
generation it had (it checks every page once more on the destination: a
run whose target does not PASS there is an error, not a figure). For each
size, migrations with pre-copy (--max-rounds 8: until the dirty set stops
shrinking) and without (--max-rounds 0: all of it copied while frozen)
alternate (A B B A ...), BENCH_RUNS each; medians and ranges of the
downtime migrate prints (from the final freeze until the destination runs
the process), of the final image's pages and of the whole migration.

The model: downtime = FIXED + final MiB x PER_MIB + final runs x PER_RUN
(a run: pages stored together, or referred to together in a parent; the
final image of a process written at random pages is mostly runs of one
page). FIXED and PER_MIB from the migrations without pre-copy (a few big
runs), PER_RUN from what is left of the pre-copy ones (fit below);
printed with each configuration's median beside what the model gives
for it. With pre-copy the final image holds what was written during the
last round.

Environment: BENCH_MIGRATE_MIB ("256,1024"), BENCH_MIGRATE_RATE (50), BENCH_RUNS (3).
Images (the source's passes, the destination's series) on /dev/shm.
"""

from __future__ import annotations

import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent))

from hosts import Hosts  # noqa: E402
from procsnap.image import schema  # noqa: E402
from procsnap.image.reader import open_image  # noqa: E402

SIZES = [int(x) for x in os.environ.get("BENCH_MIGRATE_MIB", "256,1024").split(",")]
RATE = float(os.environ.get("BENCH_MIGRATE_RATE", "50"))
RUNS = int(os.environ.get("BENCH_RUNS", "3"))
PROCSNAP = [sys.executable, "-m", "procsnap"]
ENV = {"TMPDIR": "/dev/shm"}


def wait(cond, what: str, timeout: float = 300.0):
    deadline = time.monotonic() + timeout
    while not (got := cond()):
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: timed out waiting for {what}")
        time.sleep(0.01)
    return got


def migrate_once(src, dst, exe: str, work: Path, mib: int, rounds: int) -> dict:
    out = work / f"migrator-{time.monotonic_ns()}.out"
    src.set_last_pid(300)
    t = src.popen(["setsid", "sh", "-c", f"exec {exe} default {mib} {RATE} < /dev/null > {out} 2>&1"], "migrator")
    wait(lambda: out.exists() and "READY" in out.read_text(), "the target's READY")
    kept = work / f"received-{time.monotonic_ns()}"  # the series, kept to count the final image's runs
    r = dst.popen([*PROCSNAP, "restore", "--stream", f"tcp://{dst.addr}:0", "-D", kept, "-d"], "restore", env=ENV)
    to = wait(lambda: re.search(r"listening on (\S+)", r.stderr()) or (not r.alive() and "x"), "the listener")
    if to == "x":
        raise SystemExit(f"bench: restore --stream: {r.stderr()}")
    m = src.run([*PROCSNAP, "migrate", "-t", t.inner, "--to", to.group(1), "--max-rounds", str(rounds)],
                timeout=1800, env=ENV)
    if m.returncode or r.wait() != 0:
        raise SystemExit(f"bench: migrate failed: {m.stderr.strip()} / {r.stderr().strip()}")
    line = m.stdout.splitlines()[-1]
    found = re.search(r"downtime ([0-9.]+) ms \(frozen here ([0-9.]+) ms, final image (\d+) MiB.*, ([0-9.]+) s in all",
                      line)
    copied = [int(x) for x in re.findall(r"pre-copy round \d+: (\d+) pages copied", m.stdout)]
    times = [float(x) for x in re.findall(r"pre-copy round \d+: .* ([0-9.]+) s$", m.stdout, re.M)]
    outer = wait(lambda: dst.outer(t.inner), "the migrated process")
    while dst.outer(t.inner) is not None:  # its self-check on the destination
        os.kill(outer, signal.SIGUSR1)
        time.sleep(0.2)
    text = out.read_text()
    if "PASS" not in text:
        raise SystemExit(f"bench: the migrated target did not pass: {text}")
    final = open_image(str(kept / str(max(int(n) for n in os.listdir(kept) if n.isdigit()))), verify_pages=False)
    runs = len(final.checkpoint.pages) + sum(len(schema.unpack_page_refs(refs)) for refs in final.checkpoint.page_refs)
    subprocess.run(["rm", "-rf", str(kept)])
    return {"downtime_ms": float(found.group(1)), "final_mib": int(found.group(3)), "total_s": float(found.group(4)),
            "rounds": len(copied), "final_runs": runs, "last_round_s": times[-1] if times else 0.0,
            "last_round_mib": copied[-1] / 256 if copied else 0.0}


def med(values) -> str:
    return f"{statistics.median(values):.0f} [{min(values):.0f}-{max(values):.0f}]"


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-migrate-", dir="/dev/shm"))
    exe = str(work / "migrator")
    subprocess.run(["gcc", "-O1", "-o", exe, str(HERE.parent / "tests/targets/migrator.c")], check=True)
    hosts = Hosts(work / "hosts")
    try:
        src, dst = hosts.add(), hosts.add()
        results = {}
        for mib in SIZES:
            order = [8, 0, 0, 8] * ((RUNS + 1) // 2)
            for rounds in order[: 2 * RUNS]:
                got = migrate_once(src, dst, exe, work, mib, rounds)
                results.setdefault((mib, rounds), []).append(got)
                print(f"  {mib} MiB, --max-rounds {rounds}: {got}", flush=True)
    finally:
        hosts.remove()
        subprocess.run(["rm", "-rf", str(work)])
    print(f"\nmigrate, {RATE:.0f} MiB/s written at random pages, {RUNS} runs each, median [min-max]\n")
    print("| size | pre-copy | rounds | final image MiB | final runs | downtime ms | whole migration s | model ms |")
    print("|---|---|---|---|---|---|---|---|")
    fixed, per_mib, per_run = fit(results)
    for mib in SIZES:
        for rounds in (0, 8):
            rs = results[(mib, rounds)]
            model = statistics.median(fixed + per_mib * r["final_mib"] + per_run * r["final_runs"] for r in rs)
            print(f"| {mib} MiB | {'yes' if rounds else 'no'} | {med([r['rounds'] for r in rs])} | "
                  f"{med([r['final_mib'] for r in rs])} | {med([r['final_runs'] for r in rs])} | "
                  f"{med([r['downtime_ms'] for r in rs])} | {statistics.median(r['total_s'] for r in rs):.1f} | "
                  f"{model:.0f} |")
    print(f"\nmodel: downtime = {fixed:.0f} ms + {per_mib:.2f} ms/MiB ({1000 / per_mib if per_mib > 0 else 0:.0f} "
          f"MiB/s) + {per_run * 1000:.1f} us/run of the final image")


def fit(results: dict) -> tuple[float, float, float]:
    """FIXED and PER_MIB: the line through the medians without pre-copy (two sizes at least; a final image
    of a few big runs); PER_RUN: the median of what the model leaves of each pre-copy downtime, per run."""
    sizes = sorted({mib for mib, _ in results})
    plain = {mib: statistics.median(r["downtime_ms"] for r in results[(mib, 0)]) for mib in sizes}
    if len(sizes) > 1:
        per_mib = (plain[sizes[-1]] - plain[sizes[0]]) / (sizes[-1] - sizes[0])
        fixed = plain[sizes[0]] - per_mib * sizes[0]
    else:
        per_mib, fixed = plain[sizes[0]] / sizes[0], 0.0
    left = [(r["downtime_ms"] - fixed - per_mib * r["final_mib"]) / r["final_runs"]
            for (mib, rounds), rs in results.items() if rounds for r in rs if r["final_runs"]]
    return fixed, per_mib, statistics.median(left) if left else 0.0


if __name__ == "__main__":
    main()
