"""Running syscalls inside a stopped task, with a scratch area for their
arguments, and putting everything back afterwards.

    with infected(pid, maps) as target:
        target.call(NR.brk, 0)
        target.call(NR.sigaltstack, 0, target.scratch)
        data = target.read_scratch(24)

On exit, on every path: the scratch area is unmapped, the signal mask and
the registers are the task's own again. The task stays stopped.

    target.batch([(NR.mmap, a, n, prot, flags, -1, 0), (NR.mprotect, b, m, prot)])

runs many calls, stopping at the first that fails (BatchFailed says which).
In a task being rebuilt (put_back=False, seized with PTRACE_O_EXITKILL) the
task runs them itself, a table of them per ptrace round trip, with the stub
of arch.BATCH_STUB in a batch area of its own (made at the first batch,
unmapped with the scratch area); elsewhere they are injected one by one, so
that whatever the moment procsnap dies, the task is released as it was.
"""

from __future__ import annotations

import contextlib
from .. import records as dataclasses  # the dataclasses API, cheap to import

import os

from . import memory, ptrace
from .arch import x86_64 as arch
from .arch.x86_64 import NR, PAGE_SIZE
from .proc import MapsEntry

PROT_RW = 0x3
MAP_PRIVATE_ANON_NOREPLACE = 0x02 | 0x20 | 0x100000
SCRATCH_SIZE = 4 * PAGE_SIZE
PROT_RX = 0x5
# The batch area: the stub's page (made r-x once written), then the table.
BATCH_AREA_SIZE = 64 * PAGE_SIZE
BATCH_CAPACITY = (BATCH_AREA_SIZE - PAGE_SIZE) // arch.BATCH_RECORD.size  # 4032 calls per round trip
# Pending signals a batch's ending SIGSTOP would disturb (the kernel merges
# a second SIGSTOP into one pending, and a stop signal flushes pending
# SIGCONTs): SIGCONT, SIGSTOP, SIGTSTP, SIGTTIN, SIGTTOU, as SigPnd bits.
STOP_SIGNALS_PENDING = sum(1 << (sig - 1) for sig in (18, 19, 20, 21, 22))


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


class BatchFailed(OSError):
    """Call `index` of a batch failed (errno and message as for one injected
    call); `results`: those of the calls before it, which all ran."""

    def __init__(self, errno_: int, message: str, index: int, results: list[int]):
        super().__init__(errno_, message)
        self.index = index
        self.results = results


def call_name(nr: int, *args) -> str:
    """A call as in an error message: name(arguments)."""
    return _call_name(nr, args)


def _call_name(nr: int, args) -> str:
    name = arch.NR(nr).name if nr in arch.NR.__members__.values() else str(nr)
    return f"{name}{tuple(args)}"


