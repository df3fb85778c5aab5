"""The targets' self-checks, proven without any dump.

Undisturbed, every target in every mode and build variant says PASS; with
PS_TARGET_SABOTAGE=1 it corrupts a piece of its own state after READY and
must say FAIL.  Only then does a PASS after a restore mean something.
"""

import ctypes
import os
import time

import pytest

PR_GET_CHILD_SUBREAPER = 37


def test_pytest_is_child_subreaper():
    libc = ctypes.CDLL(None, use_errno=True)
    flag = ctypes.c_int(-1)
    assert libc.prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(flag), 0, 0, 0) == 0
    assert flag.value == 1


def test_target_passes_undisturbed(procs, case, variant):
    t = procs.start_case(case, variant)
    status, out = t.wait_result()
    assert status == 0 and out.endswith("READY\nPASS\n"), f"{t}: status {status}\n{out}"


def test_target_fails_under_sabotage(procs, case, variant):
    t = procs.start_case(case, variant, sabotage=True)
    if case.sabotage_delay:
        time.sleep(case.sabotage_delay)     # the sabotage (an alarm) must strike first
    status, out = t.wait_result()
    assert status == 1, f"{t}: expected exit 1, found {status}\n{out}"
    assert "FAIL: " in out and "PASS" not in out, out


def test_target_rejects_unknown_mode(procs, targets):
    t = procs.start([targets.path("memory", "pie"), "no-such-mode"], ready=False)
    status, out = t.wait_exit()
    assert status == 2 and "unknown mode" in out, out


@pytest.mark.cases("files")
def test_snapshot_sees_fd_table(procs, case, variant, proc_snapshot):
    """fd 0 is /dev/null, 1 and 2 the output file; no stray fds leak in."""
    t = procs.start_case(case, variant)
    snap = proc_snapshot(t.pid)
    assert snap.fds[0].target == "/dev/null"
    assert snap.fds[1].target == snap.fds[2].target == str(t.out_path)
    assert snap.fds[12].target.endswith("ghost.dat (deleted)")
    assert snap.fds[7].flags & os.O_CLOEXEC
    assert snap.fds[5].flags & os.O_APPEND
    assert sorted(snap.fds) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 100]
    assert any(m.path == "[stack]" for m in snap.maps)
    status, out = t.wait_result()
    assert status == 0, out


@pytest.mark.cases("sleep-read")
@pytest.mark.variants("pie")
def test_snapshot_compare_detects_changes(procs, case, variant, proc_snapshot,
                                          assert_same_snapshot):
    t = procs.start_case(case, variant)
    before = proc_snapshot(t.pid)
    assert_same_snapshot(before, proc_snapshot(t.pid), ignore_pos=(10,))
    time.sleep(0.1)                 # fd 10 moves on 16 bytes per 10 ms
    with pytest.raises(AssertionError, match=r"fd 10: expected .* pos="):
        assert_same_snapshot(before, proc_snapshot(t.pid))
    changed = proc_snapshot(t.pid)
    changed = type(changed)(changed.pid, changed.maps[1:], changed.fds)
    with pytest.raises(AssertionError, match="maps differs"):
        assert_same_snapshot(before, changed, ignore_pos=(10,))
    status, out = t.wait_result()
    assert status == 0, out


@pytest.mark.cases("memory")
@pytest.mark.variants("pie")
def test_cleanup_kills_and_reaps(procs, case, variant):
    t = procs.start_case(case, variant)
    pid = t.pid
    procs.cleanup()
    assert t.reaped and not os.path.exists(f"/proc/{pid}")
