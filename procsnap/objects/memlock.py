"""Locked memory and guard regions: what the kernel keeps of a VMA beside
its pages and protection, and the mm's default for new mappings.

    at dump                                  stored        restored, in this order
    -------                                  ------        -----------------------
    smaps "gu" (VM_MAYBE_GUARD), then the    Vma.guards    madvise(MADV_GUARD_INSTALL) on each run
      pagemap's bit 58 of each page of it                  (never on a locked VMA: EINVAL, so first)
    smaps "lo" (VM_LOCKED), "lf" (ONFAULT)   Vma.lock      mlock2(start, size, MLOCK_ONFAULT if "lf")
    mm->def_flags: mlockall(MCL_FUTURE       Task.mlockall mlockall(MCL_FUTURE [| MCL_ONFAULT]), last:
      [| MCL_ONFAULT])                                     it only changes mappings made after it

A guard page has no contents (the pagemap shows it as a swapped PTE marker;
reading it faults), so its pages are left out of pages.img
(proc.PM_TOP_GUARD). mm->def_flags is in no /proc file: the frozen task
maps one readable shared anonymous page (which never merges with a
neighbour) and unmaps it again. VM_LOCKED in def_flags shows as VmLck
growing by that page (the whole of a locked VMA is counted); without
VM_LOCKONFAULT, mmap also faulted it in (pagemap: present). Reading smaps
instead would walk every page table of the task while it is frozen.
mlockall(MCL_CURRENT) is no state of its own: it locked the VMAs there were,
which show "lo" each. Locking goes through the restorer's privileges
(CAP_IPC_LOCK), before the credentials are restored.
"""

from __future__ import annotations

import enum
import os

from .. import model
from ..errors import RestoreError
from ..kernel import proc
from ..kernel.arch.x86_64 import NR, PAGE_SIZE
from ..kernel.infect import Target

MADV_GUARD_INSTALL = 102  # include/uapi/asm-generic/mman-common.h (6.13)
MLOCK_ONFAULT = 0x01  # include/uapi/asm-generic/mman-common.h


class Mcl(enum.IntFlag):
    """mlockall flags (include/uapi/asm-generic/mman.h)."""

    MCL_CURRENT = 1
    MCL_FUTURE = 2
    MCL_ONFAULT = 4


PROBE_PROT_READ, PROBE_FLAGS = 0x1, 0x01 | 0x20  # MAP_SHARED | MAP_ANONYMOUS


def collect_vma(pid: int, m: proc.MapsEntry, vma: model.Vma) -> None:
    """The lock and the guard regions of one VMA (of the frozen `pid`)."""
    if "lo" in m.vmflags:
        vma.lock |= model.Lock.VM_LOCKED
    if "lf" in m.vmflags:
        vma.lock |= model.Lock.VM_LOCKONFAULT
    if "gu" in m.vmflags:
        fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        try:
            vma.guards = [[first, count] for first, count in proc.guard_pages(proc.read_pagemap(fd, m.start, m.end))]
        finally:
            os.close(fd)


def collect_seized(target: Target, tids: list[int], ckpt: model.Checkpoint) -> None:
    """mm->def_flags, from what mapping a probe page did (see above)."""
    before = _vmlck_kib(target.pid)
    addr = target.call(NR.mmap, 0, PAGE_SIZE, PROBE_PROT_READ, PROBE_FLAGS, -1, 0)
    try:
        if _vmlck_kib(target.pid) == before:
            return
        fd = os.open(f"/proc/{target.pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        try:
            populated = proc.read_pagemap(fd, addr, addr + PAGE_SIZE)[7] & proc.PM_TOP_PRESENT
        finally:
            os.close(fd)
    finally:
        target.call(NR.munmap, addr, PAGE_SIZE)
    ckpt.task.mlockall = Mcl.MCL_FUTURE | (0 if populated else Mcl.MCL_ONFAULT)


def _vmlck_kib(pid: int) -> int:
    return int(proc.read_status(pid)["VmLck"].split()[0])


def restore_seized(target: Target, ckpt: model.Checkpoint, tree_pids: set[int]) -> None:
    for v in ckpt.vmas:
        for first, count in v.guards:
            start = v.start + first * PAGE_SIZE
            _call(target, f"VMA {v.start:#x}-{v.end:#x}: madvise(MADV_GUARD_INSTALL) of its guard pages "
                  f"{start:#x}-{start + count * PAGE_SIZE:#x}", NR.madvise, start, count * PAGE_SIZE,
                  MADV_GUARD_INSTALL)
    for v in ckpt.vmas:
        if v.lock and v.lock & model.Lock.VM_LOCKED:  # (IntFlag's & only for the few locked: 10,000 VMAs)
            onfault = MLOCK_ONFAULT if v.lock & model.Lock.VM_LOCKONFAULT else 0
            _call(target, f"VMA {v.start:#x}-{v.end:#x} ({v.name or v.kind.value}): mlock2", NR.mlock2,
                  v.start, v.size, onfault)
    if ckpt.task.mlockall:
        names = "|".join(m.name for m in Mcl if m & ckpt.task.mlockall)
        _call(target, f"mlockall({names})", NR.mlockall, ckpt.task.mlockall)


def _call(target: Target, what: str, nr: int, *args: int) -> None:
    try:
        target.call(nr, *args)
    except OSError as err:
        raise RestoreError(f"pid {target.pid}: {what}: {err.strerror}", target.pid) from err


def check_image(ckpt: model.Checkpoint, image) -> list[str]:
    """Guard runs must lie inside their VMA."""
    return [f"VMA {v.start:#x}-{v.end:#x}: guard run {run} is not inside it" for v in ckpt.vmas for run in v.guards
            if len(run) != 2 or run[0] < 0 or run[1] <= 0 or v.start + (run[0] + run[1]) * PAGE_SIZE > v.end]
