"""Process fds: pidfds, fds of /proc/PID/... files of the tree, and
namespace fds (/proc/PID/ns/*) of the host's own namespaces.

    fd                                  restore
    --                                  -------
    pidfd of a live process or thread   a placeholder at the spawn; once every
      of the tree (fdinfo Pid:)           process exists (restore_seized), the
    /proc/PID/... of a process of the     process itself opens it again
      tree (its link names the pid:       (pidfd_open with PIDFD_NONBLOCK/THREAD,
      /proc/self resolved)                or openat) and dup3s it over the
                                          placeholder, at its position
    pidfd of a process that is gone     the restorer forks a child, takes its
      (Pid: -1)                           pidfd and reaps it: a pidfd of no one
    namespace fd of a host namespace    the restorer's own /proc/self/ns/NAME

Refused by name: a pidfd or /proc file of a process outside the tree, or of
a thread of another process (which may not be made yet when this one is
rebuilt), and a namespace fd of any namespace but the host's own.
An fd of these shared with another process of the tree comes back as one
open file per process (the description is not shared again).
"""

from __future__ import annotations

import os
import re

from .. import model
from ..errors import RestoreError, Unsupported
from ..kernel.arch.x86_64 import NR
from ..kernel.infect import Target
from . import protocol
from .protocol import OpenFd, Restoring

PIDFD_LINK = "anon_inode:[pidfd]"
PIDFD_THREAD = os.O_EXCL  # include/uapi/linux/pidfd.h
NS_LINK = re.compile(r"(cgroup|ipc|mnt|net|pid|time|user|uts):\[\d+\]")
PROC_PID_PATH = re.compile(r"/proc/(\d+)(/task/(\d+))?(/.*)?")
AT_FDCWD = -100
LIVE = (model.FdKind.PIDFD, model.FdKind.PROC_FILE)  # opened again by the process itself


def _fdinfo_pid(pid: int, fd: int) -> int:
    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("Pid:"):
                return int(line.split()[1])
    return -1


def _is_thread_of(pid: int, tid: int) -> bool:
    return os.path.exists(f"/proc/{pid}/task/{tid}")


class Collect(protocol.Collect):
    def __init__(self):
        self.refs: list[tuple[str, int, int]] = []  # (where, pid of the fd's process, pid it names)
        self.proc_dev = os.stat("/proc").st_dev

    def collect_fd(self, fd: OpenFd) -> model.FdEntry | None:
        if fd.link == PIDFD_LINK:
            target = _fdinfo_pid(fd.pid, fd.fd)
            if target <= 0:
                return model.FdEntry(fd.fd, model.FdKind.PIDFD, fd.flags, 0, fd.link, params={"dead": 1})
            self._refer(fd, target, f"{fd.where} is a pidfd of pid {target}")
            return model.FdEntry(fd.fd, model.FdKind.PIDFD, fd.flags, 0, fd.link, params={"pid": target})
        if NS_LINK.fullmatch(fd.link):
            name = fd.link.split(":")[0]
            own = os.stat(f"/proc/self/ns/{name}")
            if not protocol.same_file(fd.st, own):
                raise Unsupported(f"{fd.where} is a namespace fd ({fd.link}) of a {name} namespace other than "
                                  "the host's; not supported", fd.pid)
            return model.FdEntry(fd.fd, model.FdKind.NAMESPACE, fd.flags, 0, f"/proc/self/ns/{name}")
        m = PROC_PID_PATH.fullmatch(fd.link)
        if m and fd.st.st_dev == self.proc_dev:
            target = int(m.group(3) or m.group(1))
            self._refer(fd, int(m.group(1)), f"{fd.where} is {fd.link}")
            if m.group(3):
                self._refer(fd, target, f"{fd.where} is {fd.link}")
            return model.FdEntry(fd.fd, model.FdKind.PROC_FILE, fd.flags, fd.pos, fd.link, params={"pid": target})
        return None

    def _refer(self, fd: OpenFd, target: int, what: str) -> None:
        self.refs.append((what, fd.pid, target))

    def collect_tree(self, root: model.Checkpoint, tree_pids: set[int]) -> None:
        for what, pid, target in self.refs:
            if target in tree_pids or (_is_thread_of(pid, target)):
                continue
            owner = next((p for p in tree_pids if _is_thread_of(p, target)), None)
            if owner is not None:
                raise Unsupported(f"pid {pid}: {what.split(': ', 1)[1]}, a thread of pid {owner}; not supported "
                                  "(only threads of its own process)", pid)
            raise Unsupported(f"pid {pid}: {what.split(': ', 1)[1]}, outside the dumped tree; not supported", pid)