@dataclasses.dataclass
class Target:
    pid: int
    call: ptrace.Injector
    scratch: int
    # Where a batch area may not go (every range mapped now or later), None
    # if unknown: then batches are injected one call at a time.
    busy: list[tuple[int, int]] | None = None
    batch_area: int = 0  # 0: not made yet; -1: cannot be (calls one at a time)

    def write_scratch(self, data: bytes, offset: int = 0) -> int:
        memory.write_bytes(self.pid, self.scratch + offset, data)
        return self.scratch + offset

    def read_scratch(self, length: int, offset: int = 0) -> bytes:
        return memory.read_bytes(self.pid, self.scratch + offset, length)

    def reserved(self) -> list[tuple[int, int]]:
        """The address ranges procsnap's own areas take in the task."""
        out = [(self.scratch, self.scratch + SCRATCH_SIZE)] if self.scratch else []
        if self.batch_area > 0:
            out.append((self.batch_area, self.batch_area + BATCH_AREA_SIZE))
        return out

    def batch(self, calls, while_running=None) -> list[int]:
        """Run each (nr, *args) of `calls` in order and return their results;
        at the first that fails, raise BatchFailed (the ones after it do not
        run). while_running(): called while the task runs a table, or
        after the first of the calls made one by one (tests kill procsnap
        there)."""
        calls = list(calls)
        results: list[int] = []
        if calls and self._in_target():  # even one: a table stops the task once, a call twice
            for lo in range(0, len(calls), BATCH_CAPACITY):
                results += self._run_table(calls[lo:lo + BATCH_CAPACITY], results, while_running)
            return results
        for i, (nr, *args) in enumerate(calls):
            try:
                results.append(self.call(nr, *args))
            except OSError as err:
                raise BatchFailed(err.errno, err.strerror, i, results) from err
            if i == 0 and while_running is not None:
                while_running()
        return results

    def claim_batch_area(self) -> None:
        """Make the batch area now, if batches will run in the task, so that
        what is computed next keeps clear of it (reserved())."""
        self._in_target()

    def drop_batch_area(self) -> None:
        if self.batch_area > 0:
            self.call(NR.munmap, self.batch_area, BATCH_AREA_SIZE)
        self.batch_area = 0

    def _in_target(self) -> bool:
        if self.call.put_back or self.busy is None or self.batch_area < 0:
            return False
        with open(f"/proc/{self.pid}/task/{self.call.pid}/status", "rb") as f:
            status = f.read()
        for key in (b"\nSigPnd:", b"\nShdPnd:"):
            at = status.index(key) + len(key)
            if int(status[at:status.index(b"\n", at)], 16) & STOP_SIGNALS_PENDING:
                return False
        if self.batch_area == 0:
            self.batch_area = self._make_batch_area()
        return self.batch_area > 0

    def _make_batch_area(self) -> int:
        """The stub's page and the table, or -1 where the task refuses an
        executable page made from a written one (PR_SET_MDWE)."""
        want = free_gap(self.busy + self.reserved(), BATCH_AREA_SIZE)
        area = self.call(NR.mmap, want, BATCH_AREA_SIZE, PROT_RW, MAP_PRIVATE_ANON_NOREPLACE, -1, 0)
        memory.write_bytes(self.pid, area, arch.BATCH_STUB)
        try:
            self.call(NR.mprotect, area, PAGE_SIZE, PROT_RX)
        except OSError:
            self.call(NR.munmap, area, BATCH_AREA_SIZE)
            return -1
        return area

    def _run_table(self, calls: list, before: list[int], while_running) -> list[int]:
        table = self.batch_area + PAGE_SIZE
        rec = arch.BATCH_RECORD
        mask, zeros = (1 << 64) - 1, (0,) * 7  # arguments as u64; unused ones and the result 0
        data = b"".join([rec.pack(*[a & mask for a in (*call, *zeros)[:8]]) for call in calls])
        memory.write_bytes(self.pid, table, data)
        regs = arch.prepare_batch(self.call.base, self.batch_area, table, len(calls), self.pid, self.call.pid)
        done = arch.batch_done(self.call.run_code(regs, while_running), table)
        ran = min(done + 1, len(calls))
        raw = memory.read_bytes(self.pid, table, ran * rec.size)
        results = [arch.signed(r[-1]) for r in rec.iter_unpack(raw)]
        if done < len(calls):
            ret = results[done]
            nr, *args = calls[done]
            raise BatchFailed(-ret, f"injected {_call_name(nr, args)}: {os.strerror(-ret)}",
                              len(before) + done, before + results[:done])
        return results



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
    target = Target(pid, call, 0, ranges if scratch_area else None)
    try:
        if scratch_area:
            want = free_gap(ranges, SCRATCH_SIZE)
            target.scratch = call(NR.mmap, want, SCRATCH_SIZE, PROT_RW, MAP_PRIVATE_ANON_NOREPLACE, -1, 0)
        yield target
    finally:
        try:
            target.drop_batch_area()
            if target.scratch:
                call(NR.munmap, target.scratch, SCRATCH_SIZE)
        finally:
            call.restore()
