"""Failures, from the library and the CLI, on real processes.

Every error names what it is about (pid, fd, path) and has its own class.
A failed dump leaves the target running, untraced, its maps and fds as they
were, no image behind, and its self-check still PASSes. A failed restore
leaves the image byte for byte as it was and no process behind.
"""

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import procsnap
from conftest import (CASES_BY_ID, REPO, Case, assert_cli_error, assert_pass, assert_untouched, cli,
                      dump_kill, edit_vmas, image_hashes, our_children, proc_status, rewrite_records,
                      wait_pid_gone, wait_until)
from procsnap.errors import (AccessDenied, ImageCorrupt, ImageWriteError, ProcessGone,
                             ProcsnapError, RestoreError, Unsupported)

SLEEPER = CASES_BY_ID["sleep-pause"]     # small image, waits in pause() for SIGUSR1
MEMORY = CASES_BY_ID["memory"]           # ~10 MiB dirty, maps priv.dat from its cwd
FEATURES = ("ptrace", "process_vm_rw", "clone3_set_tid", "prctl_mm_map", "rseq_config",
            "pidfd_getfd", "userfaultfd", "sock_diag", "checkpoint_restore_knobs")


# --------------------------------------------------------------------------
# Helpers


def assert_names(err, *names):
    for name in names:
        assert str(name) in str(err), f"{name!r} not named in {type(err).__name__}: {err}"


def free_pid():
    """A pid no process has (checked), below pid_max."""
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    for pid in range(pid_max - 1, 300, -1):
        if not os.path.exists(f"/proc/{pid}"):
            return pid
    raise AssertionError("no free pid")


def dump_refused(pid, images, cls, *names):
    images = Path(images)
    images.mkdir(exist_ok=True)
    with pytest.raises(cls) as exc:
        procsnap.dump(pid, str(images))
    assert_names(exc.value, *names)
    return exc.value


# A restore in a child python with SIGCHLD blocked: afterwards SIGCHLD pending
# means the restorer created (and reaped) a process, which a failure before
# the spawn must not do.
RESTORE_PROBE = textwrap.dedent("""\
    import json, os, signal, sys
    import procsnap
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    out = {"error": None, "message": "", "pid": None}
    try:
        out["pid"] = procsnap.restore(sys.argv[1])
        os.kill(out["pid"], signal.SIGKILL)
        os.waitpid(out["pid"], 0)
    except procsnap.ProcsnapError as err:
        out["error"], out["message"] = type(err).__name__, str(err)
    out["spawned"] = signal.SIGCHLD in signal.sigpending()
    out["children"] = open(f"/proc/self/task/{os.getpid()}/children").read().split()
    print(json.dumps(out))
""")


