"""Terminals inside the tree: pty pairs, controlling terminals, sessions
(objects/pty.py), and the headline: a tmux server with vim and top,
dumped, killed and restored, both windows alive afterwards.

The pty target (tests/targets/pty.c, cases pty-cooked and pty-raw) is also
dumped and restored by test_dump_restore; here it runs on through a
leave-running dump, and its pty index is taken before its restore."""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest

import procsnap
import statecheck
from conftest import (CASES_BY_ID, assert_pass, assert_same_snapshot, assert_untouched, descendants, dump_kill,
                      reap_gone, restore,
                      wait_until)
from procsnap.kernel import tty


@pytest.mark.parametrize("mode", ["pty-cooked", "pty-raw"])
def test_pty_pair_leave_running(mode, procs, tmp_path, proc_snapshot):
    """-R reads both queues (they cannot be peeked) and queues them again:
    the tree runs on with every byte, setting and its terminal as before."""
    t = procs.start_case(CASES_BY_ID[mode], "pie")
    before = proc_snapshot(t.pid)
    procsnap.dump(t.pid, str(tmp_path / "img"), leave_running=True)
    assert_same_snapshot(before, proc_snapshot(t.pid))
    assert_pass(t)


def _open_master_at(index):
    """Masters opened until the kernel hands out `index`; the others closed again."""
    extra = []
    try:
        while True:
            fd = os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
            got = tty.get_ptn(fd)
            if got == index:
                return fd
            extra.append(fd)
            assert got < index, f"pty index {index} went to someone else ({got})"
    finally:
        for fd in extra:
            os.close(fd)


def test_pty_index_taken(procs, tmp_path):
    """A restore that finds the pty's index taken fails naming it, and
    nothing of the tree is left; once it is free again the restore works."""
    t = procs.start_case(CASES_BY_ID["pty-raw"], "pie")
    stat_fields = open(f"/proc/{descendants(t.pid)[0]}/stat").read().rpartition(")")[2].split()
    index = tty.pts_index(int(stat_fields[4]))
    images = dump_kill(t, tmp_path / "img")
    taken = _open_master_at(index)
    try:
        assert procsnap.verify(str(images)) == [f"pty /dev/pts/{index}: the index is taken"]
        with pytest.raises(procsnap.RestoreError, match=rf"pty /dev/pts/{index}: index {index} is taken"):
            procsnap.restore(str(images))
        assert not os.path.exists(f"/proc/{t.pid}")
    finally:
        os.close(taken)
    restore(procs, t, images)
    t.signal(signal.SIGUSR1)
    assert_pass(t)


LISTENER = r"""
import os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(sys.argv[1])
os.chmod(sys.argv[1], 0o640)
s.listen(7)
os.write(1, b"READY\n")
while True:
    c, _ = s.accept()
    c.sendall(b"hello from " + str(os.getpid()).encode())
    c.close()
"""


def test_listening_unix_socket(procs, tmp_path):
    """A server listening on a path is bound and listens again (the stale
    socket file the killed server left is replaced; its mode kept), and
    answers a new connection."""
    path = str(tmp_path / "server.sock")
    t = procs.start([sys.executable, "-c", LISTENER, path], name="listener")
    images = dump_kill(t, tmp_path / "img")
    assert os.path.exists(path)
    restore(procs, t, images)
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o640)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.connect(path)
        assert c.recv(100) == f"hello from {t.pid}".encode()


# --------------------------------------------------------------------------
# tmux with vim and top

class Tmux:
    """A tmux server of our own (-L NAME, no configuration), and commands to it."""

    def __init__(self, workdir):
        self.name = f"procsnap-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "TERM": "xterm", "HOME": str(workdir),
                    "LANG": "C.UTF-8"}
        self.socket = f"/tmp/tmux-{os.getuid()}/{self.name}"
        self.server = 0

    def __call__(self, *args, check=True):
        r = subprocess.run(["tmux", "-L", self.name, "-f", "/dev/null", *args], env=self.env, capture_output=True,
                           text=True, timeout=30, close_fds=True)
        if check:
            assert r.returncode == 0, f"tmux {' '.join(args)}: {r.stderr}"
        return r.stdout

    def pane(self, target):
        return self("capture-pane", "-p", "-t", target)

    def wait_pane(self, target, cond, what, timeout=20):
        deadline = time.monotonic() + timeout
        while True:
            text = self.pane(target)
            if cond(text):
                return text
            assert time.monotonic() < deadline, f"{what}; the pane shows:\n{text}"
            time.sleep(0.1)

    def settle(self):
        """Until the server holds no connection of a client (only its listener):
        a client's command is over before the server has closed its side."""
        def connections():
            n = 0
            for fd in os.listdir(f"/proc/{self.server}/fd"):
                with contextlib.suppress(OSError):
                    n += os.readlink(f"/proc/{self.server}/fd/{fd}").startswith("socket:")
            return n
        wait_until(lambda: connections() == 1, "the tmux server closing its clients' connections")


def _stat_fields(pid):
    return open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()


