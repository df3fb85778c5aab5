"""Containers with a mount namespace of their own (issue 15): `unshare
--fork --pid --mount --mount-proc --uts --ipc` around tests/targets/mntns.c,
which mounts a tmpfs and fills it, binds a host directory read-only,
unmounts a host mount, and holds files of both open. Dumped, killed and
restored: the target checks its files, fds and mount table itself; the
state check (from inside, test_namespaces.inside_snapshot) compares the
container's mountinfo, normalized, and each of its tmpfs's contents
(statecheck._own_namespaces). What is not made again is refused by name,
the tree left running.
"""

import contextlib
import os
import signal
import subprocess

import pytest

import procsnap
from procsnap import nsworker
from procsnap.errors import ProcsnapError, RestoreError, Unsupported

from conftest import assert_pass, assert_same_snapshot
from test_namespaces import dump_container, init_of, inside_snapshot, restore_container

UNSHARE = ["unshare", "--fork", "--pid", "--mount", "--mount-proc", "--uts", "--ipc"]


@pytest.fixture
def box(tmp_path):
    """DIR (t/, b/, and u/ with a tmpfs mounted in the host, unmounted by the
    container) and SRC (hostfile), the target's arguments; the host's mount
    is taken down at the end, also on failure."""
    d, src = tmp_path / "box", tmp_path / "src"
    for sub in ("t", "b", "u"):
        (d / sub).mkdir(parents=True)
    src.mkdir()
    (src / "hostfile").write_text("from the host\n")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "hostonly", str(d / "u")], check=True)
    try:
        yield d, src
    finally:
        subprocess.run(["umount", "-l", str(d / "u")], check=False)


def start_box(procs, box, env=None, unshare=UNSHARE):
    d, src = box
    t = procs.start([*unshare, procs._targets.path("mntns", "pie"), "box", str(d), str(src)], name="mntns", env=env)
    return t, init_of(t)


def test_mount_namespace_restored(procs, box, tmp_path):
    """The tmpfs with its files (sparse, held open at a position, a dir with
    another owner, a symlink, times), the read-only bind mount, the host
    mount unmounted inside and the container's own /proc: all back, checked
    by the target and by the state check."""
    t, init = start_box(procs, box)
    before = dump_container(t, init, tmp_path / "img")
    d = box[0]
    assert "- tmpfs boxfs" in before.state[1][f"ns.mnt.mount {d}/t [0]"]
    assert "allocated 4096 " in before.state[1][f"ns.mnt.tmpfs {d}/t/sparse"]
    restore_container(t, tmp_path / "img", before)
    assert_pass(t)


def test_mount_target_sabotaged_fails(procs, box):
    """The target's own check can fail: a byte of its tmpfs file changed after READY is seen."""
    t, init = start_box(procs, box, env={"PS_TARGET_SABOTAGE": "1"})
    os.kill(init, signal.SIGUSR1)
    status, out = t.wait_exit()
    assert status != 0 and "FAIL: data contents" in out, out


@pytest.mark.parametrize("change, word", [
    (["umount", "-l", "{d}/b"], "ns.mnt.mount"),
    (["sh", "-c", "echo more >> {d}/t/sub/inner"], "ns.mnt.tmpfs"),
    (["truncate", "-s", "4M", "{d}/t/sparse"], "ns.mnt.tmpfs"),
    (["mount", "--make-private", "{d}/t"], "ns.mnt.mount"),
], ids=["mount-lost", "file-changed", "sparse-filled", "propagation"])
def test_state_check_sees_lost_mount_state(change, word, procs, box):
    """The state check compares the mount table and the tmpfs contents:
    changed behind the tree's back between two snapshots, it is a difference."""
    t, init = start_box(procs, box)
    before = inside_snapshot(init)
    argv = [a.format(d=box[0]) for a in change]
    subprocess.run(["nsenter", "-t", str(init), "-m", "-p", *argv], check=True)  # -p: its /proc/self
    with pytest.raises(AssertionError, match=word):
        assert_same_snapshot(before, inside_snapshot(init))
    t.kill_and_reap()
