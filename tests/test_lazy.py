"""restore --lazy-pages (restorer/lazy.py): the process runs before its
private anonymous memory is in; a lazy-pages server (a child of the
restore that outlives it) copies each page in when first touched and
pushes the rest, and its guard kills what it served if the server dies
before it is done. The target (tests/targets/lazy.c) checks every page
of its area, its heap and its stack after what it does right after the
restore; the state check runs on every restore."""

import contextlib
import os
import re
import signal

import pytest

from conftest import assert_cli_error, assert_pass, cli, dump_kill, restore, wait_until
from procsnap.errors import RestoreError
from procsnap.faults import InjectedFault

PG = 4096
MODES = ["default", "fork", "dontneed", "write", "mremap", "munmap"]


def start_lazy(procs, mode, mib=64):
    return procs.start([procs._targets.path("lazy", "pie"), mode, str(mib)], name=f"lazy-{mode}")


def area_of(t):
    line = next(l for l in t.output().splitlines() if l.startswith("AREA "))
    _, addr, pages = line.split()
    return int(addr, 16), int(pages)


def state(pid):
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rpartition(")")[2].split()[0]


def wait_server(pid):
    """The server is our child (the restore's, in this process): its exit status."""
    got = []

    def done():
        p, st = os.waitpid(pid, os.WNOHANG)
        if p == pid:
            got.append(os.waitstatus_to_exitcode(st))
        return bool(got)

    wait_until(done, f"lazy-pages server {pid} to finish", timeout=60)
    return got[0]


def registered(pid):
    """The areas of `pid` registered with a userfaultfd for missing pages ("um")."""
    out, start = [], None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                start = int(line.split("-")[0], 16)
            elif line.startswith("VmFlags:") and " um" in line:
                out.append(start)
    return out


