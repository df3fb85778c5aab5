"""What the tree benches share: run the CLI, wait for a target's word,
wait until processes are gone (reaping what is ours)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args: str, root: str = ROOT) -> float:
    """Runs procsnap (that of the tree `root`); seconds taken (whole CLI run)."""
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "procsnap", *args], cwd=root, capture_output=True, text=True)
    took = time.perf_counter() - t
    if p.returncode:
        raise SystemExit(f"procsnap {' '.join(args)} failed: {p.stderr.strip()}")
    return took


def wait_for(path: str, word: str, timeout: float = 120.0) -> str:
    """The file's text once it holds `word` (or FAIL)."""
    deadline = time.monotonic() + timeout
    while True:
        with open(path) as f:
            text = f.read()
        if word in text or "FAIL" in text:
            return text
        if time.monotonic() > deadline:
            raise SystemExit(f"no {word} in {path}: {text!r}")
        time.sleep(0.01)


def gone(pids: list[int]) -> None:
    for pid in pids:
        while os.path.exists(f"/proc/{pid}"):
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            time.sleep(0.005)


def kill_pids(pids: list[int]) -> None:
    """SIGKILL each of `pids` (the bench's own processes, by pid) and wait until they are gone."""
    import signal

    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    gone(pids)


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children of each of its threads), parents first."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for tid in os.listdir(f"/proc/{p}/task"):
            with open(f"/proc/{p}/task/{tid}/children") as f:
                kids = [int(k) for k in f.read().split()]
            out += kids
            todo += kids
    return out
