"""A process with 10,000 VMAs (tests/targets/manymaps.c: one-page VMAs,
alternating rw-p and r--p, each page with its own contents), restored with
the state check; the restorer maps them in batches run by the task itself
(kernel/infect.Target.batch), a handful of ptrace stops for all of them."""

import signal

import pytest

from conftest import assert_pass, dump_kill, restore
from procsnap.kernel import ptrace

VMAS = 10_000


def start(procs, n=VMAS, sabotage=False):
    env = {"PS_TARGET_SABOTAGE": "1"} if sabotage else None
    return procs.start([procs._targets.path("manymaps", "pie"), str(n)], env=env, name=f"manymaps-{n}")


def test_manymaps_checks_itself(procs):
    t = start(procs, 1000)
    assert_pass(t)
    t = start(procs, 1000, sabotage=True)
    status, out = t.wait_result()
    assert status == 1 and "FAIL: page contents" in out and "PASS" not in out, out


def test_manymaps_restored(procs, tmp_path, monkeypatch):
    """10,000 VMAs dumped and restored: same maps (state check), every page
    intact (self-check), and the rebuild stopped the task a few dozen
    times, not a few times per VMA (each stop is a ptrace round trip)."""
    t = start(procs)
    images = dump_kill(t, tmp_path / "img")
    stops = []
    wait_stop = ptrace.wait_stop
    monkeypatch.setattr(ptrace, "wait_stop", lambda pid: stops.append(pid) or wait_stop(pid))
    restore(procs, t, images)
    monkeypatch.undo()
    assert len(stops) < 200, f"{len(stops)} ptrace stops to restore {VMAS} VMAs"
    assert_pass(t)
