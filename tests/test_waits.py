"""Sleeps and waits interrupted by a dump carry on after the restore as the
kernel would have carried them on after a stop: never an EINTR, and a
relative one with the time it had left at the freeze (dumper/waits.py,
restorer/waits.py).

How long each one took is a behaviour check with a wide margin, not a
speed assertion: restarting the whole wait would add the S seconds it had
already slept before the dump; resuming it adds only the time the process
was not running (D, measured from just before the dump to the return of
procsnap.restore, which is more than it). Each check allows S/2 between.
"""

import re
import sys
import textwrap
import time

import pytest

import procsnap
from conftest import Case, assert_pass, dump_kill, proc_snapshot, restore, wait_until

WAIT_S = 4.0  # tests/targets/waits.c
SLEPT_S = 2.5  # before the dump
RELATIVE = ("nanosleep_rem", "nanosleep_null", "poll", "select", "epoll", "futex", "read")


@pytest.fixture
def restored_at(monkeypatch):
    """{"t": monotonic time procsnap.restore last returned} (before the
    state check, which the restored process runs through)."""
    seen = {}
    real = procsnap.restore

    def timed(*args, **kwargs):
        pid = real(*args, **kwargs)
        seen["t"] = time.monotonic()
        return pid

    monkeypatch.setattr(procsnap, "restore", timed)
    return seen


def dump_restore_after(procs, t, started, slept, tmp_path, restored_at):
    """Dump `t` `slept` s after `started`, restore it: (S, D)."""
    time.sleep(max(0.0, started + slept - time.monotonic()))
    before = proc_snapshot(t.pid)  # the state check's, taken before D starts
    dumped_at = time.monotonic()
    dump_kill(t, tmp_path / "img", before=before)
    restore(procs, t, tmp_path / "img")
    return dumped_at - started, restored_at["t"] - dumped_at


def elapsed(out):
    m = re.search(r"^ELAPSED ([0-9.]+)$", out, re.M)
    assert m, f"no ELAPSED line in:\n{out}"
    return float(m.group(1))


@pytest.mark.parametrize("mode", RELATIVE + ("clock_abs",))
def test_wait_carries_on(procs, mode, tmp_path, restored_at):
    t = procs.start_case(Case("waits", mode), "pie")
    started = time.monotonic()
    slept, down = dump_restore_after(procs, t, started, SLEPT_S, tmp_path, restored_at)
    assert_pass(t)  # no EINTR, no return before WAIT_S
    took = elapsed(t.output())
    if mode == "clock_abs":  # the same CLOCK_MONOTONIC deadline: the time away counts
        assert took < max(WAIT_S, slept + down) + slept / 2, f"{mode}: took {took:.2f} s"
    else:
        assert took < WAIT_S + down + slept / 2, \
            f"{mode}: took {took:.2f} s, dumped after {slept:.2f} s, away {down:.2f} s: " \
            "the whole wait was made again"


def test_waits_target_sees_eintr(procs):
    """The target's own check can fail: a real EINTR (sabotage: SIGALRM
    with a handler) is reported."""
    t = procs.start_case(Case("waits", "nanosleep_null"), "pie", sabotage=True)
    status, out = t.wait_result()
    assert status == 1 and "FAIL: nanosleep expected no EINTR found EINTR" in out, out


def test_coreutils_sleep_resumes_time_left(procs, tmp_path, restored_at):
    """`sleep 8` dumped after 3 s sleeps about 5 s more after its restore
    (not 8: it used to restart the whole sleep)."""
    t = procs.start(["sleep", "8"], ready=False, name="sleep")
    started = time.monotonic()
    wait_until(lambda: open(f"/proc/{t.pid}/syscall").read().split()[0] == "230", "sleep in clock_nanosleep")
    slept, down = dump_restore_after(procs, t, started, 3.0, tmp_path, restored_at)
    assert t.wait_exit(timeout=20)[0] == 0
    took = time.monotonic() - started
    assert 8.0 <= took < 8.0 + down + slept / 2, \
        f"sleep 8 took {took:.2f} s, dumped after {slept:.2f} s, away {down:.2f} s"


PY_SLEEP = textwrap.dedent("""\
    import sys, time
    start = time.monotonic()
    sys.stdout.write("READY\\n"); sys.stdout.flush()
    time.sleep(6)
    sys.stdout.write("ELAPSED %.3f\\n" % (time.monotonic() - start)); sys.stdout.flush()
""")


