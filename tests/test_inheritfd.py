"""restore --inherit-fd fd[N]:RESOURCE (procsnap/inheritfd.py): the fd the
tree held as RESOURCE is the caller's fd N after the restore; `procsnap
show` names the resources. The target (tests/targets/inherit.c) reads its
fd 5 after the restore and compares what it gets with what the caller's
file or pipe holds; the state check runs, with fd 5 expected to be the
caller's file."""

import dataclasses
import os
import re
import signal
import subprocess
import sys

import pytest

from conftest import REPO, assert_cli_error, assert_pass, assert_same_snapshot, cli, dump_kill, proc_snapshot, restore


def start_inherit(procs, *args, env=None):
    return procs.start([procs._targets.path("inherit", "pie"), *args], name="inherit", env=env)


def resource_of_fd5(images):
    """The name `procsnap show` gives what fd 5 held."""
    r = cli("show", images)
    assert r.returncode == 0, r.stderr
    m = re.search(r"^inherit-fd: (\S+) \(pid \d+ fd 5\)$", r.stdout, re.M)
    assert m, r.stdout
    return m[1]


def with_fd5(snap, target):
    """`snap` with fd 5 of its root the caller's file `target` (the inherited one)."""
    fd5 = dataclasses.replace(snap.fds[5], target=target)
    root = snap.tree[snap.pid]
    tree = {**snap.tree, snap.pid: dataclasses.replace(root, fds=tuple((fd, fd5 if fd == 5 else e)
                                                                      for fd, e in root.fds))}
    return dataclasses.replace(snap, fds={**snap.fds, 5: fd5}, tree=tree)


def test_pipe(procs, tmp_path):
    """fd 5, the read end of a pipe the tree alone held, is the test's pipe:
    what the test writes after the restore is what the target reads."""
    t = start_inherit(procs, "pipe", "through the caller's pipe")
    dump_kill(t, tmp_path / "img")
    name = resource_of_fd5(tmp_path / "img")
    assert name.startswith("pipe:[")
    r, w = os.pipe()
    try:
        restore(procs, t, tmp_path / "img", inherit_fd={name: r})
    finally:
        os.close(r)
    os.write(w, b"through the caller's pipe")
    os.close(w)
    os.kill(t.pid, signal.SIGUSR1)
    assert_pass(t)


def test_pipe_lost_fails(procs, tmp_path):
    """Without --inherit-fd the pipe is made again with no writer: the
    target's read gives EOF at once, and its check fails."""
    t = start_inherit(procs, "pipe", "through the caller's pipe")
    dump_kill(t, tmp_path / "img")
    restore(procs, t, tmp_path / "img")
    os.kill(t.pid, signal.SIGUSR1)
    status, out = t.wait_result()
    assert status != 0 and "FAIL: fd 5 reads" in out, out


def test_file_through_the_cli(procs, tmp_path):
    """fd 5 of a file removed since the dump: `procsnap restore -d
    --inherit-fd fd[N]:PATH` with the caller's other file as its fd N."""
    path = tmp_path / "data"
    path.write_text("the dumped file")
    t = start_inherit(procs, "file", str(path), "the caller's file")
    snap = proc_snapshot(t.pid)
    dump_kill(t, tmp_path / "img", before=snap)
    assert resource_of_fd5(tmp_path / "img") == str(path)
    path.unlink()
    r = cli("restore", "-D", tmp_path / "img", "-d")
    assert_cli_error(r, str(path))
    given = tmp_path / "given"
    given.write_text("the caller's file")
    fd = os.open(given, os.O_RDONLY)
    try:
        r = subprocess.run([sys.executable, "-m", "procsnap", "restore", "-D", str(tmp_path / "img"), "-d",
                            "--inherit-fd", f"fd[{fd}]:{path}"], cwd=REPO, capture_output=True, text=True,
                           pass_fds=(fd,), timeout=120)
    finally:
        os.close(fd)
    assert r.returncode == 0, r.stderr
    pid = int(r.stdout)
    assert pid == t.pid
    t.adopt(pid)  # (orphaned to us, the subreaper)
    assert_same_snapshot(with_fd5(snap, str(given)), proc_snapshot(pid))
    os.kill(pid, signal.SIGUSR1)
    assert_pass(t)


@pytest.mark.parametrize("spec, found", [
    ("fd[x]:pipe:[1]", "expected fd[N]:RESOURCE"),
    ("fd[999]:pipe:[1]", "fd 999 is not open here"),
    ("fd[0]:pipe:[1]", "the image holds no such resource"),
])
def test_bad_input(spec, found, procs, tmp_path):
    """One line, exit 2, nothing restored."""
    t = start_inherit(procs, "pipe", "x")
    dump_kill(t, tmp_path / "img")
    r = cli("restore", "-D", tmp_path / "img", "-d", "--inherit-fd", spec)
    assert_cli_error(r, found)
    assert r.returncode == 2
    assert not os.path.exists(f"/proc/{t.pid}")
