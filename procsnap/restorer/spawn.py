"""spawn: create the process with its old pid, prepared from inside.

clone3 with set_tid gives the child the saved pid. The child is a copy of
this Python process; while it is still Python it sets what is simplest to
set from inside (cwd, umask, session, fds, chroot, rlimits), reports READY on a
pipe and blocks in read() on another, where the restorer freezes it and
replaces everything else.
"""

from __future__ import annotations

import ctypes
from .. import records as dataclasses  # the dataclasses API, cheap to import
import os
import resource
import signal
import time
import typing

from .. import model
from ..errors import RestoreError, describe
from ..kernel.arch.x86_64 import NR
from ..kernel import proc
from ..kernel.clone import clone_with_pid
from ..kernel.libc import prctl, syscall
from ..kernel.structs import KSIGACTION, NSIG, SIGSET_SIZE
from .files import PreparedFiles

PR_SET_PDEATHSIG = 1
CLONE_NEWPID = 0x20000000  # include/uapi/linux/sched.h


@dataclasses.dataclass
class Child:
    pid: int
    sync_w: int  # restorer's end; closing it would wake the child
    helper_fds: dict[str, int]  # name -> fd number in the child
    sysv_ids: dict[int, int] = dataclasses.field(default_factory=dict)  # SharedMem id -> shmid to attach
    host_pid: int = 0  # the root of a new pid namespace: its pid in ours (pid is the namespace's, 1)


def wait_pid_free(pid: int, timeout: float = 3.0) -> None:
    """A zombie may hold the pid for a while (init reaps late here)."""
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}"):
        try:
            st = proc.read_stat(pid)
            state, comm = st.state, st.comm
        except OSError:  # gone meanwhile (or unreadable: then clone3 decides)
            if time.monotonic() > deadline:
                return
            continue
        if state not in ("Z", "X") or time.monotonic() > deadline:
            raise RestoreError(f"pid {pid} is taken by a running process ({comm}, state {state})", pid)
        time.sleep(0.01)


@dataclasses.dataclass
class Node:
    """One process of the tree to spawn: `task` and `files` are None for a
    zombie, which is spawned only to exit with its saved status."""

    proc: model.Proc
    task: model.Task | None
    files: PreparedFiles | None
    children: list["Node"] = dataclasses.field(default_factory=list)
    helpers: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)  # name -> (restorer fd, wanted)
    ready_r: int = -1
    sync_w: int = -1
    parent: "Node | None" = None
    fork_built: bool = False  # made by a fork in its rebuilt parent (forkbuild.py), not by the spawn
    clone_flags: int = 0  # the root of a container: CLONE_NEWPID (objects/namespaces.py)
    before_clone: typing.Callable[[], None] | None = None  # and its namespaces, made just before (clone.py)

    def walk(self):
        yield self
        for child in self.children:
            yield from child.walk()


def _set_session(node: Node) -> None:
    """Session and process group, as the first thing (before its children)."""
    p, task = node.proc, node.task
    if p.ppid == 0:  # the root: its own session or group, else the restorer's
        if task.session_leader:
            os.setsid()
        elif task.group_leader:
            os.setpgid(0, 0)
    elif p.sid == p.pid:
        os.setsid()
    elif p.pgid != node.parent.proc.pgid:  # else it is in its parent's group already
        os.setpgid(0, 0 if p.pgid == p.pid else p.pgid)


def _become_zombie(status: int) -> None:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {sig})
        os.kill(os.getpid(), sig)
    os._exit(os.WEXITSTATUS(status))


