"""Two dumps into one image directory or one s3:// prefix: while the first
is under way (held at a stage by PROCSNAP_FAULT=<stage>:stop) the second
fails with one line naming the place and the dump in progress, leaving its
process running untouched; the first then completes and its image
restores. A lock an s3 dump left when it was killed is taken over."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import (CASES_BY_ID, REPO, assert_cli_error, assert_pass, assert_running_untraced, assert_same_snapshot,
                      cli, descendants, proc_snapshot, reap_gone, restore, wait_until)
from test_objstore import BUCKET, s3  # noqa: F401 (the fixture)
from procsnap.image import objstore


def _held_dump(t, images, env=None, stage="before-commit"):
    """`procsnap dump` of t into `images`, stopped at `stage` (it holds the lock there)."""
    t.dumped = proc_snapshot(t.pid)
    env = {**os.environ, **(env or {}), "PROCSNAP_FAULT": f"{stage}:stop"}
    dump = subprocess.Popen([sys.executable, "-m", "procsnap", "dump", "-t", str(t.pid), "-D", str(images)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: dump.poll() is not None or
               Path(f"/proc/{dump.pid}/stat").read_text().rpartition(")")[2].split()[0] == "T",
               "the first dump to stop at its stage", timeout=120)
    assert dump.poll() is None, dump.communicate()
    return dump


def _go_on(dump, t):
    others = descendants(t.pid)
    os.kill(dump.pid, signal.SIGCONT)
    _, err = dump.communicate(timeout=120)
    assert dump.returncode == 0, err
    assert t.reap() == -signal.SIGKILL
    reap_gone(others)


def _second_refused(procs, images, env=None):
    second = procs.start_case(CASES_BY_ID["sleep-pause"], "pie")
    state = proc_snapshot(second.pid)
    r = cli("dump", "-t", second.pid, "-D", images, env=env)
    assert_cli_error(r, str(images), "another dump into it is in progress")
    assert_running_untraced(second.pid)
    assert_same_snapshot(state, proc_snapshot(second.pid))
    second.signal(signal.SIGKILL)


def test_two_dumps_into_one_directory(procs, tmp_path):
    images = tmp_path / "img"
    other = procs.start_case(CASES_BY_ID["sleep-pause"], "pie")  # images there before: img, and one to keep
    for where in (images, tmp_path / "kept"):
        r = cli("dump", "-R", "-t", other.pid, "-D", where)
        assert r.returncode == 0, r.stderr
    other.signal(signal.SIGKILL)
    first = procs.start_case(CASES_BY_ID["memory"], "pie")
    dump = _held_dump(first, images)
    try:
        _second_refused(procs, images)
        r = cli("gc", tmp_path, "--keep", "kept")  # it would remove img: not while a dump holds it
        assert_cli_error(r, str(images), "in progress")
        _go_on(dump, first)
    finally:
        if dump.poll() is None:
            dump.kill()
            dump.wait()
    restore(procs, first, images)
    assert_pass(first)


def test_two_dumps_into_one_prefix(procs, s3):
    url = f"s3://{BUCKET}/busy"
    kept = procs.start_case(CASES_BY_ID["sleep-pause"], "pie")  # an image beside it, for gc to keep
    r = cli("dump", "-R", "-t", kept.pid, "-D", f"s3://{BUCKET}/kept", env=s3.env)
    assert r.returncode == 0, r.stderr
    kept.signal(signal.SIGKILL)
    first = procs.start_case(CASES_BY_ID["memory"], "pie")
    dump = _held_dump(first, url, s3.env)
    try:
        assert objstore.read(f"{url}/LOCK")  # held
        _second_refused(procs, url, s3.env)
        r = cli("gc", f"s3://{BUCKET}", env=s3.env)  # nor does gc touch a prefix a dump holds
        assert_cli_error(r, url, "in progress")
        _go_on(dump, first)
    finally:
        if dump.poll() is None:
            dump.kill()
            dump.wait()
    with pytest.raises(objstore.ImageCorrupt):  # released
        objstore.read(f"{url}/LOCK")
    restore(procs, first, url)
    assert_pass(first)


def test_lock_of_a_killed_dump_is_taken_over(procs, s3):
    """A dump SIGKILLed while it held the lock leaves it (and its target
    frozen until the kernel detaches it); the next dump on this host sees
    that the owner is gone and goes ahead."""
    url = f"s3://{BUCKET}/stale"
    first = procs.start_case(CASES_BY_ID["sleep-pause"], "pie")
    dump = _held_dump(first, url, s3.env, stage="after-freeze")
    dump.kill()
    dump.communicate()
    first.dumped = None
    wait_until(lambda: proc_snapshot(first.pid) is not None and
               Path(f"/proc/{first.pid}/status").read_text().split("TracerPid:")[1].split()[0] == "0",
               "the tracer's death to detach the target")
    assert objstore.read(f"{url}/LOCK")  # left behind
    second = procs.start_case(CASES_BY_ID["memory"], "pie")
    others = descendants(second.pid)
    second.dumped = proc_snapshot(second.pid)
    r = cli("dump", "-t", second.pid, "-D", url, env=s3.env)
    assert r.returncode == 0, r.stderr
    assert second.reap() == -signal.SIGKILL
    reap_gone(others)
    restore(procs, second, url)
    assert_pass(second)
    first.signal(signal.SIGKILL)
