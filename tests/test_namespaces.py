"""Containers (issue 15): a tree whose root is the init of a pid namespace
of its own, made by `unshare --fork --pid --uts --ipc [--time]` around the
container target (tests/targets/container.c) or a shell with children, is
dumped with the namespace's pids, killed and restored into new namespaces:
inside, every process has its old pid, the hostname, domainname, ipc
sysctls and clock offsets are the namespace's. The state check runs on both
sides from inside the namespace (nsworker.run_inside), so that it compares
the namespace's pids, and it compares the namespace's own state too
(statecheck._own_namespaces). Namespaces not restored are refused by name,
the tree left running.
"""

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

import procsnap
from procsnap import nsworker
from procsnap.errors import Unsupported

from conftest import (CASES_BY_ID, assert_pass, assert_same_snapshot, descendants, our_children, proc_snapshot,
                      reap_gone, wait_until)

UNSHARE = ["unshare", "--fork", "--pid", "--uts", "--ipc"]
TIME = ["--time", "--monotonic", "86400000", "--boottime", "172800000"]  # 1000 and 2000 days


def init_of(t):
    """The host pid of the namespace's init: unshare's child."""
    wait_until(lambda: Path(f"/proc/{t.pid}/task/{t.pid}/children").read_text().split(), "unshare's child")
    return int(Path(f"/proc/{t.pid}/task/{t.pid}/children").read_text().split()[0])


def inside_snapshot(host_pid):
    """proc_snapshot of the tree from inside its pid namespace: its pids."""
    return nsworker.run_inside(host_pid, lambda: proc_snapshot(1))


def start_container(procs, extra=(), env=None):
    binary = procs._targets.path("container", "pie")
    t = procs.start([*UNSHARE, *extra, binary, "init"], name="container", env=env)
    return t, init_of(t)


def dump_container(t, init, images):
    """Dump the container (its init, by its host pid) in kill mode; returns
    the snapshot taken from inside before."""
    others = descendants(init)
    before = inside_snapshot(init)
    procsnap.dump(init, str(images))
    t.wait_exit()  # unshare, its child killed
    reap_gone([init, *others])
    return before


def restore_container(t, images, before):
    """Restore; t follows the new init (our child); the state check from inside."""
    pid = procsnap.restore(str(images))
    t.adopt(pid)
    assert nsworker.ns_pids(pid)[-1] == 1, f"restored init {pid}: NSpid {nsworker.ns_pids(pid)}"
    assert int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1]) == os.getpid()
    assert_same_snapshot(before, inside_snapshot(pid))
    return pid


@pytest.mark.parametrize("extra", [(), TIME, ("--cgroup",)], ids=["pid-uts-ipc", "pid-uts-ipc-time", "cgroup"])
def test_container_restored(extra, procs, tmp_path):
    """The container target: pids 1, its children and grandchild, the
    hostname, domainname, kernel.msgmax, (time) the clock offsets and
    (cgroup) the cgroups as its own cgroup namespace shows them,
    checked by the target itself after the restore."""
    t, init = start_container(procs, extra)
    before = dump_container(t, init, tmp_path / "img")
    assert sorted(before.tree) == [1, 2, 3, 4], sorted(before.tree)  # the init, C1, C2 and G
    pid = restore_container(t, tmp_path / "img", before)
    assert pid != 1
    assert_pass(t)


def test_container_sabotaged_fails(procs, tmp_path):
    """The target's own check can fail: a hostname changed after READY is seen."""
    t, init = start_container(procs, env={"PS_TARGET_SABOTAGE": "1"})
    os.kill(init, signal.SIGUSR1)
    status, out = t.wait_exit()
    assert status != 0 and "FAIL: hostname" in out, out


def test_state_check_sees_a_lost_hostname(procs, tmp_path):
    """The state check compares the namespace's own hostname: changed
    behind the tree's back between two snapshots, it is a difference."""
    t, init = start_container(procs)
    before = inside_snapshot(init)
    subprocess.run(["nsenter", "-t", str(init), "-u", "hostname", "elsewhere"], check=True)
    with pytest.raises(AssertionError, match="hostname"):
        assert_same_snapshot(before, inside_snapshot(init))


