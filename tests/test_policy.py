"""Who may restore what (README, threat model), and `verify` listing every
problem an image has before any process is touched."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import procsnap
from conftest import dump_kill, wait_pid_gone

ROOT = Path(__file__).resolve().parent.parent


def cli(*args):
    return subprocess.run([sys.executable, "-m", "procsnap", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def started():
    """Processes started here by pid; SIGKILLed and reaped at the end."""
    pids = []
    yield pids
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
        wait_pid_gone(pid)


def start_sleep(argv, started, **kw):
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True, close_fds=True, **kw)
    started.append(p.pid)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{p.pid}/syscall").read_text().split()[0] != "230":
        assert time.monotonic() < deadline, "sleep did not reach clock_nanosleep"
        time.sleep(0.01)
    return p


def kill_dump(p, images):
    images.mkdir()
    procsnap.dump(p.pid, str(images))
    p.wait()
    wait_pid_gone(p.pid)


def assert_sleeping(pid):
    """In its clock_nanosleep, or in restart_syscall: a relative sleep
    resumes through its restart block after a restore (restorer/waits.py)."""
    time.sleep(0.2)
    assert Path(f"/proc/{pid}/syscall").read_text().split()[0] in ("230", "219")


def test_image_of_another_owner_needs_explicit_flag(tmp_path, started):
    p = start_sleep(["sleep", "1000"], started, user=65534, group=65534)
    images = tmp_path / "img"
    kill_dump(p, images)
    with pytest.raises(procsnap.RestoreError, match=r"uid 65534 gid 65534.*--allow-other-owner"):
        procsnap.restore(str(images))
    assert not os.path.exists(f"/proc/{p.pid}"), "refused restore left a process"
    r = cli("verify", images)
    assert r.returncode == 1 and "--allow-other-owner" in r.stderr and "Traceback" not in r.stderr
    assert procsnap.verify(str(images), allow_other_owner=True) == []
    pid = procsnap.restore(str(images), allow_other_owner=True)
    started.append(pid)
    assert pid == p.pid
    assert_sleeping(pid)


DROPPING_TREE = """
import os, signal, sys
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1])
child = os.fork()
if child == 0:
    os.setgroups([]); os.setresgid(65534, 65534, 65534); os.setresuid(65534, 65534, 65534)
    signal.pause()
print("READY", flush=True)
signal.sigwait([signal.SIGUSR1])
ids = open(f"/proc/{child}/status").read().split("Uid:")[1].split()[:4]
print("PASS" if ids == ["65534"] * 4 else f"FAIL: child uids {ids}", flush=True)
os.kill(child, signal.SIGKILL)
os.waitpid(child, 0)
"""


def test_process_below_a_root_tree_of_another_uid_needs_no_flag(procs, tmp_path):
    """A root tree whose root made a child nobody (as nginx's master makes
    its workers): root restores it without --allow-other-owner, the child
    with its own credentials; a tree whose root is another uid's still
    needs the flag (test above)."""
    from conftest import assert_pass, restore

    t = procs.start([sys.executable, "-c", DROPPING_TREE], name="dropping")
    images = dump_kill(t, tmp_path / "img")
    assert procsnap.verify(str(images)) == []
    restore(procs, t, images)
    assert_pass(t)


def test_setuid_executable_needs_explicit_flag(tmp_path, started):
    exe = tmp_path / "sleep-setuid"
    shutil.copy2(shutil.which("sleep"), exe)
    os.chmod(exe, 0o4755)
    p = start_sleep([str(exe), "1000"], started)
    images = tmp_path / "img"
    kill_dump(p, images)
    with pytest.raises(procsnap.RestoreError, match=rf"{exe} is set-uid/set-gid; restore with --allow-setuid"):
        procsnap.restore(str(images))
    assert not os.path.exists(f"/proc/{p.pid}")
    pid = procsnap.restore(str(images), allow_setuid=True)
    started.append(pid)
    assert os.readlink(f"/proc/{pid}/exe") == str(exe)
    assert_sleeping(pid)


def test_verify_lists_every_problem(procs, tmp_path):
    """Two mapped files changed after the dump: both named, nothing restored."""
    from conftest import CASES_BY_ID

    t = procs.start_case(CASES_BY_ID["memory"], "pie")
    images = dump_kill(t, tmp_path / "img")
    priv = next(Path(f.path) for f in procsnap.open_image(str(images)).checkpoint.files
                if f.path.endswith("priv.dat"))
    shared = priv.with_name("shared.dat")
    with open(priv, "ab") as f:
        f.write(b"x")
    shared.unlink()
    problems = procsnap.verify(str(images))
    assert any(str(priv) in p and "size" in p for p in problems), problems
    assert any(str(shared) in p and "No such file" in p for p in problems), problems
    r = cli("verify", images)
    assert r.returncode == 1 and str(priv) in r.stderr and str(shared) in r.stderr, r.stderr
    with pytest.raises(procsnap.RestoreError) as err:
        procsnap.restore(str(images))
    assert str(priv) in str(err.value) and str(shared) in str(err.value)
    assert not os.path.exists(f"/proc/{t.pid}")
