"""Removed directories (objects/ghostdir.py): a restore enters and opens a
placeholder made at the old path and removes it before the tree runs; the
placeholders never outlive the restore, and a path taken meanwhile gets a
placeholder beside it."""

import os

from conftest import CASES_BY_ID, assert_pass, dump_kill, restore

REMOVED = CASES_BY_ID["removed"]


def test_placeholders_are_gone_after_restore(procs, tmp_path):
    t = procs.start_case(REMOVED, "pie")
    scratch = procs.workdir / "removed-dir"
    images = dump_kill(t, tmp_path / "img")
    restore(procs, t, images)
    assert sorted(os.listdir(scratch)) == [], os.listdir(scratch)
    assert_pass(t)


def test_taken_path_gets_a_placeholder_beside_it(procs, tmp_path):
    """Someone made a directory at the old path since the dump: it is left
    alone, the restored process is in a removed placeholder beside it."""
    t = procs.start_case(REMOVED, "pie")
    scratch = procs.workdir / "removed-dir"
    images = dump_kill(t, tmp_path / "img")
    (scratch / "gone-cwd").mkdir()
    t.dumped = None  # its cwd is the placeholder's name now, which the state check would see
    restore(procs, t, images)
    assert os.readlink(f"/proc/{t.pid}/cwd") == f"{scratch}/gone-cwd.procsnap-ghost.1 (deleted)"
    assert sorted(os.listdir(scratch)) == ["gone-cwd"]
    t.signal(10)
    status, out = t.wait_result()
    assert status == 1 and "FAIL: cwd link" in out, out  # it knows it is elsewhere