def test_shell_with_children(procs, tmp_path):
    """A shell as the init, with a pipeline and a python3 child, in its own
    pid, UTS and IPC namespaces: every pid the same inside after restore."""
    script = ("hostname shellbox; sleep 1000 | cat & python3 -c 'import time; print(\"READY\", flush=True); "
              "time.sleep(1000)' & wait")
    t = procs.start([*UNSHARE, "sh", "-c", script], name="shell")
    init = init_of(t)
    def settled():  # every process past its exec, waiting
        procs_in = [init, *descendants(init)]
        return len(procs_in) == 4 and all(Path(f"/proc/{p}/syscall").read_text().split()[0] in ("61", "130", "230", "0")
                                          for p in procs_in)
    wait_until(settled, "the shell's children waiting")
    before = dump_container(t, init, tmp_path / "img")
    pid = restore_container(t, tmp_path / "img", before)
    host = subprocess.run(["nsenter", "-t", str(pid), "-u", "hostname"], capture_output=True, text=True).stdout
    assert host.strip() == "shellbox"
    kids = sorted(nsworker.ns_pids(k)[-1] for k in descendants(pid))
    assert kids == sorted(p for p in before.tree if p != 1)
    t.kill_and_reap()


UNPRIVILEGED = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]  # nobody


@pytest.mark.parametrize("user, unshare, names", [
    ([], ["--fork", "--pid", "--user", "--map-root-user"], ["user:["]),
    (UNPRIVILEGED, ["--fork", "--pid", "--user", "--map-root-user"], ["user:["]),
], ids=["user", "user-by-nobody"])  # mount namespaces: test_mountns.py; network: test_netns.py; cgroup: test_container_restored
def test_not_restored_refused_by_name(user, unshare, names, procs, tmp_path):
    """A container's namespaces procsnap does not make again are refused,
    naming them, and the tree runs on (the target checks itself): a user
    namespace, also one an unprivileged user made."""
    binary = procs._targets.path("container", "pie")
    if user:  # the target where nobody may run it (the fixtures' directories are root's alone)
        import shutil
        import tempfile

        where = tempfile.mkdtemp(prefix="procsnap-nobody-")
        os.chmod(where, 0o755)
        binary = shutil.copy(binary, where)
    try:
        t = procs.start([*user, "unshare", *unshare, "--uts", "--ipc", binary, "init"], name="container")
        _refused_running(t, names, tmp_path)
    finally:
        if user:
            shutil.rmtree(where)


def _refused_running(t, names, tmp_path):
    init = init_of(t)
    with pytest.raises(Unsupported) as exc:
        procsnap.dump(init, str(tmp_path / "img"))
    for name in names:
        assert name in str(exc.value), (name, str(exc.value))
    assert "refused" in str(exc.value)
    assert not (tmp_path / "img" / "procsnap.img").exists()
    os.kill(init, signal.SIGUSR1)
    status, out = t.wait_exit()
    assert status == 0 and "PASS\n" in out, out


def test_nested_and_non_init_refused(procs, tmp_path):
    """A process of a pid namespace that is not its init, and a tree with a
    nested pid namespace, are refused by name; both run on."""
    t = procs.start(["unshare", "--fork", "--pid", "sh", "-c",
                     "unshare --fork --pid sleep 1000 & sleep 1000 & echo READY; wait"], name="nested")
    init = init_of(t)
    wait_until(lambda: len(descendants(init)) == 3, "the nested namespace's sleep")
    sleeper = next(p for p in descendants(init) if Path(f"/proc/{p}/comm").read_text().strip() == "sleep"
                   and len(nsworker.ns_pids(p)) == 2)
    with pytest.raises(Unsupported, match=rf"pid {sleeper}: is pid \d+ of pid namespace pid:\[\d+\], not its init"):
        procsnap.dump(sleeper, str(tmp_path / "img"))
    with pytest.raises(Unsupported, match=r"pid \d+: lives in namespaces other than procsnap's: pid:\[\d+\]") as exc:
        procsnap.dump(init, str(tmp_path / "img"))
    assert "nested pid namespaces" in str(exc.value)
    deep = next(p for p in descendants(init) if len(nsworker.ns_pids(p)) == 3)
    with pytest.raises(Unsupported, match=rf"pid {deep}: the init of pid namespace .* nested 2 levels"):
        procsnap.dump(deep, str(tmp_path / "img"))
    assert all(Path(f"/proc/{p}/stat").read_text().split()[2] == "S" for p in [init, *descendants(init)])
    t.kill_and_reap()


