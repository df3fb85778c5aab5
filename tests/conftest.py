"""Fixtures for tests that use real processes (STYLE.md section 10).

Targets are the small C programs in tests/targets/, compiled once per session
in three variants.  Each follows one handshake: set up state, write READY,
wait for SIGUSR1, check its own state, write PASS (exit 0) or FAIL lines
(exit 1).  Between READY and SIGUSR1 it may be dumped, killed and restored.

Fixtures and helpers:
    targets            session: targets.path(name, variant) -> Path
    procs              per test: procs.start(argv, ...), procs.start_case(case, variant, ...)
    Target             .pid .output() .signal(sig) .wait_result() .reap() .adopt(pid)
    case, variant      parametrized automatically (see pytest_generate_tests)
    proc_snapshot, assert_same_snapshot   fixtures returning the functions below
    proc_snapshot(pid) -> Snapshot(maps, fds); assert_same_snapshot(before, after, ignore_pos=())
    image_size(dir), proc_status(pid), status_kib(pid, key), wait_pid_gone(pid)
    dump_kill(t, dir), restore(procs, t, dir), assert_pass(t)    dump/restore one target
    dump_kill_to(t, location)   dump_kill to s3:// or a stream's URL
    image_hashes(dir), read_inventory(dir), rewrite_records(dir, edit)   image files, raw
    edit_vmas(records, edit)   the VMAs of a VMAT record, in a rewrite_records edit
    cli(*args, env=None), assert_cli_error(r, *names)   procsnap as a subprocess
    our_children(), wait_until(cond, what), assert_running_untraced(pid),
    assert_untouched(pid, before, images, ...)   state after a failed dump
"""

import contextlib
import ctypes
import dataclasses
import difflib
import hashlib
import json
import os
import signal
import subprocess
import struct
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import procsnap
import statecheck

REPO = Path(__file__).resolve().parent.parent
TARGETS_DIR = Path(__file__).parent / "targets"
CFLAGS = ["-O1", "-g", "-Wall"]
VARIANTS = {
    "static": ["-static"],
    "pie": ["-fPIE", "-pie"],
    "nopie": ["-no-pie", "-fno-pie"],
}
PR_SET_CHILD_SUBREAPER = 36
READY_TIMEOUT = 10.0
RESULT_TIMEOUT = 20.0


@dataclasses.dataclass(frozen=True)
class Case:
    """One target program in one mode."""

    target: str
    mode: str = "default"
    dir_arg: bool = False           # argv[2] is a scratch directory made by the test
    ignore_pos: tuple = ()          # fds whose offset legitimately moves while waiting
    sabotage_delay: float = 0.0     # sabotage acts this long after READY, by itself
    restore_options: tuple = ()     # (name, value) pairs for procsnap.restore

    @property
    def id(self):
        return self.target if self.mode == "default" else f"{self.target}-{self.mode}"

    def argv(self, binary, workdir):
        argv = [str(binary), self.mode]
        if self.dir_arg:
            scratch = Path(workdir) / f"{self.target}-dir"
            scratch.mkdir(exist_ok=True)
            argv.append(str(scratch))
        return argv


