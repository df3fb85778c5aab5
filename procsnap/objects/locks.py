"""File locks: flock, POSIX (fcntl F_SETLK) and open-file-description
(F_OFD_SETLK) locks, taken again by the restored process itself before
any process of the tree runs.

    dump: fdinfo `lock:` lines of each open file description
          (fs/locks.c shows there the locks taken through that description:
          its flock and OFD locks, and this process's POSIX locks)
    restore: injected into the rebuilt process, non-blocking:
          FLOCK  -> flock(fd, LOCK_SH|LOCK_EX | LOCK_NB)
          POSIX  -> fcntl(fd, F_SETLK, {type, SEEK_SET, start, len})
          OFDLCK -> fcntl(fd, F_OFD_SETLK, ...)

A lock another process took meanwhile fails the restore, naming the file
and the lock: the restored program would otherwise write without it. A
lease (F_SETLEASE) is refused at dump by name.

The image's locks were released when the dump killed the tree; between
that and the restore the files are unlocked (as with CRIU). Within the
restore, every lock is held before any process of the tree is released.
"""

from __future__ import annotations

from .. import records as dataclasses  # the dataclasses API, cheap to import
import errno
import os
import struct

from ..errors import RestoreError, Unsupported
from ..kernel import proc
from ..kernel.arch.x86_64 import NR
from ..kernel.infect import Target

F_SETLK = 6
F_OFD_SETLK = 37
F_RDLCK, F_WRLCK = 0, 1
SEEK_SET = 0
LOCK_SH, LOCK_EX, LOCK_NB = 1, 2, 4
# struct flock (include/uapi/asm-generic/fcntl.h, x86_64): l_type, l_whence,
# (padding to 8), l_start, l_len, l_pid, (padding): 32 bytes
FLOCK = struct.Struct("<hh4xqqi4x")
KINDS = ("FLOCK", "POSIX", "OFDLCK")


@dataclasses.dataclass
class FileLock:
    """A lock held through fd `fd` (record LOCK, since format 1.2)."""

    fd: int
    kind: str  # FLOCK, POSIX, OFDLCK
    write: bool  # exclusive (WRITE) or shared (READ)
    start: int = 0
    end: int = -1  # last byte locked; -1: to the end of the file, however long
    # FLOCK: the process that took it (the kernel shows it as the owner);
    # every process holding the description lists the lock, the owner takes it
    owner: int = 0


def collect_locks(pid: int, fds) -> list[FileLock]:
    """The locks of every open file description of `pid` (once each: a
    description's other fds show the same locks)."""
    out = []
    for entry in fds:
        if entry.shares_with != -1:
            continue
        try:
            with open(f"/proc/{pid}/fdinfo/{entry.fd}") as f:
                lines = proc.parse_fd_locks(f.read())
        except FileNotFoundError:
            continue
        for line in lines:
            what = f"pid {pid}: fd {entry.fd} ({entry.path or entry.kind.value})"
            if line.kind not in KINDS:
                raise Unsupported(f"{what} holds {line.kind.lower()} {line.mode} {line.access}; file "
                                  f"{line.kind.lower()}s are not supported", pid)
            if line.mode != "ADVISORY":
                raise Unsupported(f"{what} holds a {line.mode.lower()} {line.kind} lock; not supported", pid)
            out.append(FileLock(entry.fd, line.kind, line.access == "WRITE", line.start, line.end, line.pid))
    return out


def describe(lock: FileLock) -> str:
    span = f"bytes {lock.start}-{'EOF' if lock.end < 0 else lock.end}"
    return f"{'write' if lock.write else 'read'} {lock.kind} lock on {span}"


def restore_locks_seized(target: Target, locks: list[FileLock], paths: dict[int, str],
                         tree_pids: set[int]) -> None:
    """Each lock taken again by the rebuilt process, through its own fd. A
    flock on a description several processes hold is taken by the process
    that took it (by every one of them if that one is not in the tree: the
    first one's stays, the others' are no-ops on the same description)."""
    for lock in locks:
        if lock.kind == "FLOCK" and lock.owner != target.pid and lock.owner in tree_pids:
            continue
        if lock.kind == "FLOCK":
            ret = target.call(NR.flock, lock.fd, (LOCK_EX if lock.write else LOCK_SH) | LOCK_NB, check=False)
        else:
            length = 0 if lock.end < 0 else lock.end - lock.start + 1
            target.write_scratch(FLOCK.pack(F_WRLCK if lock.write else F_RDLCK, SEEK_SET, lock.start, length, 0))
            cmd = F_SETLK if lock.kind == "POSIX" else F_OFD_SETLK
            ret = target.call(NR.fcntl, lock.fd, cmd, target.scratch, check=False)
        if -4096 < ret < 0:
            why = ("another process holds a conflicting lock now" if -ret in (errno.EAGAIN, errno.EACCES,
                                                                            errno.EWOULDBLOCK)
                   else os.strerror(-ret))
            raise RestoreError(f"pid {target.pid}: fd {lock.fd} ({paths.get(lock.fd, '?')}): cannot take its "
                               f"{describe(lock)} again: {why}", target.pid)


# The task-state protocol (objects/__init__.py TASK_STATE)

def collect_seized(target: Target, tids: list[int], ckpt) -> None:
    ckpt.locks = collect_locks(target.pid, ckpt.fds)


def restore_seized(target: Target, ckpt, tree_pids: set[int]) -> None:
    restore_locks_seized(target, ckpt.locks, {e.fd: e.path for e in ckpt.fds}, tree_pids)
