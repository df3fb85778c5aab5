"""signalfd: the signals it takes (FdEntry.params: mask)."""

from __future__ import annotations

from .. import model
from ..kernel import anonfd
from . import protocol


class Collect(protocol.AnonCollect):
    link = "anon_inode:[signalfd]"
    fd_kind = model.FdKind.SIGNALFD


class Prepare(protocol.AnonPrepare):
    fd_kinds = (model.FdKind.SIGNALFD,)

    def make(self, entry: model.FdEntry) -> int:
        return anonfd.make_signalfd(entry.params.get("mask", 0), protocol.nonblock(entry))
