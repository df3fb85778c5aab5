"""Running syscalls inside a stopped task, with a scratch area for their
arguments, and putting everything back afterwards.

    with infected(pid, maps) as target:
        target.call(NR.brk, 0)
        target.call(NR.sigaltstack, 0, target.scratch)
        data = target.read_scratch(24)

On exit, on every path: the scratch area is unmapped, the signal mask and
the registers are the task's own again. The task stays stopped.
"""

from __future__ import annotations

import contextlib
from .. import records as dataclasses  # the dataclasses API, cheap to import

from . import memory, ptrace
from .arch import x86_64 as arch
from .arch.x86_64 import NR, PAGE_SIZE
from .proc import MapsEntry

PROT_RW = 0x3
MAP_PRIVATE_ANON_NOREPLACE = 0x02 | 0x20 | 0x100000
SCRATCH_SIZE = 4 * PAGE_SIZE


def find_gadget(pid: int, maps: list[MapsEntry]) -> int:
    """Address of a `syscall` instruction in the task: its vdso, else any
    executable mapping. Jumping into the middle of other code is fine: the
    CPU decodes from where rip points."""
    candidates = [m for m in maps if m.path == "[vdso]"]
    candidates += [m for m in maps if m.perms[2] == "x" and m.path not in ("[vdso]", "[vsyscall]")]
    for m in candidates:
        try:
            data = memory.read_mem_file(pid, m.start, m.end - m.start)
        except OSError:
            continue
        i = data.find(arch.SYSCALL_INSN)
        if i >= 0:
            return m.start + i
    raise OSError(0, f"pid {pid}: no syscall instruction found in any executable mapping")


def free_gap(busy: list[tuple[int, int]], size: int, margin: int = 16 * PAGE_SIZE) -> int:
    """An address for `size` bytes in the middle of the largest hole between
    the `busy` ranges, at least `margin` away from each neighbour."""
    edges = sorted(r for r in busy if r[0] < arch.TASK_SIZE) + [(arch.TASK_SIZE, arch.TASK_SIZE)]
    best = (0, 0)
    prev_end = 1 << 32  # stay clear of the low addresses non-PIE programs use
    for start, end in edges:
        if start > prev_end and start - prev_end > best[1] - best[0]:
            best = (prev_end, start)
        prev_end = max(prev_end, end)
    lo, hi = best
    if hi - lo < size + 2 * margin:
        raise OSError(12, f"no free gap of {size} bytes in the address space")
    return (lo + (hi - lo) // 2) & ~(PAGE_SIZE - 1)


@dataclasses.dataclass
class Target:
    pid: int
    call: ptrace.Injector
    scratch: int

    def write_scratch(self, data: bytes, offset: int = 0) -> int:
        memory.write_bytes(self.pid, self.scratch + offset, data)
        return self.scratch + offset

    def read_scratch(self, length: int, offset: int = 0) -> bytes:
        return memory.read_bytes(self.pid, self.scratch + offset, length)


@contextlib.contextmanager
def infected(pid: int, maps: list[MapsEntry], busy: list[tuple[int, int]] | None = None,
             scratch_area: bool = True, put_back: bool = True, gadget: int = 0):
    """Prepare a stopped task for injected syscalls; undo it all on exit.

    put_back=False (a task being rebuilt, which has nothing to go back to)
    skips resetting registers and mask after every call. `gadget`: a
    `syscall` already found (another thread of the same process), else
    looked for in `maps`.
    """
    regs = ptrace.get_regs(pid)
    mask = ptrace.get_sigmask(pid)
    gadget = gadget or find_gadget(pid, maps)
    call = ptrace.Injector(pid, gadget, regs, mask, put_back)
    ranges = busy if busy is not None else [(m.start, m.end) for m in maps]
    scratch = 0
    try:
        if scratch_area:
            want = free_gap(ranges, SCRATCH_SIZE)
            scratch = call(NR.mmap, want, SCRATCH_SIZE, PROT_RW, MAP_PRIVATE_ANON_NOREPLACE, -1, 0)
        yield Target(pid, call, scratch)
    finally:
        try:
            if scratch:
                call(NR.munmap, scratch, SCRATCH_SIZE)
        finally:
            call.restore()
