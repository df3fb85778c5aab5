"""Where a dump reads each process's pages from, and when it scans them.

One flow for one process and for a tree, killed or left running; what
--leave-running changes is only where the pages are read:

  scan_frozen  while the tree is frozen. With leave_running, the runs of
               the areas a fork would not keep as they are
               (snapshot.read_while_frozen), read at once by the dump. In a
               tree, every other run too, and its page frames claimed
               (CowIndex): a snapshot shares every page with its process,
               so what the tree's processes share can only be seen before
               one exists. Without leave_running, every run.
  snapshot     leave_running: a copy-on-write snapshot of every process,
               then the tree runs on; if the kernel refuses one (e.g.
               RLIMIT_NPROC), the tree stays frozen and is read as it is.
  runs         a process's runs to read from its source (its snapshot, or
               itself frozen): those not scanned yet are scanned there, so a
               single process left running has no pagemap read inside its
               freeze window.
"""

from __future__ import annotations

import contextlib

from .. import log as logging  # the logging API, cheap to import
from .. import model
from ..errors import plural
from . import collect as C
from . import tree as T
from .snapshot import cow_snapshot, read_while_frozen

log = logging.getLogger("procsnap.dumper")


class PagePlan:
    """`collected`: (checkpoint, maps) of each frozen process of `tree`, in tree order."""

    def __init__(self, tree, collected: list[tuple[model.Checkpoint, list]], leave_running: bool):
        self.tasks = tree.tasks
        self.maps = [c[1] for c in collected]
        self.single = len(self.tasks) == 1
        self.leave_running = leave_running
        early = [[v for v in c[0].vmas if leave_running and read_while_frozen(v)] for c in collected]
        self.later = [[v for v in c[0].vmas if not (leave_running and read_while_frozen(v))] for c in collected]
        self._early = early
        self.now: list[list] = [[] for _ in collected]  # runs read while frozen
        self.scanned: list[list | None] = [None for _ in collected]
        self.claims: list[tuple[list, list]] = []  # per process: (runs it stores, pages it refers to)
        self.cow = T.CowIndex()
        self.sources = [task.pid for task in self.tasks]  # where each process's pages are read

    def scan_frozen(self) -> None:
        for index, task in enumerate(self.tasks):
            if self._early[index]:
                self.now[index] = C.collect_page_runs(task.pid, self._early[index])
            if not (self.leave_running and self.single):
                self.scanned[index] = C.collect_page_runs(task.pid, self.later[index])
        if not self.single:  # before any page is read (see CowIndex)
            self.claims = [self.cow.claim(i, task.pid, runs) for i, (task, runs) in
                           enumerate(zip(self.tasks, self.scanned))]

    def snapshot(self, stack: contextlib.ExitStack) -> bool:
        """Every process's snapshot (released by `stack`), then all of them
        run on; False if one could not be made: then all stay frozen."""
        snaps = [stack.enter_context(cow_snapshot(task, maps)) for task, maps in zip(self.tasks, self.maps)]
        if any(snap is None for snap in snaps):
            return False
        for task in self.tasks:
            task.thaw()
        log.info("pid %d: thawed; reading pages from %s", self.tasks[0].pid, plural(len(snaps), "snapshot"))
        self.sources = snaps
        return True

    def runs(self, index: int) -> tuple[list, list]:
        """(runs to read from sources[index], pages claimed from an earlier process)."""
        if self.claims:
            return self.claims[index]
        runs = self.scanned[index]
        if runs is None:
            runs = C.collect_page_runs(self.sources[index], self.later[index])
        return runs, []
