"""Dump and restore real processes, then let them check themselves.

Every test follows the same shape: start a target, wait READY, take the
visible state (/proc/PID/maps and the fd table), dump, reap, restore onto the
same pid, compare the visible state, then SIGUSR1: the target checks its own
state and must say PASS.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import procsnap
from conftest import (assert_pass, dump_kill, image_size, proc_status, put_back_times, restore,
                      shared_file_times)

KIB = 1024
MIB = 1024 * KIB


def test_dump_restore(procs, case, variant, tmp_path, proc_snapshot, assert_same_snapshot):
    t = procs.start_case(case, variant)
    before = proc_snapshot(t.pid)
    images = dump_kill(t, tmp_path / "img", before)
    procsnap.open_image(str(images))        # the validated reader accepts what dump wrote
    restore(procs, t, images)
    assert_same_snapshot(before, proc_snapshot(t.pid), ignore_pos=case.ignore_pos)
    assert_pass(t)


@pytest.mark.cases("memory", "cpu-regs", "cpu-busy", "sleep-read", "signals", "signals-sigtrap", "files",
                   "settings", "settings-mdwe", "locks")
@pytest.mark.variants("pie", "static")
def test_three_cycles(procs, case, variant, tmp_path, proc_snapshot, assert_same_snapshot):
    t = procs.start_case(case, variant)
    before = proc_snapshot(t.pid)
    for cycle in range(3):
        images = dump_kill(t, tmp_path / f"img{cycle}")
        restore(procs, t, images)
        assert_same_snapshot(before, proc_snapshot(t.pid), ignore_pos=case.ignore_pos)
        time.sleep(0.05)        # let the restored process run a little
    assert_pass(t)


@pytest.mark.cases("memory", "cpu-regs", "cpu-busy", "sleep-clock_abs", "signals", "signals-sigtrap", "files",
                   "writer", "settings", "settings-mdwe")
@pytest.mark.variants("pie")
def test_leave_running(procs, case, variant, tmp_path, proc_snapshot, assert_same_snapshot):
    """The dump leaves no trace; then the image still restores after the original exits."""
    t = procs.start_case(case, variant)
    before = proc_snapshot(t.pid)
    out_size = t.output_size()
    times = shared_file_times(t.pid)
    images = tmp_path / "img"
    images.mkdir()
    stats = procsnap.dump(t.pid, str(images), leave_running=True)

    # Pages came from a copy-on-write snapshot, which is gone without a trace.
    assert stats.snapshot, "leave_running did not use a copy-on-write snapshot"
    assert 0 < stats.frozen_s < stats.total_s
    assert Path(f"/proc/{t.pid}/task/{t.pid}/children").read_text().split() == [], \
        "the snapshot child (or its zombie) is still there"
    assert t.alive(), f"{t} died after a leave_running dump:\n{t.output()}"
    st = proc_status(t.pid)
    assert st["TracerPid"] == "0", f"{t} still traced by {st['TracerPid']}"
    assert st["State"][0] in "SR", f"{t} left in state {st['State']}"
    assert_same_snapshot(before, proc_snapshot(t.pid), ignore_pos=case.ignore_pos)
    assert_pass(t)

    # The original finished (and may have changed its files); the image is
    # of the process before SIGUSR1 and must restore and pass again.
    t.reap()
    t.truncate_output(out_size)     # its stdout resumes at the saved offset
    put_back_times(times)
    restore(procs, t, images)
    assert_pass(t)


PY_COUNTER = textwrap.dedent("""\
    import os, signal, sys, time
    done = False
    def on_usr1(sig, frame):
        global done
        done = True
    signal.signal(signal.SIGUSR1, on_usr1)
    path = sys.argv[1]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    i = 0
    while not done:
        os.write(fd, b"%d\\n" % i)
        i += 1
        if i == 20:
            os.write(1, b"READY\\n")
        time.sleep(0.01)
    with open(path) as f:
        lines = f.read().splitlines()
    bad = [(n, l) for n, l in enumerate(lines) if l != str(n)]
    if bad or len(lines) != i:
        os.write(1, b"FAIL: counter expected 0..%d found %r\\n" % (i - 1, bad[:3]))
        sys.exit(1)
    os.write(1, b"PASS\\n")
