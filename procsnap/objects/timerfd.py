"""timerfd: its clock, the time that was left when dumped, its interval and
the expirations not yet read (FdEntry.params: clockid, value_ns,
interval_ns, ticks). Restored armed with the time left, relative."""

from __future__ import annotations

from .. import model
from ..kernel import anonfd
from ..kernel.arch.x86_64 import NR
from . import protocol


class Collect(protocol.AnonCollect):
    link = "anon_inode:[timerfd]"
    fd_kind = model.FdKind.TIMERFD

    def collect_seized(self, target, entries: list[model.FdEntry]) -> None:
        """A periodic timerfd's fdinfo counts expirations only when asked: the
        task asks (timerfd_gettime, which changes nothing it can see), then
        fdinfo has the ticks and the time left."""
        from ..kernel import proc  # a dump's (see objects/__init__)

        for e in entries:
            if e.kind == self.fd_kind:
                target.call(NR.timerfd_gettime, e.fd, target.scratch)
                with open(f"/proc/{target.pid}/fdinfo/{e.fd}") as f:
                    e.params, _ = proc.parse_anon_fdinfo(f.read())


class Prepare(protocol.AnonPrepare):
    fd_kinds = (model.FdKind.TIMERFD,)

    def make(self, entry: model.FdEntry) -> int:
        p = entry.params
        return anonfd.make_timerfd(p.get("clockid", 1), protocol.nonblock(entry), p.get("value_ns", 0),
                                   p.get("interval_ns", 0), p.get("ticks", 0))
