"""Signal-driven I/O: an open file description's owner (F_SETOWN_EX),
the signal it sends (F_SETSIG) and its O_ASYNC flag.

    dump (injected, per description)         restore (injected, before anything runs)
    ----                                     -------
    fcntl(fd, F_GETOWN_EX, &f_owner_ex)  --> fcntl(fd, F_SETFL, flags & ~O_ASYNC), then
    fcntl(fd, F_GETSIG)                        F_SETFL flags: the change is what calls the
    O_ASYNC from the fd's flags                file's ->fasync (open() keeps the bit unarmed)
                                             fcntl(fd, F_SETOWN_EX, &f_owner_ex)
                                             fcntl(fd, F_SETSIG, sig)

O_ASYNC goes first: a terminal's fasync makes its foreground group (or the
caller) the owner, which the saved owner then replaces. An owner outside
the dumped tree (a process, thread or process group none of its processes
is or is in) is refused at dump by name: the restored file would signal
whoever holds that number then.
"""

from __future__ import annotations

from .. import records as dataclasses  # the dataclasses API, cheap to import
import enum
import os
import struct

from .. import model
from ..errors import RestoreError, Unsupported
from ..kernel.arch.x86_64 import NR
from ..kernel.infect import Target


class Fcntl(enum.IntEnum):
    """fcntl commands (include/uapi/asm-generic/fcntl.h) used here."""

    F_GETFL = 3
    F_SETFL = 4
    F_SETSIG = 10
    F_GETSIG = 11
    F_SETOWN_EX = 15
    F_GETOWN_EX = 16


class OwnerType(enum.IntEnum):
    """struct f_owner_ex.type."""

    F_OWNER_TID = 0
    F_OWNER_PID = 1
    F_OWNER_PGRP = 2


F_OWNER_EX = struct.Struct("<ii")  # struct f_owner_ex {int type; pid_t pid;}


@dataclasses.dataclass
class FdOwner:
    """Who an fd's description signals, and with what (record FOWN, since format 1.2)."""

    fd: int
    owner_type: int = OwnerType.F_OWNER_PID
    owner: int = 0  # 0: none
    sig: int = 0  # 0: SIGIO
    async_io: bool = False  # O_ASYNC

    def describe(self) -> str:
        who = f"{OwnerType(self.owner_type).name[8:].lower()} {self.owner}" if self.owner else "nobody"
        return f"owner {who}, signal {self.sig or 'SIGIO'}{', O_ASYNC' if self.async_io else ''}"


def _failed(ret: int) -> bool:
    return -4096 < ret < 0


def collect_owners_seized(target: Target, fds: list[model.FdEntry]) -> list[FdOwner]:
    """The owner and signal of each open file description of the task
    (once: its aliases share them), where any is set."""
    out = []
    for entry in fds:
        if entry.shares_with != -1:
            continue
        target.write_scratch(bytes(F_OWNER_EX.size))
        ret = target.call(NR.fcntl, entry.fd, Fcntl.F_GETOWN_EX, target.scratch, check=False)
        kind, owner = F_OWNER_EX.unpack(target.read_scratch(F_OWNER_EX.size)) if not _failed(ret) else (1, 0)
        sig = target.call(NR.fcntl, entry.fd, Fcntl.F_GETSIG, check=False)
        sig = 0 if _failed(sig) else sig
        async_io = bool(entry.flags & os.O_ASYNC)
        if owner or sig or async_io:
            out.append(FdOwner(entry.fd, kind, owner, sig, async_io))
    return out


def check_owners(ckpts: list[model.Checkpoint], tids: dict[int, list[int]], procs: list[model.Proc]) -> None:
    """Refuse an owner outside the tree. `tids`: every thread of each live
    process; `procs`: the tree (its process groups)."""
    groups = {p.pgid for p in procs}
    all_tids = {tid for ts in tids.values() for tid in ts}
    for ckpt in ckpts:
        pid = ckpt.task.pid
        paths = {e.fd: e.path or e.kind.value for e in ckpt.fds}
        for o in ckpt.owners:
            if not o.owner:
                continue
            inside = {OwnerType.F_OWNER_TID: all_tids, OwnerType.F_OWNER_PID: set(tids),
                      OwnerType.F_OWNER_PGRP: groups}.get(o.owner_type, set())
            if o.owner not in inside:
                raise Unsupported(f"pid {pid}: fd {o.fd} ({paths.get(o.fd, '?')}): its signal-driven I/O "
                                  f"{o.describe()} is outside the dumped tree; not supported", pid)


def restore_owners_seized(target: Target, owners: list[FdOwner]) -> None:
    """Into the rebuilt process, its threads made (a thread may be the owner)."""
    for o in owners:
        what = f"pid {target.pid}: fd {o.fd}: {o.describe()}"
        flags = target.call(NR.fcntl, o.fd, Fcntl.F_GETFL, check=False)
        steps = []
        if o.async_io and not _failed(flags):
            steps += [(Fcntl.F_SETFL, flags & ~os.O_ASYNC), (Fcntl.F_SETFL, flags | os.O_ASYNC)]
        if o.owner:
            target.write_scratch(F_OWNER_EX.pack(o.owner_type, o.owner))
            steps.append((Fcntl.F_SETOWN_EX, target.scratch))
        if o.sig:
            steps.append((Fcntl.F_SETSIG, o.sig))
        for cmd, arg in steps:
            ret = flags if _failed(flags) else target.call(NR.fcntl, o.fd, cmd, arg, check=False)
            if _failed(ret):
                raise RestoreError(f"{what}: fcntl {cmd.name}: {os.strerror(-ret)}", target.pid)


# The task-state protocol (objects/__init__.py TASK_STATE)

def collect_seized(target: Target, tids: list[int], ckpt: model.Checkpoint) -> None:
    ckpt.owners = collect_owners_seized(target, ckpt.fds)


def restore_seized(target: Target, ckpt: model.Checkpoint, tree_pids: set[int]) -> None:
    restore_owners_seized(target, ckpt.owners)
