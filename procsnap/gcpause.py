"""Python's cyclic garbage collector held off while a dump or restore runs.

A dump or restore of 10,000 VMAs makes some 100,000 objects that live to
its end (model.Vma, page indices, batch tables), nearly none in a cycle;
each of them made the collector walk the older ones again, a fifth of the
restore's CPU time (notes/issue-12-vmas.md). Reference counting frees all
the rest as before; the collector runs again once the call returns.
"""

from __future__ import annotations

import gc
import threading


_lock = threading.Lock()
_depth = 0  # dumps and restores running now (a library may run two at once, in two threads)
_was = True


class paused:
    """`with paused():` the collector off inside, as it was after the last
    of the overlapping calls ends."""

    def __enter__(self) -> None:
        global _depth, _was
        with _lock:
            if _depth == 0:
                _was = gc.isenabled()
                gc.disable()
            _depth += 1

    def __exit__(self, *exc) -> None:
        global _depth
        with _lock:
            _depth -= 1
            if _depth == 0 and _was:
                gc.enable()