def _child_setup(node: Node) -> None:
    """Runs in the child. `node.helpers`: name -> (restorer fd, fd number wanted)."""
    task, files, helpers = node.task, node.files, node.helpers
    # If the restorer dies (even by SIGKILL) before the rebuild is done, the
    # half-built process dies with it; the rebuild clears this at the end.
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    _reset_signal_actions()
    # fd numbers up to the hard limit, whatever the restorer's soft one (the
    # saved limits are set last)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    _set_session(node)
    for in_session in files.in_session:
        in_session()
    # Children before anything of ours changes: they inherit the restorer's fds.
    stopped = [pid for child in node.children
               if not child.fork_built and (pid := _clone(child)) and child.task and child.task.stopped_by]
    # Helpers first go above every number in use, so nothing collides.
    for src, want in helpers.values():
        os.dup2(src, want, inheritable=False)
    try:
        os.chdir(task.cwd)
    except OSError as err:
        raise RestoreError(f"cannot enter its working directory {task.cwd}: {err.strerror}") from err
    os.umask(task.umask)
    keep = {want for _, want in helpers.values()}
    for target_fd, src in files.fd_sources.items():
        os.dup2(helpers[f"fd{target_fd}"][1], target_fd, inheritable=target_fd not in files.cloexec)
        keep.add(target_fd)
    for target_fd, first in files.fd_aliases.items():
        os.dup2(first, target_fd, inheritable=target_fd not in files.cloexec)
        keep.add(target_fd)
    for finish in files.in_child:
        finish()
    for name, (_, want) in helpers.items():
        if name.startswith("fd"):
            os.close(want)
            keep.discard(want)
    prev = 0
    for fd in sorted(keep) + [1 << 20]:
        if fd > prev:
            os.closerange(prev, fd)
        prev = fd + 1
    if task.root != "/":  # last of the paths: everything above was opened from ours
        try:
            os.chroot(task.root)
        except OSError as err:
            raise RestoreError(f"cannot enter its root directory {task.root}: {err.strerror}") from err
    for r in task.rlimits:
        try:
            resource.setrlimit(r.resource, (_rlim(r.soft), _rlim(r.hard)))
        except (OSError, ValueError) as err:
            raise RestoreError(f"cannot set its resource limit {r.resource} to soft {r.soft} hard {r.hard}: "
                               f"{describe(err)}") from err
    ready_w, sync_r = helpers["ready"][1], helpers["sync"][1]
    for pid in stopped:  # their stop is ours to be told of: the parent this becomes saw it long ago
        os.waitpid(pid, os.WUNTRACED)
    os.write(ready_w, b"R")
    os.close(ready_w)
    if task.stopped_by:  # restored stopped (see wait_stopped)
        os.kill(os.getpid(), signal.SIGSTOP)
    os.read(sync_r, 1)  # frozen here by the restorer, never returns


def wait_stopped(pid: int, tids: list[int] = (), timeout: float = 10.0) -> None:
    """A process restored stopped stops itself once ready (_child_setup), in
    a group-stop its parent has already been told of, as the dumped one's
    had. It is rebuilt from that stop (injection works from a group-stop)
    and its release leaves it there: the kernel puts a task that was in a
    group-stop back into it at detach, telling no one. SIGSTOP whatever
    signal had stopped it: SIGTSTP, SIGTTIN and SIGTTOU are discarded in an
    orphaned process group. Also once released: until its threads `tids`
    too are back in the stop (a detached task re-enters it on its own)."""
    deadline = time.monotonic() + timeout
    while any(proc.read_stat(f"{pid}/task/{t}").state != "T" for t in [pid, *tids]):
        if time.monotonic() > deadline:
            raise RestoreError(f"pid {pid}: did not stop itself within {timeout:.0f} s", pid)
        time.sleep(0.001)


def _reset_signal_actions() -> None:
    """Every signal's action SIG_DFL with no flags (the raw call: glibc's
    sigaction would add SA_RESTORER), so that the rebuild sets only the
    saved ones. A copy of the restorer carries the restorer's handlers."""
    default = ctypes.create_string_buffer(KSIGACTION.size)
    for sig in range(1, NSIG + 1):
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            syscall(NR.rt_sigaction, sig, default, 0, SIGSET_SIZE)


def _rlim(value: int) -> int:
    return resource.RLIM_INFINITY if value >= (1 << 63) else value


