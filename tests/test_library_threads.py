"""procsnap used as a library by a program with other threads.

The restore makes each new process by clone3 with set_tid, a copy of this
Python process that goes on running Python. With another thread asking for
the GIL at that instant, a raw clone3 child waits forever for a thread it
does not have (kernel/clone.py says why, and how the clone is made then).
"""

import contextlib
import os
import sys
import threading

import pytest

import procsnap
from conftest import CASES_BY_ID, assert_pass, assert_same_snapshot, descendants, proc_snapshot, reap_gone
from procsnap.kernel.probes import run_checks
from procsnap.kernel.proc import read_stat


@contextlib.contextmanager
def busy_thread():
    """A thread running bytecode all along, asking for the GIL as soon as it
    waits for it (a switch interval of 1 us, so that a thread holding the
    GIL is asked to drop it at almost every instant: as on a loaded host,
    where the holder is preempted for more than the default 5 ms)."""
    stop = threading.Event()
    interval = sys.getswitchinterval()

    def spin():
        n = 0
        while not stop.is_set():
            n += 1

    th = threading.Thread(target=spin, daemon=True)
    th.start()
    sys.setswitchinterval(1e-6)
    try:
        yield th
    finally:
        sys.setswitchinterval(interval)
        stop.set()
        th.join()


@pytest.mark.timeout(120)
def test_kernel_checks_beside_a_busy_thread():
    with busy_thread():
        for _ in range(20):
            got = {r.name: r for r in run_checks()}
            assert got["clone3_set_tid"].ok, got["clone3_set_tid"].detail


@pytest.mark.timeout(180)
def test_restore_in_process_beside_a_busy_thread(procs, tmp_path):
    """A tree (its children made by the restored root, single-threaded)
    restored by procsnap.restore() while a thread of ours runs."""
    t = procs.start_case(CASES_BY_ID["tree-pipes"], "pie")
    pid0 = t.pid
    before = proc_snapshot(t.pid)
    others = descendants(t.pid)
    images = tmp_path / "img"
    images.mkdir()
    procsnap.dump(t.pid, str(images))
    t.reap()
    reap_gone(others)
    with busy_thread():
        pid = procsnap.restore(str(images))
    t.adopt(pid)
    assert pid == pid0
    assert read_stat(pid).ppid == os.getpid(), "the restored root is not our child"
    assert_same_snapshot(before, proc_snapshot(pid), ignore_pos=t.ignore_pos)
    assert_pass(t)