def restore_probe(images):
    r = subprocess.run([sys.executable, "-c", RESTORE_PROBE, str(images)], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"restore probe crashed:\n{r.stderr}"
    return json.loads(r.stdout)


# --------------------------------------------------------------------------
# Dump failures


def test_no_such_pid(tmp_path):
    pid = free_pid()
    images = tmp_path / "img"
    dump_refused(pid, images, ProcessGone, pid)
    assert not (images / "procsnap.img").exists()
    assert_cli_error(cli("dump", "-t", pid, "-D", images), pid)


SEIZER = textwrap.dedent("""\
    import ctypes, os, sys, time
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    if libc.ptrace(0x4206, int(sys.argv[1]), None, None) != 0:   # PTRACE_SEIZE
        os.write(1, b"FAIL: PTRACE_SEIZE errno %d\\n" % ctypes.get_errno())
        sys.exit(2)
    os.write(1, b"READY\\n")
    time.sleep(1000)
""")


def test_traced_by_another(procs, tmp_path, proc_snapshot, assert_same_snapshot):
    t = procs.start_case(SLEEPER, "pie")
    seizer = procs.start([sys.executable, "-c", SEIZER, t.pid], name="seizer")
    assert proc_status(t.pid)["TracerPid"] == str(seizer.pid)
    before = proc_snapshot(t.pid)
    images = tmp_path / "img"

    dump_refused(t.pid, images, AccessDenied, f"pid {t.pid}")
    assert_untouched(t.pid, before, images, proc_snapshot, assert_same_snapshot, tracer=seizer.pid)
    assert_cli_error(cli("dump", "-t", t.pid, "-D", images), f"pid {t.pid}")
    assert_untouched(t.pid, before, images, proc_snapshot, assert_same_snapshot, tracer=seizer.pid)

    seizer.kill_and_reap()          # its tracee is detached and runs on
    deadline = time.monotonic() + 5
    while proc_status(t.pid)["TracerPid"] != "0":
        assert time.monotonic() < deadline, f"{t} still traced after the seizer died"
        time.sleep(0.01)
    assert_pass(t)


@pytest.mark.parametrize("kind", ["pipe", "socket", "listening", "device-node"])
def test_unsupported_resource(kind, procs, tmp_path, proc_snapshot, assert_same_snapshot):
    images = tmp_path / "img"
    extra = []          # (pid, ) of grandchildren to kill first
    peer = None
    try:
        if kind == "pipe":  # its other end is ours, outside the tree
            fd, peer_w = os.pipe()
            try:
                t = procs.start_case(SLEEPER, "pie", pass_fds=(fd,))
            finally:
                os.close(fd)
            names = (f"pid {t.pid}", f"fd {fd}", "pipe", f"pid {os.getpid()}", "outside the dumped tree")
        elif kind == "socket":  # its peer is ours, outside the tree
            a, peer = socket.socketpair()
            fd = a.fileno()
            try:
                t = procs.start_case(SLEEPER, "pie", pass_fds=(fd,))
            finally:
                a.close()
            names = (f"pid {t.pid}", f"fd {fd}", kind, "outside the dumped tree")
        elif kind == "listening":  # with a connection from us, outside the tree, waiting in its backlog
            lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            lsock.bind(str(tmp_path / "sock"))
            lsock.listen()
            peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            peer.connect(str(tmp_path / "sock"))
            fd = lsock.fileno()
            try:
                t = procs.start_case(SLEEPER, "pie", pass_fds=(fd,))
            finally:
                lsock.close()
            names = (f"pid {t.pid}", f"fd {fd}", "listening", "outside the dumped tree", "waiting to be accepted")
        elif kind == "fifo":
            os.mkfifo(tmp_path / "fifo")
            fd = os.open(tmp_path / "fifo", os.O_RDWR)
            try:
                t = procs.start_case(SLEEPER, "pie", pass_fds=(fd,))
            finally:
                os.close(fd)
            names = (f"pid {t.pid}", f"fd {fd}", "named FIFO")
        elif kind == "device-node":  # unlinked, of a device with state (/dev/kmsg's)
            node = tmp_path / "kmsg"
            os.mknod(node, 0o600 | stat.S_IFCHR, os.makedev(1, 11))
            fd = os.open(node, os.O_WRONLY)
            node.unlink()
            try:
                t = procs.start_case(SLEEPER, "pie", pass_fds=(fd,))
            finally:
                os.close(fd)
            names = (f"pid {t.pid}", f"fd {fd}", str(node), "unlinked character device node", "1:11")

        before = proc_snapshot(t.pid)
        dump_refused(t.pid, images, Unsupported, *names)
        assert_untouched(t.pid, before, images, proc_snapshot, assert_same_snapshot)
        assert_cli_error(cli("dump", "-t", t.pid, "-D", images), *names)
        assert_untouched(t.pid, before, images, proc_snapshot, assert_same_snapshot)
        for pid in extra:
            assert proc_status(pid)["TracerPid"] == "0"
        if kind in ("pipe", "socket", "listening", "device-node"):
            assert_pass(t)
    finally:
        if peer is not None:
            peer.close()
        if kind == "pipe":
            os.close(peer_w)
        for pid in extra:       # sh reaps them (it is in `wait`), then exits
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in extra:
            wait_pid_gone(pid)


# memfd target modes that a dump refuses, and what the refusal must name
REFUSED_MEMORY = {
    "secret": ("memfd_secret", "/secretmem (deleted)", "fd "),
    "secret-mapped": ("memfd_secret", "/secretmem (deleted)", "VMA "),
    "future-mixed": ("memfd /memfd:ps-future", "F_SEAL_FUTURE_WRITE", "may write", "may not"),
}


@pytest.mark.parametrize("mode", sorted(REFUSED_MEMORY))
def test_unsupported_memory(mode, procs, tmp_path, proc_snapshot, assert_same_snapshot):
    """A memfd_secret (unreadable from outside) and a memfd sealed
    F_SEAL_FUTURE_WRITE with mappings made both before and after the seal
    (the kernel cannot make both again) are refused by name; the target runs on."""
    t = procs.start_case(Case("memfd", mode), "pie")
    images = tmp_path / "img"
    names = REFUSED_MEMORY[mode] + ((f"pid {t.pid}",) if mode.startswith("secret") else ())
    before = proc_snapshot(t.pid)
    dump_refused(t.pid, images, Unsupported, *names)
    assert_untouched(t.pid, before, images, proc_snapshot, assert_same_snapshot)
    assert_cli_error(cli("dump", "-t", t.pid, "-D", images), *names)
    assert_pass(t)


@pytest.fixture
def tiny_fs(tmp_path):
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)]).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_disk_full(procs, tiny_fs, proc_snapshot, assert_same_snapshot):
    t = procs.start_case(MEMORY, "pie")
    before = proc_snapshot(t.pid)
    images = tiny_fs / "img"

    err = dump_refused(t.pid, images, ProcsnapError, f"pid {t.pid}")
    assert isinstance(err, ImageWriteError) or "No space left" in str(err), \
        f"{type(err).__name__}: {err}"
    assert "No space left" in str(err), str(err)
    assert_untouched(t.pid, before, images, proc_snapshot, assert_same_snapshot)

    line = assert_cli_error(cli("dump", "-t", t.pid, "-D", images), f"pid {t.pid}")
    assert "No space left" in line
    assert_untouched(t.pid, before, images, proc_snapshot, assert_same_snapshot)
    assert_pass(t)


