"""The stored memory of the processes of an opened tree, for tools that
look at it (views, diff, core files) rather than restore it.

A process's pages are in its own pages.img (PageRun) or, for pages it
shared copy-on-write with another process of the tree when dumped, in that
process's pages.img (PREF records). `TreePages` resolves both to one list
of StoredRun per process and hands out the bytes of a run from a read-only
mmap of the right file; the tree has been validated by open_tree, so every
run is inside its file and its checksum has been checked.

    process memory           StoredRun                    file
    [vaddr, +npages pages) -> (vaddr, npages, source,  -> source.pages_path
                               offset)                    at offset
"""

from __future__ import annotations

import ctypes
from .. import records as dataclasses  # the dataclasses API, cheap to import
import mmap
import os

from .. import model
from ..kernel.arch.x86_64 import PAGE_SIZE
from . import objstore
from .reader import Image, open_pages
from . import schema


@dataclasses.dataclass(frozen=True)
class StoredRun:
    vaddr: int
    npages: int
    source: Image  # whose pages.img holds the bytes
    offset: int
    shared: bool  # stored by another process of the tree (a PREF run)

    @property
    def end(self) -> int:
        return self.vaddr + self.npages * PAGE_SIZE


class TreePages:
    """Page data of every image of a tree [(Proc, Image | None)] (open_tree's)."""

    def __init__(self, tree: list[tuple[model.Proc, Image | None]]):
        self.by_dir = {p.dir: img for p, img in tree if img is not None}
        self.by_dir.update(tree[0][1].parents)  # a series' parent images, by their "parent:REL" source
        self._maps: dict[str, mmap.mmap] = {}
        self._chunked: dict[str, object] = {}  # pages_path -> ChunkedPageSource of an encoded image

    def __enter__(self) -> TreePages:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def runs(self, image: Image) -> list[StoredRun]:
        """Every stored run of the process, its own and those by reference, by address."""
        out = [StoredRun(r.vaddr, r.npages, image, r.offset, False) for r in image.checkpoint.pages]
        for refs in image.checkpoint.page_refs:
            for vaddr, npages, src, offset in schema.unpack_page_refs(refs):
                out.append(StoredRun(vaddr, npages, self.by_dir[refs.sources[src]], offset, True))
        out.sort(key=lambda r: r.vaddr)
        return out

    def data(self, run: StoredRun) -> memoryview:
        """The run's bytes (a view of the mapped file; valid until close)."""
        path = run.source.pages_path
        length = run.npages * PAGE_SIZE
        if run.source.codec is not None:  # compressed or encrypted chunks (chunks.py), local or remote
            chunks = self._chunked.get(path)
            if chunks is None:
                chunks = self._chunked[path] = open_pages(run.source)
            segment = (chunks.base + run.offset, 0, length)
            chunks.prepare([segment])  # decoded once, kept until close (drop: no-op for these)
            return memoryview((ctypes.c_char * length).from_address(segment[0])).cast("B")
        if run.source.remote:  # plain pages.img in object storage: the run's range
            return memoryview(objstore.read_range(path, run.offset, length))
        m = self._maps.get(path)
        if m is None:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                m = self._maps[path] = mmap.mmap(fd, run.source.pages_size, access=mmap.ACCESS_READ)
            finally:
                os.close(fd)
        return memoryview(m)[run.offset : run.offset + run.npages * PAGE_SIZE]

    def drop(self, run: StoredRun, start: int = 0, length: int | None = None) -> None:
        """Done with the run's bytes [start, start + length): let the kernel drop them from our RSS."""
        m = self._maps.get(run.source.pages_path)
        size = run.npages * PAGE_SIZE - start if length is None else min(length, run.npages * PAGE_SIZE - start)
        if m is not None and size > 0:
            m.madvise(mmap.MADV_DONTNEED, run.offset + start, size)

    def close(self) -> None:
        for m in self._maps.values():
            try:
                m.close()
            except BufferError:  # a view still held by a caller: freed with it
                pass
        self._maps.clear()
        for chunks in self._chunked.values():
            chunks.close()
        self._chunked.clear()