def check_image(ckpt: model.Checkpoint, image) -> list[str]:
    problems = protocol.bad_fd_paths(ckpt, (model.FdKind.PROC_FILE, model.FdKind.NAMESPACE))
    for e in ckpt.fds:
        if e.kind in LIVE and not 0 < e.params.get("pid", 1 if e.params.get("dead") else 0) < 1 << 22:
            problems.append(f"fd {e.fd}: {e.kind.value} of pid {e.params.get('pid')}")
        if e.kind == model.FdKind.NAMESPACE and not re.fullmatch(r"/proc/self/ns/[a-z_]+", e.path):
            problems.append(f"fd {e.fd}: namespace fd path {e.path!r}")
    return problems


def dead_pidfd(flags: int) -> int:
    """A pidfd of a process that has exited and been reaped (Pid: -1)."""
    child = os.fork()
    if child == 0:
        os._exit(0)
    try:
        return os.pidfd_open(child, flags)
    finally:
        os.waitpid(child, 0)


class Prepare(protocol.Prepare):
    fd_kinds = (model.FdKind.PIDFD, model.FdKind.PROC_FILE, model.FdKind.NAMESPACE)

    def open_fd(self, entry: model.FdEntry, proc: Restoring) -> int:
        what = f"fd {entry.fd}"
        if entry.kind == model.FdKind.NAMESPACE:
            return self.own(protocol.open_path(entry.path, os.O_RDONLY | os.O_CLOEXEC, what))
        if entry.kind == model.FdKind.PIDFD and entry.params.get("dead"):
            try:
                return self.own(dead_pidfd(entry.flags & os.O_NONBLOCK))
            except OSError as err:
                raise RestoreError(f"{what}: cannot make a pidfd of an exited process: {err.strerror}") from err
        # made by the process itself once every pid exists (restore_seized)
        return self.own(protocol.open_path("/dev/null", os.O_RDONLY | os.O_CLOEXEC, what))


def _reopen_seized(target: Target, e: model.FdEntry) -> None:
    where = f"pid {target.pid}: fd {e.fd}"
    if e.kind == model.FdKind.PIDFD:
        ret = target.call(NR.pidfd_open, e.params["pid"], e.flags & (os.O_NONBLOCK | PIDFD_THREAD), check=False)
    else:
        target.write_scratch(e.path.encode() + b"\0")
        ret = target.call(NR.openat, AT_FDCWD, target.scratch, protocol.open_flags(e) & ~os.O_CLOEXEC, 0,
                          check=False)
    if ret < 0:
        raise RestoreError(f"{where}: cannot open {e.path if e.kind == model.FdKind.PROC_FILE else 'a pidfd'} of "
                           f"pid {e.params['pid']} again: {os.strerror(-ret)}", target.pid)
    cloexec = os.O_CLOEXEC if e.flags & os.O_CLOEXEC else 0
    target.call(NR.dup3, ret, e.fd, cloexec)
    target.call(NR.close, ret)
    if e.pos:
        target.call(NR.lseek, e.fd, e.pos, os.SEEK_SET)


# The task-state protocol (objects/__init__.py TASK_STATE)

def collect_seized(target: Target, tids: list[int], ckpt) -> None:
    """Nothing beyond the fds' records."""


def restore_seized(target: Target, ckpt, tree_pids: set[int]) -> None:
    """Every pid of the tree exists now (and this process's threads): the
    placeholders are replaced, and the fds that share their description."""
    for e in ckpt.fds:
        if e.kind in LIVE and e.shares_with < 0 and not e.params.get("dead"):
            _reopen_seized(target, e)
            for alias in ckpt.fds:
                if alias.shares_with == e.fd:
                    target.call(NR.dup3, e.fd, alias.fd, os.O_CLOEXEC if alias.flags & os.O_CLOEXEC else 0)
