"""Injected faults at every stage of a dump and a restore, and soak runs.

PROCSNAP_FAULT=<stage> makes procsnap raise InjectedFault at that stage
(tested in-process); PROCSNAP_FAULT=<stage>:kill makes it SIGKILL itself
there (tested through the CLI, nothing of procsnap can clean up then).

A dump that fails either way leaves the target running, untraced, its maps
and fds as they were, and its own self-check passing. One documented
limitation: SIGKILLed at mid-collect, procsnap's 16 KiB scratch area (mapped
in the target for the arguments of injected syscalls) stays there. An error
removes every file the dump created; a SIGKILL before the commit may leave
page data but never procsnap.img, so the directory is not taken for an
image; a SIGKILL after the commit (mid-swap, before-thaw) leaves a complete image.

A restore that fails either way leaves the image byte for byte as it was
and no process with the saved pid: on an error procsnap kills and reaps the
half-built process; SIGKILLed, the half-built process dies with it.

The soak tests repeat dumps and restores and then look for what a leak
would leave: fds and pages.img mappings in the test process, traced
processes, stray files in the image directories.
"""

import dataclasses
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import procsnap
from conftest import (CASES_BY_ID, assert_pass, assert_running_untraced, assert_untouched, cli,
                      dump_kill, image_hashes, our_children, proc_status, restore, wait_until,
                      put_back_times, shared_file_times, without_mapping)
from procsnap.errors import ImageCorrupt
from procsnap.faults import DUMP_STAGES, RESTORE_STAGES, InjectedFault

MEMORY = CASES_BY_ID["memory"]          # every kind of mapping, ~10 MiB dirty
WRITER = CASES_BY_ID["writer"]          # writes 64 MiB all the time, checks it is consistent
BUSY = CASES_BY_ID["cpu-busy"]          # userspace loop, registers and counters in step
IMAGE_FILES = {"procsnap.img", "pages.img", "ghosts.img"}
SCRATCH_SIZE = 16 * 1024                # procsnap.kernel.infect.SCRATCH_SIZE
# What a SIGKILLed dump leaves visible in an empty image directory: it writes
# in a hidden staging directory beside it (image/staging.py), and the image
# appears only once swapped in; a swap cut short (mid-swap) is finished by
# the next reader.
KILLED_DUMP_LEAVES = {
    "after-freeze": set(),
    "mid-collect": set(),
    "mid-page-write": set(),
    "before-commit": set(),
    "mid-swap": set(),
    "before-thaw": IMAGE_FILES,
}
COMMITTED = ("mid-swap", "before-thaw")  # SIGKILLed here, the new image is complete
# --leave-running: from mid-page-write on, pages are read from the copy-on-write snapshot child.
SNAPSHOT_STAGES = ("mid-page-write", "before-commit", "mid-swap", "before-thaw")
# How the half-built process ends when the restorer is SIGKILLed at a stage:
# PR_SET_PDEATHSIG's SIGKILL. At after-spawn it is still the Python copy of
# the restorer, blocked in read() on the sync pipe; the restorer's death
# closes the pipe too, and the EOF may wake it first: exit status 1 (seen once).
RESTORER_DEATH = {stage: (-signal.SIGKILL,) for stage in RESTORE_STAGES}
RESTORER_DEATH["after-spawn"] = (-signal.SIGKILL, 1)
HOW = ["error", "kill"]
SETTLE = 0.3                            # s a target runs on its own after procsnap's SIGKILL


class TargetTrapped(AssertionError):
    """The target died of SIGTRAP after procsnap was SIGKILLed (known bug, see below)."""


class HalfBuiltNotKilled(AssertionError):
    """After the restorer's SIGKILL the half-built process did not die of SIGKILL (known bug)."""


def fault_params(stages, marked):
    """(stage, how) parameters, `marked` {(stage, how): mark}."""
    return [pytest.param(stage, how, id=f"{stage}-{how}",
                         marks=[marked[(stage, how)]] if (stage, how) in marked else [])
            for stage in stages for how in HOW]