CASES = [
    Case("memory"),
    Case("cpu", "regs"),
    Case("cpu", "busy"),
    Case("sleep", "nanosleep", sabotage_delay=1.5),
    Case("sleep", "clock_abs", sabotage_delay=1.5),
    Case("sleep", "pause", sabotage_delay=1.5),
    Case("sleep", "poll", sabotage_delay=1.5),
    Case("sleep", "read", ignore_pos=(10,)),
    Case("sleep", "sigsuspend", sabotage_delay=1.5),
    Case("sleep", "ppoll", sabotage_delay=1.5),
    Case("signals"),
    Case("signals", "sigtrap"),
    Case("identity", dir_arg=True),
    Case("files", dir_arg=True),
    Case("writer"),
    Case("threads"),
    Case("settings"),
    Case("settings", "mdwe"),
    Case("tree", "prefork"),
    Case("tree", "pipes"),
    Case("tree", "zombie"),
    Case("tree", "session"),
    Case("ipc", "anonfd"),
    Case("ipc", "sockets"),
    Case("ipc", "fifo", dir_arg=True),
    Case("locks", dir_arg=True),
    Case("ghosts", dir_arg=True),
    Case("ghosts", "shared", dir_arg=True),
    Case("creds", restore_options=(("allow_other_owner", True),)),  # an image of uid 1000
    Case("memfd"),
    Case("memfd", "wipe"),
    Case("treestate", "fown"),
    Case("treestate", "chroot", dir_arg=True),
    Case("memlock", "guard"),
    Case("memlock", "mlock"),
    Case("memlock", "mlockall"),
    Case("memlock", "mlockall-current"),
    Case("opath", dir_arg=True),
    Case("removed", dir_arg=True),
    Case("ghostmap", dir_arg=True),
    Case("epollclosed"),
    Case("seccomp", "filter"),
    Case("seccomp", "threads"),
    Case("seccomp", "tsync"),
    Case("seccomp", "fork"),
    Case("seccomp", "strict"),
    Case("inotify", dir_arg=True),
    Case("pty", "cooked"),
    Case("pty", "raw"),
    Case("inet", "all"),
]
# Targets whose state a dump refuses (tests/test_refused.py): self-checked, never restored
REFUSED_CASES = [Case("refused", m) for m in ("io_uring", "userfaultfd", "bpf-map", "perf_event", "aio")]
CASES_BY_ID = {c.id: c for c in CASES}


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "cases(*ids): parametrize `case` over these case ids only")
    config.addinivalue_line(
        "markers", "variants(*names): parametrize `variant` over these variants only")
    # Orphans and restored processes come back to us, so we can reap them
    # (PID 1 here reaps late and a zombie keeps its pid taken).
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(e)}")


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        marker = metafunc.definition.get_closest_marker("cases")
        cases = [CASES_BY_ID[i] for i in marker.args] if marker else CASES
        metafunc.parametrize("case", cases, ids=[c.id for c in cases])
    if "variant" in metafunc.fixturenames:
        marker = metafunc.definition.get_closest_marker("variants")
        metafunc.parametrize("variant", list(marker.args) if marker else list(VARIANTS))


# --------------------------------------------------------------------------
# Building


class Targets:
    def __init__(self, outdir):
        self.outdir = Path(outdir)
        self.sources = sorted(TARGETS_DIR.glob("*.c"))
        self.names = [s.stem for s in self.sources]

    def path(self, name, variant):
        if variant not in VARIANTS:
            raise KeyError(f"unknown variant {variant!r}, expected one of {list(VARIANTS)}")
        p = self.outdir / f"{name}-{variant}"
        if not p.exists():
            raise KeyError(f"no target {name!r} built (have {self.names})")
        return p

    def build(self):
        jobs = [(src, variant) for src in self.sources for variant in VARIANTS]

        def compile_one(job):
            src, variant = job
            out = self.outdir / f"{src.stem}-{variant}"
            cmd = ["gcc", *CFLAGS, *VARIANTS[variant], "-o", str(out), str(src)]
            r = subprocess.run(cmd, capture_output=True, text=True)
            return cmd, r

        with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            results = list(pool.map(compile_one, jobs))
        errors = [f"$ {' '.join(cmd)}\n{r.stdout}{r.stderr}"
                  for cmd, r in results if r.returncode != 0]
        if errors:
            pytest.fail("target compilation failed:\n" + "\n".join(errors), pytrace=False)


@pytest.fixture(scope="session")
def targets(tmp_path_factory):
    t = Targets(tmp_path_factory.mktemp("targets"))
    t.build()
    return t


# --------------------------------------------------------------------------
# Running


def wait_pid_gone(pid, timeout=10.0):
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}"):
        if time.monotonic() > deadline:
            raise AssertionError(f"/proc/{pid} still exists after {timeout} s")
        time.sleep(0.005)


def _decode(status):
    """waitpid status -> Popen.returncode convention (-signal when killed)."""
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


