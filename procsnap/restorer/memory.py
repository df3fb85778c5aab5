"""Rebuilding the address space inside the frozen child.

The order matters (each step says what is true when it ends):
  unmap_seized        only [vvar], [vvar_vclock], [vdso] and procsnap's
                      areas are left of the child's own memory; then (same
                      batch) its mm fields and exe link are the saved ones
                      (before mapping: the old exe may not be mapped then)
  move_vdso_seized    the kernel areas sit at their saved addresses
  map_vmas_seized     every saved VMA exists with its final protection and
                      holds its saved pages
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import threading
import typing

from .. import faults, model, workers
from ..errors import RestoreError
from ..image.reader import PageSource
from ..kernel import mapping, memory, sysv
from ..kernel.arch.x86_64 import NR, PAGE_SIZE, TASK_SIZE
from ..kernel.infect import SCRATCH_SIZE, BatchFailed, Target, free_gap
from ..kernel.proc import MapsEntry
from ..kernel.structs import MREMAP_FIXED, MREMAP_MAYMOVE, Prctl, prctl_mm_map
from .files import vma_map_key
from .pagecursor import OWN, PagesByVma, VmaPages

MMAP_MIN_ADDR = 0x10000


def specials_of(maps: list[MapsEntry]) -> dict[model.VmaKind, tuple[int, int]]:
    return {model.SPECIAL_NAMES[m.path]: (m.start, m.end) for m in maps if m.path in model.SPECIAL_NAMES}


def unmap_seized(target: Target, maps: list[MapsEntry], inherited: typing.Iterable[tuple[int, int]],
                 first: typing.Sequence[tuple[int, ...]], mm: model.Mm, exe_fd: int) -> None:
    """One batch: the calls `first`, then munmap everything between the
    areas we keep, in a few big calls (`inherited`: VMAs a fork-built
    process keeps, see inherit.py; procsnap's own areas, the batch area
    made first), then PR_SET_MM_MAP with the saved `mm` and exe_fd."""
    target.claim_batch_area()
    keep = sorted([r for r in specials_of(maps).values()] + target.reserved() + list(inherited))
    calls, prev = list(first), MMAP_MIN_ADDR
    for start, end in keep + [(TASK_SIZE, TASK_SIZE)]:
        if start > prev:
            calls.append((NR.munmap, prev, start - prev))
        prev = max(prev, end)
    try:
        target.batch(calls + [_mm_call(target, mm, exe_fd)])
    except BatchFailed as err:
        if err.index < len(calls):
            raise
        raise _mm_error(target, err) from err


def _mm_call(target: Target, mm: model.Mm, exe_fd: int) -> tuple[int, ...]:
    """PR_SET_MM_MAP's call, its struct and the auxv written to the scratch area."""
    m = _mm_map(target, mm, exe_fd)
    target.write_scratch(bytes(m) + mm.auxv)
    return (NR.prctl, Prctl.PR_SET_MM, Prctl.PR_SET_MM_MAP, target.scratch, ctypes.sizeof(m))


def _mm_error(target: Target, err: OSError) -> RestoreError:
    m = prctl_mm_map.from_buffer_copy(target.read_scratch(ctypes.sizeof(prctl_mm_map)))
    fields = ", ".join(f"{name}={getattr(m, name):#x}" for name, _ in m._fields_)
    return RestoreError(f"pid {target.pid}: prctl(PR_SET_MM_MAP) refused the saved mm fields "
                        f"({fields}): {err.strerror}", target.pid)


def _mm_map(target: Target, mm: model.Mm, exe_fd: int) -> prctl_mm_map:
    return prctl_mm_map(
        start_code=mm.start_code, end_code=mm.end_code, start_data=mm.start_data, end_data=mm.end_data,
        start_brk=mm.start_brk, brk=mm.brk, start_stack=mm.start_stack, arg_start=mm.arg_start,
        arg_end=mm.arg_end, env_start=mm.env_start, env_end=mm.env_end,
        auxv=target.scratch + ctypes.sizeof(prctl_mm_map), auxv_size=len(mm.auxv), exe_fd=exe_fd)