""")


def counter_lines(path):
    return Path(path).read_text().splitlines()


def wait_for(cond, timeout, what):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def syscall_nr(pid):
    """First field of /proc/PID/syscall: the blocking syscall, or 'running'."""
    with open(f"/proc/{pid}/syscall") as f:
        return f.read().split()[0]


def test_python_and_coreutils_sleep(procs, tmp_path):
    python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    script = tmp_path / "counter.py"
    script.write_text(PY_COUNTER)
    counter = tmp_path / "counter.txt"
    py = procs.start([python, script, counter], name="python")
    py.ignore_pos = (3,)  # it appends to counter.txt until the dump freezes it
    sl = procs.start(["sleep", "1000"], ready=False, name="sleep")
    wait_for(lambda: syscall_nr(sl.pid) == "230", 5, "sleep in clock_nanosleep")
    sleep_cmdline = Path(f"/proc/{sl.pid}/cmdline").read_bytes()

    dump_kill(py, tmp_path / "img-py")
    dump_kill(sl, tmp_path / "img-sleep")
    at_dump = counter_lines(counter)
    time.sleep(0.1)
    assert counter_lines(counter) == at_dump, "the counter moved while python was dead"

    restore(procs, py, tmp_path / "img-py")
    restore(procs, sl, tmp_path / "img-sleep")

    wait_for(lambda: len(counter_lines(counter)) >= len(at_dump) + 50, 10,
             "the restored python to write 50 more lines")
    lines = counter_lines(counter)
    assert lines == [str(n) for n in range(len(lines))], \
        f"counter has a gap or repeat near line {len(at_dump)}: " \
        f"{lines[max(0, len(at_dump) - 3):len(at_dump) + 3]}"
    assert_pass(py)

    # 219: restart_syscall, the same sleep carried on after the state check's
    # own freeze (the kernel resumes an interrupted relative sleep through it)
    sleeping = ("230", "219")
    wait_for(lambda: syscall_nr(sl.pid) in sleeping, 5, "restored sleep in clock_nanosleep")
    time.sleep(0.3)
    assert sl.alive(), f"restored sleep exited with {sl.status}"
    assert syscall_nr(sl.pid) in sleeping
    assert proc_status(sl.pid)["State"].startswith("S")
    assert Path(f"/proc/{sl.pid}/cmdline").read_bytes() == sleep_cmdline


@pytest.mark.cases("memory", "cpu-regs", "sleep-nanosleep", "signals", "identity", "files")
def test_image_skips_untouched_pages(procs, case, variant, tmp_path):
    """Never-touched pages (and clean file pages) are not stored."""
    t = procs.start_case(case, variant)
    st = proc_status(t.pid)
    vm_size = int(st["VmSize"].split()[0]) * KIB
    rss_anon = int(st["RssAnon"].split()[0]) * KIB
    images = dump_kill(t, tmp_path / "img")
    size = image_size(images)
    assert size < vm_size // 2, f"image {size} B is not much smaller than VmSize {vm_size} B"
    # slack for metadata and pages mapped to the zero page by reads
    assert size <= rss_anon + 2 * MIB, \
        f"image {size} B > RssAnon {rss_anon} B + 2 MiB: untouched or clean pages stored?"
    if case.id == "memory":
        assert size < 16 * MIB, f"image {size} B: the 64 MiB sparse area was stored?"


def test_fd_above_the_restorers_soft_limit(procs, tmp_path):
    """A process that raised its own fd limit and holds fd 5000 is restored
    by a restorer whose soft limit is 1024: numbers go up to the hard limit,
    the saved limits come last."""
    import resource

    code = textwrap.dedent("""
        import os, resource, signal, sys, time
        resource.setrlimit(resource.RLIMIT_NOFILE, (8192, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        fd = os.open("/dev/null", os.O_RDONLY)
        os.dup2(fd, 5000)
        os.close(fd)
        got = []
        signal.signal(signal.SIGUSR1, lambda *a: got.append(1))
        os.write(1, b"READY\\n")
        while not got:
            time.sleep(0.05)
        ok = os.path.samestat(os.fstat(5000), os.stat("/dev/null"))
        ok = ok and resource.getrlimit(resource.RLIMIT_NOFILE)[0] == 8192
        os.write(1, b"PASS\\n" if ok else b"FAIL: fd 5000 or the nofile limit\\n")
        sys.exit(0 if ok else 1)
    """)
    t = procs.start([sys.executable, "-c", code], name="highfd")
    images = dump_kill(t, tmp_path / "img")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))
    try:
        restore(procs, t, images)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert os.readlink(f"/proc/{t.pid}/fd/5000") == "/dev/null"
    assert_pass(t)


def test_huge_reservation_costs_no_memory(procs, tmp_path):
    """64 GiB of PROT_NONE reserved (as runtimes and sanitizers do) next to a
    few written pages: the dump scans it in windows, procsnap's peak RSS
    stays small, the written pages come back."""
    code = textwrap.dedent("""
        import mmap, os, signal, sys, time
        big = mmap.mmap(-1, 64 << 30, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, prot=0)  # PROT_NONE
        small = mmap.mmap(-1, 1 << 20)
        small[:5] = b"hello"
        got = []
        signal.signal(signal.SIGUSR1, lambda *a: got.append(1))
        os.write(1, b"READY\\n")
        while not got:
            time.sleep(0.05)
        ok = small[:5] == b"hello" and len(big) == 64 << 30
        os.write(1, b"PASS\\n" if ok else b"FAIL: memory\\n")
        sys.exit(0 if ok else 1)
    """)
    t = procs.start([sys.executable, "-c", code], name="reserve")
    images = tmp_path / "img"
    images.mkdir()
    wrapper = textwrap.dedent("""
        import resource, subprocess, sys
        r = subprocess.run(sys.argv[1:]).returncode
        print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r)
    """)
    out = subprocess.run([sys.executable, "-c", wrapper, sys.executable, "-m", "procsnap",
                          "dump", "-t", str(t.pid), "-D", str(images)],
                         capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent.parent)
    maxrss_kib, rc = map(int, out.stdout.split())
    assert rc == 0, out.stderr
    assert maxrss_kib < 100 * 1024, f"procsnap peaked at {maxrss_kib} KiB dumping a 64 GiB reservation"
    assert t.reap() == -signal.SIGKILL
    assert image_size(images) < 64 * MIB
    restore(procs, t, images)
    assert_pass(t)


@pytest.mark.cases("ghosts")
@pytest.mark.variants("static")
def test_sparse_unlinked_file_costs_its_data(procs, case, variant, tmp_path):
    """A 2 GiB unlinked file with 1 MiB of data in three extents: the image
    holds the data, not the holes (the target checks that the holes are
    holes again, SEEK_DATA/SEEK_HOLE)."""
    t = procs.start_case(case, variant)
    images = dump_kill(t, tmp_path / "img")
    ghosts = (images / "ghosts.img").stat().st_size
    assert ghosts == 1 * MIB, f"ghosts.img holds {ghosts} bytes for 1 MiB of data"
    assert image_size(images) < 4 * MIB
    restore(procs, t, images)
    assert_pass(t)
