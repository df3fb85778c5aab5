"""epoll: its watches (FdEntry.watches: [fd, events, data] as registered).
The restorer makes the epoll; the watches are added by the new process
itself once its fds are at their numbers, since the kernel keys a watch
by fd number.

A watch outlives close() of its fd while another fd holds the file (a dup,
an fd inherited by another process): the watch keeps the old number. As
CRIU does, the dump finds such an fd of the process with
kcmp(KCMP_EPOLL_TFD) and records it as the watch's fourth element; the
new process puts that file at the old number for the epoll_ctl (moving
aside whatever holds the number now) and closes it again. A watch whose
file no fd of the process holds is refused by name."""

from __future__ import annotations

import ctypes
import functools
import os
import struct

from .. import model
from ..errors import Unsupported
from ..kernel import anonfd
from ..kernel.arch.x86_64 import NR
from ..kernel.libc import syscall
from . import protocol
from .protocol import Restoring


class Collect(protocol.AnonCollect):
    link = "anon_inode:[eventpoll]"
    fd_kind = model.FdKind.EPOLL

    def check_fds(self, pid: int, entries: list[model.FdEntry]) -> None:
        open_fds = sorted(e.fd for e in entries)
        for e in entries:
            for watch in e.watches:  # an open number may hold another file now: asked first, then the others
                holder = _holder(pid, e.fd, watch[0], [watch[0]] + [fd for fd in open_fds if fd != watch[0]])
                if holder is None:
                    raise Unsupported(f"pid {pid}: fd {e.fd} is an epoll watching fd {watch[0]}, which is closed "
                                      "(or now another file), and no other fd of the process holds its file; "
                                      "not supported", pid)
                if holder != watch[0]:
                    watch.append(holder)


KCMP_EPOLL_TFD = 7  # include/uapi/linux/kcmp.h
KCMP_EPOLL_SLOT = struct.Struct("=III")  # struct kcmp_epoll_slot {__u32 efd, tfd, toff}


def _holder(pid: int, epfd: int, tfd: int, fds: list[int]) -> int | None:
    """An fd of `pid` that is the file epoll `epfd` watches as `tfd`."""
    slot = ctypes.create_string_buffer(KCMP_EPOLL_SLOT.pack(epfd, tfd, 0), KCMP_EPOLL_SLOT.size)
    for fd in fds:
        try:
            if syscall(NR.kcmp, pid, pid, KCMP_EPOLL_TFD, fd, slot) == 0:
                return fd
        except OSError:
            continue
    return None


class Prepare(protocol.AnonPrepare):
    fd_kinds = (model.FdKind.EPOLL,)

    def make(self, entry: model.FdEntry) -> int:
        return anonfd.make_epoll()

    def open_fd(self, entry: model.FdEntry, proc: Restoring) -> int:
        fd = super().open_fd(entry, proc)
        proc.in_child.append(functools.partial(_add_watches, entry.fd, entry.watches))
        return fd


def _add_watches(epfd: int, watches: list[list[int]]) -> None:
    """In the new process: by the fd numbers they were added with; a closed
    one's file (held by fd `via`) put at its number for the call."""
    for fd, events, data, *via in watches:
        if not via:
            anonfd.epoll_add(epfd, fd, events, data)
            continue
        try:
            inheritable = os.get_inheritable(fd)
            aside = os.dup(fd)  # whatever holds the number now
        except OSError:
            aside = -1
        os.dup2(via[0], fd)
        try:
            anonfd.epoll_add(epfd, fd, events, data)
        finally:
            if aside >= 0:
                os.dup2(aside, fd, inheritable=inheritable)
                os.close(aside)
            else:
                os.close(fd)
