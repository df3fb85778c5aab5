"""Regular files and directories: reopened by path at their position.

The record, FileRef, says what identified the file at dump (size, mtime,
mode); fds refer to it (FdEntry.file_id), and so do mapped files and the
executable (Vma.file_id, Mm.exe_file_id), which the memory stages handle.
"""

from __future__ import annotations

from .. import records as dataclasses  # the dataclasses API, cheap to import
import os
import stat

from .. import model, nsworker
from ..errors import Unsupported
from . import protocol
from .protocol import OpenFd, Restoring


@dataclasses.dataclass
class FileRef:
    """A file the process uses by path, with what identified it at dump."""

    id: int
    path: str
    size: int
    mtime_ns: int
    mode: int


class FileTable:
    """FileRef records, one per distinct file, identified at dump time."""

    def __init__(self):
        self.refs: list[FileRef] = []
        self._by_key: dict[tuple[int, int], int] = {}

    def add(self, path: str, st: os.stat_result) -> int:
        key = (st.st_dev, st.st_ino)
        if key not in self._by_key:
            ref = FileRef(len(self.refs), path, st.st_size, st.st_mtime_ns, st.st_mode)
            self.refs.append(ref)
            self._by_key[key] = ref.id
        return self._by_key[key]


def changed_since_dump(ref: FileRef, st: os.stat_result) -> str | None:
    if st.st_size != ref.size:
        return f"size {ref.size} at dump, {st.st_size} now"
    if st.st_mtime_ns != ref.mtime_ns:
        return "modified since the dump"
    return None


class Collect(protocol.Collect):
    def collect_fd(self, fd: OpenFd) -> model.FdEntry | None:
        if not (stat.S_ISREG(fd.st.st_mode) or stat.S_ISDIR(fd.st.st_mode)):
            return None
        kind = model.FdKind.REG if stat.S_ISREG(fd.st.st_mode) else model.FdKind.DIR
        try:
            now = os.stat(nsworker.in_root(fd.link))
        except OSError as err:
            raise Unsupported(f"{fd.where}: {fd.link}: {err.strerror}", fd.pid) from err
        if not protocol.same_file(fd.st, now):
            raise Unsupported(f"{fd.where}: {fd.link} now names another file than the one open", fd.pid)
        return model.FdEntry(fd.fd, kind, fd.flags, fd.pos, fd.link, fd.files.add(fd.link, fd.st))


class Prepare(protocol.Prepare):
    fd_kinds = (model.FdKind.REG, model.FdKind.DIR)
    always_seek = (model.FdKind.REG,)

    def __init__(self, root, tree_fds):
        super().__init__(root, tree_fds)
        self.refs: dict[str, dict[int, FileRef]] = {}  # image directory -> its FileRefs by id

    def open_fd(self, entry: model.FdEntry, proc: Restoring) -> int:
        image = proc.image
        if image.directory not in self.refs:
            self.refs[image.directory] = {f.id: f for f in image.checkpoint.files}
        ref = self.refs[image.directory][entry.file_id]  # there: check_image
        return protocol.open_path(ref.path, protocol.open_flags(entry), f"fd {entry.fd}")


def check_image(ckpt: model.Checkpoint, image) -> list[str]:
    p = [f"file {f.id}: path {f.path!r} is not a plain absolute path" for f in ckpt.files if protocol.bad_path(f.path)]
    file_ids = {f.id for f in ckpt.files}
    if len(file_ids) != len(ckpt.files):
        p.append("file ids are not unique")
    p += [f"fd {fd.fd}: refers to unknown file {fd.file_id}" for fd in ckpt.fds
          if fd.kind in Prepare.fd_kinds and fd.file_id not in file_ids]
    return p