# --------------------------------------------------------------------------
# Restore failures


def test_restore_pid_taken(procs, tmp_path, proc_snapshot, assert_same_snapshot):
    t = procs.start_case(SLEEPER, "pie")
    images = tmp_path / "img"
    images.mkdir()
    procsnap.dump(t.pid, str(images), leave_running=True)
    before, hashes = proc_snapshot(t.pid), image_hashes(images)
    children = our_children()

    with pytest.raises(RestoreError) as exc:
        procsnap.restore(str(images))
    assert_names(exc.value, f"pid {t.pid}")
    assert_cli_error(cli("restore", "-D", images), f"pid {t.pid}")

    assert our_children() == children
    assert image_hashes(images) == hashes
    assert_same_snapshot(before, proc_snapshot(t.pid))
    assert_pass(t)


def flip_byte(path, offset):
    data = bytearray(Path(path).read_bytes())
    data[offset] ^= 0xFF
    Path(path).write_bytes(bytes(data))


def test_restore_corrupt_pages_creates_nothing(procs, tmp_path):
    t = procs.start_case(SLEEPER, "pie")
    images = dump_kill(t, tmp_path / "img")
    pages = images / "pages.img"
    assert pages.stat().st_size > 4096
    flip_byte(pages, pages.stat().st_size // 2)
    hashes = image_hashes(images)

    got = restore_probe(images)
    assert got["error"] == "ImageCorrupt", got
    assert str(pages) in got["message"], got
    assert not got["spawned"] and not got["children"], f"a process was created: {got}"
    assert not os.path.exists(f"/proc/{t.pid}")
    with pytest.raises(ImageCorrupt):
        procsnap.restore(str(images))
    assert image_hashes(images) == hashes


def test_restore_mapped_file_changed(procs, tmp_path):
    t = procs.start_case(MEMORY, "pie")
    images = dump_kill(t, tmp_path / "img")
    priv = procs.workdir / "priv.dat"
    with open(priv, "ab") as f:
        f.write(b"grown")
    hashes = image_hashes(images)

    got = restore_probe(images)
    assert got["error"] == "RestoreError", got
    assert str(priv) in got["message"], got
    assert not got["children"], got
    assert not os.path.exists(f"/proc/{t.pid}")
    assert image_hashes(images) == hashes


def test_restore_fails_after_spawn(procs, tmp_path):
    """An image whose vdso is one page shorter than this kernel's: only the
    spawned process can find out, so the failure comes after the spawn, and
    the half-built process must be killed and reaped, the pid free again."""
    t = procs.start_case(SLEEPER, "pie")
    images = dump_kill(t, tmp_path / "img")

    def short_vdso(vmas):
        vdso = next(v for v in vmas if v.kind.value == "vdso")
        assert vdso.end - vdso.start >= 2 * 4096, vdso
        vdso.end -= 4096
    rewrite_records(images, lambda records: edit_vmas(records, short_vdso))
    procsnap.open_image(str(images))        # still valid for the reader
    hashes = image_hashes(images)

    got = restore_probe(images)
    assert got["error"] == "RestoreError", got
    assert f"pid {t.pid}" in got["message"] and "vdso" in got["message"], got
    assert got["spawned"], f"expected a spawned (then reaped) process: {got}"
    assert not got["children"], got
    assert not os.path.exists(f"/proc/{t.pid}")
    assert image_hashes(images) == hashes


@pytest.mark.parametrize("what", ["missing", "file", "empty"])
def test_restore_and_show_not_an_image(what, tmp_path):
    images = tmp_path / "img"
    if what == "file":
        images.write_text("not an image\n")
    elif what == "empty":
        images.mkdir()
    for call in (procsnap.restore, procsnap.open_image):
        with pytest.raises(ImageCorrupt) as exc:
            call(str(images))
        assert_names(exc.value, images)
    assert_cli_error(cli("restore", "-D", images), images)
    assert_cli_error(cli("show", images), images)
    assert_cli_error(cli("check", "-D", images), images)


# --------------------------------------------------------------------------
# CLI round trips


def test_cli_dump_restore_detached(procs, tmp_path):
    t = procs.start_case(MEMORY, "pie")
    images, pidfile = tmp_path / "img", tmp_path / "pid"
    r = cli("dump", "-t", t.pid, "-D", images)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert t.reap() == -signal.SIGKILL

    r = cli("restore", "-D", images, "-d", "--pidfile", pidfile)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(t.pid), r.stdout
    assert pidfile.read_text().strip() == str(t.pid)
    t.adopt(t.pid)          # the CLI exited: the restored process is re-parented to us
    assert proc_status(t.pid)["PPid"] == str(os.getpid())
    assert_pass(t)


@pytest.mark.parametrize("sabotage,expected", [(False, 0), (True, 1)], ids=["pass", "fail"])
def test_cli_restore_waits(sabotage, expected, procs, tmp_path):
    """Without -d the CLI waits and exits with the restored process's status."""
    t = procs.start_case(MEMORY, "pie", sabotage=sabotage)
    images, pidfile = tmp_path / "img", tmp_path / "pid"
    r = cli("dump", "-t", t.pid, "-D", images)
    assert r.returncode == 0, r.stderr
    t.reap()

    restorer = subprocess.Popen([sys.executable, "-m", "procsnap", "restore", "-D", str(images),
                                 "--pidfile", str(pidfile)], cwd=REPO, stderr=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: pidfile.exists() and pidfile.read_text().endswith("\n")
                  or restorer.poll() is not None, "the pidfile")
        assert restorer.poll() is None, f"restore exited early: {restorer.communicate()}"
        pid = int(pidfile.read_text())
        assert pid == t.pid
        assert proc_status(pid)["PPid"] == str(restorer.pid)
        deadline = time.monotonic() + 20
        while restorer.poll() is None:      # re-send: a SIGUSR1 before pause() is lost
            assert time.monotonic() < deadline, f"restored {pid} did not exit:\n{t.output()}"
            try:
                os.kill(pid, signal.SIGUSR1)
            except ProcessLookupError:
                pass
            time.sleep(0.2)
        out, err = restorer.communicate()
        assert restorer.returncode == expected, \
            f"exit {restorer.returncode}, target said:\n{t.output()}\nstderr: {err}"
        assert err == "", err
        assert ("PASS\n" in t.output()) == (not sabotage), t.output()
    finally:
        if restorer.poll() is None:
            restorer.kill()
            restorer.wait()
        if pidfile.exists() and pidfile.read_text().strip().isdigit():
            pid = int(pidfile.read_text())
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# --------------------------------------------------------------------------
# check


def test_cli_check(procs, tmp_path):
    r = cli("check")
    assert r.returncode == 0, r.stdout + r.stderr
    for name in FEATURES:
        assert any(l.startswith("ok") and f" {name}:" in l for l in r.stdout.splitlines()), \
            f"feature {name} not listed as ok:\n{r.stdout}"

    t = procs.start_case(SLEEPER, "pie")
    images = tmp_path / "img"
    images.mkdir()
    procsnap.dump(t.pid, str(images), leave_running=True)
    r = cli("check", "-D", images)
    assert r.returncode == 0 and f"{images}: image is valid" in r.stdout, r.stdout + r.stderr

    flip_byte(images / "procsnap.img", 30)
    assert_cli_error(cli("check", "-D", images), images / "procsnap.img")
    assert_pass(t)


@pytest.mark.parametrize("spec, names", [("eth0:veth0", ["'eth0:veth0'", "KIND[KEY]:VALUE"]),
                                         ("tun[tun0]:x", ["'tun'", "mnt, veth"]),
                                         ("mnt[/a]:", ["'mnt[/a]:'"])])
def test_bad_external_refused(spec, names, procs, tmp_path, proc_snapshot, assert_same_snapshot):
    """A malformed --external or one of a kind procsnap does not know: one
    line naming it, exit 2, the process left as it was, nothing written;
    restore refuses it the same way."""
    t = procs.start_case(SLEEPER, "pie")
    before = proc_snapshot(t.pid)
    images = tmp_path / "img"
    images.mkdir()
    r = cli("dump", "-t", t.pid, "-D", images, "--external", spec)
    assert_cli_error(r, *names)
    assert r.returncode == 2
    assert_untouched(t.pid, before, images, proc_snapshot, assert_same_snapshot)
    r = cli("restore", "-D", images, "--external", spec)
    assert_cli_error(r, *names)
    assert r.returncode == 2
    assert_pass(t)