def _clone(node: Node) -> int:
    """clone3 with set_tid = the node's pid; the child sets itself up (and
    its children) or, for a zombie, exits."""
    def child() -> int:
        try:
            if node.proc.zombie:
                _set_session(node)
                _become_zombie(node.proc.exit_status)
            _child_setup(node)
        except BaseException as err:  # noqa: BLE001 - reported to the restorer
            for fd in (node.helpers.get("ready", (-1, -1))[::-1]):
                try:
                    os.write(fd, f"E{describe(err)}".encode()[:4000])
                    break
                except BaseException:  # noqa: BLE001
                    continue
            return 2
        return 1

    pid, err = clone_with_pid(node.proc.pid, child, node.clone_flags, node.before_clone)
    if pid < 0:
        if err == 17:
            raise RestoreError(f"pid {node.proc.pid} is taken (clone3: EEXIST)", node.proc.pid)
        raise RestoreError(f"clone3 with pid {node.proc.pid}: {os.strerror(err)}", node.proc.pid)
    if node.proc.zombie:  # dead before the next sibling, which may join its group, is made
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
    elif node.proc.ppid and node.proc.sid != node.proc.pid and node.proc.pgid != node.parent.proc.pgid:
        try:  # as a shell does: from both sides, so a later sibling finds the group
            os.setpgid(pid, node.proc.pgid)
        except OSError:
            pass  # the child sets it itself (or reports why it cannot)
    return pid


def spawn(root: Node) -> dict[int, Child]:
    """Every process of the tree, each with its saved pid, children made by
    their parents; returns once all are READY (a Child per live process)."""
    nodes = list(root.walk())
    for node in nodes if not root.clone_flags & CLONE_NEWPID else ():  # in a new one, every pid is free
        wait_pid_free(node.proc.pid)
    live = [n for n in nodes if not n.proc.zombie and not n.fork_built]
    try:
        for node in live:
            node.ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
            sync_r, node.sync_w = os.pipe2(os.O_CLOEXEC)
            node.helpers = {"sync": (sync_r, 0), "ready": (ready_w, 0)}
        in_use = [int(n) for n in os.listdir("/proc/self/fd")]
        base = max(in_use + [fd for n in live for fd in list(n.files.fd_sources) + list(n.files.fd_aliases)]) + 1
        for node in live:
            helpers = {f"fd{target_fd}": (src, 0) for target_fd, src in node.files.fd_sources.items()}
            helpers.update({f"map{fid}": (src, 0) for fid, src in node.files.map_sources.items()})
            helpers.update({f"shm{sid}": (src, 0) for sid, src in node.files.shm_sources.items()})
            helpers.update(node.helpers)
            node.helpers = {name: (src, base + i) for i, (name, (src, _)) in enumerate(helpers.items())}
        pid = _clone(root)
    except BaseException:
        for node in live:
            for fd in (node.ready_r, node.sync_w):
                if fd >= 0:
                    os.close(fd)
        raise
    finally:
        for node in live:  # the children's ends: only they hold them now
            for name in ("ready", "sync"):
                if name in node.helpers:
                    os.close(node.helpers[name][0])
    problems = []
    for node in live:
        try:  # until EOF: the child has closed its end, its fd table is final
            msg = b""
            while chunk := os.read(node.ready_r, 4096):
                msg += chunk
        finally:
            os.close(node.ready_r)
        if msg != b"R":
            why = msg[1:].decode(errors="replace") if msg else "exited before it was ready"
            problems.append((node.proc.pid, why))
    if problems:
        for node in live:
            os.close(node.sync_w)
        _kill_spawned(pid, [n.proc.pid for n in nodes] if not root.clone_flags & CLONE_NEWPID else [pid])  # its init: all
        who, why = problems[0]
        raise RestoreError(f"pid {who}: preparing the new process failed: {why}", who)
    return {n.proc.pid: Child(n.proc.pid, n.sync_w, {name: want for name, (_, want) in n.helpers.items()},
                              n.files.sysv_ids, pid if n is root and root.clone_flags & CLONE_NEWPID else 0)
            for n in live}


def _kill_spawned(root_pid: int, pids: list[int]) -> None:
    """Kill what the spawn made: the root (our child) and every pid of the
    tree whose parent is one of ours (a pid we failed to take belongs to
    someone else and is left alone)."""
    ours = {os.getpid(), *pids}
    for p in pids:
        try:
            if proc.read_stat(p).ppid in ours:
                os.kill(p, signal.SIGKILL)
        except OSError:
            pass
    try:
        os.waitpid(root_pid, 0)
    except ChildProcessError:
        os.chroot(task.root)
