"""Copying the frozen task's pages into a PageSink, and ghost files.

Runs are gathered into one local buffer and read with as few
process_vm_readv calls as possible (many iovecs per call); areas the task
cannot read itself (PROT_NONE, write-only) go through /proc/PID/mem.
"""

from __future__ import annotations

from .. import model
from ..image.writer import ImageWriter, PageSink
from ..kernel import mapping, memory

BUFFER_SIZE = 32 << 20


def write_pages_seized(pid: int, runs: list[tuple[model.Vma, int, int]], sink: PageSink, progress=None) -> None:
    total = sum(length for _, _, length in runs)
    done = 0
    buf = mapping.map_anonymous(BUFFER_SIZE)
    view = mapping.view(buf, BUFFER_SIZE)
    try:
        batch: list[tuple[int, int, int]] = []  # (buffer offset, address, length)
        used = 0

        def flush():
            nonlocal used, done
            if batch:
                memory.read_into(pid, [(buf + off, addr, length) for off, addr, length in batch])
                for off, addr, length in batch:
                    sink.write_pages(addr, view[off : off + length])
                    done += length
                if progress:
                    progress(done, total)
            batch.clear()
            used = 0

        for vma, addr, length in runs:
            if not vma.prot & model.Prot.PROT_READ:
                flush()
                while length:
                    take = min(length, BUFFER_SIZE)
                    view[:take] = memory.read_mem_file(pid, addr, take)
                    sink.write_pages(addr, view[:take])
                    done, addr, length = done + take, addr + take, length - take
                continue
            while length:
                if used == BUFFER_SIZE:
                    flush()
                take = min(length, BUFFER_SIZE - used)
                batch.append((used, addr, take))
                used, addr, length = used + take, addr + take, length - take
        flush()
    finally:
        del view
        mapping.unmap(buf, BUFFER_SIZE)


def write_ghosts_seized(pid: int, ghost_fds, writer: ImageWriter, ckpt: model.Checkpoint) -> None:
    """Copy the contents of files unlinked while open, through the task's fd."""
    for ghost, fd in ghost_fds:
        with open(f"/proc/{pid}/fd/{fd}", "rb") as f:
            data = f.read()
        ghost.size = len(data)
        ghost.offset, ghost.crc32 = writer.write_ghost(data)
    ckpt.ghosts = [g for g, _ in ghost_fds]
