"""Process fds (issue 11 part 5): pidfds of live processes, of threads and
of processes that are gone; /proc files of processes of the tree; namespace
fds of the host's namespaces. A python3 target holds them all and checks
after the restore that each still names what it named."""

import os
import textwrap

from conftest import (assert_cli_error, assert_pass, assert_untouched, cli, dump_kill, proc_snapshot, wait_until,
                      assert_same_snapshot, restore)

PYTHON = "/usr/bin/python3"

HOLDER = textwrap.dedent("""\
    import os, select, signal, sys, threading, time
    PIDFD_THREAD = os.O_EXCL
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    fails = []
    def check(what, expected, found):
        if expected != found:
            fails.append(f"FAIL: {what}: expected {expected!r} found {found!r}")
    child = os.fork()
    if child == 0:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})
        signal.sigwait({signal.SIGUSR2})
        os._exit(7)
    gone = os.fork()
    if gone == 0:
        os._exit(0)
    dead = os.pidfd_open(gone)
    os.waitpid(gone, 0)
    release = threading.Event()
    tids = []
    def worker():
        tids.append(threading.get_native_id())
        release.wait()
    th = threading.Thread(target=worker)
    th.start()
    while not tids:
        time.sleep(0.01)
    live = os.pidfd_open(child)
    live_nb = os.pidfd_open(child, os.O_NONBLOCK)
    me = os.pidfd_open(os.getpid(), PIDFD_THREAD)
    thread = os.pidfd_open(tids[0], PIDFD_THREAD)
    alias = os.dup(live)
    status = os.open("/proc/self/status", os.O_RDONLY)
    os.read(status, 10)   # a position to keep
    cmdline = os.open(f"/proc/{child}/cmdline", os.O_RDONLY)
    comm = os.open(f"/proc/self/task/{tids[0]}/comm", os.O_RDONLY)
    procdir = os.open(f"/proc/{child}", os.O_RDONLY | os.O_DIRECTORY)
    net = os.open("/proc/self/ns/net", os.O_RDONLY)
    uts = os.open("/proc/thread-self/ns/uts", os.O_RDONLY)
    if os.environ.get("PS_TARGET_SABOTAGE") == "1":
        os.dup2(os.pidfd_open(os.getpid()), alias)
    def pid_of(fd):
        for line in open(f"/proc/self/fdinfo/{fd}"):
            if line.startswith("Pid:"):
                return int(line.split()[1])
    print("READY", flush=True)
    signal.sigwait({signal.SIGUSR1})
    check("live pidfd", child, pid_of(live))
    check("its dup", child, pid_of(alias))
    check("nonblocking pidfd", (child, os.O_NONBLOCK), (pid_of(live_nb), os.get_blocking(live_nb) and 0 or os.O_NONBLOCK))
    check("thread pidfd of myself", os.getpid(), pid_of(me))
    check("thread pidfd", tids[0], pid_of(thread))
    check("dead pidfd", -1, pid_of(dead))
    try:
        signal.pidfd_send_signal(dead, 0)
        check("signal through the dead pidfd", "ProcessLookupError", "sent")
    except ProcessLookupError:
        pass
    check("live pidfd not readable while the child runs", [], select.select([live], [], [], 0)[0])
    check("/proc/self/status position", 10, os.lseek(status, 0, os.SEEK_CUR))
    os.lseek(status, 0, os.SEEK_SET)
    check("/proc/self/status is mine", f"Pid:\\t{os.getpid()}", [l for l in os.read(status, 4096).decode().splitlines() if l.startswith("Pid:")][0])
    check("/proc/CHILD/cmdline", open("/proc/self/cmdline", "rb").read(), os.pread(cmdline, 4096, 0))
    check("/proc/self/task/TID/comm", open(f"/proc/self/task/{tids[0]}/comm").read(), os.pread(comm, 64, 0).decode())
    check("/proc/CHILD dir", os.stat(f"/proc/{child}").st_ino, os.fstat(procdir).st_ino)
    for name, fd in (("net", net), ("uts", uts)):
        check(f"ns {name}", os.stat(f"/proc/self/ns/{name}").st_ino, os.fstat(fd).st_ino)
    signal.pidfd_send_signal(live, signal.SIGUSR2)
    check("child through its pidfd", [live], select.select([live], [], [], 10)[0])
    check("child's exit", 7, os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]))
    release.set()
    th.join()
    print("\\n".join(fails) if fails else "PASS", flush=True)
    sys.exit(1 if fails else 0)
""")