# --------------------------------------------------------------------------
# Helpers


def fault_spec(stage, how):
    return stage if how == "error" else f"{stage}:kill"


def dump_with_fault(t, images, stage, how, monkeypatch, leave_running=False):
    """Dump `t` into the empty directory `images` with the fault injected."""
    images.mkdir(exist_ok=True)
    assert not any(images.iterdir())
    if how == "error":
        monkeypatch.setenv("PROCSNAP_FAULT", fault_spec(stage, how))
        try:
            with pytest.raises(InjectedFault) as exc:
                procsnap.dump(t.pid, str(images), leave_running=leave_running)
        finally:
            monkeypatch.delenv("PROCSNAP_FAULT")
        assert f"stage {stage}" in str(exc.value), str(exc.value)
    else:
        r = cli("dump", "-t", t.pid, "-D", images, *(["-R"] if leave_running else []),
                env={"PROCSNAP_FAULT": fault_spec(stage, how)})
        assert r.returncode == -signal.SIGKILL, \
            f"procsnap dump exited {r.returncode}, not by SIGKILL at {stage}:\n{r.stderr}"


def is_scratch_area(m):
    return (m.end - m.start == SCRATCH_SIZE and m.perms == "rw-p" and m.offset == 0
            and m.dev == "00:00" and m.inode == 0 and m.path == "")


def assert_same_but_scratch(before, after, assert_same_snapshot):
    """`after` has exactly one mapping more than `before`, procsnap's scratch
    area (16 KiB, private anonymous, rw), and is otherwise the same."""
    extra = [m for m in after.maps if m not in before.maps]
    assert len(extra) == 1 and is_scratch_area(extra[0]), \
        (f"expected exactly one extra 16 KiB anonymous rw-p mapping, found "
         f"{[str(m) for m in extra]}")
    assert_same_snapshot(before, without_mapping(after, after.pid, extra[0]))


def assert_alive(t, stage):
    if t.alive():
        return
    msg = f"{t} died ({t.status}) after the dump failed at {stage}; output:\n{t.output()}"
    raise (TargetTrapped if t.status == -signal.SIGTRAP else AssertionError)(msg)


def assert_dump_fault_left(t, before, images, stage, how, proc_snapshot, assert_same_snapshot):
    """The state a dump failing at `stage` must leave (see the module doc)."""
    if how == "error":
        assert_alive(t, stage)
        assert_untouched(t.pid, before, images, proc_snapshot, assert_same_snapshot)
        return
    left = {p.name for p in images.iterdir() if not p.name.startswith(".")}
    assert left == KILLED_DUMP_LEAVES[stage], f"SIGKILLed at {stage}, the dump left {sorted(left)}"
    if stage in COMMITTED:
        image = procsnap.open_image(str(images))
        assert image.checkpoint.task.pid == t.pid
        assert {p.name for p in images.iterdir()} == IMAGE_FILES
    else:
        with pytest.raises(ImageCorrupt):
            procsnap.open_image(str(images))
    # The kernel detached the target when procsnap died: let it run a moment
    # on its own, so that a stop, a trap or a crash has time to show.
    time.sleep(SETTLE)
    assert_alive(t, stage)
    assert_running_untraced(t.pid)
    # (the process alone: a killed snapshot's zombie child is checked by the caller)
    after = proc_snapshot(t.pid, tree=False)
    before = dataclasses.replace(before, tree={})
    if stage == "mid-collect":
        assert_same_but_scratch(before, after, assert_same_snapshot)
    else:
        assert_same_snapshot(before, after)


def pass_unless_trapped(t):
    """assert_pass, except that death by SIGTRAP is returned (as a message)
    instead of failing at once, so the caller can check more first."""
    status, out = t.wait_result()
    if status == -signal.SIGTRAP:
        return f"{t} died of SIGTRAP when it got SIGUSR1; output:\n{out}"
    assert status == 0 and "PASS\n" in out and "FAIL" not in out, \
        f"{t}: exit status {status}, output:\n{out}"
    return None


