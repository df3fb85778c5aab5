"""A restore reads the page runs of each VMA from the image's packed runs
(restorer/pagecursor.py), not from a tuple per run: tests/targets/halfzero.c
has a page run per written page. Restored with the state check, every word
checked by the target itself, and what map_vmas_seized allocates bounded
(tracemalloc, in process): a tuple per run grouped by VMA is ~150 bytes a
run, the packed cursor 4."""

import tracemalloc

import pytest

import procsnap
from conftest import assert_pass, dump_kill, proc_snapshot, restore
from procsnap.restorer import memory

PAGES = 32768  # 16,384 runs of private pages
ALLOCATED_MAX = 1 << 20  # the per-run tuples were ~2.7 MiB here


def start(procs, n=PAGES, sabotage=False):
    env = {"PS_TARGET_SABOTAGE": "1"} if sabotage else None
    return procs.start([procs._targets.path("halfzero", "pie"), str(n)], env=env, name=f"halfzero-{n}")


def test_halfzero_checks_itself(procs):
    assert_pass(start(procs, 64))
    t = start(procs, 64, sabotage=True)
    status, out = t.wait_result()
    assert status == 1 and "FAIL: private page contents" in out and "PASS" not in out, out


@pytest.mark.parametrize("leave_running", [False, True], ids=["kill", "leave-running"])
def test_many_runs_restored_packed(procs, tmp_path, monkeypatch, leave_running):
    """leave_running: the shared area's runs were read while frozen, so
    pages.img holds them before the private ones (not in address order)."""
    t = start(procs)
    if leave_running:
        images = tmp_path / "img"
        images.mkdir()
        before = proc_snapshot(t.pid)
        assert procsnap.dump(t.pid, str(images), leave_running=True).snapshot
        t.kill_and_reap()
        t.dumped = before  # restore() compares against it
    else:
        images = dump_kill(t, tmp_path / "img")
    runs = len(procsnap.open_image(str(images)).checkpoint.pages)
    assert runs >= PAGES // 2, f"{runs} page runs in the image"
    monkeypatch.setattr(memory, "FILL_BATCH", 1 << 20)  # the fill's own batches stay small beside the bound
    allocated = []
    map_vmas = memory.map_vmas_seized

    def measured(*args, **kwargs):
        tracemalloc.start()
        try:
            start_bytes = tracemalloc.get_traced_memory()[0]
            map_vmas(*args, **kwargs)
            allocated.append(tracemalloc.get_traced_memory()[1] - start_bytes)
        finally:
            tracemalloc.stop()

    monkeypatch.setattr(memory, "map_vmas_seized", measured)
    restore(procs, t, images)
    monkeypatch.undo()
    assert_pass(t)
    assert len(allocated) == 1 and allocated[0] < ALLOCATED_MAX, \
        f"map_vmas_seized allocated {allocated} bytes for {runs} page runs"