def test_python_time_sleep_keeps_deadline(procs, tmp_path, restored_at):
    """Python's time.sleep is an absolute CLOCK_MONOTONIC sleep: made again
    with the same deadline, which runs on while the process is away (on
    the same machine, CLOCK_MONOTONIC goes on across a restore)."""
    script = tmp_path / "sleep.py"
    script.write_text(PY_SLEEP)
    t = procs.start([sys.executable, script], name="python")
    started = time.monotonic()
    slept, down = dump_restore_after(procs, t, started, 2.0, tmp_path, restored_at)
    assert t.wait_exit(timeout=20)[0] == 0
    took = elapsed(t.output())
    assert 6.0 <= took < max(6.0, slept + down) + slept / 2, f"time.sleep(6) took {took:.2f} s"


# --------------------------------------------------------------------------
# Timers (objects/timers.py): their time left is the dump's


@pytest.mark.parametrize("mode", ["itimers", "posix"])
def test_timers_kept(procs, mode, tmp_path):
    """itimers: each interval timer comes back armed with its interval and
    its time left. posix: POSIX timers on every clock and with each
    notification come back with their ids, clock, signal, value, notified
    thread, interval and time left (the target compares /proc/self/timers
    and timer_gettime), and go on firing. The state check compares
    /proc/PID/timers, and each interval timer's being armed and interval."""
    t = procs.start_case(Case("timers", mode), "pie")
    dump_kill(t, tmp_path / "img")
    restore(procs, t, tmp_path / "img")
    assert_pass(t)


@pytest.mark.parametrize("mode, lost", [("itimers", "ITIMER_PROF"), ("posix", "/proc/self/timers")])
def test_timers_target_sees_a_lost_timer(procs, mode, lost):
    t = procs.start_case(Case("timers", mode), "pie", sabotage=True)
    status, out = t.wait_result()
    assert status == 1 and f"FAIL: {lost}" in out, out


def test_itimer_fires_after_restore(procs, tmp_path):
    """An ITIMER_REAL dumped before it first fired fires after the restore,
    then every interval: the target counts four SIGALRMs."""
    t = procs.start_case(Case("timers", "fires"), "pie")
    dump_kill(t, tmp_path / "img")
    assert "ALARMS" not in t.output()
    restore(procs, t, tmp_path / "img")
    wait_until(lambda: "ALARMS 4" in t.output(), "four SIGALRMs after the restore")
    assert_pass(t)


REFUSED_TIMERS = {
    # a thread CPU clock timer of a process with two threads: whose CPU time it counts is not in /proc
    "thread-cpu-clock": ("""\
        import ctypes, signal, threading, time
        threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()
        tid = ctypes.c_int(0)
        assert ctypes.CDLL(None, use_errno=True).timer_create(3, None, ctypes.byref(tid)) == 0  # CLOCK_THREAD_CPUTIME_ID
        """, ("counts the CPU time of the thread that made it", "of its 2 threads")),
    # a timer whose last signal merged expirations: its overrun count cannot be set again
    "overrun": ("""\
        import ctypes, signal, time
        libc = ctypes.CDLL(None, use_errno=True)
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGALRM])
        tid = ctypes.c_int(0)
        assert libc.timer_create(1, None, ctypes.byref(tid)) == 0  # CLOCK_MONOTONIC, SIGALRM
        spec = (ctypes.c_long * 4)(0, 1_000_000, 0, 1_000_000)  # every 1 ms
        assert libc.timer_settime(tid, 0, spec, None) == 0
        time.sleep(0.05)
        signal.sigwait([signal.SIGALRM])  # delivered with the expirations merged meanwhile; still blocked after
        assert libc.timer_getoverrun(tid) > 0
        """, ("has an overrun count of", "cannot be set again")),
}


@pytest.mark.parametrize("kind", sorted(REFUSED_TIMERS))
def test_posix_timer_refused_by_name(kind, procs, tmp_path):
    """What a restore could not give back of a POSIX timer is refused at
    dump, naming the pid and the timer; the process runs on untouched."""
    setup, names = REFUSED_TIMERS[kind]
    code = textwrap.dedent(setup) + "print('READY', flush=True)\nsignal.pause()\n"
    t = procs.start([sys.executable, "-c", code], name=f"timer-{kind}")
    before = proc_snapshot(t.pid)
    with pytest.raises(procsnap.Unsupported) as exc:
        procsnap.dump(t.pid, str(tmp_path / "img"))
    for name in (f"pid {t.pid}", "POSIX timer", *names):
        assert name in str(exc.value), exc.value
    assert t.alive()
    after = proc_snapshot(t.pid)
    assert (before.maps, before.fds) == (after.maps, after.fds)