def children_of(pid):
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def reap_until_gone(pid, timeout=3.0, error=AssertionError):
    """Wait until /proc/PID is gone, reaping PID whenever it is our child
    (orphans come back to us: we are a subreaper). Returns its exit status as
    Popen.returncode, or None if we did not reap it. If it is still there
    after `timeout`, it is killed (cleanup) and the test fails."""
    deadline = time.monotonic() + timeout
    status = None
    while True:
        try:
            got, st = os.waitpid(pid, os.WNOHANG)
            if got == pid:
                status = os.waitstatus_to_exitcode(st)
        except ChildProcessError:
            pass
        if not os.path.exists(f"/proc/{pid}"):
            return status
        if time.monotonic() > deadline:
            try:
                st = proc_status(pid)
                what = f"state {st['State']}, parent {st['PPid']}, comm {st['Name']}"
            except OSError:
                what = "?"
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            raise error(f"pid {pid} still exists {timeout} s later ({what}); killed now")
        time.sleep(0.005)


# --------------------------------------------------------------------------
# Dump faults


@pytest.mark.parametrize("stage,how", fault_params(DUMP_STAGES, {}))
def test_dump_fault(stage, how, procs, tmp_path, monkeypatch, proc_snapshot,
                    assert_same_snapshot):
    t = procs.start_case(MEMORY, "pie")
    before = proc_snapshot(t.pid)
    out_size = t.output_size()
    times = shared_file_times(t.pid)
    images = tmp_path / "img"

    dump_with_fault(t, images, stage, how, monkeypatch)
    assert_dump_fault_left(t, before, images, stage, how, proc_snapshot, assert_same_snapshot)
    trapped = pass_unless_trapped(t)

    if how == "kill" and stage in COMMITTED:
        # The image left behind is complete: once the original has ended,
        # it restores and the process passes its self-check (again).
        t.reap()
        t.truncate_output(out_size)     # its stdout resumes at the saved offset
        put_back_times(times)
        restore(procs, t, images)
        assert_pass(t)
    if trapped:
        raise TargetTrapped(trapped)


def test_dump_fault_cli_error(procs, tmp_path, proc_snapshot, assert_same_snapshot):
    """The error variant through the CLI: one line naming the stage, exit 1."""
    t = procs.start_case(MEMORY, "pie")
    before = proc_snapshot(t.pid)
    images = tmp_path / "img"
    images.mkdir()
    r = cli("dump", "-t", t.pid, "-D", images, env={"PROCSNAP_FAULT": "mid-page-write"})
    assert r.returncode == 1, r.stderr
    assert len(r.stderr.splitlines()) == 1 and "injected fault at stage mid-page-write" in r.stderr, \
        r.stderr
    assert_untouched(t.pid, before, images, proc_snapshot, assert_same_snapshot)
    assert_pass(t)


