"""The pages each VMA gets at restore, without an object per page run.

A dump of half-zero memory has a run per page (131,072 per GiB); a tuple
per run, grouped by VMA, cost ~190 bytes a run (~100 MiB at 4 GiB) on top
of the runs themselves. Here the runs stay as the image holds them
(schema.PageRuns, 32 bytes each), and each VMA keeps only the indices of
its runs (4 bytes each); what fill() writes is made from them as it goes.

  PageRuns.data   | vaddr npages offset xxh3 | vaddr npages ... |   (PAGE_RUN, pages.img order)
  VmaPages.own    [ 7, 8, 9, ... ]   indices into it, pages.img order
  VmaPages.refs   [(vaddr, npages, local address, source), ...]  pages stored by another image
"""

from __future__ import annotations

import array
import bisect
import typing

from .. import model
from ..image import schema
from ..kernel.arch.x86_64 import PAGE_SIZE

OWN = -1  # the source of a process's own pages.img, as page_segments says


class VmaPages:
    """The pages of one VMA: its own runs (indices into `data`, mapped at
    `base`) and its references into other images' pages."""

    __slots__ = ("data", "base", "own", "refs")

    def __init__(self, data, base: int, own: array.array | None = None, refs: list | None = None):
        self.data, self.base = data, base
        self.own = own if own is not None else array.array("I")
        self.refs = refs if refs is not None else []

    def __bool__(self) -> bool:
        return bool(self.own) or bool(self.refs)

    def sources(self) -> set[int]:
        out = {src for *_, src in self.refs}
        if self.own:
            out.add(OWN)
        return out

    def writes(self, source: int, shift: int = 0) -> typing.Iterator[tuple[int, int, int]]:
        """(local address, vaddr + shift, length) of each run from `source`."""
        if source == OWN:
            data, base, unpack = self.data, self.base, schema.PAGE_RUN.unpack_from
            for i in self.own:
                vaddr, npages, offset, _ = unpack(data, i * schema.PAGE_RUN.size)
                yield base + offset, vaddr + shift, npages * PAGE_SIZE
        for vaddr, npages, address, src in self.refs:
            if src == source:
                yield address, vaddr + shift, npages * PAGE_SIZE

    def segments(self) -> list[tuple[int, int, int, int]]:
        """(vaddr, npages, local address, source) of every run, as a list:
        for the few VMAs that need them all at once (inherit.py)."""
        out = []
        for i in self.own:
            vaddr, npages, offset, _ = schema.PAGE_RUN.unpack_from(self.data, i * schema.PAGE_RUN.size)
            out.append((vaddr, npages, self.base + offset, OWN))
        return out + self.refs


class PagesByVma:
    """`runs` (schema.PageRuns, or a list of model.PageRun) and `refs`
    ((vaddr, npages, local address, source)) by the VMA of `starts`
    (sorted by start) each lies in; the image's reader has checked that
    every run lies in one VMA."""

    def __init__(self, starts: list[model.Vma], runs, base: int,
                 refs: typing.Sequence[tuple[int, int, int, int]] = ()):
        self.data = runs.data if isinstance(runs, schema.PageRuns) else schema.pack_page_runs(runs).runs
        self.base = base
        self.own: dict[int, array.array] = {}
        self.refs: dict[int, list] = {}
        keys = [v.start for v in starts]
        lo = hi = 0
        mine = None
        for i, (vaddr, _, _, _) in enumerate(schema.PAGE_RUN.iter_unpack(self.data)):
            if not lo <= vaddr < hi:  # runs come VMA by VMA: a lookup only where the VMA changes
                v = starts[bisect.bisect_right(keys, vaddr) - 1]
                lo, hi = v.start, v.end
                mine = self.own.setdefault(lo, array.array("I"))
            mine.append(i)
        for seg in refs:
            self.refs.setdefault(starts[bisect.bisect_right(keys, seg[0]) - 1].start, []).append(seg)

    def of(self, v: model.Vma) -> VmaPages:
        return VmaPages(self.data, self.base, self.own.get(v.start), self.refs.get(v.start))
