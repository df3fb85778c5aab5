"""Ghost files: regular files unlinked while open. Their contents go into
the process's ghosts.img; restore creates the file again at its old path
(or beside it, if that is taken), opens it and unlinks it again."""

from __future__ import annotations

import dataclasses
import os
import stat

from .. import model
from ..errors import RestoreError
from . import protocol
from .protocol import OpenFd, Restoring

DELETED = " (deleted)"


@dataclasses.dataclass
class Ghost:
    """Contents of a file unlinked while open, at `offset` in ghosts.img."""

    id: int
    path: str
    mode: int
    size: int
    offset: int
    xxh3: int  # XXH3-64 of the contents


class Collect(protocol.Collect):
    def __init__(self):
        # pid -> (Ghost without its data yet, an fd to read it through), and ids by (st_dev, st_ino)
        self.found: dict[int, list[tuple[Ghost, int]]] = {}
        self.ids: dict[int, dict[tuple[int, int], int]] = {}

    def collect_fd(self, fd: OpenFd) -> model.FdEntry | None:
        st = fd.st
        if not (stat.S_ISREG(st.st_mode) and fd.link.endswith(DELETED) and st.st_nlink == 0):
            return None
        path = fd.link[: -len(DELETED)]
        ghosts, ids = self.found.setdefault(fd.pid, []), self.ids.setdefault(fd.pid, {})
        if (st.st_dev, st.st_ino) not in ids:
            ids[st.st_dev, st.st_ino] = len(ghosts)
            ghosts.append((Ghost(len(ghosts), path, st.st_mode, st.st_size, 0, 0), fd.fd))
        return model.FdEntry(fd.fd, model.FdKind.GHOST, fd.flags, fd.pos, path, ids[st.st_dev, st.st_ino])

    def write_process(self, pid: int, writer, ckpt: model.Checkpoint) -> None:
        """Copy the contents through the task's fd."""
        found = self.found.get(pid, [])
        for ghost, fd in found:
            with open(f"/proc/{pid}/fd/{fd}", "rb") as f:
                data = f.read()
            ghost.size = len(data)
            ghost.offset, ghost.xxh3 = writer.write_ghost(data)
        ckpt.ghosts = [g for g, _ in found]


class Prepare(protocol.Prepare):
    fd_kinds = (model.FdKind.GHOST,)
    always_seek = fd_kinds

    def __init__(self, root, tree_fds):
        super().__init__(root, tree_fds)
        self.paths: dict[int, str] = {}  # Ghost id -> where it is, until the process's fds are open

    def open_fd(self, entry: model.FdEntry, proc: Restoring) -> int:
        if entry.file_id not in self.paths:
            ghost = next(g for g in proc.image.checkpoint.ghosts if g.id == entry.file_id)  # there: check_image
            self.paths[entry.file_id] = _recreate(proc.image, ghost)
        return protocol.open_path(self.paths[entry.file_id], protocol.open_flags(entry), f"fd {entry.fd}")

    def end_process(self) -> None:
        """Unlinked again as soon as they are open: as at dump."""
        for path in self.paths.values():
            try:
                os.unlink(path)
            except OSError:
                pass
        self.paths.clear()


def _recreate(image, ghost: Ghost) -> str:
    """The file, back at its old path (or beside it if that is taken)."""
    data = image.read_ghost(ghost)
    path = protocol.create_beside(ghost.path, ghost.mode, f"ghost file {ghost.path}")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
    except OSError as err:
        os.unlink(path)
        raise RestoreError(f"ghost file {ghost.path}: cannot write: {err.strerror}") from err
    return path


def check_image(ckpt: model.Checkpoint, image) -> list[str]:
    ids = {g.id for g in ckpt.ghosts}
    p = [f"fd {fd.fd}: refers to unknown ghost {fd.file_id}" for fd in ckpt.fds
         if fd.kind == model.FdKind.GHOST and fd.file_id not in ids]
    p += [f"ghost {g.id}: outside ghosts.img" for g in ckpt.ghosts
          if g.size < 0 or g.offset < 0 or g.offset + g.size > image.ghosts_size]
    return p


def blobs(ckpt: model.Checkpoint) -> list[tuple[str, int, int, int]]:
    return [(f"ghost {g.id}", g.offset, g.size, g.xxh3) for g in ckpt.ghosts]
