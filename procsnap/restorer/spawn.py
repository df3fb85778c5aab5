"""spawn: create the process with its old pid, prepared from inside.

clone3 with set_tid gives the child the saved pid. The child is a copy of
this Python process; while it is still Python it sets what is simplest to
set from inside (cwd, umask, session, fds, rlimits), reports READY on a
pipe and blocks in read() on another, where the restorer freezes it and
replaces everything else.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import resource
import signal
import time

from .. import model
from ..errors import RestoreError
from ..kernel.arch.x86_64 import NR
from ..kernel.libc import prctl
from .files import PreparedFiles

_pylibc = ctypes.PyDLL(None, use_errno=True)  # keeps the GIL across clone3
_pylibc.syscall.restype = ctypes.c_long


PR_SET_PDEATHSIG = 1


class clone_args(ctypes.Structure):
    """struct clone_args (include/uapi/linux/sched.h), 88 bytes."""

    _fields_ = [(name, ctypes.c_uint64) for name in (
        "flags", "pidfd", "child_tid", "parent_tid", "exit_signal", "stack", "stack_size", "tls",
        "set_tid", "set_tid_size", "cgroup")]


@dataclasses.dataclass
class Child:
    pid: int
    sync_w: int  # restorer's end; closing it would wake the child
    helper_fds: dict[str, int]  # name -> fd number in the child


def wait_pid_free(pid: int, timeout: float = 3.0) -> None:
    """A zombie may hold the pid for a while (init reaps late here)."""
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}"):
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rpartition(")")[2].split()[0]
            with open(f"/proc/{pid}/comm") as f:
                comm = f.read().strip()
        except OSError:  # gone meanwhile (or unreadable: then clone3 decides)
            if time.monotonic() > deadline:
                return
            continue
        if state not in ("Z", "X") or time.monotonic() > deadline:
            raise RestoreError(f"pid {pid} is taken by a running process ({comm}, state {state})", pid)
        time.sleep(0.01)


def _child_setup(task: model.Task, files: PreparedFiles, helpers: dict[str, tuple[int, int]]) -> None:
    """Runs in the child. `helpers`: name -> (restorer fd, fd number wanted)."""
    # If the restorer dies (even by SIGKILL) before the rebuild is done, the
    # half-built process dies with it; the rebuild clears this at the end.
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    # fd numbers up to the hard limit, whatever the restorer's soft one (the
    # saved limits are set last)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # Helpers first go above every number in use, so nothing collides.
    for src, want in helpers.values():
        os.dup2(src, want, inheritable=False)
    os.chdir(task.cwd)
    os.umask(task.umask)
    if task.session_leader:
        os.setsid()
    elif task.group_leader:
        os.setpgid(0, 0)
    keep = {want for _, want in helpers.values()}
    for target_fd, src in files.fd_sources.items():
        os.dup2(helpers[f"fd{target_fd}"][1], target_fd, inheritable=target_fd not in files.cloexec)
        keep.add(target_fd)
    for target_fd, first in files.fd_aliases.items():
        os.dup2(first, target_fd, inheritable=target_fd not in files.cloexec)
        keep.add(target_fd)
    for name, (_, want) in helpers.items():
        if name.startswith("fd"):
            os.close(want)
            keep.discard(want)
    prev = 0
    for fd in sorted(keep) + [1 << 20]:
        if fd > prev:
            os.closerange(prev, fd)
        prev = fd + 1
    for r in task.rlimits:
        resource.setrlimit(r.resource, (_rlim(r.soft), _rlim(r.hard)))
    ready_w, sync_r = helpers["ready"][1], helpers["sync"][1]
    os.write(ready_w, b"R")
    os.close(ready_w)
    os.read(sync_r, 1)  # frozen here by the restorer, never returns


def _rlim(value: int) -> int:
    return resource.RLIM_INFINITY if value >= (1 << 63) else value


def spawn(task: model.Task, files: PreparedFiles) -> Child:
    """clone3 with set_tid = task.pid; returns once the child is READY."""
    wait_pid_free(task.pid)
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    sync_r, sync_w = os.pipe2(os.O_CLOEXEC)
    in_use = [int(n) for n in os.listdir("/proc/self/fd")]
    base = max(in_use + list(files.fd_sources) + list(files.fd_aliases)) + 1
    helpers: dict[str, tuple[int, int]] = {}
    for target_fd, src in files.fd_sources.items():
        helpers[f"fd{target_fd}"] = (src, 0)
    for fid, src in files.map_sources.items():
        helpers[f"map{fid}"] = (src, 0)
    helpers["sync"] = (sync_r, 0)
    helpers["ready"] = (ready_w, 0)
    helpers = {name: (src, base + i) for i, (name, (src, _)) in enumerate(helpers.items())}
    tid = (ctypes.c_int * 1)(task.pid)
    args = clone_args(exit_signal=signal.SIGCHLD, set_tid=ctypes.addressof(tid), set_tid_size=1)
    pid = _pylibc.syscall(NR.clone3, ctypes.byref(args), ctypes.sizeof(args))
    if pid == 0:  # the child
        code = 1
        try:
            _child_setup(task, files, helpers)
        except BaseException as err:  # noqa: BLE001 - reported to the parent
            try:
                os.write(helpers["ready"][1], f"E{type(err).__name__}: {err}".encode()[:4000])
            except BaseException:  # noqa: BLE001
                code = 2
        os._exit(code)
    err = ctypes.get_errno()
    os.close(ready_w)
    os.close(sync_r)
    if pid < 0:
        os.close(ready_r)
        os.close(sync_w)
        if err == 17:
            raise RestoreError(f"pid {task.pid} is taken (clone3: EEXIST)", task.pid)
        raise RestoreError(f"clone3 with pid {task.pid}: {os.strerror(err)}", task.pid)
    try:  # until EOF: the child has closed its end, its fd table is final
        msg = b""
        while chunk := os.read(ready_r, 4096):
            msg += chunk
    finally:
        os.close(ready_r)
    if msg != b"R":
        os.close(sync_w)
        os.waitpid(pid, 0)
        why = msg[1:].decode(errors="replace") if msg else "exited before it was ready"
        raise RestoreError(f"pid {task.pid}: preparing the new process failed: {why}", task.pid)
    return Child(pid, sync_w, {name: want for name, (_, want) in helpers.items()})
