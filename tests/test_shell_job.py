"""--shell-job: a process whose stdio is a terminal is dumped only with
--shell-job, and restored with its terminal fds on the restorer's terminal."""

import os
import select
import signal
import subprocess
import sys
import time

import pytest

import procsnap

PROGRAM = r"""
import os, sys, time
n = 0
os.write(1, b"READY\n")
while True:
    os.write(1, f"tick {n}\n".encode())
    n += 1
    time.sleep(0.05)
"""


def read_until(master, needle, timeout=10.0):
    data = b""
    deadline = time.monotonic() + timeout
    while needle not in data:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no {needle!r} on the terminal; got {data[-300:]!r}")
        ready, _, _ = select.select([master], [], [], left)
        if ready:
            try:
                data += os.read(master, 65536)
            except OSError:
                break
    return data


def kill_all(p, pids):
    """SIGKILL every pid we started or restored; reap p and the others."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    p.wait()
    for pid in pids[1:]:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass


@pytest.fixture
def tty_job(tmp_path):
    """python3 with fds 0-2 on a fresh pty; killed and reaped at the end."""
    master, slave = os.openpty()
    p = subprocess.Popen([sys.executable, "-c", PROGRAM], stdin=slave, stdout=slave, stderr=slave,
                         start_new_session=True, close_fds=True)
    os.close(slave)
    pids = [p.pid]
    read_until(master, b"READY")
    yield p, master, pids
    kill_all(p, pids)
    os.close(master)


def test_terminal_refused_without_shell_job(tty_job, tmp_path):
    p, master, _ = tty_job
    with pytest.raises(procsnap.Unsupported, match=rf"pid {p.pid}: fd 0 is a terminal \(/dev/pts/\d+\); dump with --shell-job"):
        procsnap.dump(p.pid, str(tmp_path))
    assert p.poll() is None
    assert "TracerPid:\t0" in open(f"/proc/{p.pid}/status").read()
    read_until(master, b"tick")  # still running on its terminal
    assert not (tmp_path / "procsnap.img").exists()


def test_shell_job_reattaches_to_restoring_terminal(tty_job, tmp_path):
    p, master, pids = tty_job
    old_tty = os.readlink(f"/proc/{p.pid}/fd/0")
    procsnap.dump(p.pid, str(tmp_path), shell_job=True)
    p.wait()
    while os.path.exists(f"/proc/{p.pid}"):
        time.sleep(0.01)

    # Restoring without --shell-job is refused, naming the fix.
    with pytest.raises(procsnap.RestoreError, match="restore with --shell-job"):
        procsnap.restore(str(tmp_path))
    assert not os.path.exists(f"/proc/{p.pid}")

    master2, slave2 = os.openpty()
    try:
        new_tty = os.ttyname(slave2)
        cli = subprocess.run([sys.executable, "-m", "procsnap", "restore", "-D", str(tmp_path), "-d", "-j"],
                             stdin=slave2, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             timeout=60, cwd=os.path.dirname(os.path.dirname(__file__)))
        assert cli.returncode == 0, cli.stderr
        pid = int(cli.stdout.split()[-1])
        pids.append(pid)
        assert pid == p.pid
        for fd in (0, 1, 2):
            assert os.readlink(f"/proc/{pid}/fd/{fd}") == new_tty, f"fd {fd} not on the restoring terminal"
        assert new_tty != old_tty
        out = read_until(master2, b"tick")
        n = int(out.split(b"tick ")[-1].split()[0])
        out = read_until(master2, f"tick {n + 3}".encode())
    finally:
        os.close(slave2)
        os.close(master2)


def count_with_digit(digits):
    """How many of 1 .. 10**digits have a 7: all but the 9**digits without one."""
    return 10**digits - 9**digits


def test_shell_pipeline_on_a_terminal(tmp_path):
    """`seq | grep 7 | wc -l` started from a terminal, dumped mid-flight with
    --shell-job, restored on another terminal: the same count appears there."""
    digits = 7  # 10 million lines: long enough (~0.7 s) to be mid-flight at the dump and after the restore
    n = 10**digits
    master, slave = os.openpty()
    p = subprocess.Popen(["bash", "-c", f"echo READY; seq {n} | grep 7 | wc -l; echo DONE"],
                         stdin=slave, stdout=slave, stderr=slave, start_new_session=True, close_fds=True)
    os.close(slave)
    pids = [p.pid]
    images = tmp_path / "img"
    images.mkdir()
    master2, slave2 = os.openpty()
    try:
        read_until(master, b"READY")
        deadline = time.monotonic() + 10
        while len(open(f"/proc/{p.pid}/task/{p.pid}/children").read().split()) < 3:
            assert time.monotonic() < deadline, "the pipeline did not start"
            time.sleep(0.01)
        kids = [int(k) for k in open(f"/proc/{p.pid}/task/{p.pid}/children").read().split()]
        pids += kids
        procsnap.dump(p.pid, str(images), shell_job=True)
        assert p.wait() == -signal.SIGKILL
        for pid in kids:  # the pipeline's processes come back to us (the subreaper)
            deadline = time.monotonic() + 10
            while os.path.exists(f"/proc/{pid}"):
                try:
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass
                assert time.monotonic() < deadline, f"pid {pid} still there"
                time.sleep(0.005)
        cli = subprocess.run([sys.executable, "-m", "procsnap", "restore", "-D", str(images), "-d", "-j"],
                             stdin=slave2, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             timeout=60, cwd=os.path.dirname(os.path.dirname(__file__)))
        assert cli.returncode == 0, cli.stderr
        assert int(cli.stdout.split()[-1]) == p.pid
        new_tty = os.ttyname(slave2)
        for pid in [p.pid] + kids:
            assert os.readlink(f"/proc/{pid}/fd/2") == new_tty, f"pid {pid}: fd 2 not on the restoring terminal"
        assert sorted(os.readlink(f"/proc/{pid}/fd/0").startswith("pipe:") for pid in kids) == [False, True, True]
        out = read_until(master2, b"DONE", timeout=60)
        assert f"{count_with_digit(digits)}".encode() in out, out
    finally:
        kill_all(p, pids)
        for fd in (master, master2, slave2):
            os.close(fd)
