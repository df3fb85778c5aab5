"""The memory a fork-built process inherits from its rebuilt parent
(restorer/forkbuild.py), kept instead of unmapped, so that the pages both
held copy-on-write when dumped are one page again.

A VMA of the child is *kept* when its parent's image has the same private
anonymous VMA, or one it is a piece of (flags, advice; no MADV_DONTFORK or
MADV_WIPEONFORK, which a fork does not copy as it is; not MAP_DROPPABLE),
holding at least one page, so that the copy has an anon_vma of its own
and no new neighbour merges into it; what the child lacks of it is
unmapped with the rest. Then, page by page (in runs):

    the child's stored page there          what is done in the child
    ------------------------------         --------------------------
    the parent's (same page of an image)   nothing: it is the parent's page
    another one                            written (the kernel copies that page)
    none (zero or never touched)           MADV_DONTNEED (reads zeros again)

Its protection is set last (written through RW first where needed).

A stored page is named by where the restorer maps it: two processes whose
runs point at the same address of the same pages.img (their own run, or a
PREF of the image that stored it) had the same page frame when dumped.
"""

from __future__ import annotations

import bisect
import itertools
import typing

from .. import model
from ..kernel import mapping
from ..kernel.arch.x86_64 import NR, PAGE_SIZE
from ..kernel.infect import Target
from .memory import PROT_RW, fill

Segment = tuple[int, int, int, int]  # (vaddr, npages, local address, source), as map_vmas_seized's
NOT_INHERITED = model.Advice.DONTFORK | model.Advice.WIPEONFORK


def kept_vmas(ckpt: model.Checkpoint, parent: model.Checkpoint,
              parent_pages: typing.Sequence[Segment]) -> dict[int, model.Vma]:
    """start -> the parent's VMA, for each VMA of `ckpt` the fork keeps: one
    of the parent's, or a piece of one (the rest unmapped, or protected
    otherwise), but two neighbouring pieces of one the kernel would have
    merged (a new area in the middle: it is built anew and kept apart)."""
    theirs = sorted(parent.vmas, key=lambda v: v.start)
    keys = [v.start for v in theirs]
    starts = sorted(s[0] for s in parent_pages)
    ends = {s[0]: s[0] + s[1] * PAGE_SIZE for s in parent_pages}
    out: dict[int, model.Vma] = {}
    prev = None
    for v in sorted(ckpt.vmas, key=lambda v: v.start):
        i = bisect.bisect_right(keys, v.start) - 1
        pv = theirs[i] if i >= 0 and v.end <= theirs[i].end else None
        if (pv is None or v.kind != model.VmaKind.ANON or pv.kind != v.kind or pv.flags != v.flags
                or pv.advice != v.advice or v.advice & NOT_INHERITED or v.flags & model.MapFlag.MAP_DROPPABLE
                or ((pv.start, pv.end) != (v.start, v.end) and v.flags & model.MapFlag.MAP_GROWSDOWN)):
            continue
        if prev is not None and out.get(prev.start) is pv and prev.end == v.start and prev.prot == v.prot:
            continue
        j = bisect.bisect_right(starts, pv.end - 1) - 1  # the last run starting below its end
        if j >= 0 and ends[starts[j]] > pv.start:  # it has pages: the copy has an anon_vma
            out[v.start] = pv
            prev = v
    return out


def in_range(segments: typing.Iterable[Segment], start: int, end: int) -> list[Segment]:
    """The parts of `segments` inside [start, end), sorted."""
    out = []
    for vaddr, npages, local, src in segments:
        lo, hi = max(vaddr, start), min(vaddr + npages * PAGE_SIZE, end)
        if lo < hi:
            out.append((lo, (hi - lo) // PAGE_SIZE, local + lo - vaddr, src))
    return sorted(out)


def page_diff(start: int, end: int, mine: list[Segment], theirs: list[Segment]) \
        -> tuple[list[Segment], list[tuple[int, int]]]:
    """What makes [start, end) of a copy of `theirs` hold `mine` (both from
    in_range): the runs to write, and the (address, length) to drop."""
    cuts = sorted({start, end} | {a for s in mine + theirs for a in (s[0], s[0] + s[1] * PAGE_SIZE)})
    keys_m, keys_t = [s[0] for s in mine], [s[0] for s in theirs]

    def at(segs, keys, a):
        i = bisect.bisect_right(keys, a) - 1
        if i >= 0 and a < segs[i][0] + segs[i][1] * PAGE_SIZE:
            return segs[i][2] + a - segs[i][0], segs[i][3]
        return None

    writes: list[Segment] = []
    drops: list[tuple[int, int]] = []
    for a, b in itertools.pairwise(cuts):
        m, t = at(mine, keys_m, a), at(theirs, keys_t, a)
        if m is None:
            if t is None:
                continue
            if drops and drops[-1][0] + drops[-1][1] == a:
                drops[-1] = (drops[-1][0], drops[-1][1] + b - a)
            else:
                drops.append((a, b - a))
        elif t is None or t[0] != m[0]:
            w = writes[-1] if writes else None
            if w and w[0] + w[1] * PAGE_SIZE == a and w[2] + w[1] * PAGE_SIZE == m[0] and w[3] == m[1]:
                writes[-1] = (w[0], w[1] + (b - a) // PAGE_SIZE, w[2], w[3])
            else:
                writes.append((a, (b - a) // PAGE_SIZE, m[0], m[1]))
    return writes, drops


def restore_kept_seized(target: Target, v: model.Vma, inherited: model.Vma, mine: list[Segment],
                        theirs: list[Segment], filled=None) -> int:
    """Make the kept VMA `v` (the parent's `inherited`, as the fork copied
    it) hold the child's pages; returns the bytes written."""
    writes, drops = page_diff(v.start, v.end, in_range(mine, v.start, v.end), in_range(theirs, v.start, v.end))
    prot = inherited.prot
    if writes and prot & PROT_RW != PROT_RW:
        prot |= PROT_RW
        target.call(NR.mprotect, v.start, v.size, int(prot))
    for source in sorted({w[3] for w in writes}):  # a batch never spans two sources' mappings
        fill(target.pid, ((local, vaddr, n * PAGE_SIZE) for vaddr, n, local, src in writes if src == source), filled)
    for addr, length in drops:
        target.call(NR.madvise, addr, length, mapping.MADV_DONTNEED)
    if prot != v.prot:
        target.call(NR.mprotect, v.start, v.size, int(v.prot))
    return sum(w[1] for w in writes) * PAGE_SIZE