@pytest.mark.parametrize("stage,how", fault_params(DUMP_STAGES, {}))
def test_dump_fault_leave_running(stage, how, procs, tmp_path, monkeypatch, proc_snapshot,
                                  assert_same_snapshot):
    """--leave-running on a target that never stops writing its memory.

    The copy-on-write snapshot child is SIGKILLed with procsnap (EXITKILL).
    After an error procsnap reaps it through the target. SIGKILLed, procsnap
    cannot: the snapshot's zombie stays a child of the target (exit signal 0,
    so the target is never told and never reaps it) until the target exits.
    """
    t = procs.start_case(WRITER, "pie")
    before = proc_snapshot(t.pid)
    assert children_of(t.pid) == []
    images = tmp_path / "img"

    dump_with_fault(t, images, stage, how, monkeypatch, leave_running=True)
    assert_dump_fault_left(t, before, images, stage, how, proc_snapshot, assert_same_snapshot)

    if how == "kill" and stage in SNAPSHOT_STAGES:
        def zombie_only():
            kids = children_of(t.pid)
            return len(kids) == 1 and proc_status(kids[0])["State"].startswith("Z")
        wait_until(zombie_only, f"the snapshot child of {t.pid} to be a zombie, "
                                f"found {children_of(t.pid)}", timeout=5)
        snap = children_of(t.pid)[0]
        st = proc_status(snap)
        assert st["PPid"] == str(t.pid) and st["TracerPid"] == "0", st
        # killed through PTRACE_O_EXITKILL, it never ran (run, it would crash: SIGSEGV)
        exit_code = int(Path(f"/proc/{snap}/stat").read_text().split()[-1])
        assert exit_code == signal.SIGKILL, f"snapshot {snap} ended with wait status {exit_code:#x}"
        assert_pass(t)
        # Once the target has exited, the zombie comes to us (the subreaper).
        assert reap_until_gone(snap) == -signal.SIGKILL, \
            f"the snapshot's zombie {snap} was not ours to reap"
    else:
        assert children_of(t.pid) == [], \
            f"the snapshot child (or its zombie) is still there: {children_of(t.pid)}"
        assert_pass(t)


# --------------------------------------------------------------------------
# Restore faults


@pytest.mark.parametrize("stage,how", fault_params(RESTORE_STAGES, {}))
def test_restore_fault(stage, how, procs, tmp_path, monkeypatch):
    t = procs.start_case(MEMORY, "pie")
    images = dump_kill(t, tmp_path / "img")
    hashes = image_hashes(images)
    children = our_children()

    if how == "error":
        monkeypatch.setenv("PROCSNAP_FAULT", fault_spec(stage, how))
        try:
            with pytest.raises(InjectedFault) as exc:
                procsnap.restore(str(images))
        finally:
            monkeypatch.delenv("PROCSNAP_FAULT")
        assert f"stage {stage}" in str(exc.value), str(exc.value)
        # killed and reaped by procsnap before it raised
        assert not os.path.exists(f"/proc/{t.pid}"), proc_status(t.pid)
    else:
        r = cli("restore", "-D", images, env={"PROCSNAP_FAULT": fault_spec(stage, how)})
        assert r.returncode == -signal.SIGKILL, \
            f"procsnap restore exited {r.returncode}, not by SIGKILL at {stage}:\n{r.stderr}"
        # The half-built process was the CLI's child: orphaned, it comes to
        # us, and it must die with the restorer, not run on.
        status = reap_until_gone(t.pid, error=HalfBuiltNotKilled)
        if status not in RESTORER_DEATH[stage]:
            raise HalfBuiltNotKilled(f"the half-built pid {t.pid} ended with {status}, "
                                     f"expected one of {RESTORER_DEATH[stage]}")
    assert our_children() == children
    assert image_hashes(images) == hashes

    restore(procs, t, images)
    assert_pass(t)


# --------------------------------------------------------------------------
# Soak


def our_tids():
    return {int(tid) for tid in os.listdir("/proc/self/task")}


def fd_table():
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except FileNotFoundError:
            pass            # the listing's own fd
    return out


def assert_no_leftovers(fds_before, image_dirs, pids):
    """What a soak must not leave behind; `pids` must still be running."""
    fds = fd_table()
    new = {fd: path for fd, path in fds.items() if fds_before.get(fd) != path}
    assert len(fds) <= len(fds_before) and not new, f"fds leaked: {new}"
    maps = [line for line in Path("/proc/self/maps").read_text().splitlines()
            if "pages.img" in line or "ghosts.img" in line]
    assert not maps, "image files still mapped:\n" + "\n".join(maps)
    for pid in pids:
        assert_running_untraced(pid)
    tids = our_tids()
    traced = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if int(proc_status(name)["TracerPid"]) in tids:
                    traced.append(int(name))
            except (OSError, KeyError):
                pass
    assert not traced, f"processes still traced by us: {traced}"
    for d in image_dirs:
        names = {p.name for p in Path(d).iterdir()}
        assert names == IMAGE_FILES, f"{d} holds {sorted(names)}, expected {sorted(IMAGE_FILES)}"


