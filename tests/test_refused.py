"""What procsnap refuses is refused by name: the kind of object, with its
pid and fd (or VMA), in words ("a TCP socket listening on 127.0.0.1:PORT",
"an io_uring instance"), never "socket:[N]" or a Python exception's name;
the target runs on untouched and its self-check still PASSes. And an error
says what failed: a failed read of a process's memory names that pid and
address, not the image directory.
"""

import os
import signal
import socket
import sys
import textwrap

import pytest

import procsnap
from conftest import (CASES_BY_ID, REFUSED_CASES, assert_cli_error, assert_pass, assert_untouched, cli,
                      descendants, dump_kill, restore, wait_until)
from procsnap import model
from procsnap.errors import DumpError, RestoreError, Unsupported
from procsnap.image.writer import ImageWriter
from procsnap.dumper.pages import write_pages_seized

SLEEPER = CASES_BY_ID["sleep-pause"]
REFUSED_BY_ID = {c.mode: c for c in REFUSED_CASES}

# target mode -> what the refusal must say (besides the pid), and whether it names an fd
REFUSED_OBJECTS = {
    "io_uring": ("an io_uring instance (io_uring_setup)", "anon_inode:[io_uring]"),
    "userfaultfd": ("a userfaultfd", "anon_inode:[userfaultfd]"),
    "bpf-map": ("a BPF map", "anon_inode:bpf-map"),
    "perf_event": ("a perf event (perf_event_open)", "anon_inode:[perf_event]"),
    "aio": ("VMA ", "is the ring of an AIO context (io_setup)", "/[aio] (deleted)"),
}


def _refused(t, tmp_path, proc_snapshot, assert_same_snapshot, names):
    images = tmp_path / "img"
    images.mkdir()
    before = proc_snapshot(t.pid)
    with pytest.raises(Unsupported) as exc:
        procsnap.dump(t.pid, str(images))
    for name in (f"pid {t.pid}",) + names:
        assert name in str(exc.value), f"{name!r} not named in {exc.value}"
    assert "Error" not in str(exc.value) and "[Errno" not in str(exc.value), str(exc.value)
    assert_untouched(t.pid, before, images, proc_snapshot, assert_same_snapshot)
    assert_cli_error(cli("dump", "-t", t.pid, "-D", images), f"pid {t.pid}", *names)
    assert_untouched(t.pid, before, images, proc_snapshot, assert_same_snapshot)
    return str(exc.value)


@pytest.mark.parametrize("mode", sorted(REFUSED_OBJECTS))
def test_kernel_object_refused_by_name(mode, procs, tmp_path, proc_snapshot, assert_same_snapshot):
    t = procs.start_case(REFUSED_BY_ID[mode], "pie")
    message = _refused(t, tmp_path, proc_snapshot, assert_same_snapshot, REFUSED_OBJECTS[mode])
    if mode != "aio":
        assert " fd " in message, message
    assert_pass(t)


@pytest.mark.parametrize("mode", sorted(REFUSED_OBJECTS))
def test_refused_target_check_can_fail(mode, procs):
    """The self-check after a refused dump is able to fail: with the object
    gone (sabotage) the target says FAIL."""
    t = procs.start_case(REFUSED_BY_ID[mode], "pie", sabotage=True)
    status, out = t.wait_result()
    assert status == 1 and "FAIL: " in out and "PASS" not in out, out


def _tcp_backlog():
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.bind(("127.0.0.1", 0))
    lsock.listen()
    c = socket.create_connection(lsock.getsockname())  # never accepted: waits in the accept queue
    return [lsock, c], (f"a TCP socket listening on 127.0.0.1:{lsock.getsockname()[1]}",
                        "with 1 connection in its accept queue")


def _tcp_connection():
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.bind(("127.0.0.1", 0))
    lsock.listen()
    c = socket.create_connection(lsock.getsockname())
    server, _ = lsock.accept()
    here, there = c.getsockname(), c.getpeername()
    return [c, lsock, server], (f"a TCP connection 127.0.0.1:{here[1]} -> 127.0.0.1:{there[1]} (ESTABLISHED)",
                                "live TCP connections")


def _udp_queued(family=socket.AF_INET, host="127.0.0.1", shown="127.0.0.1"):
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.bind((host, 0))
    sender = socket.socket(family, socket.SOCK_DGRAM)
    sender.sendto(b"queued", s.getsockname())
    return [s, sender], (f"a UDP socket bound to {shown}:{s.getsockname()[1]}", "datagrams queued")


def _udp6_queued():
    return _udp_queued(socket.AF_INET6, "::1", "[::1]")


# sockets the inet kind (objects/inet.py) does not restore yet; the rest are restored (tests/test_sockets.py)
SOCKETS = {"tcp-backlog": _tcp_backlog, "tcp-connection": _tcp_connection, "udp-queued": _udp_queued,
           "udp6-queued": _udp6_queued}


