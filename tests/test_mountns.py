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
import shutil
import subprocess
from pathlib import Path

import pytest

import procsnap
from procsnap import nsworker
from procsnap.errors import ProcsnapError, RestoreError

from conftest import assert_pass, assert_same_snapshot, wait_until
from test_namespaces import (assert_copies_pass, copies_killed, dump_container, init_of, inside_snapshot,
                             restore_container)

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


def test_ten_copies_each_with_its_own_tmpfs(procs, box, tmp_path):
    """One image restored ten times at once: each copy has a mount
    namespace and a tmpfs of its own (a file written into one copy's is
    not in another's), and each copy's self-check passes."""
    t, init = start_box(procs, box)
    before = dump_container(t, init, tmp_path / "img")
    pids = procsnap.restore_copies(str(tmp_path / "img"), 10)
    point = f"{box[0]}/t"
    with copies_killed(pids):
        assert len({os.readlink(f"/proc/{p}/ns/mnt") for p in pids}) == 10
        devs = {line.split()[2] for p in pids for line in open(f"/proc/{p}/mountinfo") if line.split()[4] == point}
        assert len(devs) == 10, devs
        subprocess.run(["nsenter", "-t", str(pids[0]), "-m", "sh", "-c", f"echo one > {point}/only-in-0"], check=True)
        assert os.path.exists(f"/proc/{pids[0]}/root{point}/only-in-0")
        assert not any(os.path.exists(f"/proc/{p}/root{point}/only-in-0") for p in pids[1:])
        subprocess.run(["nsenter", "-t", str(pids[0]), "-m", "rm", f"{point}/only-in-0"], check=True)
        assert_copies_pass(t, before, pids)


def start_shell(procs, script):
    """A shell as the container's init: `script` sets up its mounts, then it
    sleeps (its mount table as the script left it)."""
    head, sep, sleeper = script.rpartition(" && exec /")  # its own sleeper (a static one, in a root of its own)
    script = f"{head} && echo READY && exec /{sleeper}" if sep else f"{script} && echo READY && exec sleep 1000"
    t = procs.start([*UNSHARE, "sh", "-c", script], name="mntsh")
    init = init_of(t)
    wait_until(lambda: Path(f"/proc/{init}/comm").read_text().startswith("sleep"), "the init's sleep")
    return t, init


def assert_refused(t, init, images, match, **options):
    """dump refused with `match` in its words; nothing written, the tree running on, not traced."""
    with pytest.raises(ProcsnapError, match=match) as exc:
        procsnap.dump(init, str(images), **options)
    assert "Traceback" not in str(exc.value)
    assert not (images / "procsnap.img").exists()
    status = Path(f"/proc/{init}/status").read_text()
    assert "\nState:\tS" in status and "\nTracerPid:\t0\n" in status, status
    t.kill_and_reap()


@pytest.mark.parametrize("script, match", [
    ("mount -t ramfs rammed {d}/t", r"ramfs mount at {d}/t .*file system type ramfs made inside"),
    ("mount -t tmpfs one {d}/t && mount -t tmpfs two {d}/t", r"tmpfs mount at {d}/t: overmounts the tmpfs"),
    ("mount -t tmpfs one {d}/t && mkdir {d}/t/x && mount --bind {d}/t/x {d}/b",
     r"at {d}/b: a bind mount of /x of a tmpfs made inside"),
    ("mount -t tmpfs one {d}/t && mount --bind {d}/t {d}/b", r"at {d}/b: a bind mount of / of a tmpfs made inside"),
    ("mount -t tmpfs one {d}/t && mount --make-shared {d}/t && mount --bind {d}/t {d}/b && mount --make-slave {d}/b",
     r"tmpfs mount at {d}/b: a slave of peer group \d+"),
    ("mount -t tmpfs one {d}/t && echo a > {d}/t/a && ln {d}/t/a {d}/t/b", r"{d}/t/a: a file with 2 hard links"),
    ("mount -t tmpfs one {d}/t && mknod {d}/t/null c 1 3", r"{d}/t/null: a device node"),
    ("mount -t tmpfs one {d}/t && mkfifo {d}/t/fifo", r"{d}/t/fifo: a fifo"),
    ("exec 3</proc/1/status", r"fd 3: /proc/1/status is a file of the container's own procfs"),
    ("mount -t tmpfs root {d}/t && mkdir {d}/t/old && cd {d}/t && pivot_root . old && cd / && "
     "exec /old{sleep} pause", r"tmpfs mount at / .*is the container's root and not the host's"),
    ("mount --bind {d} {d} && cd {d} && mkdir old && pivot_root . old && cd / && exec /old{sleep} pause",
     r"mount at /old: a host mount kept under the container's own root"),
], ids=["ramfs", "overmount", "bind-of-tmpfs", "bind-of-tmpfs-root", "slave", "hard-link", "device-node", "fifo",
        "own-proc-file", "pivot-root-tmpfs", "pivot-root-old-kept"])
def test_refused_by_name(script, match, procs, box, tmp_path):
    """What the mount namespace restore does not make again is refused at
    dump, named (type, mount point, path), the container left running."""
    d = box[0]
    t, init = start_shell(procs, script.format(d=d, sleep=procs._targets.path("sleep", "static")))
    assert_refused(t, init, tmp_path / "img", match.format(d=d))