class Target:
    """A process we started (a Popen child) or restored (a plain child pid)."""

    def __init__(self, argv, cwd, out_path, env, pass_fds=()):
        self.argv = [str(a) for a in argv]
        self.out_path = Path(out_path)
        fd = os.open(self.out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            # stderr=STDOUT: fd 2 is a dup of fd 1, one open file description
            self._popen = subprocess.Popen(
                self.argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=fd,
                stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
                pass_fds=tuple(pass_fds))
        finally:
            os.close(fd)
        self.pid = self._popen.pid
        self.status = None      # set once reaped; None while the pid is ours and unreaped
        self.ignore_pos = ()    # fds whose offset legitimately moves (its Case's)
        self.restore_options = {}   # its Case's, for restore()
        self.ignore_state = ()      # statecheck keys a busy target changes while read (see assert_same_snapshot)
        self.snapshot_view = None   # what of a busy target's snapshot restore() compares (a test's function)
        self.dumped = None      # proc_snapshot taken by dump_kill, compared by restore()

    def __repr__(self):
        return f"<Target pid={self.pid} {' '.join(self.argv)}>"

    def output(self):
        return self.out_path.read_text(errors="replace")

    def output_size(self):
        return self.out_path.stat().st_size

    def truncate_output(self, size):
        os.truncate(self.out_path, size)

    @property
    def reaped(self):
        return self.status is not None

    def _poll(self):
        """Reap if exited; return the status or None."""
        if self.reaped:
            return self.status
        if self._popen is not None:
            rc = self._popen.poll()
            if rc is not None:
                self.status = rc
            return self.status
        try:
            pid, st = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            # not our child (should not happen after an in-process restore)
            if not os.path.exists(f"/proc/{self.pid}"):
                self.status = -999
            return self.status
        if pid == self.pid:
            self.status = _decode(st)
        return self.status

    def alive(self):
        return self._poll() is None

    def signal(self, sig):
        if self.reaped:
            raise AssertionError(f"{self}: already reaped, not signalling pid {self.pid}")
        os.kill(self.pid, sig)

    def _settle_stdout(self, timeout=2.0):
        """The kernel moves a file's position after the written bytes are
        visible to readers: under load a snapshot taken right after READY
        showed fd 1 at 0, the restored one at 6. Wait until the position of
        fd 1 (when it is the output file) has caught up with its size."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if os.readlink(f"/proc/{self.pid}/fd/1") != str(self.out_path):
                    return
                with open(f"/proc/{self.pid}/fdinfo/1") as f:
                    if int(f.readline().split()[1]) >= self.output_size():
                        return
            except (OSError, ValueError, IndexError):
                return
            time.sleep(0.002)

    def wait_ready(self, timeout=READY_TIMEOUT):
        deadline = time.monotonic() + timeout
        while True:
            out = self.output()
            if "READY\n" in out:
                self._settle_stdout()
                return out
            if self._poll() is not None:
                raise AssertionError(
                    f"{self} exited with {self.status} before READY; output:\n{out}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self}: no READY after {timeout} s; output:\n{out}")
            time.sleep(0.005)

    def wait_exit(self, timeout=RESULT_TIMEOUT):
        """Wait for exit without signalling; returns (status, output)."""
        deadline = time.monotonic() + timeout
        while self._poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"{self}: still running after {timeout} s; "
                                     f"output:\n{self.output()}")
            time.sleep(0.005)
        return self.status, self.output()

    def wait_result(self, timeout=RESULT_TIMEOUT, resend=1.0):
        """Send SIGUSR1, wait for exit; returns (status, output).

        SIGUSR1 is re-sent every `resend` seconds: a target tests its flag and
        then enters pause(), and a signal landing in between would be lost.
        """
        deadline = time.monotonic() + timeout
        next_send = 0.0
        while self._poll() is None:
            now = time.monotonic()
            if now > deadline:
                raise AssertionError(f"{self}: no exit {timeout} s after SIGUSR1; "
                                     f"output:\n{self.output()}")
            if now >= next_send:
                os.kill(self.pid, signal.SIGUSR1)   # still unreaped: still ours
                next_send = now + resend
            time.sleep(0.005)
        return self.status, self.output()

    def reap(self, timeout=10.0):
        """Wait for the process to end (e.g. SIGKILLed by dump), reap it and
        wait until /proc/PID is gone, so the pid is free for a restore."""
        status, _ = self.wait_exit(timeout)
        wait_pid_gone(self.pid, timeout)
        return status

    def adopt(self, pid):
        """The process now lives on as `pid`, a restored direct child of us."""
        self._popen = None
        self.dumped = None
        self.pid = pid
        self.status = None

    def kill_and_reap(self):
        if self.reaped:
            return
        # its descendants first (by pid: what it started), so that none is
        # left orphaned: unshare's child, a container's init, dies with it
        for pid in [*descendants(self.pid), self.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.wait_exit(timeout=10.0)
        except AssertionError:
            pass


class Procs:
    """Starts targets for one test and kills + reaps all of them at the end."""

    def __init__(self, targets, workdir):
        self._targets = targets
        self.workdir = Path(workdir)
        self.started = []

    def env(self, extra=None):
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}
        env.update(extra or {})
        return env

    def start(self, argv, cwd=None, env=None, ready=True, name=None, pass_fds=()):
        name = name or Path(str(argv[0])).name
        out = self.workdir / f"{name}-{len(self.started)}.out"
        t = Target(argv, cwd or self.workdir, out, self.env(env), pass_fds)
        self.started.append(t)
        if ready:
            t.wait_ready()
        return t

    def start_case(self, case, variant, sabotage=False, ready=True, pass_fds=()):
        binary = self._targets.path(case.target, variant)
        env = {"PS_TARGET_SABOTAGE": "1"} if sabotage else None
        t = self.start(case.argv(binary, self.workdir), env=env, ready=ready,
                       name=f"{case.id}-{variant}", pass_fds=pass_fds)
        t.ignore_pos = case.ignore_pos
        t.restore_options = dict(case.restore_options)
        return t

    def adopt_if_ours(self, t, pid):
        """After a failed restore: take over `pid` for cleanup if it is our child."""
        try:
            with open(f"/proc/{pid}/status") as f:
                ppid = next(int(l.split()[1]) for l in f if l.startswith("PPid:"))
        except (OSError, StopIteration):
            return
        if ppid == os.getpid():
            t.adopt(pid)

    def cleanup(self):
        for t in reversed(self.started):
            if not t.reaped:    # a tree's other processes first: nothing of a failed test survives it
                with contextlib.suppress(ProcessLookupError):
                    os.kill(t.pid, signal.SIGSTOP)  # no parent makes new children meanwhile (nginx's master)
                for pid in reversed(descendants(t.pid)):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            t.kill_and_reap()
        # restored/orphaned descendants re-parented to us: reap zombies only
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break


@pytest.fixture
def procs(targets, tmp_path):
    p = Procs(targets, tmp_path)
    try:
        yield p
    finally:
        p.cleanup()


# --------------------------------------------------------------------------
# Visible state


@dataclasses.dataclass(frozen=True)
class MapLine:
    start: int
    end: int
    perms: str
    offset: int
    dev: str
    inode: int
    path: str

    def __str__(self):
        return (f"{self.start:012x}-{self.end:012x} {self.perms} {self.offset:08x} "
                f"{self.dev} {self.inode} {self.path}")


@dataclasses.dataclass(frozen=True)
class FdEntry:
    target: str
    pos: int
    flags: int          # octal "flags:" from fdinfo, O_CLOEXEC included

    def __str__(self):
        return f"{self.target} pos={self.pos} flags=0{self.flags:o}"


@dataclasses.dataclass(frozen=True)
class Snapshot:
    pid: int
    maps: tuple
    fds: dict
    # every process of the tree rooted at pid (pid included): its ids,
    # threads, maps and fds; pid -> ProcIds
    tree: dict = dataclasses.field(default_factory=dict)
    # everything else the kernel shows about each process: pid -> {key: value}
    # (statecheck.capture_tree; None when not taken)
    state: dict | None = None


@dataclasses.dataclass(frozen=True)
class ProcIds:
    ppid: int
    pgid: int
    sid: int
    state: str
    tids: tuple
    maps: tuple = ()
    fds: tuple = ()


# Shared memory comes back as a new object of the same kind and name: only
# its inode number differs.
RECREATED_OBJECTS = ("/dev/zero (deleted)", "/memfd:", "/dev/shm/")
DELETED = " (deleted)"  # a file unlinked while mapped: made again by the restore, a new inode


def _normalized(maps):
    return tuple(dataclasses.replace(m, inode=0) if m.path.startswith(RECREATED_OBJECTS) or m.path.endswith(DELETED)
                 else m for m in maps)


def descendants(pid):
    """pids of every descendant of pid (children of all its threads)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop(0)
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except FileNotFoundError:
            continue
        for tid in tids:
            try:
                kids = Path(f"/proc/{p}/task/{tid}/children").read_text().split()
            except FileNotFoundError:
                continue
            for k in map(int, kids):
                if k not in out:
                    out.append(k)
                    todo.append(k)
    return out


def _ids(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    tids = tuple(sorted(int(t) for t in os.listdir(f"/proc/{pid}/task")))
    return fields[0], int(fields[1]), int(fields[2]), int(fields[3]), tids


RENAMED = ("pipe:[", "socket:[")


def _canonical_pipes(fds, names):
    """pipe:[inode] -> pipe#k (socket:[inode] -> socket#k), k by first
    appearance in the tree: restored, it has a new inode, but which fds
    share one must stay the same."""
    out = {}
    for fd, e in sorted(fds.items()):
        if e.target.startswith(RENAMED):
            kind = e.target.split(":")[0]
            e = dataclasses.replace(e, target=names.setdefault(e.target, f"{kind}#{len(names)}"))
        out[fd] = e
    return out


def proc_snapshot(pid, tree=True, state=True):
    """The visible state of the tree rooted at pid. state=False leaves out
    statecheck's capture (only for a process that must not be stopped even
    for an instant, such as one already traced by another tracer)."""
    maps, fds = _maps_and_fds(pid)
    names = {}
    fds = _canonical_pipes(fds, names)
    procs = {}
    if tree:
        for p in [pid] + descendants(pid):
            state, ppid, pgid, sid, tids = _ids(p)
            if state == "Z":
                procs[p] = ProcIds(ppid if p != pid else 0, pgid, sid, state, ())
                continue
            pmaps, pfds = (maps, fds) if p == pid else _maps_and_fds(p)
            pfds = _canonical_pipes(pfds, names)
            procs[p] = ProcIds(ppid if p != pid else 0, pgid, sid, "Z" if state == "Z" else "live", tids,
                               _normalized(pmaps), tuple(sorted(pfds.items())))
    pids = list(procs) if tree else [pid]
    return Snapshot(pid, maps, fds, procs, statecheck.capture_tree(pids) if state else None)


def _maps_and_fds(pid):
    maps = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.rstrip("\n").split(maxsplit=5)
            rng, perms, off, dev, inode = parts[:5]
            lo, hi = rng.split("-")
            maps.append(MapLine(int(lo, 16), int(hi, 16), perms, int(off, 16), dev,
                                int(inode), parts[5] if len(parts) > 5 else ""))
    fds = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        fd = int(name)
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            info = {}
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                for line in f:
                    k, _, v = line.partition(":")
                    info[k] = v.strip()
        except FileNotFoundError:
            continue        # closed while we looked
        fds[fd] = FdEntry(target, int(info["pos"]), int(info["flags"], 8))
    return tuple(maps), fds


def assert_same_snapshot(before, after, ignore_pos=(), ignore_state=()):
    """ignore_state: statecheck keys (of the process and of each of its
    threads) a busy test target changes while its snapshot is being read;
    each test that passes one says why."""
    problems = []
    if before.tree and after.tree:
        problems += _tree_problems(before, after, ignore_pos)
    if _normalized(before.maps) != _normalized(after.maps):
        diff = difflib.unified_diff([str(m) for m in before.maps], [str(m) for m in after.maps],
                                    "maps before", "maps after", lineterm="", n=1)
        problems.append("/proc/PID/maps differs:\n" + "\n".join(diff))
    for fd in sorted(set(before.fds) | set(after.fds)):
        b, a = before.fds.get(fd), after.fds.get(fd)
        if b is None or a is None:
            problems.append(f"fd {fd}: expected {b or 'closed'} found {a or 'closed'}")
            continue
        if fd in ignore_pos:
            b, a = dataclasses.replace(b, pos=0), dataclasses.replace(a, pos=0)
        if b != a:
            problems.append(f"fd {fd}: expected {b} found {a}")
    if before.state is not None and after.state is not None:
        problems += statecheck.state_problems(_ignoring(before.state, ignore_pos, ignore_state),
                                              _ignoring(after.state, ignore_pos, ignore_state))
    if problems:
        raise AssertionError(f"visible state of pid {before.pid} -> {after.pid} changed:\n"
                             + "\n".join(problems))


def without_mapping(snap, pid, m):
    """`snap` as if private anonymous mapping `m` of `pid` were not there
    (procsnap's scratch area, left by a dump SIGKILLed while injecting):
    its maps line and its share of VmSize and VmData."""
    state = snap.state
    if state is not None and pid in state:
        kib = (m.end - m.start) // 1024
        values = dict(state[pid])
        for key in ("status.VmSize", "status.VmData"):
            size, unit = values[key].split()
            values[key] = f"{int(size) - kib} {unit}"
        state = {**state, pid: values}
    maps = tuple(x for x in snap.maps if x != m) if snap.pid == pid else snap.maps
    tree = snap.tree
    if pid in tree:
        tree = {**tree, pid: dataclasses.replace(tree[pid], maps=tuple(x for x in tree[pid].maps if x != m))}
    return dataclasses.replace(snap, maps=maps, tree=tree, state=state)


def _ignoring(state, ignore_pos, ignore_state):
    """ignore_pos: fds whose offset legitimately moves (in every process)."""
    drop = {f"fdinfo.{fd}.pos" for fd in ignore_pos} | set(ignore_state)

    def dropped(key):
        return key in drop or (key.startswith("task.") and key.split(".", 2)[2] in drop)

    return {pid: {k: v for k, v in values.items() if not dropped(k)} for pid, values in state.items()}


def _tree_problems(before, after, ignore_pos):
    problems = []
    if sorted(before.tree) != sorted(after.tree):
        return [f"processes of the tree: expected {sorted(before.tree)}, found {sorted(after.tree)}"]
    for p in sorted(before.tree):
        if p == before.pid:
            b, a = before.tree[p], after.tree[p]
            b, a = dataclasses.replace(b, maps=(), fds=()), dataclasses.replace(a, maps=(), fds=())
        else:
            b, a = before.tree[p], after.tree[p]
            if ignore_pos:
                b = dataclasses.replace(b, fds=tuple((fd, dataclasses.replace(e, pos=0)) for fd, e in b.fds))
                a = dataclasses.replace(a, fds=tuple((fd, dataclasses.replace(e, pos=0)) for fd, e in a.fds))
        if b != a:
            lines = lambda x: [f"{k}={v}" for k, v in dataclasses.asdict(dataclasses.replace(x, maps=(), fds=())).items()
                               if k not in ("maps", "fds")] + [str(m) for m in x.maps] + \
                [f"fd {fd}: {e}" for fd, e in x.fds]
            diff = "\n".join(difflib.unified_diff(lines(b), lines(a), "before", "after", lineterm="", n=1))
            problems.append(f"process {p} of the tree changed:\n{diff}")
    return problems


def shared_file_times(pid):
    """{path: (atime_ns, mtime_ns)} of every file `pid` maps shared and writable."""
    out = {}
    for m in _maps_and_fds(pid)[0]:
        if m.perms[1] == "w" and m.perms[3] == "s" and m.path.startswith("/") and m.inode:
            st = os.stat(m.path)
            out[m.path] = (st.st_atime_ns, st.st_mtime_ns)
    return out


def put_back_times(times):
    """A test that lets the original run on after a dump and then restores
    the older image: the original wrote through its shared mappings, which
    (once the kernel has written the pages back) gives the files a new
    mtime, and a restore rightly refuses a mapped file modified since the
    dump. The image is of the process before: its files' times are put back."""
    for path, ns in times.items():
        os.utime(path, ns=ns)


def image_size(images_dir):
    return sum(p.stat().st_size for p in Path(images_dir).rglob("*") if p.is_file())


def proc_status(pid):
    """/proc/PID/status as {key: value-string}."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k] = v.strip()
    return out


def status_kib(pid, key):
    return int(proc_status(pid)[key].split()[0])


@pytest.fixture(name="proc_snapshot")
def _proc_snapshot_fixture():
    """proc_snapshot(pid) -> Snapshot (also importable from conftest)."""
    return proc_snapshot


@pytest.fixture(name="assert_same_snapshot")
def _assert_same_snapshot_fixture():
    """assert_same_snapshot(before, after, ignore_pos=()) (also importable)."""
    return assert_same_snapshot


# --------------------------------------------------------------------------
# Dump and restore one target


def dump_kill(t, images, before=None, **options):
    """Dump in kill mode; the original tree dies by procsnap's SIGKILL and is
    reaped (its other processes come back to us, the subreaper). The tree's
    visible state is taken just before, and restore() compares against it:
    no test restores what dump_kill dumped without the state check.
    `before`: a snapshot the test took itself (a settled one, of a tree
    that is busy). `options` go to procsnap.dump."""
    images = Path(images)
    images.mkdir(exist_ok=True)
    others = descendants(t.pid)
    t.dumped = before or proc_snapshot(t.pid)
    procsnap.dump(t.pid, str(images), **options)
    status = t.reap()
    assert status == -signal.SIGKILL, f"{t}: expected SIGKILL after dump, found {status}"
    reap_gone(others)
    return images


def dump_kill_to(t, location, **options):
    """dump_kill to a location that is not a local directory (s3://, a stream's URL)."""
    others = descendants(t.pid)
    t.dumped = proc_snapshot(t.pid)
    procsnap.dump(t.pid, location, **options)
    assert t.reap() == -signal.SIGKILL
    reap_gone(others)


def reap_gone(pids, timeout=10.0):
    """Wait until each pid is gone, reaping those that became our children."""
    deadline = time.monotonic() + timeout
    for pid in pids:
        while os.path.exists(f"/proc/{pid}"):
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"pid {pid} still there {timeout} s after the dump")
            time.sleep(0.005)


def restore(procs, t, images, **options):
    """Restore onto t's (reaped, gone) pid and make t follow the restored
    process; `options` go to procsnap.restore."""
    assert t.reaped and not os.path.exists(f"/proc/{t.pid}")
    old = t.pid
    try:
        pid = procsnap.restore(str(images), **{**t.restore_options, **options})
    except BaseException:
        procs.adopt_if_ours(t, old)     # clean up a half-restored child
        raise
    dumped, t.dumped = t.dumped, None
    t.adopt(pid)
    assert pid == old, f"restored pid {pid}, expected the original {old}"
    ppid = int(proc_status(pid)["PPid"])
    assert ppid == os.getpid(), f"restored {pid} has parent {ppid}, expected us {os.getpid()}"
    if dumped is not None:
        after = proc_snapshot(pid)
        if t.snapshot_view is not None:
            after = t.snapshot_view(after)
        assert_same_snapshot(dumped, after, ignore_pos=t.ignore_pos, ignore_state=t.ignore_state)
    return pid


def assert_pass(t):
    status, out = t.wait_result()
    assert status == 0 and "PASS\n" in out and "FAIL" not in out, \
        f"{t}: exit status {status}, output:\n{out}"


# --------------------------------------------------------------------------
# procsnap as a command, and the state a failure must leave


def cli(*args, timeout=120, env=None):
    """Run `python -m procsnap ARGS` from the repository; `env` adds variables."""
    full_env = None if env is None else {**os.environ, **env}
    return subprocess.run([sys.executable, "-m", "procsnap", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, env=full_env)


def assert_cli_error(r, *names):
    """Non-zero exit, exactly one stderr line `procsnap: error: ...` naming `names`."""
    lines = r.stderr.splitlines()
    assert r.returncode != 0, f"exit 0 for a failure; stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    assert "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1 and lines[0].startswith("procsnap: error: "), \
        f"expected one line 'procsnap: error: ...' on stderr, found:\n{r.stderr}"
    for name in names:
        assert str(name) in lines[0], f"{name!r} not named in {lines[0]!r}"
    return lines[0]


def our_children():
    """Pids of the test process's children (all its threads'), zombies included."""
    kids = set()
    for task in os.listdir("/proc/self/task"):
        try:
            kids.update(int(p) for p in Path(f"/proc/self/task/{task}/children").read_text().split())
        except FileNotFoundError:  # a thread that ended meanwhile (its children went to another thread)
            pass
    return kids


def wait_until(cond, what, timeout=10):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def assert_running_untraced(pid, tracer=0):
    """Running or sleeping (not stopped, not a zombie), each thread traced by `tracer` (0: none)."""
    st = proc_status(pid)
    assert st["State"][0] in "SR", f"pid {pid} left in state {st['State']}"
    for task in os.listdir(f"/proc/{pid}/task"):
        tracer_now = proc_status(f"{pid}/task/{task}")["TracerPid"]
        assert tracer_now == str(tracer), f"pid {pid} task {task}: TracerPid {tracer_now}"


def assert_untouched(pid, before, images, proc_snapshot, assert_same_snapshot, tracer=0):
    """After a refused dump: running, untraced, same maps/fds, no image
    (`images` was empty before the dump and must be again)."""
    assert_running_untraced(pid, tracer)
    assert_same_snapshot(before, proc_snapshot(pid))
    assert not (Path(images) / "procsnap.img").exists(), f"a partial image left in {images}"
    left = sorted(p.name for p in Path(images).iterdir())
    assert not left, f"the dump left {left} in {images} (it was empty)"


# --------------------------------------------------------------------------
# Image files, read and rewritten without procsnap's reader

IMG_HEADER = struct.Struct("<8sHHI")     # magic, major, minor, crc32(first 12 bytes)
IMG_RECORD = struct.Struct("<4sII")      # tag, payload length, crc32(payload)


def image_hashes(images_dir):
    """{relative path: sha256} of every file in the image directory."""
    root = Path(images_dir)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def read_inventory(images_dir):
    """procsnap.img as (header bytes, [(tag, payload offset, payload bytes)])."""
    data = (Path(images_dir) / "procsnap.img").read_bytes()
    header = data[:IMG_HEADER.size]
    records, off = [], IMG_HEADER.size
    while off < len(data):
        tag, length, _ = IMG_RECORD.unpack_from(data, off)
        start = off + IMG_RECORD.size
        records.append((tag, start, data[start:start + length]))
        off = start + length
    return header, records


def rewrite_records(images_dir, edit):
    """Rewrite procsnap.img with valid framing: `edit(records)` changes the
    list of [tag, payload dict] (END excluded) in place; payloads are
    re-encoded, CRCs and END's record count recomputed, so only the reader's
    semantic checks can object."""
    header, raw = read_inventory(images_dir)
    records = [[tag, json.loads(payload)] for tag, _, payload in raw]
    assert records[-1][0] == b"END ", f"last record is {records[-1][0]!r}, not END"
    end = records.pop()[1]
    edit(records)
    end["records"] = len(records)
    out = bytearray(header)
    for tag, obj in records + [[b"END ", end]]:
        payload = json.dumps(obj).encode()
        out += IMG_RECORD.pack(tag, len(payload), zlib.crc32(payload)) + payload
    (Path(images_dir) / "procsnap.img").write_bytes(bytes(out))


def edit_vmas(records, edit):
    """For a rewrite_records edit: the VMAs of the VMAT record among
    `records` (image/vmatable.py) as model.Vma, changed by edit(vmas) in
    place and packed again; returns what edit returns."""
    from procsnap.image import schema, vmatable

    record = next(r for r in records if r[0] == b"VMAT")
    vmas = vmatable.unpack(schema.decode(vmatable.VmaTable, record[1], "VmaTable"))
    result = edit(vmas)
    record[1] = schema.encode(vmatable.pack(vmas))
    return result