@pytest.mark.parametrize("kind", sorted(SOCKETS))
def test_socket_refused_by_what_it_is(kind, procs, tmp_path, proc_snapshot, assert_same_snapshot):
    """A socket no kind restores is named by what it is, from the target's
    own /proc/PID/net tables (objects/sockname.py)."""
    socks, names = SOCKETS[kind]()
    try:
        fd = socks[0].fileno()
        t = procs.start_case(SLEEPER, "pie", pass_fds=(fd,))
        socks[0].close()  # the target's now; the others (a connection's far end) stay ours until the end
        message = _refused(t, tmp_path, proc_snapshot, assert_same_snapshot, (f"fd {fd} is ",) + names)
        assert "socket:[" in message  # the inode, after what it is
        assert_pass(t)
    finally:
        for s in socks:
            s.close()


def test_memory_read_failure_names_pid_and_address(procs, tmp_path):
    """A read of a process's memory that fails (here: a guard page, whose
    read faults) is reported as reading that address of that pid, in its
    VMA, never as a failure to write the image."""
    t = procs.start_case(CASES_BY_ID["memlock-guard"], "pie")
    guard = None
    for line in open(f"/proc/{t.pid}/smaps"):
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:
            start, end = (int(x, 16) for x in fields[0].split("-"))
        elif fields[0] == "VmFlags:" and "gu" in fields[1:]:
            guard = (start, end)
    assert guard, "the target has no guard region"
    start, end = guard
    vma = model.Vma(start, end, model.VmaKind.ANON, model.Prot.PROT_READ | model.Prot.PROT_WRITE)
    writer = ImageWriter(str(tmp_path))
    try:
        with pytest.raises(DumpError) as exc:  # pages 2-3 are the guard (tests/targets/memlock.c)
            write_pages_seized(t.pid, [(vma, start, 4 * 4096)], writer.pages)
    finally:
        writer.abort()
    message = str(exc.value)
    assert message.startswith(f"pid {t.pid}: cannot read its memory at {start + 2 * 4096:#x} "
                              f"(VMA {start:#x}-{end:#x} anon): Bad address"), message
    assert str(tmp_path) not in message and "write" not in message, message
    assert_pass(t)


def test_restore_names_the_missing_working_directory(procs, tmp_path):
    """A restore whose working directory was removed since the dump fails
    naming it, with the kernel's reason and no Python exception name."""
    wd = tmp_path / "wd"
    wd.mkdir()
    binary = procs._targets.path(SLEEPER.target, "pie")
    t = procs.start([binary, SLEEPER.mode], cwd=wd, name="sleeper-in-wd")
    images = dump_kill(t, tmp_path / "img")
    wd.rmdir()
    with pytest.raises(RestoreError) as exc:
        restore(procs, t, images)
    message = str(exc.value)
    assert f"working directory {wd}" in message and "No such file or directory" in message, message
    assert "Error" not in message and "[Errno" not in message, message
    assert_cli_error(cli("restore", "-D", images), f"working directory {wd}", "No such file or directory")


EPOLL_OF_A_FILE_HELD_OUTSIDE = textwrap.dedent("""\
    import os, select, signal, sys
    r, w = os.pipe()
    ep = select.epoll()
    ep.register(r, select.EPOLLIN)
    child = os.fork()
    if child == 0:
        os.close(r)  # the watch lives on: the parent still holds the pipe
        print("READY", ep.fileno(), r, flush=True)
        signal.signal(signal.SIGUSR1, lambda *a: None)
        signal.pause()
        print("PASS" if ep.poll(0) == [] else "FAIL: events", flush=True)
        sys.exit(0)
    os.waitpid(child, 0)
""")


def test_epoll_watching_a_file_no_fd_of_the_process_holds(procs, tmp_path, proc_snapshot, assert_same_snapshot):
    """An epoll watch whose fd was closed, its file held only by a process
    outside the tree (its parent): there is nothing to restore it from."""
    t = procs.start([sys.executable, "-c", EPOLL_OF_A_FILE_HELD_OUTSIDE], name="epoll-outside", ready=False)
    wait_until(lambda: "READY" in t.output(), "the child's READY")
    child = descendants(t.pid)[0]
    _, epfd, closed = t.output().split()[:3]
    images = tmp_path / "img"
    images.mkdir()
    before = proc_snapshot(child)
    with pytest.raises(Unsupported) as exc:
        procsnap.dump(child, str(images), shell_job=True)
    assert str(exc.value).startswith(f"pid {child}: fd {epfd} is an epoll watching fd {closed}, which is closed"), \
        str(exc.value)
    assert "no other fd of the process holds its file" in str(exc.value), str(exc.value)
    assert_untouched(child, before, images, proc_snapshot, assert_same_snapshot)
    os.kill(child, signal.SIGUSR1)
    wait_until(lambda: "PASS" in t.output() or "FAIL" in t.output(), "the child's check")
    assert "PASS" in t.output(), t.output()
