"""What a process shares with its tree or the system: cgroup membership
restored (refused by name when the cgroup is gone), fd tables and fs
structs shared between processes refused by name at dump. (fd owners and
chroot are target cases: treestate-fown, treestate-chroot; a zombie's wait
status is in the state check, see test_tree's signalled zombie.)"""

import contextlib
import os
import sys
import textwrap
from pathlib import Path

import pytest

import procsnap
from procsnap.errors import RestoreError, Unsupported

from conftest import (CASES_BY_ID, Case, assert_pass, assert_same_snapshot, assert_untouched, dump_kill,
                      proc_snapshot, restore, wait_pid_gone)

def assert_refused_untouched(t, tmp_path, *names) -> None:
    """A dump of `t` is refused, the message naming each of `names`; the
    tree runs on untouched and passes its check."""
    before = proc_snapshot(t.pid)
    images = tmp_path / "img"
    images.mkdir()
    with pytest.raises(Unsupported) as exc:
        procsnap.dump(t.pid, str(images))
    for name in names:
        assert name in str(exc.value), exc.value
    assert_untouched(t.pid, before, images, proc_snapshot, assert_same_snapshot)
    assert_pass(t)


@pytest.mark.parametrize("mode,what,flag", [("sharefiles", "fd table", "CLONE_FILES"),
                                            ("sharefs", "root, working directory and umask", "CLONE_FS")])
def test_shared_tables_refused(mode, what, flag, procs, tmp_path):
    """Two processes sharing one fd table (or fs struct): refused at dump
    naming both and the flag; the tree runs on untouched and still shares it."""
    t = procs.start_case(Case("treestate", mode), "pie")
    child = int(Path(f"/proc/{t.pid}/task/{t.pid}/children").read_text().split()[0])
    key = f"shares.{'files' if mode == 'sharefiles' else 'fs'}"
    assert proc_snapshot(t.pid).state[child][key] == f"pid {t.pid}'s"  # the state check sees it
    assert_refused_untouched(t, tmp_path, f"pid {child}", f"pid {t.pid}", what, flag)



# cgroups

V2 = Path("/sys/fs/cgroup/unified")
V1_PIDS = Path("/sys/fs/cgroup/pids")


@contextlib.contextmanager
def made_cgroup(hierarchy: Path, name: str):
    if not (hierarchy / "cgroup.procs").exists():
        pytest.skip(f"no cgroup hierarchy mounted at {hierarchy}")
    path = hierarchy / name
    path.mkdir()
    try:
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            for pid in (path / "cgroup.procs").read_text().split():  # only ours can be there
                wait_pid_gone(int(pid))
            path.rmdir()


def move(pid: int, cgroup: Path) -> None:
    (cgroup / "cgroup.procs").write_text(str(pid))


def cgroup_of(pid: int) -> str:
    return Path(f"/proc/{pid}/cgroup").read_text()


def test_cgroups_restored(procs, tmp_path):
    """In a cgroup v2 and a v1 (pids) cgroup of its own: back in both, its
    threads too (the state check compares /proc/PID/cgroup)."""
    name = f"procsnap-test-{os.getpid()}-restored"
    with made_cgroup(V2, name) as v2, made_cgroup(V1_PIDS, name) as v1:
        t = procs.start_case(CASES_BY_ID["threads"], "pie")
        move(t.pid, v2)
        move(t.pid, v1)
        assert f"::/{name}" in cgroup_of(t.pid) and f"pids:/{name}" in cgroup_of(t.pid)
        images = dump_kill(t, tmp_path / "img")
        restore(procs, t, images)
        assert f"::/{name}" in cgroup_of(t.pid) and f"pids:/{name}" in cgroup_of(t.pid)
        assert_pass(t)


def test_cgroup_gone_refused(procs, tmp_path):
    """The saved cgroup removed before the restore: refused by name, no
    process made."""
    name = f"procsnap-test-{os.getpid()}-gone"
    with made_cgroup(V2, name) as v2:
        t = procs.start_case(CASES_BY_ID["sleep-pause"], "pie")
        move(t.pid, v2)
        images = dump_kill(t, tmp_path / "img")
    assert not v2.exists()
    with pytest.raises(RestoreError) as exc:
        procsnap.restore(str(images))
    assert f"cgroup cgroup2:/{name} is gone" in str(exc.value), exc.value
    assert exc.value.pid == t.pid
    assert not os.path.exists(f"/proc/{t.pid}")
    assert f"cgroup2:/{name} is gone" in " ".join(procsnap.verify(str(images)))


def test_thread_in_another_cgroup_refused(procs, tmp_path):
    """A thread moved alone into a v1 cgroup: refused naming the thread and
    both cgroups; the process runs on untouched."""
    name = f"procsnap-test-{os.getpid()}-thread"
    with made_cgroup(V1_PIDS, name) as v1:
        t = procs.start_case(CASES_BY_ID["threads"], "pie")
        tid = max(int(x) for x in os.listdir(f"/proc/{t.pid}/task"))
        (v1 / "tasks").write_text(str(tid))
        assert_refused_untouched(t, tmp_path, f"pid {t.pid}", f"thread {tid}", f"pids:/{name}", "its process: /")



# fd owners

OWNER_OUTSIDE = textwrap.dedent("""\
    import fcntl, os, signal
    r, w = os.pipe()
    fcntl.fcntl(r, fcntl.F_SETOWN, os.getppid())
    signal.signal(signal.SIGUSR1, lambda *a: None)
    os.write(1, f"READY\\n{r}\\n".encode())
    signal.pause()
    ok = fcntl.fcntl(r, fcntl.F_GETOWN) == os.getppid()
    os.write(1, b"PASS\\n" if ok else b"FAIL owner\\n")
    """)


def test_fd_owner_outside_the_tree_refused(procs, tmp_path):
    """F_SETOWN to a process outside the tree (the test): refused at dump
    naming the fd and the owner; the target runs on untouched."""
    t = procs.start([sys.executable, "-c", OWNER_OUTSIDE], name="owner")
    fd = t.output().split()[1]
    assert_refused_untouched(t, tmp_path, f"pid {t.pid}", f"fd {fd}", f"owner pid {os.getpid()}",
                             "outside the dumped tree")
