"""A python3 tree whose children are fork-built (restorer/forkbuild.py),
restored with the state check and each process's own check, in a few
dozen ptrace stops per process: a child's fd table setup, its unmapping
and mm fields, its helper fds and its prctl reads run as batches in the
task (kernel/infect.Target.batch), in the batch area it inherits from
its parent (notes/issue-12-tree.md). Before that, ~200 stops per process."""

import os
import sys
import textwrap

import procsnap
import procsnap.restorer as R
from conftest import assert_pass, descendants, dump_kill, restore
from procsnap.kernel import ptrace

PROCS = 8
# Each process: its own data, checked after the restore against a digest
# taken before; the root also checks that every child exits 0 after its own
# check (SIGUSR2), so a child restored wrong fails the root's PASS.
PROGRAM = textwrap.dedent("""\
    import hashlib, os, signal, stat, sys, time
    procs = int(sys.argv[1])
    common = os.urandom(1 << 20)
    def body():
        own = os.urandom(1 << 20)
        return own, hashlib.sha256(own + common).digest()
    def ok(own, digest):
        return (hashlib.sha256(own + common).digest() == digest and os.getcwd() == "/tmp"
                and stat.S_ISREG(os.fstat(1).st_mode))
    def child(i):  # never returns
        signal.signal(signal.SIGUSR2, lambda *a: None)
        own, digest = body()
        os.write(w, b"k")  # settled: the tree is dumped once all are
        signal.pause()
        if os.environ.get("PS_TARGET_SABOTAGE") and i == procs - 2:
            own = own[:-1] + bytes([own[-1] ^ 1])
        os._exit(0 if ok(own, digest) else 1)
    os.chdir("/tmp")
    r, w = os.pipe()
    kids = [os.fork() or child(i) for i in range(procs - 1)]
    os.close(w)
    own, digest = body()
    got = 0
    while got < procs - 1:
        got += len(os.read(r, 64))
    os.close(r)
    signal.signal(signal.SIGUSR1, lambda *a: None)
    os.write(1, b"READY\\n")
    signal.pause()
    good, statuses = ok(own, digest), []
    for pid in kids:
        while True:  # resent: one that comes before the child's pause() is not seen
            os.kill(pid, signal.SIGUSR2)
            done, st = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.05)
        statuses.append(st)
    os.write(1, b"PASS\\n" if good and statuses == [0] * len(kids) else b"FAIL\\n")
    """)


def start(procs, sabotage=False):
    env = {"PS_TARGET_SABOTAGE": "1"} if sabotage else None
    return procs.start([sys.executable, "-c", PROGRAM, str(PROCS)], env=env, name="pytree")


def test_tree_checks_itself(procs):
    assert_pass(start(procs))
    status, out = start(procs, sabotage=True).wait_result()
    assert "FAIL" in out and "PASS" not in out, out


def test_fork_built_tree_in_batches(procs, tmp_path, monkeypatch):
    t = start(procs)
    assert len(descendants(t.pid)) == PROCS - 1
    images = dump_kill(t, tmp_path / "img")
    stops, forked, restoring = [], [], [False]
    wait_stop, fork_built, real_restore = ptrace.wait_stop, R.fork_built, procsnap.restore

    def counted_restore(*args, **options):  # the restore's stops, not the state check's
        restoring[0] = True
        try:
            return real_restore(*args, **options)
        finally:
            restoring[0] = False

    monkeypatch.setattr(procsnap, "restore", counted_restore)
    monkeypatch.setattr(ptrace, "wait_stop", lambda pid: (restoring[0] and stops.append(pid)) or wait_stop(pid))
    monkeypatch.setattr(R, "fork_built", lambda *a: forked.extend(fork_built(*a)) or set(forked))
    restore(procs, t, images)
    monkeypatch.undo()
    assert len(forked) == PROCS - 1, f"fork-built: {forked}"
    assert len(stops) < 80 * PROCS, f"{len(stops)} ptrace stops to restore {PROCS} processes"
    assert_pass(t)