def run_to_exit(pid, timeout=30.0):
    """SIGUSR1 to our child `pid` until it exits (re-sent: the flag test races pause()); its status."""
    deadline = time.monotonic() + timeout
    while True:
        got, status = os.waitpid(pid, os.WNOHANG)
        if got == pid:
            return status
        assert time.monotonic() < deadline, f"copy {pid}: no exit {timeout} s after SIGUSR1"
        os.kill(pid, signal.SIGUSR1)
        time.sleep(0.05)


def test_ten_copies(procs, tmp_path):
    """One image restored ten times at once, each copy in namespaces of its
    own with the same pids inside: all ten run side by side, and each one's
    self-check passes (its exit status; they share one output file)."""
    t, init = start_container(procs)
    before = dump_container(t, init, tmp_path / "img")
    pids = procsnap.restore_copies(str(tmp_path / "img"), 10)
    with copies_killed(pids):
        assert len(set(pids)) == 10
        assert len({os.readlink(f"/proc/{p}/ns/pid") for p in pids}) == 10
        assert len({os.readlink(f"/proc/{p}/ns/uts") for p in pids}) == 10
        for p in pids:  # all at once: every copy's tree is there, with the image's pids inside
            assert sorted(nsworker.ns_pids(k)[-1] for k in [p, *descendants(p)]) == sorted(before.tree)
        assert_copies_pass(t, before, pids)


@contextlib.contextmanager
def copies_killed(pids):
    """Every copy killed and reaped at the end, whatever happens."""
    try:
        yield
    finally:
        for p in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(p, 0)


def assert_copies_pass(t, before, pids):
    """The state check of the last copy, then every copy run to its exit:
    each passes its self-check (they share t's output file)."""
    assert_same_snapshot(before, inside_snapshot(pids[-1]))
    statuses = [run_to_exit(p) for p in pids]
    assert statuses == [0] * len(pids), statuses
    assert "PASS\n" in t.output() and "FAIL" not in t.output(), t.output()


def test_copies_of_a_host_tree_refused(procs, tmp_path):
    """--copies of a tree in the host's pid namespace: refused (its pids can
    be taken once), nothing restored."""
    from conftest import cli, dump_kill

    t = procs.start_case(CASES_BY_ID["memory"], "pie")
    dump_kill(t, tmp_path / "img")
    r = cli("restore", "-D", str(tmp_path / "img"), "--copies", "2", "-d")
    assert r.returncode != 0 and "--copies 2" in r.stderr and "pid namespace" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not os.path.exists(f"/proc/{t.pid}")


def test_copies_cli(procs, tmp_path):
    """`procsnap restore -D DIR --copies 3 -d` prints the three roots' pids."""
    from conftest import cli

    t, init = start_container(procs)
    dump_container(t, init, tmp_path / "img")
    r = cli("restore", "-D", str(tmp_path / "img"), "--copies", "3", "-d")
    assert r.returncode == 0, r.stderr
    pids = [int(x) for x in r.stdout.split()]
    try:
        assert len(pids) == 3 and all(nsworker.ns_pids(p)[-1] == 1 for p in pids), r.stdout
    finally:
        for p in pids:  # the CLI's children, orphaned to us (the subreaper)
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        reap_gone(pids)


MQ_OPEN = "python3 -c \"import ctypes; ctypes.CDLL(None).mq_open(b'/psq', 0o102, 0o600, None)\""


@pytest.mark.parametrize("make", ["ipcmk -Q", "ipcmk -S 2", "ipcmk -M 4096", MQ_OPEN],
                         ids=["msg", "sem", "shm-unattached", "mqueue"])
def test_ipc_objects_of_programs_restored(make, procs, tmp_path):
    """IPC objects a program made in the container's IPC namespace and no
    process holds (ipcmk's, a queue mq_open made) are made again there, at
    their ids (ipcs shows the same; the state check compares them)."""
    t = procs.start([*UNSHARE, "sh", "-c", f"{make} >/dev/null && echo READY && exec sleep 1000"], name="ipc")
    init = init_of(t)
    wait_until(lambda: Path(f"/proc/{init}/comm").read_text().strip() == "sleep", "the init's sleep")
    shown = subprocess.run(["nsenter", "-t", str(init), "--ipc", "ipcs", "-a"], capture_output=True, text=True).stdout
    before = dump_container(t, init, tmp_path / "img")
    pid = restore_container(t, tmp_path / "img", before)
    again = subprocess.run(["nsenter", "-t", str(pid), "--ipc", "ipcs", "-a"], capture_output=True, text=True).stdout
    assert again == shown
    t.kill_and_reap()


