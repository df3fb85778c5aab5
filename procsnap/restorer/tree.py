"""The tree an image holds: the root's image names every process (PROC
records); each live non-root process has its own image in a subdirectory.

open_tree reads and validates all of them, and that the tree is one a
restore can build (parents before children, one root, no process twice);
plan() turns it into spawn.Node objects.
"""

from __future__ import annotations

import functools
import os

from .. import model, objects
from ..errors import ImageCorrupt
from ..image import schema
from ..image.reader import Image, open_image
from ..image.series import open_parents
from ..kernel.arch.x86_64 import PAGE_SIZE

IMAGE_DIR = "proc.{pid}"  # as the dumper names them


def open_tree(root: Image, progress=None, home: str | None = None, verify_pages: bool = True,
              verify_parents: bool | None = None) -> list[tuple[model.Proc, Image | None]]:
    """(Proc, its image or None for a zombie) of every process, root first,
    each parent before its children. progress(phase, done, total) hears of
    each image's page check. home: where the image will be once swapped in
    (a staged one checked before that: its parents are relative to home).
    verify_pages=False: the other processes' and the parents' page data are
    not read again (checked whole moments ago by a migration's receiver);
    verify_parents: the parents' alone (default: as verify_pages)."""
    ckpt = root.checkpoint
    procs = ckpt.procs or [model.Proc(ckpt.task.pid, 0, 0, 0)]
    where = os.path.join(root.directory, "procsnap.img")
    problems = []
    if procs[0].pid != ckpt.task.pid or procs[0].ppid != 0 or procs[0].dir or procs[0].zombie:
        problems.append(f"the first process record is not the root {ckpt.task.pid}")
    seen: dict[int, model.Proc] = {}
    for p in procs:
        if p.pid in seen:
            problems.append(f"process {p.pid} recorded twice")
        if not 0 < p.pid < (1 << 22):
            problems.append(f"process {p.pid}: pid out of range")
        if p is not procs[0]:
            parent = seen.get(p.ppid)
            if parent is None:
                problems.append(f"process {p.pid}: parent {p.ppid} is not recorded before it")
            elif parent.zombie:
                problems.append(f"process {p.pid}: its parent {p.ppid} is a zombie")
            want = "" if p.zombie else IMAGE_DIR.format(pid=p.pid)
            if p.dir != want:
                problems.append(f"process {p.pid}: image directory {p.dir!r}, expected {want!r}")
        seen[p.pid] = p
    if problems:
        raise ImageCorrupt(f"{where}: " + "; ".join(problems))
    out: list[tuple[model.Proc, Image | None]] = [(procs[0], root)]
    for p in procs[1:]:
        image = None
        if not p.zombie:
            check = progress and functools.partial(progress, f"check pages of pid {p.pid}")
            image = open_image(os.path.join(root.directory, p.dir), verify_pages, progress=check, key=root.key)
            if image.checkpoint.task.pid != p.pid:
                raise ImageCorrupt(f"{image.directory}: holds pid {image.checkpoint.task.pid}, expected {p.pid}")
            _check_refs(image, root.checkpoint)
        out.append((p, image))
    _check_refs(root, root.checkpoint)
    by_dir = {p.dir: img for p, img in out if img is not None}  # the root's dir is "" (checked above)
    root.parents = open_parents([img for _, img in out if img is not None], root.key, home,
                                verify_pages if verify_parents is None else verify_parents)
    by_dir.update(root.parents)
    for p, img in out:
        if img is not None:
            _check_page_refs(img, by_dir)
    return out


def _check_page_refs(image: Image, by_dir: dict[str, Image]) -> None:
    """Pages stored by another image of the tree are inside its pages.img
    (whose data its own validation has checked)."""
    problems = []
    for refs in image.checkpoint.page_refs:
        for vaddr, npages, src, offset in schema.unpack_page_refs(refs):
            source = by_dir.get(refs.sources[src])
            if source is None:
                problems.append(f"page ref {vaddr:#x}: source image {refs.sources[src]!r} is not in the tree")
            elif offset + npages * PAGE_SIZE > source.pages_size:
                problems.append(f"page ref {vaddr:#x}+{npages}: beyond {source.pages_path}")
    if problems:
        raise ImageCorrupt(f"{image.directory}: " + "; ".join(problems))


def _check_refs(image: Image, root: model.Checkpoint) -> None:
    """What an image refers to in the root's (pipes, sockets, shared
    memory: each kind checks its own), and the fds' parameters."""
    ckpt = image.checkpoint
    problems = objects.check_tree(ckpt, root)
    problems += [f"fd {e.fd}: {e.kind.value} parameter {k} = {v}" for e in ckpt.fds
                 for k, v in e.params.items() if not 0 <= v < 1 << 63]
    problems += [f"fd {e.fd}: epoll watch {w}" for e in ckpt.fds for w in e.watches
                 if len(w) not in (3, 4) or not (0 <= w[0] < 1 << 20 and 0 <= w[1] < 1 << 32 and 0 <= w[2] < 1 << 64)
                 or (len(w) == 4 and w[3] not in {f.fd for f in ckpt.fds})]  # 1.3: the fd holding a closed one's file
    if problems:
        raise ImageCorrupt(f"{image.directory}: " + "; ".join(problems))
