"""Python's cyclic garbage collector held off while a dump or restore runs.

A dump or restore of 10,000 VMAs makes some 100,000 objects that live to
its end (model.Vma, page indices, batch tables), nearly none in a cycle;
each of them made the collector walk the older ones again, a fifth of the
restore's CPU time (notes/issue-12-vmas.md). Reference counting frees all
the rest as before; the collector runs again once the call returns.
"""

from __future__ import annotations

import gc


class paused:
    """`with paused():` the collector off inside, as it was after."""

    def __enter__(self) -> None:
        self.was = gc.isenabled()
        gc.disable()

    def __exit__(self, *exc) -> None:
        if self.was:
            gc.enable()