def move_vdso_seized(target: Target, maps: list[MapsEntry], vmas: list[model.Vma]) -> None:
    """mremap the kernel's areas to their saved addresses, keeping their
    relative layout, and point the injector at the moved vdso."""
    have = specials_of(maps)
    want = {v.kind: (v.start, v.end) for v in vmas if v.kind in model.SPECIAL_KINDS}
    if set(have) != set(want) or any(have[k][1] - have[k][0] != want[k][1] - want[k][0] for k in want):
        raise RestoreError(f"pid {target.pid}: the kernel's vdso/vvar layout differs from the image's "
                           f"(here {_fmt(have)}, image {_fmt(want)})", target.pid)
    if have == want:
        return
    overlap = any(a < d and c < b for (a, b) in want.values() for (c, d) in have.values())
    if overlap:  # go through a free place so no move lands on an area not yet moved
        busy = [(v.start, v.end) for v in vmas] + list(have.values()) + [(target.scratch, target.scratch + SCRATCH_SIZE)]
        lo = min(a for a, _ in have.values())
        size = max(b for _, b in have.values()) - lo
        tmp = free_gap(busy, size)
        _move(target, have, {k: (tmp + a - lo, tmp + b - lo) for k, (a, b) in have.items()})
        have = {k: (tmp + a - lo, tmp + b - lo) for k, (a, b) in have.items()}
    _move(target, have, want)


def _move(target: Target, have, want) -> None:
    for kind, (start, end) in have.items():
        new = want[kind][0]
        if kind == model.VmaKind.VDSO:
            gadget_offset = target.call.gadget - start
        target.call(NR.mremap, start, end - start, end - start, MREMAP_MAYMOVE | MREMAP_FIXED, new)
        if kind == model.VmaKind.VDSO:
            target.call.gadget = new + gadget_offset


def _fmt(areas) -> str:
    return ", ".join(f"{k.value} {b - a:#x}" for k, (a, b) in sorted(areas.items(), key=lambda kv: kv[1]))


PROT_RW = model.Prot.PROT_READ | model.Prot.PROT_WRITE
MAP_FIXED_NOREPLACE = model.MapFlag.MAP_FIXED_NOREPLACE
MAP_TYPES = model.MapFlag.MAP_SHARED | model.MapFlag.MAP_PRIVATE | model.MapFlag.MAP_DROPPABLE
SHARED_KINDS = (model.VmaKind.FILE_SHARED, model.VmaKind.SHARED_ANON, model.VmaKind.SHARED_MEM)
INT_PROT_RW, INT_MAP_FIXED_NOREPLACE, INT_MAP_TYPES = int(PROT_RW), int(MAP_FIXED_NOREPLACE), int(MAP_TYPES)
INT_MAP_SHARED, INT_MAP_PRIVATE, INT_MAP_DROPPABLE, INT_MAP_ANONYMOUS = (int(f) for f in (
    model.MapFlag.MAP_SHARED, model.MapFlag.MAP_PRIVATE, model.MapFlag.MAP_DROPPABLE, model.MapFlag.MAP_ANONYMOUS))
FILL_THREADS = 2
FILL_BATCH = 16 << 20


def fill(pid: int, segments: typing.Iterable[tuple[int, int, int]], filled=None, pages=None) -> None:
    """process_vm_writev (local, remote, length) segments from FILL_THREADS
    threads at once, in batches of at most FILL_BATCH bytes; filled(nbytes)
    after each batch.

    Most of the cost is the target's page faults allocating memory, which
    proceed in parallel (the GIL is released in the syscall). After each
    batch the source pages are dropped from our mapping of pages.img, so
    procsnap's RSS stays near FILL_THREADS * FILL_BATCH however big the
    process is. An encoded image's `pages` (image/chunks.py) decodes what
    a batch needs first, on the thread that writes it, and drops it after.
    """
    def batches():
        """Built as the threads take them: a sparse image has a segment per
        page, too many to hold as a list."""
        batch, size = [], 0
        for loc, rem, length in segments:
            for o in range(0, length, FILL_BATCH):
                n = min(FILL_BATCH, length - o)
                if size + n > FILL_BATCH and batch:
                    yield batch
                    batch, size = [], 0
                batch.append((loc + o, rem + o, n))
                size += n
        if batch:
            yield batch

    source = batches()
    lock = threading.Lock()

    def write(batch) -> None:
        if pages is not None:
            pages.prepare(batch)
            memory.write_from(pid, batch)
            pages.release(batch)
            if filled:
                filled(sum(length for _, _, length in batch))
            return
        memory.write_from(pid, batch)
        lo = min(loc for loc, _, _ in batch)
        hi = max(loc + length for loc, _, length in batch)
        mapping.drop(lo, hi - lo)  # runs sit back to back in pages.img: one call covers the batch
        if filled:
            filled(sum(length for _, _, length in batch))

    def work() -> None:
        while True:
            with lock:
                batch = next(source, None)
            if batch is None:
                return
            write(batch)

    first, second = next(source, None), next(source, None)
    if second is None:  # one batch (most VMAs): no thread to hand it to
        if first is not None:
            write(first)
        return
    source = itertools.chain([first, second], source)
    for fut in [_fill_pool().submit(work) for _ in range(FILL_THREADS)]:
        fut.result()


@functools.cache
def _fill_pool() -> workers.ThreadPool:
    """One pool for every fill of the restore: a tree has thousands of VMAs."""
    return workers.ThreadPool(FILL_THREADS, thread_name_prefix="procsnap-fill")


