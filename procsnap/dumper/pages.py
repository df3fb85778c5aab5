"""Copying the frozen task's pages into a PageSink.

Runs are read in chunks into one small local buffer that stays in the CPU
cache, with as few process_vm_readv calls as possible (many iovecs per
call); areas the task cannot read itself (PROT_NONE, write-only) go
through /proc/PID/mem. Pages of anonymous memory that hold only zeros are
left out, like never-touched pages: restore maps fresh memory there, which
reads as zeros. (In private file mappings a zero page differs from the
file, so it is stored.)
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os

from .. import faults, model
from ..errors import DumpError
from ..image.writer import PageSink
from ..kernel import memory
from ..kernel.arch.x86_64 import PAGE_SIZE

CHUNK = 4 << 20
BUFFERS = 4
ZERO_PAGE = bytes(PAGE_SIZE)
ZERO_SKIPPED = (model.VmaKind.ANON, model.VmaKind.SHARED_ANON)
INT_PROT_READ = int(model.Prot.PROT_READ)


def nonzero_runs(buf: mmap.mmap, start: int, end: int) -> list[tuple[int, int]]:
    """(offset, length) of the runs of pages in buf[start:end] that are not
    all zeros. One C-speed find rules out chunks without a zero page; else
    each page is compared (a 4 KiB memcmp, about 12 GiB/s from Python)."""
    if buf.find(ZERO_PAGE, start, end) < 0:
        return [(start, end - start)]
    runs = []
    run = start
    for off in range(start, end, PAGE_SIZE):
        if buf[off : off + PAGE_SIZE] == ZERO_PAGE:
            if off > run:
                runs.append((run, off - run))
            run = off + PAGE_SIZE
    if end > run:
        runs.append((run, end - run))
    return runs


def _chunks(runs: list[tuple[model.Vma, int, int]]):
    """Batches of (vma, address, length, buffer offset) filling CHUNK bytes;
    an unreadable area comes alone, flagged False."""
    batch, used = [], 0
    for vma, addr, length in runs:
        readable = bool(int(vma.prot) & INT_PROT_READ)  # (plain ints: a run per VMA of 10,000)
        while length:
            take = min(length, CHUNK - used)
            if not readable:
                if batch:
                    yield True, batch
                    batch, used = [], 0
                take = min(length, CHUNK)
                yield False, [(vma, addr, take, 0)]
            else:
                batch.append((vma, addr, take, used))
                used += take
                if used == CHUNK:
                    yield True, batch
                    batch, used = [], 0
            addr, length = addr + take, length - take
    if batch:
        yield True, batch


def write_pages_seized(pid: int, runs: list[tuple[model.Vma, int, int]], sink: PageSink, progress=None,
                       cow_shared: bool = False) -> None:
    """Read chunks into a ring of BUFFERS cache-sized buffers; each chunk's
    non-zero pieces go to the sink, which writes them while the next chunk
    is read. A buffer is reused only once the sink is done with it.

    cow_shared: the pages are likely shared copy-on-write with another
    process (a snapshot, a forked tree): read through /proc/PID/mem, which
    does not unshare them (see memory.read_mem_into)."""
    total = sum(length for _, _, length in runs)
    done = 0
    ring = [_Buffer() for _ in range(BUFFERS)]
    mem_fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC) if cow_shared else -1
    try:
        for i, (readable, batch) in enumerate(_chunks(runs)):
            buf = ring[i % BUFFERS]
            buf.wait()
            try:
                if readable and cow_shared:
                    memory.read_mem_into(mem_fd, [(buf.view[off : off + length], addr)
                                                  for _, addr, length, off in batch])
                elif readable:
                    memory.read_into(pid, [(buf.address + off, addr, length) for _, addr, length, off in batch])
                else:
                    _, addr, length, _ = batch[0]
                    buf.map[:length] = memory.read_mem_file(pid, addr, length)
            except OSError as err:
                raise _read_failed(pid, batch, err) from err
            pieces = []
            for vma, addr, length, off in batch:
                spans = nonzero_runs(buf.map, off, off + length) if vma.kind in ZERO_SKIPPED else [(off, length)]
                pieces += [(addr + start - off, buf.view[start : start + size]) for start, size in spans]
                done += length
            if pieces:
                buf.ticket = sink.submit(pieces)
                faults.point("mid-page-write")
            if progress:
                progress(done, total)
        for buf in ring:
            buf.wait()
    finally:
        if mem_fd >= 0:
            os.close(mem_fd)
        for buf in ring:
            buf.close()


def _read_failed(pid: int, batch, err: OSError) -> DumpError:
    """A read of the task's memory failed: which address of which pid (the
    kernel layer names the address it stopped at), in which VMA."""
    at = getattr(err, "address", None)
    vma, addr, length, _ = next((b for b in batch if at is not None and b[1] <= at < b[1] + b[2]), batch[0])
    if at is None:
        at = addr
    return DumpError(f"pid {pid}: cannot read its memory at {at:#x} (VMA {vma.start:#x}-{vma.end:#x} "
                     f"{vma.name or vma.kind.value}): {os.strerror(err.errno) if err.errno else err}", pid)


class _Buffer:
    """A CHUNK-sized anonymous mapping with its address, and the sink's
    ticket for the data last submitted from it."""

    def __init__(self):
        self.map = mmap.mmap(-1, CHUNK)
        self._anchor = ctypes.c_char.from_buffer(self.map)
        self.address = ctypes.addressof(self._anchor)
        self.view = memoryview(self.map)
        self.ticket = None

    def wait(self) -> None:
        if self.ticket is not None:
            ticket, self.ticket = self.ticket, None
            ticket.result()

    def close(self) -> None:
        # On an error the sink or a traceback may still hold slices; then
        # the mapping is freed with the last of them instead.
        if self.ticket is not None:
            with contextlib.suppress(Exception):
                self.ticket.result()
        del self._anchor
        with contextlib.suppress(BufferError):
            self.view.release()
            self.map.close()
