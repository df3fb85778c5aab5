"""make demo: checkpoint a running program, kill it, restore it, and show
that it carried on from where it stopped, with the same pids.

The program is a small python3 process tree: a thread of the parent counts,
holding its counter only in memory, and sends each value through a pipe to
a child process, which appends it to a log file.
"""

import ctypes
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

PROGRAM = textwrap.dedent("""
    import os, sys, threading, time
    r, w = os.pipe()
    if os.fork() == 0:          # the child: writes what comes through the pipe to the log
        os.close(w)
        log = open(sys.argv[1], "a", buffering=1)
        for line in os.fdopen(r):
            log.write(f"pid {os.getpid()} (child of {os.getppid()}) count {line.strip()}\\n")
        os._exit(0)
    os.close(r)
    def count():                # a thread of the parent: the counter lives only here
        n = 0
        while True:
            os.write(w, f"{n}\\n".encode())
            n += 1
            time.sleep(0.1)
    threading.Thread(target=count).start()
""")


def tree(pid):
    """'pid P (N threads) -> child C' of the demo program."""
    threads = len(os.listdir(f"/proc/{pid}/task"))
    kids = open(f"/proc/{pid}/task/{pid}/children").read().split()
    return f"pid {pid} ({threads} threads) -> child {', '.join(kids)}", [int(k) for k in kids]


def procsnap(*args, check=True):
    cmd = [sys.executable, "-m", "procsnap", *args]
    print(f"$ procsnap {' '.join(args)}")
    out = subprocess.run(cmd, capture_output=True, text=True)
    lines = out.stdout.strip().splitlines()
    if lines:
        shown = lines if len(lines) <= 20 else lines[:20] + [f"... ({len(lines) - 20} more lines)"]
        print(textwrap.indent("\n".join(shown), "  "))
    if out.returncode and check:
        sys.exit(f"procsnap failed ({out.returncode}): {out.stderr.strip()}")
    return out


def tail(path, n=3):
    with open(path) as f:
        return f.read().splitlines()[-n:]


def main():
    ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: restored orphans come back to us
    work = tempfile.mkdtemp(prefix="procsnap-demo-")
    log, images = os.path.join(work, "count.log"), os.path.join(work, "images")
    prog = subprocess.Popen(["python3", "-c", PROGRAM, log], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    pid = prog.pid
    restored = None
    try:
        time.sleep(1.5)
        shape, kids = tree(pid)
        print(f"1. python3 {shape} is counting; its log ends with:")
        print(textwrap.indent("\n".join(tail(log)), "  "))
        print("\n2. Checkpoint it (the process is killed once the image is complete):")
        t0 = time.monotonic()
        procsnap("dump", "-t", str(pid), "-D", images)
        print(f"  dump took {(time.monotonic() - t0) * 1000:.0f} ms (whole CLI)")
        prog.wait()
        for k in kids:  # killed too: it comes back to us (the subreaper) to be reaped
            while os.path.exists(f"/proc/{k}"):
                try:
                    os.waitpid(k, os.WNOHANG)
                except ChildProcessError:
                    pass
                time.sleep(0.01)
        last = tail(log, 1)[0]
        print(f"  pid {pid} is gone: exit status {prog.returncode}; the log stops at '{last}'")
        time.sleep(0.5)
        assert tail(log, 1)[0] == last, "the log moved while the process was dead"
        procsnap("show", images, check=True)  # the image's one-screen summary
        print("\n3. Restore it:")
        t0 = time.monotonic()
        out = procsnap("restore", "-D", images, "-d")
        restored = int(out.stdout.split()[-1])
        print(f"  restore took {(time.monotonic() - t0) * 1000:.0f} ms (whole CLI)")
        time.sleep(1.0)
        lines = tail(log, 4)
        shape_after, kids_after = tree(restored)
        print(f"\n4. {shape_after} is running again; its log now ends with:")
        print(textwrap.indent("\n".join(lines), "  "))
        last_before = int(last.split()[-1])
        counts = [int(x.split()[-1]) for x in open(log).read().splitlines()]
        same = restored == pid and kids_after == kids and shape_after == shape
        ok = same and counts == list(range(len(counts))) and counts[-1] > last_before
        print(f"\nSame pids and threads: {same}. Counter carried on from {last_before} with no gap or repeat: "
              f"{counts == list(range(len(counts)))} (now at {counts[-1]}).")
        print("PASS" if ok else "FAIL")
        return 0 if ok else 1
    finally:
        for p in [*(kids if "kids" in locals() else []), pid, restored]:
            if p:
                try:
                    os.kill(p, signal.SIGKILL)
                    os.waitpid(p, 0)
                except (ProcessLookupError, ChildProcessError):
                    pass


if __name__ == "__main__":
    sys.exit(main())