def _child(pid, comm):
    for kid in descendants(pid):
        with contextlib.suppress(OSError):
            if open(f"/proc/{kid}/comm").read().strip() == comm:
                return kid
    return None


@pytest.mark.skipif(not shutil.which("tmux") or not shutil.which("vim") or not shutil.which("top"),
                    reason="tmux, vim and top are installed by `make test`")
def _gone_or_zombie(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def test_tmux_with_vim_and_top(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("line one\n")
    tm = Tmux(tmp_path)
    pids = []
    try:
        tm("new-session", "-d", "-s", "main", "-x", "100", "-y", "30", "bash --norc --noprofile")
        tm.server = int(tm("display-message", "-p", "#{pid}").strip())
        pids.append(tm.server)
        tm.wait_pane("main:0", lambda s: "$" in s or "#" in s, "no bash prompt")
        tm("send-keys", "-t", "main:0", f"vim -u NONE -N -n {text}", "Enter")
        tm.wait_pane("main:0", lambda s: "line one" in s and "notes.txt" in s, "vim did not show the file")
        tm("new-window", "-t", "main:1", "top -d 1")
        tm.wait_pane("main:1", lambda s: s.startswith("top - "), "top did not start")
        tm.settle()
        bash = int(tm("display-message", "-p", "-t", "main:0", "#{pane_pid}").strip())
        vim, top = _child(bash, "vim"), _child(tm.server, "top")
        assert vim and top, descendants(tm.server)
        tree = [tm.server] + descendants(tm.server)
        pids += tree[1:]
        vim_stat = _stat_fields(vim)
        vim_tty, vim_tpgid = int(vim_stat[4]), int(vim_stat[5])
        assert tty.is_pts(vim_tty) and vim_tpgid == vim
        quiet = [bash, vim]  # their state is still between the dump and the restore (top reads /proc on)
        before = statecheck.capture_tree(quiet)

        procsnap.dump(tm.server, str(tmp_path / "img"))
        reap_gone(tree)
        assert not tm("list-sessions", check=False)  # nobody listens any more
        pid = procsnap.restore(str(tmp_path / "img"))
        assert pid == tm.server

        assert tm("list-windows", "-F", "#{window_index} #{pane_current_command}").split("\n")[:2] == \
            ["0 vim", "1 top"]
        assert statecheck.state_problems(before, statecheck.capture_tree(quiet)) == []
        assert _stat_fields(vim)[4:6] == [str(vim_tty), str(vim)], "vim lost its controlling terminal"
        first = tm.pane("main:1").splitlines()[0]
        tm.wait_pane("main:1", lambda s: s.startswith("top - ") and s.splitlines()[0] != first,
                     "top's screen does not update")
        tm("send-keys", "-t", "main:0", "ihello", "Escape", ":wq", "Enter")
        wait_until(lambda: _gone_or_zombie(vim), "vim did not exit after :wq")
        assert text.read_text() == "helloline one\n"  # inserted before the cursor, at the start of line one
        tm.wait_pane("main:0", lambda s: s.rstrip().endswith(("$", "#")), "bash did not get its prompt back")
    finally:
        tm("kill-server", check=False)
        for p in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        for p in pids:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(p, 0)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tm.socket)


# --------------------------------------------------------------------------
# Refused by name, the tree left running untouched

PACKET_STATUS = r"""
import fcntl, os, struct, termios, time
m, s = os.openpty()
fcntl.ioctl(m, termios.TIOCPKT, struct.pack("i", 1))
a = termios.tcgetattr(s)
a[0] ^= termios.IXON  # the master's reader is told: a status byte waits
termios.tcsetattr(s, termios.TCSANOW, a)
os.write(1, f"fd {m}\nREADY\n".encode())
time.sleep(1000)
"""
SLEEP = "import os, time\nos.write(1, b'READY\\n')\ntime.sleep(1000)\n"
LOST_TTY = r"""
import fcntl, os, signal, termios, time
m, s = os.openpty()
fcntl.ioctl(s, termios.TIOCSCTTY, 0)  # a session leader (the test made it one)
fd = os.open("/dev/tty", os.O_RDWR)
signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the leader's TIOCNOTTY hangs up its foreground: itself
fcntl.ioctl(fd, termios.TIOCNOTTY)
os.write(1, f"fd {fd}\nREADY\n".encode())
time.sleep(1000)
"""


@pytest.mark.parametrize("kind", ["packet-status", "console", "dev-tty"])
def test_terminal_refused(kind, procs, tmp_path, proc_snapshot):
    images = tmp_path / "img"
    images.mkdir()
    if kind == "console":
        try:
            fd = os.open("/dev/console", os.O_RDONLY | os.O_NOCTTY)
        except OSError as err:
            pytest.skip(f"/dev/console: {err.strerror}")
        try:
            t = procs.start([sys.executable, "-c", SLEEP], name=kind, pass_fds=(fd,))
        finally:
            os.close(fd)
        names = (f"pid {t.pid}: fd {fd} is a terminal (/dev/console); dump with --shell-job",)
    else:
        t = procs.start([sys.executable, "-c", PACKET_STATUS if kind == "packet-status" else LOST_TTY], name=kind)
        fd = int(t.output().split()[1])
        names = ((f"pid {t.pid}: fd {fd}", "pty master of /dev/pts/", "packet-mode status byte")
                 if kind == "packet-status" else
                 (f"pid {t.pid}: fd {fd} is /dev/tty of a process without a controlling terminal",))
    before = proc_snapshot(t.pid)
    with pytest.raises(procsnap.Unsupported) as exc:
        procsnap.dump(t.pid, str(images))
    for name in names:
        assert name in str(exc.value), str(exc.value)
    assert_untouched(t.pid, before, images, proc_snapshot, assert_same_snapshot)


DEV_TTY_JOB = r"""
import os, signal, time
signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the restoring CLI exiting hangs up the foreground of its terminal
fd = os.open("/dev/tty", os.O_WRONLY)
os.write(1, b"READY\n")
while True:
    time.sleep(0.05)
    try:
        os.write(fd, b"via /dev/tty\n")
    except OSError:
        pass
"""


def _with_ctty():
    import fcntl
    import termios
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def test_dev_tty_of_a_shell_job(tmp_path):
    """--shell-job: /dev/tty opened on the dumping terminal is opened again
    on the restoring one (the restorer's controlling terminal); a restorer
    without one refuses, naming the fd."""
    from test_shell_job import kill_all, read_until

    master, slave = os.openpty()
    # a job of a shell: its session and group are the shell's, the controlling terminal too
    p = subprocess.Popen(["sh", "-c", f"{sys.executable} -c '{DEV_TTY_JOB}' & wait"], stdin=slave, stdout=slave,
                         stderr=slave, start_new_session=True, close_fds=True, preexec_fn=_with_ctty)
    os.close(slave)
    pids = [p.pid]
    master2, slave2 = os.openpty()
    try:
        read_until(master, b"READY")
        job = int(open(f"/proc/{p.pid}/task/{p.pid}/children").read().split()[0])
        pids.append(job)
        fd = next(int(n) for n in os.listdir(f"/proc/{job}/fd") if os.readlink(f"/proc/{job}/fd/{n}") == "/dev/tty")
        procsnap.dump(job, str(tmp_path / "img"), shell_job=True)
        p.wait()  # its job killed, the shell's wait is over
        reap_gone([job])
        restorer = [sys.executable, "-m", "procsnap", "restore", "-D", str(tmp_path / "img"), "-d", "-j"]
        alone = subprocess.run(restorer, stdin=slave2, capture_output=True, text=True, timeout=60,  # no terminal
                               cwd=os.path.dirname(os.path.dirname(__file__)), start_new_session=True)
        assert alone.returncode != 0 and alone.stderr.count("\n") == 1, alone.stderr
        assert f"fd {fd} was /dev/tty of the dumping terminal; the restorer has no controlling terminal" \
            in alone.stderr, alone.stderr
        assert not os.path.exists(f"/proc/{job}")
        cli = subprocess.run(restorer, stdin=slave2, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60,
                             cwd=os.path.dirname(os.path.dirname(__file__)), start_new_session=True,
                             preexec_fn=_with_ctty)
        assert cli.returncode == 0, cli.stderr
        pid = int(cli.stdout.split()[-1])
        assert pid == job
        assert os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/tty"
        read_until(master2, b"via /dev/tty")
    finally:
        kill_all(p, pids)
        for f in (master, master2, slave2):
            os.close(f)


FOREIGN_SESSION = r"""
import fcntl, os, termios, time
m, s = os.openpty()
fcntl.ioctl(s, termios.TIOCSCTTY, 0)  # the terminal of our session (the test made us its leader)
child = os.fork()
if child == 0:  # holds the master too, in our session: dumped alone, its terminal's session leader is outside
    time.sleep(1000)
    os._exit(0)
os.write(1, f"child {child}\nREADY\n".encode())
time.sleep(1000)
"""


def test_terminal_of_a_session_led_from_outside(procs, tmp_path, proc_snapshot):
    """A process whose controlling terminal is a pty of the tree, in a
    session whose leader is not dumped: restored, the session (and so the
    terminal) could not be made again. Refused by name, even with
    --shell-job (which lets the root join the restorer's session)."""
    t = procs.start([sys.executable, "-c", FOREIGN_SESSION], name="foreign-session")
    child = int(t.output().split()[1])
    images = tmp_path / "img"
    images.mkdir()
    before = proc_snapshot(child)
    with pytest.raises(procsnap.Unsupported) as exc:
        procsnap.dump(child, str(images), shell_job=True)
    for name in (f"pid {child}: its controlling terminal /dev/pts/", f"belongs to session {t.pid}",
                 "whose leader is not in the dumped tree"):
        assert name in str(exc.value), str(exc.value)
    assert_untouched(child, before, images, proc_snapshot, assert_same_snapshot)
