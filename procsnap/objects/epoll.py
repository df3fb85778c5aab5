"""epoll: its watches (FdEntry.watches: [fd, events, data] as registered).
The restorer makes the epoll; the watches are added by the new process
itself once its fds are at their numbers, since the kernel keys a watch
by fd number."""

from __future__ import annotations

import functools

from .. import model
from ..errors import Unsupported
from ..kernel import anonfd
from . import protocol
from .protocol import Restoring


class Collect(protocol.AnonCollect):
    link = "anon_inode:[eventpoll]"
    fd_kind = model.FdKind.EPOLL

    def check_fds(self, pid: int, entries: list[model.FdEntry]) -> None:
        open_fds = {e.fd for e in entries}
        for e in entries:
            for watched, _, _ in e.watches:
                if watched not in open_fds:
                    raise Unsupported(f"pid {pid}: fd {e.fd} is an epoll watching fd {watched}, which is no "
                                      "longer open; not supported", pid)


class Prepare(protocol.AnonPrepare):
    fd_kinds = (model.FdKind.EPOLL,)

    def make(self, entry: model.FdEntry) -> int:
        return anonfd.make_epoll()

    def open_fd(self, entry: model.FdEntry, proc: Restoring) -> int:
        fd = super().open_fd(entry, proc)
        proc.in_child.append(functools.partial(_add_watches, entry.fd, entry.watches))
        return fd


def _add_watches(epfd: int, watches: list[list[int]]) -> None:
    """In the new process: by the fd numbers they were added with."""
    for fd, events, data in watches:
        anonfd.epoll_add(epfd, fd, events, data)
