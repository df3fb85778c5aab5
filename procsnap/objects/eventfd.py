"""eventfd: its counter and mode (FdEntry.params: count, semaphore)."""

from __future__ import annotations

from .. import model
from ..kernel import anonfd
from . import protocol


class Collect(protocol.AnonCollect):
    link = "anon_inode:[eventfd]"
    fd_kind = model.FdKind.EVENTFD


class Prepare(protocol.AnonPrepare):
    fd_kinds = (model.FdKind.EVENTFD,)

    def make(self, entry: model.FdEntry) -> int:
        return anonfd.make_eventfd(entry.params.get("count", 0), bool(entry.params.get("semaphore")),
                                   protocol.nonblock(entry))
