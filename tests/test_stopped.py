"""Stopped processes (state T: SIGSTOP, SIGTSTP) are dumped without their
parent being told anything and restored stopped; SIGCONT resumes them where
they were (dumper: ptrace.freeze from a group-stop; restorer: spawn's
wait_stopped)."""

import os
import signal
import time

import procsnap
from conftest import (Case, assert_pass, assert_same_snapshot, descendants, dump_kill, proc_snapshot, restore,
                      wait_until)


def states(pid):
    """The stat state of every thread of `pid`."""
    return {int(t): open(f"/proc/{pid}/task/{t}/stat").read().rpartition(")")[2].split()[0]
            for t in os.listdir(f"/proc/{pid}/task")}


def tracer(pid):
    return next(line.split()[1] for line in open(f"/proc/{pid}/status") if line.startswith("TracerPid:"))


def assert_stays_stopped(pid, t, lines):
    """Every thread of `pid` stopped, untraced, and `t` printing no `lines` for a while."""
    assert set(states(pid).values()) == {"T"}, states(pid)
    assert tracer(pid) == "0"
    before = t.output().count(lines)
    time.sleep(0.3)
    assert t.output().count(lines) == before, f"pid {pid} ran while stopped"


def stop(pid, sig):
    os.kill(pid, sig)
    wait_until(lambda: set(states(pid).values()) == {"T"}, f"pid {pid} to stop")


def test_stopped_process_restored_stopped(procs, tmp_path):
    t = procs.start_case(Case("stopped", "ticker"), "pie")
    wait_until(lambda: "TICK 3" in t.output(), "ticks")
    stop(t.pid, signal.SIGSTOP)
    dump_kill(t, tmp_path / "img")
    restore(procs, t, tmp_path / "img")  # the state check compares stat.state: T
    assert_stays_stopped(t.pid, t, "TICK")
    os.kill(t.pid, signal.SIGCONT)
    ticks = t.output().count("TICK")
    wait_until(lambda: t.output().count("TICK") > ticks + 2, "ticks after SIGCONT")
    assert_pass(t)  # exactly one SIGCONT seen, ticks went on


def test_stopped_threads_restored_stopped(procs, tmp_path):
    t = procs.start_case(Case("stopped", "threads"), "pie")
    wait_until(lambda: t.output().count("TICK") > 9, "ticks")
    stop(t.pid, signal.SIGSTOP)
    dump_kill(t, tmp_path / "img")
    restore(procs, t, tmp_path / "img")
    assert len(states(t.pid)) == 4
    assert_stays_stopped(t.pid, t, "TICK")
    os.kill(t.pid, signal.SIGCONT)
    ticks = t.output().count("TICK")
    wait_until(lambda: t.output().count("TICK") > ticks + 6, "ticks after SIGCONT")
    assert_pass(t)


def test_stopped_job_parent_sees_nothing(procs, tmp_path):
    """A job stopped by SIGTSTP (Ctrl-Z) in its own process group: neither
    a dump that lets it run on, nor a dump and restore, tells its parent
    anything (no wait event, no SIGCHLD: the parent counts both); SIGCONT
    then does, once."""
    t = procs.start_case(Case("stopped", "parent"), "pie")
    wait_until(lambda: "TICK 3" in t.output(), "the child's ticks")
    (child,) = descendants(t.pid)
    stop(child, signal.SIGTSTP)
    wait_until(lambda: f"EVENT stopped {signal.SIGTSTP.value}" in t.output(), "the parent to see the stop")

    before = proc_snapshot(t.pid)
    procsnap.dump(t.pid, str(tmp_path / "img-R"), leave_running=True)
    assert_same_snapshot(before, proc_snapshot(t.pid))
    assert_stays_stopped(child, t, "EVENT")

    dump_kill(t, tmp_path / "img")
    restore(procs, t, tmp_path / "img")
    assert_stays_stopped(child, t, "EVENT")
    assert t.output().count("EVENT") == 1

    os.kill(child, signal.SIGCONT)
    wait_until(lambda: "EVENT continued" in t.output(), "the parent to see the continue")
    assert_pass(t)  # one stop, one continue, three SIGCHLDs, the child's own PASS