def test_external_mnt_without_mount_namespace_refused(procs, tmp_path):
    """--external mnt[] for a container that shares the host's mount namespace: refused by name."""
    t = procs.start(["unshare", "--fork", "--pid", "--uts", "--ipc", "sh", "-c", "echo READY && exec sleep 1000"],
                    name="nomnt")
    init = init_of(t)
    wait_until(lambda: Path(f"/proc/{init}/comm").read_text().strip() == "sleep", "the init's sleep")
    assert_refused(t, init, tmp_path / "img", r"--external mnt\[/data\]: .*no mount namespace of its own",
                   external={"mnt": {"/data": "data"}})


def test_root_given_again(procs, tmp_path):
    """A container that pivot_root(2)ed into a directory tree the test made
    (its static binary in it, a host directory bound read-only inside, a
    tmpfs and a procfs of its own): dumped, restored with --root DIR (the
    API's root=), checked by the target and the state check. Without
    --root the restore is refused by name, before any process is made."""
    rootfs, src = tmp_path / "rootfs", tmp_path / "src"
    for sub in ("t", "b", "proc"):
        (rootfs / sub).mkdir(parents=True)
    src.mkdir()
    (src / "hostfile").write_text("from the host\n")
    shutil.copy(procs._targets.path("mntns", "static"), rootfs / "mntns")
    t = procs.start([*UNSHARE, str(rootfs / "mntns"), "root", str(rootfs), str(src)], name="mntroot")
    init = init_of(t)
    before = dump_container(t, init, tmp_path / "img")
    assert "- ext4 " in before.state[1]["ns.mnt.mount / [0]"] and str(rootfs) in before.state[1]["ns.mnt.mount / [0]"]
    with pytest.raises(RestoreError, match=r"root was the host directory .*rootfs .*--root DIR"):
        procsnap.restore(str(tmp_path / "img"))
    pid = procsnap.restore(str(tmp_path / "img"), root=str(rootfs))
    t.adopt(pid)
    assert_same_snapshot(before, inside_snapshot(pid))
    assert_pass(t)


def test_external_bind_mount(procs, box, tmp_path):
    """dump --external mnt[DIR/b]:data (the CLI), restore with
    mnt[data]:PATH: the read-only bind mount is bound again from PATH,
    another directory than the one it was bound from (the one mount line
    the state check sees differ: its root); the target's checks pass on
    it. Restoring without it is refused by name."""
    from conftest import cli

    d, src = box
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "hostfile").write_text("from the host\n")
    t, init = start_box(procs, box)
    before = inside_snapshot(init)
    r = cli("dump", "-t", str(init), "-D", str(tmp_path / "img"), "--external", f"mnt[{d}/b]:data")
    assert r.returncode == 0, r.stderr
    t.wait_exit()
    r = cli("restore", "-D", str(tmp_path / "img"), "-d")
    assert r.returncode != 0 and "--external mnt[data]:PATH" in r.stderr and "Traceback" not in r.stderr, r.stderr
    pid = procsnap.restore(str(tmp_path / "img"), external={"mnt": {"data": str(other)}})
    t.adopt(pid)
    key = f"ns.mnt.mount {d}/b [0]"
    after = inside_snapshot(pid)
    assert f" {other} " in after.state[1][key] and f" {src} " in before.state[1][key], after.state[1][key]
    assert_same_snapshot(before, after, ignore_state=(key,))
    assert_pass(t)


@pytest.mark.parametrize("edit, found", [
    (lambda m: m["files"][1].update(path="../../escape"), "entry '../../escape'"),
    (lambda m: m.update(super_options="rw,size=1m,context=x"), "options 'rw,size=1m,context=x' beyond"),
    (lambda m: m["files"][1].update(size=1), "extents .* beyond its size 1"),
], ids=["path", "tmpfs-option", "extent"])
def test_corrupt_mount_record(edit, found, procs, box, tmp_path):
    """A mount record restore cannot trust is ImageCorrupt, naming it, before anything is mounted or made."""
    from conftest import our_children, rewrite_records
    from procsnap.errors import ImageCorrupt

    t, init = start_box(procs, box)
    dump_container(t, init, tmp_path / "img")

    def change(records):
        for tag, payload in records:
            if tag == b"NSPC":
                edit(next(m for m in payload["mounts"] if m["point"] == f"{box[0]}/t"))  # (a host tmpfs gone
                # since the container's unshare is one of its own too, with what it held)
    rewrite_records(tmp_path / "img", change)
    mine = set(our_children())
    with pytest.raises(ImageCorrupt, match=found):
        procsnap.restore(str(tmp_path / "img"))
    assert set(our_children()) <= mine


def test_bind_source_missing_at_restore(procs, box, tmp_path):
    """The host directory a bind mount came from is gone at restore: a
    RestoreError naming the mount and the path, and nothing left running."""
    from conftest import our_children

    d, src = box
    t, init = start_box(procs, box)
    dump_container(t, init, tmp_path / "img")
    src.rename(tmp_path / "moved")
    mine = set(our_children())
    with pytest.raises(RestoreError, match=f"the bind mount at {d}/b: its source {src} is missing"):
        procsnap.restore(str(tmp_path / "img"))
    assert set(our_children()) <= mine