def close_fill_pool() -> None:
    """Join the fill threads, at the end of a restore. The next restore in
    this process spawns by clone3, which is safe from a single-threaded
    process only: with these threads still there it would have to go
    through a forked helper (kernel/clone.py; seen before that: a child
    waiting forever for malloc's main_arena lock, which a fill thread held)."""
    if _fill_pool.cache_info().currsize:
        _fill_pool().shutdown(wait=True)
        _fill_pool.cache_clear()


def map_vmas_seized(target: Target, vmas: list[model.Vma], runs: list[model.PageRun], pages: PageSource,
                    map_fds: dict[str, int], filled=None, shm_fds: dict[int, int] | None = None,
                    refs: typing.Sequence[tuple[int, int, int, int]] = (),
                    sysv_ids: dict[int, int] | None = None,
                    kept: typing.Mapping[int, typing.Callable[[list], None]] | None = None,
                    ref_sources: dict | None = None) -> None:
    """Map each VMA, write its pages, set its final protection;
    filled(nbytes) is told of each batch of pages written.

    Shared anonymous memory is mapped from the object the restorer made for
    it (shm_fds: SharedMem.id -> fd in the target), so that every process of
    the tree maps the same one. `refs`: (vaddr, npages, local address,
    source) of pages stored by another image of the tree, mapped here.

    A VMA that gets pages is mapped writable first (process_vm_writev does
    not force its way through protections). The VMAs that need nothing of
    their own (below) are mapped, filled and protected a run of them at a
    time (_map_group), the others one by one, in address order.

    Neighbouring private anonymous VMAs of the same protection and flags
    were kept apart by the kernel only because each had its own anon_vma
    (typically after a fork: inherited areas next to new ones). The kernel
    merges a new area into a neighbour without one, so such a VMA is given
    an anon_vma of its own (its pages, or one page written and dropped)
    and, if it continues the previous one, built elsewhere and moved into
    place with mremap, which never merges two areas with different
    anon_vmas.

    `kept`: VMA start -> what makes a VMA the fork left in place hold its
    pages, given its segments (inherit.restore_kept_seized).
    """
    starts = sorted(vmas, key=lambda v: v.start)
    by_vma = PagesByVma(starts, runs, pages.base, refs)
    busy = [(v.start, v.end) for v in starts]
    group: list[tuple[model.Vma, int, int, int, VmaPages]] = []  # (vma, prot, flags, fd, pages) mapped together
    for i, v in enumerate(starts):
        if v.kind in model.SPECIAL_KINDS:
            continue
        vruns = by_vma.of(v)
        if kept and v.start in kept:
            _map_group(target, group, pages, filled, ref_sources)
            kept[v.start](vruns.segments())
            continue
        apart = i > 0 and _kept_apart(starts[i - 1], v)  # built elsewhere, moved in
        own_anon_vma = apart or (i + 1 < len(starts) and _kept_apart(v, starts[i + 1]))
        # plain ints from here: flag arithmetic on enum.IntFlag costs more than the rest of a VMA's mapping
        prot = int(v.prot) | INT_PROT_RW if vruns or own_anon_vma else int(v.prot)
        flags = (int(v.flags) & ~INT_MAP_TYPES) | INT_MAP_FIXED_NOREPLACE
        if v.kind in SHARED_KINDS:
            flags |= INT_MAP_SHARED
        else:
            flags |= int(v.flags) & INT_MAP_DROPPABLE or INT_MAP_PRIVATE
        fd = map_fds[vma_map_key(v)] \
            if v.kind in (model.VmaKind.FILE_PRIVATE, model.VmaKind.FILE_SHARED) else -1
        if v.kind == model.VmaKind.SHARED_MEM:
            fd = shm_fds[v.shm]
            flags &= ~INT_MAP_ANONYMOUS
        if not own_anon_vma and v.kind != model.VmaKind.SYSV_SHM:
            group.append((v, prot, flags, fd, vruns))
            continue
        _map_group(target, group, pages, filled, ref_sources)
        at = free_gap(busy + target.reserved(), v.size) if apart else v.start
        try:
            if v.kind == model.VmaKind.SYSV_SHM:  # shmat, so that it is an attachment of the segment
                target.call(NR.shmat, sysv_ids[v.shm], at, _shmat_flags(v.prot))
                prot = _shmat_prot(v.prot)
            else:
                target.call(NR.mmap, at, v.size, int(prot), int(flags), fd, v.offset)
        except OSError as err:
            raise _map_error(target, v, flags, err) from err
        for advice in _advice(v):
            target.call(NR.madvise, at, v.size, advice)
        if vruns:
            _fill(target, [vruns], at - v.start, pages, filled, ref_sources)
            faults.point("mid-memory-load")
        elif own_anon_vma:
            memory.write_bytes(target.pid, at, b"\0")  # the first fault makes its anon_vma
            target.call(NR.madvise, at, PAGE_SIZE, mapping.MADV_DONTNEED)
        if prot != v.prot:
            target.call(NR.mprotect, at, v.size, int(v.prot))
        if apart:
            target.call(NR.mremap, at, v.size, v.size, MREMAP_MAYMOVE | MREMAP_FIXED, v.start)
    _map_group(target, group, pages, filled, ref_sources)