@pytest.mark.parametrize("stage", ["after-spawn", "before-registers", "before-detach"])
def test_failed_restore_leaves_nothing(stage, procs, tmp_path, monkeypatch):
    """A restore that fails inside the namespace's worker raises the error
    (no hang: the init cannot be killed from inside, it is killed from
    outside) and leaves no process; the image restores afterwards."""
    t, init = start_container(procs)
    fail_then_restore(t, init, tmp_path / "img", stage, monkeypatch)


def fail_then_restore(t, init, images, stage, monkeypatch):
    """Dump the container; a restore failing at `stage` leaves no process
    of ours; then the image restores and the target passes its check."""
    from procsnap.faults import InjectedFault

    before = dump_container(t, init, images)
    mine = set(our_children())
    monkeypatch.setenv("PROCSNAP_FAULT", stage)
    with pytest.raises(InjectedFault):
        procsnap.restore(str(images))
    monkeypatch.delenv("PROCSNAP_FAULT")
    assert set(our_children()) <= mine
    restore_container(t, images, before)
    assert_pass(t)


@pytest.mark.parametrize("stage", ["after-freeze", "before-commit"])
def test_failed_dump_leaves_it_running(stage, procs, tmp_path, monkeypatch):
    """A dump that fails inside the namespace's worker leaves the container
    running untouched (state check from inside) and passing its check."""
    from procsnap.faults import InjectedFault

    t, init = start_container(procs)
    before = inside_snapshot(init)
    monkeypatch.setenv("PROCSNAP_FAULT", stage)
    with pytest.raises(InjectedFault):
        procsnap.dump(init, str(tmp_path / "img"))
    monkeypatch.delenv("PROCSNAP_FAULT")
    assert not (tmp_path / "img" / "procsnap.img").exists()
    assert_same_snapshot(before, inside_snapshot(init))
    os.kill(init, signal.SIGUSR1)
    status, out = t.wait_exit()
    assert status == 0 and "PASS\n" in out, out


def test_leave_running_then_a_copy_beside_it(procs, tmp_path):
    """dump -R of a running container, then a restore while it runs: the
    copy, in namespaces of its own, has the same pids inside as the
    original, which runs on; both pass their checks."""
    t, init = start_container(procs)
    before = inside_snapshot(init)
    procsnap.dump(init, str(tmp_path / "img"), leave_running=True)
    assert_same_snapshot(before, inside_snapshot(init))
    copy = procsnap.restore(str(tmp_path / "img"))
    try:
        assert_same_snapshot(before, inside_snapshot(copy))
        status = run_to_exit(copy)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(copy, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(copy, 0)
    assert status == 0, status
    os.kill(init, signal.SIGUSR1)
    code, out = t.wait_exit()
    assert code == 0 and "PASS\n" in out and "FAIL" not in out, out  # (the copy wrote to the same file)


@pytest.mark.parametrize("edit, found", [
    (lambda ns: ns.update(own=["uts"]), "only pid, uts, ipc, time, mnt, net and cgroup"),
    (lambda ns: ns.update(own=["pid", "user"]), "only pid, uts, ipc, time, mnt, net and cgroup"),
    (lambda ns: ns.update(own=["pid", "mnt"]), "a mount namespace without its mount table"),
    (lambda ns: ns.update(own=["pid", "net"]), "a network namespace without its NETN record"),
    (lambda ns: ns.update(ipc_sysctls={"kernel/core_pattern": "|/bin/sh"}), "ipc sysctls"),
    (lambda ns: ns.update(time_offsets=[["realtime", 5, 0]]), "time offsets"),
], ids=["no-pid", "user", "mnt", "net", "sysctl", "clock"])
def test_corrupt_namespaces_record(edit, found, procs, tmp_path):
    """An NSPC record restore cannot trust is ImageCorrupt, naming it (a
    sysctl outside the ipc ones is never written), before any process is made."""
    from conftest import rewrite_records
    from procsnap.errors import ImageCorrupt

    t, init = start_container(procs)
    dump_container(t, init, tmp_path / "img")
    rewrite_records(tmp_path / "img", lambda records: [edit(p) for tag, p in records if tag == b"NSPC"])
    mine = set(our_children())
    with pytest.raises(ImageCorrupt, match=found):
        procsnap.restore(str(tmp_path / "img"))
    assert set(our_children()) <= mine
