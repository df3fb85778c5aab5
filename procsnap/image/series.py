"""A series of images: dump --prev-images-dir PARENT stores only the pages
of the root process that are not already in PARENT (by content: XXH3-128
of each page), and refers to the others where they are stored.

    PARENT/pages.img  <--- PREF source "parent:../1"   (PARENT's own pages)
    GRANDPARENT/...   <--- PREF source "parent:../0"   (pages PARENT itself referred to)

The references go straight to the image that stores the bytes (never
through PARENT's own references), so a restore opens and validates each
image the chain needs and maps pages from each, as it does for the pages a
tree's processes share (restorer: sources). A source is named by its path
relative to the image's directory; an image that is referred to must stay
(`procsnap gc` removes only those no kept image refers to). The other
processes of a tree are stored whole.
"""

from __future__ import annotations

import contextlib
import ctypes
import os

import xxhash

from .. import model, workers
from ..errors import ImageCorrupt, ImageError
from . import objseries, objstore, schema, staging

PARENT = "parent:"
PAGE_SIZE = 4096


def is_parent_source(name: str) -> bool:
    return name.startswith(PARENT)


def source_dir(image_dir: str, name: str) -> str:
    """The directory (or s3:// generation) a "parent:REL" source of the image in `image_dir` names."""
    if objstore.is_url(image_dir):
        return objseries.join(image_dir, name[len(PARENT):])
    return os.path.normpath(os.path.join(image_dir, name[len(PARENT):]))


def _absolute(where: str) -> str:
    return where if objstore.is_url(where) else os.path.abspath(where)


def _relative(where: str, image_dir: str) -> str:
    return objseries.relative(where, image_dir) if objstore.is_url(image_dir) else os.path.relpath(where, image_dir)


def bad_source(name: str) -> bool:
    rel = name[len(PARENT):]
    return not rel or "\0" in rel or os.path.isabs(rel)


def _page_hashes(view, offset: int, npages: int) -> list[int]:
    return [xxhash.xxh3_128_intdigest(view[offset + i * PAGE_SIZE : offset + (i + 1) * PAGE_SIZE])
            for i in range(npages)]


def _stored(image) -> list[tuple[str, int, int]]:
    """(image dir, offset, npages) of every page an image's root process has
    stored somewhere: its own runs and its parent references."""
    out = [(image.directory, r.offset, r.npages) for r in image.checkpoint.pages]
    for refs in image.checkpoint.page_refs:
        for _, npages, src, offset in schema.unpack_page_refs(refs):
            name = refs.sources[src]
            if is_parent_source(name):
                out.append((source_dir(image.directory, name), offset, npages))
    return out


def stored_at(image) -> list[tuple[int, int, str, int]]:
    """(vaddr, npages, absolute image dir, offset) of every page the image's
    root process has, by address (what dumper/predump.py refers to by
    address where dirty tracking says a page is unchanged); sorted."""
    out = [(r.vaddr, r.npages, os.path.abspath(image.directory), r.offset) for r in image.checkpoint.pages]
    for refs in image.checkpoint.page_refs:
        for vaddr, npages, src, offset in schema.unpack_page_refs(refs):
            name = refs.sources[src]
            if is_parent_source(name):
                out.append((vaddr, npages, os.path.abspath(source_dir(image.directory, name)), offset))
    return sorted(out)


def page_index(parent_dir: str, key: bytes | None = None) -> dict[int, tuple[str, int]]:
    """XXH3-128 of each page the parent's root process has -> (the absolute
    directory of the image that stores it, its offset in that pages.img)."""
    from .reader import open_image, open_pages

    parent = open_image(parent_dir, key=key)
    index: dict[int, tuple[str, int]] = {}
    by_dir: dict[str, list[tuple[int, int]]] = {}
    for where, offset, npages in _stored(parent):
        by_dir.setdefault(_absolute(where), []).append((offset, npages))
    for where, spans in by_dir.items():
        image = parent if _absolute(parent.directory) == where else open_image(where, key=key)
        if not image.pages_size:
            continue
        pages = open_pages(image)  # plain: pages.img mapped; encoded: chunks decoded as asked (chunks.py)
        try:
            view = memoryview((ctypes.c_char * image.pages_size).from_address(pages.base)).cast("B")
            try:
                for offset, npages in spans:
                    if pages.transformed:
                        pages.prepare([(pages.base + offset, 0, npages * PAGE_SIZE)])
                    for i, h in enumerate(_page_hashes(view, offset, npages)):
                        index.setdefault(h, (where, offset + i * PAGE_SIZE))
                    if pages.transformed:
                        pages.release([(pages.base + offset, 0, npages * PAGE_SIZE)])
            finally:
                view.release()
        finally:
            pages.close()
    return index