def test_process_fds(procs, tmp_path):
    """Every kind of process fd comes back naming the same process, thread,
    file or namespace (and the state check compares their fdinfo Pid lines)."""
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    t = procs.start([PYTHON, script], name="holder")
    restore(procs, t, dump_kill(t, tmp_path / "img"))
    assert_pass(t)


def test_process_fds_sabotaged(procs, tmp_path):
    """The holder's checks can fail: its dup of the pidfd of the child names itself."""
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    t = procs.start([PYTHON, script], name="holder", env={"PS_TARGET_SABOTAGE": "1"})
    status, out = t.wait_result()
    assert status == 1 and "FAIL: its dup" in out, out


OUTSIDE = textwrap.dedent("""\
    import os, sys, time
    fd = os.pidfd_open(int(sys.argv[1])) if sys.argv[2] == "pidfd" else os.open(f"/proc/{sys.argv[1]}/status", os.O_RDONLY)
    print("READY", flush=True)
    time.sleep(600)
""")


def test_outside_the_tree_refused(procs, tmp_path):
    """A pidfd, or a /proc file, of a process outside the tree: refused
    naming the pid, the fd and the process it names; left untouched."""
    script = tmp_path / "outside.py"
    script.write_text(OUTSIDE)
    for how in ("pidfd", "proc"):
        t = procs.start([PYTHON, script, os.getpid(), how], name=f"outside-{how}")
        fd = max(int(x) for x in os.listdir(f"/proc/{t.pid}/fd"))
        images = tmp_path / f"img-{how}"
        images.mkdir()
        before = proc_snapshot(t.pid)
        r = cli("dump", "-t", t.pid, "-D", images)
        assert_cli_error(r, f"pid {t.pid}", f"fd {fd}", str(os.getpid()), "outside the dumped tree")
        assert_untouched(t.pid, before, images, proc_snapshot, assert_same_snapshot)


NSFD = textwrap.dedent("""\
    import os, sys, time
    fd = os.open(f"/proc/{sys.argv[1]}/ns/uts", os.O_RDONLY)
    print("READY", flush=True)
    time.sleep(600)
""")


def test_foreign_namespace_fd_refused(procs, tmp_path):
    """An fd of a UTS namespace that is not the host's (held open, the
    process itself in the host's): refused naming the fd and the namespace."""
    other = procs.start(["unshare", "--uts", "sh", "-c", "echo READY; exec sleep 600"], name="unshared")
    wait_until(lambda: os.readlink(f"/proc/{other.pid}/ns/uts") != os.readlink("/proc/self/ns/uts"),
               "the unshared namespace")
    script = tmp_path / "nsfd.py"
    script.write_text(NSFD)
    t = procs.start([PYTHON, script, other.pid], name="nsfd")
    fd = max(int(x) for x in os.listdir(f"/proc/{t.pid}/fd"))
    images = tmp_path / "img"
    images.mkdir()
    before = proc_snapshot(t.pid)
    r = cli("dump", "-t", t.pid, "-D", images)
    assert_cli_error(r, f"pid {t.pid}: fd {fd}", os.readlink(f"/proc/{other.pid}/ns/uts"), "other than the host's")
    assert_untouched(t.pid, before, images, proc_snapshot, assert_same_snapshot)