def report_time(name, started, n):
    took = time.monotonic() - started
    print(f"\nSOAK {name}: {took:.1f} s wall ({took / n * 1000:.0f} ms per round, {n} rounds)")


@pytest.mark.slow
def test_soak_dump_restore_100(procs, tmp_path):
    """One busy process, dumped (killed) and restored 100 times in a row."""
    fds_before = fd_table()
    started = time.monotonic()
    t = procs.start_case(BUSY, "pie")
    images = tmp_path / "img"
    for i in range(100):
        dump_kill(t, images)
        restore(procs, t, images)
    assert_no_leftovers(fds_before, [images], [t.pid])
    assert_pass(t)
    report_time("dump+restore x100 (cpu-busy)", started, 100)


@pytest.mark.slow
def test_soak_leave_running_100(procs, tmp_path):
    """One process writing its memory all the time, dumped 100 times while
    it runs; the last image still restores and passes."""
    fds_before = fd_table()
    started = time.monotonic()
    t = procs.start_case(WRITER, "pie")
    out_size = t.output_size()
    images = tmp_path / "img"
    images.mkdir()
    for i in range(100):
        stats = procsnap.dump(t.pid, str(images), leave_running=True)
        assert stats.snapshot, f"dump {i}: no copy-on-write snapshot"
        assert children_of(t.pid) == [], f"dump {i}: snapshot left: {children_of(t.pid)}"
    assert_no_leftovers(fds_before, [images], [t.pid])
    assert_pass(t)
    report_time("leave-running dump x100 (writer, 64 MiB)", started, 100)

    t.reap()
    t.truncate_output(out_size)
    restore(procs, t, images)
    assert_pass(t)


SOAK_CASES = [CASES_BY_ID[c] for c in ("memory", "cpu-busy", "cpu-regs", "sleep-nanosleep", "signals")]


@pytest.mark.slow
def test_soak_concurrent_20(procs, targets, tmp_path):
    """20 processes dumped at once from 20 threads, then all restored."""
    fds_before = fd_table()
    started = time.monotonic()
    ts = []
    for i in range(20):
        case = SOAK_CASES[i % len(SOAK_CASES)]
        cwd = tmp_path / f"t{i}"             # memory creates its files in its cwd
        cwd.mkdir()
        ts.append(procs.start(case.argv(targets.path(case.target, "pie"), cwd), cwd=cwd,
                              ready=False, name=f"{case.id}-{i}"))
    for t in ts:
        t.wait_ready()
    dirs = [tmp_path / f"img{i}" for i in range(20)]
    for d in dirs:
        d.mkdir()
    gate = threading.Barrier(20)
    spans = [None] * 20

    def dump_one(i):
        gate.wait()
        begin = time.monotonic()
        procsnap.dump(ts[i].pid, str(dirs[i]))
        spans[i] = (begin, time.monotonic())

    with ThreadPoolExecutor(20) as pool:
        futures = [pool.submit(dump_one, i) for i in range(20)]
        errors = [f.exception() for f in futures]
    assert not any(errors), "\n".join(f"{ts[i]}: {e!r}" for i, e in enumerate(errors) if e)
    # all 20 were in progress at one moment
    assert max(b for b, _ in spans) < min(e for _, e in spans), f"dumps did not overlap: {spans}"
    for t in ts:
        assert t.reap() == -signal.SIGKILL, t
    dumped = time.monotonic()
    for t, d in zip(ts, dirs):
        restore(procs, t, d)
    assert_no_leftovers(fds_before, dirs, [t.pid for t in ts])
    for t in ts:
        assert_pass(t)
    report_time(f"20 concurrent dumps ({dumped - started:.1f} s incl. start) + 20 restores",
                started, 20)
