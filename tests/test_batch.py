"""Batches of injected syscalls (kernel/infect.Target.batch) in a live
target: every call runs in order, the first failure stops the batch and is
named, and the target is left as it was; in a task being rebuilt
(put_back=False) the task runs a whole table itself per round trip
(arch.BATCH_STUB), elsewhere the calls go one by one. Killed in the middle
of a batch, procsnap leaves the target as a single injection does: alive
and as it was (but the scratch area) one by one, dead by SIGKILL in a task
seized with PTRACE_O_EXITKILL (every task being rebuilt)."""

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import CASES_BY_ID, REPO, assert_pass, assert_running_untraced, proc_status, without_mapping
from procsnap.kernel import infect, proc, ptrace
from procsnap.kernel.arch.x86_64 import NR, PAGE_SIZE

PAUSE = CASES_BY_ID["sleep-pause"]
PROT_RW = 0x3
MAP_ANON_NOREPLACE = 0x02 | 0x20 | 0x100000
SETTLE = 0.3  # s the target runs on its own after its tracer's death
SCRATCH_SIZE = 16 * 1024  # infect.SCRATCH_SIZE


def mapped(pid, address):
    return any(m.start <= address < m.end for m in proc.read_maps(pid))


def two_free_pages(pid):
    """Two page addresses nothing is mapped at (nor near), 1 GiB below the
    middle of the largest hole, where procsnap's own areas go."""
    a = infect.free_gap([(m.start, m.end) for m in proc.read_maps(pid)], 4 << 30) - (1 << 30)
    return a, a + 32 * PAGE_SIZE


@pytest.mark.parametrize("put_back", [False, True], ids=["in-target", "one-by-one"])
def test_batch_stops_at_first_failure(put_back, procs, proc_snapshot, assert_same_snapshot):
    """mmap, getpid, close(-1), mmap: the third fails with EBADF, the fourth
    never runs; results of the first two come back; then a batch bigger
    than one table. Released, the target passes its self-check (no SIGSTOP
    of the stub left to it) and shows the same state as before."""
    t = procs.start_case(PAUSE, "pie")
    before = proc_snapshot(t.pid)
    a, b = two_free_pages(t.pid)
    ptrace.freeze(t.pid, options=ptrace.PTRACE_O_EXITKILL)
    maps = proc.read_maps(t.pid)
    with infect.infected(t.pid, maps, put_back=put_back) as target:
        calls = [(NR.mmap, a, PAGE_SIZE, PROT_RW, MAP_ANON_NOREPLACE, -1, 0), (NR.getpid,),
                 (NR.close, -1), (NR.mmap, b, PAGE_SIZE, PROT_RW, MAP_ANON_NOREPLACE, -1, 0)]
        with pytest.raises(infect.BatchFailed) as exc:
            target.batch(calls)
        assert (exc.value.index, exc.value.errno, exc.value.results) == (2, errno.EBADF, [a, t.pid])
        assert "close" in str(exc.value) and "Bad file descriptor" in str(exc.value)
        assert mapped(t.pid, a) and not mapped(t.pid, b)
        assert (target.batch_area > 0) == (not put_back), target.batch_area
        many = 5000 if not put_back else 50
        assert target.batch([(NR.getpid,)] * many + [(NR.munmap, a, PAGE_SIZE)]) == [t.pid] * many + [0]
        area = target.batch_area
    assert not mapped(t.pid, a)
    if area > 0:
        assert not mapped(t.pid, area), "the batch area was left mapped"
    ptrace.detach(t.pid)
    assert_running_untraced(t.pid)
    assert_same_snapshot(before, proc_snapshot(t.pid))
    assert_pass(t)


# Seizes PID as the options say, runs a batch of COUNT calls and SIGKILLs
# itself while it runs (in-target: while the task runs the table; one by
# one: after the first call).
KILLER = textwrap.dedent("""\
    import os, signal, sys
    from procsnap.kernel import infect, proc, ptrace
    from procsnap.kernel.arch.x86_64 import NR
    pid, put_back, count = int(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3])
    ptrace.freeze(pid, options=0 if put_back else ptrace.PTRACE_O_EXITKILL)
    with infect.infected(pid, proc.read_maps(pid), put_back=put_back) as target:
        die = lambda: os.kill(os.getpid(), signal.SIGKILL)
        target.batch([(NR.getpid,)] * count, die)
    sys.exit("not killed")
""")


def killed_in_batch(pid, put_back, count):
    r = subprocess.run([sys.executable, "-c", KILLER, str(pid), "1" if put_back else "0", str(count)],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == -signal.SIGKILL, f"the injector exited {r.returncode}: {r.stderr}"


def test_sigkill_mid_batch_in_target_kills_the_task(procs):
    """The task seized with EXITKILL dies of SIGKILL with its tracer, never of
    the stub's SIGSTOP (stopped) or of a trap, and never runs on."""
    t = procs.start_case(PAUSE, "pie")
    killed_in_batch(t.pid, put_back=False, count=infect.BATCH_CAPACITY)
    assert t.reap() == -signal.SIGKILL, t


def test_sigkill_mid_batch_one_by_one_leaves_target_as_it_was(procs, proc_snapshot, assert_same_snapshot):
    """Killed between two calls of a batch in a live task (put_back: one by
    one), procsnap leaves it running, untraced, as it was but for the
    scratch area (as a dump SIGKILLed at mid-collect), passing its check."""
    t = procs.start_case(PAUSE, "pie")
    before = proc_snapshot(t.pid)
    killed_in_batch(t.pid, put_back=True, count=10)
    time.sleep(SETTLE)
    assert t.alive(), t
    assert_running_untraced(t.pid)
    after = proc_snapshot(t.pid, tree=False)
    extra = [m for m in after.maps if m not in before.maps]
    assert len(extra) == 1 and extra[0].end - extra[0].start == SCRATCH_SIZE, [str(m) for m in extra]
    assert_same_snapshot(before, without_mapping(after, t.pid, extra[0]))
    assert_pass(t)
