"""The objects of a container's IPC namespace (objects/ipcns.py): SysV
message queues with their messages, semaphore sets with their values,
segments no process attaches with their contents, POSIX message queues
with their attributes and messages, and the mq fds a process holds, made
again at their ids and names in the restored container's new IPC
namespace; the target (tests/targets/ipcns.c) checks them itself, and the
state check compares them from inside (statecheck: ns.ipc.objects).
What cannot be made again is refused by name, the container left running."""

import os
import signal
import subprocess
from pathlib import Path

import pytest

import procsnap
from procsnap.errors import Unsupported

from conftest import assert_pass, assert_running_untraced, assert_same_snapshot, cli
from test_namespaces import dump_container, fail_then_restore, init_of, inside_snapshot, restore_container

UNSHARE = ["unshare", "--fork", "--pid", "--uts", "--ipc"]


def start_ipcns(procs, mode, env=None):
    binary = procs._targets.path("ipcns", "pie")
    t = procs.start([*UNSHARE, binary, mode], name=f"ipcns-{mode}", env=env)
    return t, init_of(t)


def ipcs(init):
    """What ipcs shows inside the container (ids, keys, owners, modes, counts)."""
    return subprocess.run(["nsenter", "-t", str(init), "--ipc", "ipcs", "-a"], capture_output=True, text=True,
                          check=True).stdout


def test_ipc_objects_restored(procs, tmp_path):
    """Every kind with contents, at its id: checked by the target after the
    restore, by the state check (message contents, semaphore values,
    segment bytes, queue attributes), and by ipcs."""
    t, init = start_ipcns(procs, "objects")
    shown = ipcs(init)
    before = dump_container(t, init, tmp_path / "img")
    r = cli("show", tmp_path / "img")
    assert "ipc objects: 2 SysV message queues, 1 semaphore set, 1 unattached segment, 1 POSIX message queue; " \
        "7 messages in them" in r.stdout, r.stdout
    pid = restore_container(t, tmp_path / "img", before)
    assert ipcs(pid) == shown
    assert_pass(t)


def test_ipc_objects_sabotaged_fails(procs, tmp_path):
    """The target's check can fail: a message taken after READY is missed."""
    t, init = start_ipcns(procs, "objects", env={"PS_TARGET_SABOTAGE": "1"})
    os.kill(init, signal.SIGUSR1)
    status, out = t.wait_exit()
    assert status != 0 and "FAIL: Q:" in out, out


def test_state_check_sees_lost_contents(procs, tmp_path):
    """The state check compares contents the kernel shows only by reading
    them: a SysV message changed (its queue's counts the same), a
    semaphore moved behind the tree's back are each a difference."""
    t, init = start_ipcns(procs, "objects")
    before = inside_snapshot(init)
    nsipc = ["nsenter", "-t", str(init), "--ipc", "python3", "-c"]
    swap = ("import ctypes; l = ctypes.CDLL(None); b = ctypes.create_string_buffer(600); "
            "q = l.msgget(0x15a1, 0); assert l.msgrcv(q, b, 512, 7, 0o4000) == 300; "
            "b[8] = b[8][0] ^ 1; assert l.msgsnd(q, b, 300, 0o4000) == 0")  # same count and bytes, not the same
    subprocess.run([*nsipc, swap], check=True)
    with pytest.raises(AssertionError, match=r"ns\.ipc\.objects"):
        assert_same_snapshot(before, inside_snapshot(init))
    before = inside_snapshot(init)
    sem = ("import ctypes; l = ctypes.CDLL(None); s = l.semget(0x15a2, 0, 0); "
           "assert l.semctl(s, 1, 16, ctypes.c_int(3)) == 0")  # SETVAL
    subprocess.run([*nsipc, sem], check=True)
    with pytest.raises(AssertionError, match=r"ns\.ipc\.objects"):
        assert_same_snapshot(before, inside_snapshot(init))
    t.kill_and_reap()


@pytest.mark.parametrize("mode, found", [
    ("notify", r"POSIX message queue /psq: pid 1 \(of the namespace\) is registered for its notification"),
    ("undo", r"pid 1: holds a SysV semaphore undo list \(semop SEM_UNDO\)"),
])
def test_refused_by_name(mode, found, procs, tmp_path):
    """An mq_notify registration and a semaphore undo list are refused by
    name; the container runs on and passes its check."""
    t, init = start_ipcns(procs, mode)
    with pytest.raises(Unsupported, match=found):
        procsnap.dump(init, str(tmp_path / "img"))
    assert not (tmp_path / "img" / "procsnap.img").exists()
    os.kill(init, signal.SIGUSR1)
    status, out = t.wait_exit()
    assert status == 0 and "PASS\n" in out, out


@pytest.mark.parametrize("stage", ["mid-mqueue-copy", "before-commit"])
def test_failed_dump_puts_messages_back(stage, procs, tmp_path, monkeypatch):
    """A dump that fails while the POSIX queue's messages are taken out
    (or later) leaves every queue as it was: the state check from inside,
    and the target's own check of its messages and their order."""
    from procsnap.faults import InjectedFault

    t, init = start_ipcns(procs, "objects")
    before = inside_snapshot(init)
    monkeypatch.setenv("PROCSNAP_FAULT", stage)
    with pytest.raises(InjectedFault):
        procsnap.dump(init, str(tmp_path / "img"))
    monkeypatch.delenv("PROCSNAP_FAULT")
    assert_same_snapshot(before, inside_snapshot(init))
    os.kill(init, signal.SIGUSR1)
    status, out = t.wait_exit()
    assert status == 0 and "PASS\n" in out, out


def test_failed_restore_then_restored(procs, tmp_path, monkeypatch):
    """A restore that fails after the objects are made leaves no process
    (the new IPC namespace goes with it); the image restores afterwards."""
    t, init = start_ipcns(procs, "objects")
    fail_then_restore(t, init, tmp_path / "img", "after-spawn", monkeypatch)


def test_mq_fd_outside_a_container_refused(procs, tmp_path):
    """An mq fd of a tree in procsnap's own IPC namespace: refused by name."""
    script = ("import ctypes, os, signal; l = ctypes.CDLL(None); "
              "fd = l.mq_open(b'/psq-host-test', 0o102, 0o600, None); assert fd >= 0; l.mq_unlink(b'/psq-host-test'); "
              "print('READY', flush=True); signal.pause()")
    t = procs.start(["python3", "-c", script], name="mqhost")
    init = t.pid
    with pytest.raises(Unsupported, match=r"fd \d+ is POSIX message queue /psq-host-test"):
        procsnap.dump(init, str(tmp_path / "img"))
    assert_running_untraced(init)  # thawed: sleeping, or still on its way back into pause()
    t.kill_and_reap()