class DedupSink:
    """A PageSink in front of another: pages found in the parent's index
    become references (`refs`), the rest go on to `inner`."""

    def __init__(self, inner, index: dict[int, tuple[str, int]], image_dir: str):
        self.inner, self.index, self.image_dir = inner, index, _absolute(image_dir)
        self.refs: list[list] = []  # [vaddr, npages, source name, offset]
        self.referred = 0
        # pages other processes of the tree share copy-on-write with this one: stored here
        # whatever the parent has, as those processes' images refer to them here (tree.CowIndex)
        self.keep: set[int] = set()
        self.names: dict[str, str] = {}  # image dir -> source name (refer_run)

    def __getattr__(self, name):  # runs, offset, close, abort: the inner sink's
        return getattr(self.inner, name)

    def submit(self, pieces):
        fresh = []
        for vaddr, data in pieces:
            view = memoryview(data).cast("B")
            start = None  # first page of the current fresh stretch
            for i, h in enumerate(_page_hashes(view, 0, len(view) // PAGE_SIZE)):
                found = self.index.get(h)
                if found is None or vaddr + i * PAGE_SIZE in self.keep:
                    start = i if start is None else start
                    continue
                if start is not None:
                    fresh.append((vaddr + start * PAGE_SIZE, view[start * PAGE_SIZE : i * PAGE_SIZE]))
                    start = None
                self._refer(vaddr + i * PAGE_SIZE, found)
            if start is not None:
                fresh.append((vaddr + start * PAGE_SIZE, view[start * PAGE_SIZE :]))
            self.refs.append(None)  # a piece is within one VMA: runs never join across pieces
        if fresh:
            return self.inner.submit(fresh)
        return workers.Job.completed()

    def _refer(self, vaddr: int, found: tuple[str, int]) -> None:
        name = PARENT + _relative(found[0], self.image_dir)
        last = self.refs[-1] if self.refs else None
        self.referred += 1
        if last and last[0] + last[1] * PAGE_SIZE == vaddr and last[2] == name and \
                last[3] + last[1] * PAGE_SIZE == found[1]:
            last[1] += 1
        else:
            self.refs.append([vaddr, 1, name, found[1]])

    def parents(self) -> set[str]:
        """The images (directories or s3:// generations) the references go to."""
        return {source_dir(self.image_dir, r[2]) for r in self.refs if r is not None}

    def refer_run(self, vaddr: int, npages: int, where: str, offset: int) -> None:
        """`npages` pages at `vaddr`, known unchanged, referred to where the
        image in directory `where` stores them (dumper/predump.py)."""
        name = self.names.get(where)
        if name is None:
            name = self.names[where] = PARENT + _relative(where, self.image_dir)
        self.refs.append([vaddr, npages, name, offset])
        self.referred += npages

    def merged_refs(self, refs: model.PageRefs | None) -> model.PageRefs | None:
        """The tree's own PageRefs (or None) with the parent references added."""
        sources = list(refs.sources) if refs else []
        packed = [refs.runs] if refs else []
        for r in self.refs:
            if r is None:
                continue
            if r[2] not in sources:
                sources.append(r[2])
            packed.append(schema.PAGE_REF.pack(r[0], r[1], sources.index(r[2]), r[3]))
        if not sources:
            return None
        return model.PageRefs(sources, b"".join(packed))


def open_parents(images: list, key: bytes | None = None, home: str | None = None,
                 verify_pages: bool = True) -> dict[str, object]:
    """Every parent image the images refer to, opened and validated, by source name
    (relative to the image dir; home: the root's, if its image is not there yet).
    A parent that is gone or damaged is an ImageCorrupt naming it."""
    from .reader import open_image

    out = {}
    for image in images:
        base = image.directory if home is None else os.path.join(home, os.path.relpath(image.directory,
                                                                                       images[0].directory))
        for refs in image.checkpoint.page_refs:
            for name in refs.sources:
                if is_parent_source(name) and name not in out:
                    where = source_dir(base, name)
                    try:
                        out[name] = open_image(where, verify_pages, key=key)
                    except ImageError as err:
                        raise ImageCorrupt(f"{image.directory}: its parent image {where} (dumped with "
                                           f"--prev-images-dir) cannot be used: {err}") from err
    return out


def gc(directory: str, keep: list[str] | None = None, key: bytes | None = None) -> list[str]:
    """Remove the images in `directory` (its subdirectories that hold one)
    that no kept image refers to, directly or through others; kept: the
    names in `keep`, or else the newest image. Returns what was removed.
    directory: or s3://BUCKET/PREFIX (objseries.gc)."""
    import shutil

    from .reader import open_image

    if objstore.is_url(directory):
        return objseries.gc(directory, keep)

    try:
        names = sorted(n for n in os.listdir(directory) if os.path.isfile(os.path.join(directory, n, schema.INVENTORY)))
    except OSError as err:
        raise ImageError(f"{directory}: {err.strerror}") from err
    if not names:
        raise ImageError(f"{directory}: holds no images")
    for name in keep or []:
        if name not in names:
            raise ImageError(f"{directory}: no image {name!r} to keep (images: {', '.join(names)})")
    kept = keep or [max(names, key=lambda n: os.stat(os.path.join(directory, n, schema.INVENTORY)).st_mtime)]
    referred: set[str] = set()
    todo = [os.path.abspath(os.path.join(directory, n)) for n in kept]
    while todo:
        where = todo.pop()
        if where in referred:
            continue
        referred.add(where)
        image = open_image(where, verify_pages=False, key=key)
        todo += [source_dir(where, s) for refs in image.checkpoint.page_refs for s in refs.sources
                 if is_parent_source(s)]
    removed = [os.path.join(directory, n) for n in names if os.path.abspath(os.path.join(directory, n)) not in referred]
    with contextlib.ExitStack() as stack:
        for path in removed:  # a dump under way into one of them: nothing is removed
            stack.enter_context(staging.locked(path))
        for path in removed:
            os.unlink(os.path.join(path, schema.INVENTORY))  # first: never half an image that looks whole
            shutil.rmtree(path)
    return removed