def resident_pages(pid, start, npages):
    """Pages of start.. present in memory (pagemap bit 63)."""
    import struct
    with open(f"/proc/{pid}/pagemap", "rb") as f:
        f.seek(start // PG * 8)
        data = f.read(npages * 8)
    return sum(1 for (e,) in struct.iter_unpack("<Q", data) if e >> 63)


def lazy_restore(procs, t, images, log, servers, **options):
    return restore(procs, t, images, lazy_pages=True, lazy_log=str(log), lazy_server=servers.append, **options)


@pytest.mark.parametrize("mode", MODES)
def test_lazy_restore(procs, tmp_path, mode):
    """What the process does at once after the restore (fork: the child's
    missing pages served too; MADV_DONTNEED and munmap: those pages read
    zeros, never the image's; writes: kept, not overwritten by the push;
    mremap: the pages follow the area) leaves every page as after a
    normal restore."""
    t = start_lazy(procs, mode, 256 if mode == "default" else 64)
    images = dump_kill(t, tmp_path / "img")
    servers, log = [], tmp_path / "lazy.log"
    lazy_restore(procs, t, images, log, servers)
    assert_pass(t)
    assert wait_server(servers[0]) == 0, log.read_text()
    text = log.read_text()
    assert "done in" in text and "failed" not in text, text
    if mode == "fork":
        assert "forked: mm 1" in text, text
    if mode in ("dontneed", "munmap"):
        dropped = int(re.search(r"(\d+) dropped", text).group(1))
        assert dropped > 0, text


def test_runs_before_its_pages(procs, tmp_path, monkeypatch):
    """With the server held at its first push (it has answered only the
    faults of the restore itself), the process is restored, its area
    registered and almost all of it not there; once the server goes on, every
    page arrives, the registration goes, and the process checks PASS."""
    t = start_lazy(procs, "default", 256)
    start, npages = area_of(t)
    images = dump_kill(t, tmp_path / "img")
    servers, log = [], tmp_path / "lazy.log"
    monkeypatch.setenv("PROCSNAP_FAULT", "lazy-mid-push:stop")
    lazy_restore(procs, t, images, log, servers)
    server = servers[0]
    try:
        wait_until(lambda: state(server) == "T", "the server to stop at its first push")
        assert registered(t.pid), "no area registered with the server's userfaultfd"
        assert resident_pages(t.pid, start, npages) < npages // 100
    finally:
        os.kill(server, signal.SIGCONT)
    assert wait_server(server) == 0, log.read_text()
    assert registered(t.pid) == [], "areas still registered once the server is done"
    assert resident_pages(t.pid, start, npages) > npages * 8 // 10
    assert_pass(t)


def test_server_killed(procs, tmp_path, monkeypatch):
    """The server SIGKILLed before it is done: without its guard the uffd
    would close and the missing pages read zeros (the kernel unregisters
    the ranges on the last close; no SIGBUS). The guard still holds the
    uffd, so the ranges stay registered, and kills the process: it never
    runs on with zeros where its memory was."""
    t = start_lazy(procs, "default", 64)
    images = dump_kill(t, tmp_path / "img")
    servers, log = [], tmp_path / "lazy.log"
    monkeypatch.setenv("PROCSNAP_FAULT", "lazy-mid-push:stop")
    lazy_restore(procs, t, images, log, servers)
    server = servers[0]
    wait_until(lambda: state(server) == "T", "the server to stop at its first push")
    os.kill(server, signal.SIGKILL)
    os.kill(server, signal.SIGCONT)
    assert wait_server(server) == -signal.SIGKILL
    t.signal(signal.SIGUSR1)  # it touches its area: it waits there (the guard holds the uffd) until killed
    status, out = t.wait_exit(20)
    assert status == -signal.SIGKILL, f"{t}: status {status}, output:\n{out}"
    assert "PASS" not in out and "FAIL" not in out, out
    text = log.read_text()
    assert f"killed {t.pid}" in text, text
    guard = int(re.search(r"guard \(pid (\d+)\)", text).group(1))
    wait_until(lambda: not os.path.exists(f"/proc/{guard}") or state(guard) == "Z", "the guard to exit")
    with contextlib.suppress(ChildProcessError):  # reparented to us (the subreaper) when the server died
        os.waitpid(guard, 0)


def test_fault_after_register(procs, tmp_path, monkeypatch):
    """A restore that fails once the uffd is registered: the half-restored
    process is killed, the server exits, nothing is left."""
    t = start_lazy(procs, "default", 16)
    images = dump_kill(t, tmp_path / "img")
    servers = []
    monkeypatch.setenv("PROCSNAP_FAULT", "lazy-after-register")
    with pytest.raises(InjectedFault):
        restore(procs, t, images, lazy_pages=True, lazy_server=servers.append)
    assert not os.path.exists(f"/proc/{t.pid}")
    assert not os.path.exists(f"/proc/{servers[0]}")  # waited for by the failed restore
    monkeypatch.delenv("PROCSNAP_FAULT")
    servers.clear()
    restore(procs, t, images, lazy_pages=True, lazy_server=servers.append)
    assert_pass(t)
    assert wait_server(servers[0]) == 0


@pytest.mark.parametrize("case_id", ["tree-prefork", "tree-zombie"])
def test_tree_refused(procs, tmp_path, case_id):
    """A tree (zombies count: the root forks them at restore) is not
    restored lazily yet: refused by name before anything is made."""
    from conftest import CASES_BY_ID

    t = procs.start_case(CASES_BY_ID[case_id], "pie")
    images = dump_kill(t, tmp_path / "img")
    with pytest.raises(RestoreError, match=rf"pid {t.pid}: --lazy-pages: the image is a tree of \d+ processes"):
        restore(procs, t, images, lazy_pages=True)
    r = cli("restore", "-D", images, "--lazy-pages", "-d")
    assert_cli_error(r, f"pid {t.pid}", "--lazy-pages", "tree")
    restore(procs, t, images)  # a normal restore of it works
    assert_pass(t)


def test_cli_detached(procs, tmp_path):
    """procsnap restore --lazy-pages -d returns once the process runs and
    says which pid serves its pages; the server outlives it."""
    t = start_lazy(procs, "write", 64)
    images = dump_kill(t, tmp_path / "img")
    log = tmp_path / "lazy.log"
    r = cli("restore", "-D", images, "--lazy-pages", "--lazy-pages-log", log, "-d")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(t.pid)
    _passes_served_to_the_end(t, r.stderr, log)


def _passes_served_to_the_end(t, stderr, log):
    """The restored process (the restore's child, reparented to us, the
    subreaper) passes, and the server it named finishes its log."""
    server = int(re.search(r"lazy pages served by pid (\d+)", stderr).group(1))
    t.adopt(t.pid)
    assert_pass(t)
    wait_until(lambda: not os.path.exists(f"/proc/{server}") or state(server) == "Z", "the server to finish",
               timeout=60)
    assert "done in" in log.read_text(), log.read_text()


def test_check_reports_lazy_pages():
    """procsnap check says whether restore --lazy-pages can work here (it can on this kernel)."""
    r = cli("check")
    line = next((l for l in r.stdout.splitlines() if " lazy_pages:" in l), None)
    assert line is not None and line.startswith("ok") and "MISSING" in line and "UFFDIO_COPY" in line, r.stdout


def test_dump_while_lazy_refused(procs, tmp_path, monkeypatch):
    """A dump of a process whose lazy restore is not done would miss the
    pages still on their way (pagemap shows them absent): refused by
    name, the process runs on; once the server is done it dumps again."""
    import procsnap
    from procsnap.errors import Unsupported

    t = start_lazy(procs, "default", 16)
    images = dump_kill(t, tmp_path / "img")
    servers = []
    monkeypatch.setenv("PROCSNAP_FAULT", "lazy-mid-push:stop")
    lazy_restore(procs, t, images, tmp_path / "lazy.log", servers)
    monkeypatch.delenv("PROCSNAP_FAULT")
    server = servers[0]
    try:
        wait_until(lambda: state(server) == "T", "the server to stop at its first push")
        start = registered(t.pid)[0]
        with pytest.raises(Unsupported, match=rf"pid {t.pid}: VMA {start:#x}-0x[0-9a-f]+ .*registered with a "
                                              "userfaultfd for missing pages"):
            procsnap.dump(t.pid, str(tmp_path / "again"), leave_running=True)
    finally:
        os.kill(server, signal.SIGCONT)
    assert wait_server(server) == 0
    procsnap.dump(t.pid, str(tmp_path / "after"), leave_running=True)
    assert_pass(t)


CASES_LAZILY = ["memory", "cpu-regs", "signals", "threads", "settings", "settings-mdwe", "files", "sleep-read",
                "writer", "creds", "memlock-mlock", "memlock-mlockall", "memlock-guard", "seccomp-filter",
                "seccomp-strict", "ipc-anonfd", "epollclosed"]


@pytest.mark.parametrize("case_id", CASES_LAZILY)
def test_cases_lazily(procs, tmp_path, case_id):
    """The ordinary targets restored with --lazy-pages: each checks itself
    (its memory among the rest) and the state check runs."""
    from conftest import CASES_BY_ID

    t = procs.start_case(CASES_BY_ID[case_id], "pie")
    images = dump_kill(t, tmp_path / "img")
    servers, log = [], tmp_path / "lazy.log"
    lazy_restore(procs, t, images, log, servers)
    assert_pass(t)
    assert wait_server(servers[0]) == 0, log.read_text()


def test_stream_lazily(procs, tmp_path):
    """dump --stream - | restore --stream - --lazy-pages -d: the temporary
    image directory is removed once the process runs, while the server,
    which mapped pages.img before, still serves from it."""
    import subprocess
    import sys

    from conftest import REPO

    t = start_lazy(procs, "dontneed", 64)
    log = tmp_path / "lazy.log"
    py = [sys.executable, "-m", "procsnap"]
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    dump = subprocess.Popen([*py, "dump", "-t", str(t.pid), "--stream", "-"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    rest = subprocess.Popen([*py, "restore", "--stream", "-", "--lazy-pages", "--lazy-pages-log", str(log), "-d"],
                            cwd=REPO, stdin=dump.stdout, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    dump.stdout.close()
    assert t.reap() == -signal.SIGKILL  # the dump kills the source once the image is written
    out, err = rest.communicate(timeout=120)
    assert dump.wait(timeout=60) == 0, dump.stderr.read()
    assert rest.returncode == 0, err
    assert int(out.split()[-1]) == t.pid
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("procsnap-stream-")]
    _passes_served_to_the_end(t, err, log)


def test_closed_uffd_reads_zeros():
    """The kernel fact the guard is for: once the last fd of a uffd is
    closed its ranges are unregistered and a missing page fills as an
    ordinary fault, with zeros, no signal. A page here of our own, with
    nothing to wait for it: registered, the uffd closed, then read."""
    import ctypes

    from procsnap.kernel import mapping, uffd
    from procsnap.kernel.arch.x86_64 import NR
    from procsnap.kernel.libc import syscall

    start = mapping.libc.mmap(None, PG, mapping.PROT_RW, mapping.MAP_PRIVATE | mapping.MAP_ANONYMOUS, -1, 0)
    assert start != mapping.MAP_FAILED
    try:
        fd = syscall(NR.userfaultfd, os.O_CLOEXEC | os.O_NONBLOCK)
        uffd.enable(fd)
        uffd.register_missing(fd, start, start + PG)
        assert any(l.startswith(f"{start:x}-") for l in open("/proc/self/maps"))
        with open("/proc/self/smaps") as f:
            text = f.read()
        flags = text[text.index(f"{start:x}-"):].split("VmFlags:", 1)[1].split("\n", 1)[0]
        assert " um" in flags, flags
        os.close(fd)
        import threading
        got = []  # read in a thread: a page still registered would make it wait forever
        reader = threading.Thread(target=lambda: got.append(ctypes.string_at(start, PG)), daemon=True)
        reader.start()
        reader.join(20)
        assert got == [bytes(PG)], "the page of a closed uffd did not read as zeros"
    finally:
        mapping.unmap(start, PG)