INT_ADVICE = [(int(bit), advice) for bit, (_, advice) in model.ADVICE_TABLE.items()]


def _advice(v: model.Vma) -> list[int]:
    """The madvise advice values a VMA gets: plain ints (IntFlag's & per bit
    per VMA was a sixth of the restore of 10,000 VMAs)."""
    bits = int(v.advice)
    return [advice for bit, advice in INT_ADVICE if bits & bit] if bits else []


def _map_error(target: Target, v: model.Vma, flags: int, err: OSError) -> RestoreError:
    needs = " (MAP_DROPPABLE needs Linux 6.11)" if flags & model.MapFlag.MAP_DROPPABLE else ""
    return RestoreError(f"pid {target.pid}: mmap of VMA {v.start:#x}-{v.end:#x} ({v.name or v.kind.value}): "
                        f"{err.strerror}{needs}", target.pid)


def _fill(target: Target, parts: list[VmaPages], shift: int, pages: PageSource, filled, ref_sources) -> None:
    """Write the pages of `parts` at their vaddr + shift."""
    for source in sorted(set().union(*(p.sources() for p in parts))):  # a batch never spans two sources' mappings
        of = pages if source == OWN else (ref_sources or {}).get(source)
        fill(target.pid, (w for p in parts for w in p.writes(source, shift)), filled,
             of if getattr(of, "transformed", False) else None)


def _map_group(target: Target, group: list, pages: PageSource, filled, ref_sources) -> None:
    """Map, advise, fill and protect the VMAs of `group` (each at its own
    address, none needing an anon_vma of its own), then empty it: the
    calls in two batches (target.batch: one round trip for thousands of
    VMAs), the pages of all of them in one fill per page source."""
    if not group:
        return
    calls, owner = [], []
    for v, prot, flags, fd, _ in group:
        calls.append((NR.mmap, v.start, v.size, int(prot), flags, fd, v.offset))
        owner.append(v)
        for advice in _advice(v):
            calls.append((NR.madvise, v.start, v.size, advice))
            owner.append(v)
    try:
        target.batch(calls, lambda: faults.point("mid-batch"))
    except BatchFailed as err:
        v = owner[err.index]
        if calls[err.index][0] == NR.mmap:
            raise _map_error(target, v, calls[err.index][4], err) from err
        raise RestoreError(f"pid {target.pid}: madvise of VMA {v.start:#x}-{v.end:#x} ({v.name or v.kind.value}): "
                           f"{err.strerror}", target.pid) from err
    parts = [vruns for *_, vruns in group if vruns]
    if parts:
        _fill(target, parts, 0, pages, filled, ref_sources)
        faults.point("mid-memory-load")
    protect = [(NR.mprotect, v.start, v.size, int(v.prot)) for v, prot, *_ in group if prot != v.prot]
    group.clear()
    target.batch(protect)


def page_segments(runs: list[model.PageRun], pages: PageSource,
                  refs: typing.Sequence[tuple[int, int, int, int]] = ()) -> list[tuple[int, int, int, int]]:
    """(vaddr, npages, local address, source: -1 for our own pages.img) of every page a process gets."""
    return [(r.vaddr, r.npages, pages.address(r), -1) for r in runs] + list(refs)


def _shmat_flags(prot: model.Prot) -> int:
    return (0 if prot & model.Prot.PROT_WRITE else sysv.SHM_RDONLY) | (sysv.SHM_EXEC if prot & model.Prot.PROT_EXEC else 0)


def _shmat_prot(prot: model.Prot) -> model.Prot:
    """The protection shmat gives for the flags above."""
    return model.Prot.PROT_READ | (prot & (model.Prot.PROT_WRITE | model.Prot.PROT_EXEC))


def _kept_apart(a: model.Vma, b: model.Vma) -> bool:
    """Two private anonymous VMAs the kernel would merge if it could."""
    return (a.end == b.start and a.kind == b.kind == model.VmaKind.ANON and a.prot == b.prot
            and a.flags == b.flags and a.advice == b.advice and not a.flags & model.MapFlag.MAP_GROWSDOWN
            and not b.flags & model.MapFlag.MAP_GROWSDOWN)
