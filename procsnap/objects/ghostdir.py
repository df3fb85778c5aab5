"""Removed directories: a working directory, or an fd of a directory,
whose directory was removed (rmdir) while in use.

A removed directory is empty and nothing can be made in it any more, so
only its owner, mode and times are kept (FdEntry.params, Task.cwd_removed).
Restore, as CRIU does: a placeholder directory is made at its old path
(with any parents that are missing) before the processes are spawned; they
enter it (chdir) and open their fds of it; once every process of the tree
is rebuilt, before any runs (ready), the placeholder and the parents made
for it are removed again, so /proc shows "PATH (deleted)" as at dump. If
something else holds the path by then, a name beside it is used
(PATH.procsnap-ghost.N, logged): that name is what /proc then shows.
"""

from __future__ import annotations

import contextlib
from .. import records as dataclasses  # the dataclasses API, cheap to import
from .. import log as logging  # the logging API, cheap to import
import os
import stat

from .. import model
from ..errors import RestoreError, Unsupported
from . import protocol
from .protocol import FileAttrs, OpenFd, Restoring

log = logging.getLogger("procsnap.restorer")
DELETED = " (deleted)"


def _attrs(st: os.stat_result) -> dict[str, int]:
    return dataclasses.asdict(FileAttrs.of(st))


def collect_cwd(pid: int, link: str) -> tuple[str, dict[str, int]]:
    """A removed working directory: (its path, its attributes)."""
    st = os.stat(f"/proc/{pid}/cwd")
    path = link[: -len(DELETED)]
    if protocol.bad_path(path):
        raise Unsupported(f"pid {pid}: its working directory {link} was removed and its path is not a plain "
                          "absolute one; not supported", pid)
    return path, _attrs(st)


class Collect(protocol.Collect):
    def collect_fd(self, fd: OpenFd) -> model.FdEntry | None:
        if not stat.S_ISDIR(fd.st.st_mode) or not fd.link.endswith(DELETED) or fd.st.st_nlink:
            return None
        path = fd.link[: -len(DELETED)]
        if protocol.bad_path(path):
            raise Unsupported(f"{fd.where} is of the removed directory {fd.link}, whose path is not a plain "
                              "absolute one; not supported", fd.pid)
        return model.FdEntry(fd.fd, model.FdKind.GHOST_DIR, fd.flags, 0, path, params=_attrs(fd.st))


class Prepare(protocol.Prepare):
    fd_kinds = (model.FdKind.GHOST_DIR,)

    def __init__(self, root, tree_fds):
        super().__init__(root, tree_fds)
        self.made: dict[str, str] = {}  # old path -> the placeholder made for it
        self.parents: list[str] = []  # missing parents made, outermost first

    def placeholder(self, path: str, attrs: dict[str, int], what: str) -> str:
        if path in self.made:
            return self.made[path]
        parent = os.path.dirname(path)
        missing = []
        while parent != "/" and not os.path.isdir(parent):
            missing.append(parent)
            parent = os.path.dirname(parent)
        try:
            for p in reversed(missing):
                os.mkdir(p, 0o755)
                self.parents.append(p)
        except OSError as err:
            raise RestoreError(f"{what}: cannot make the missing parent {p} of its placeholder: {err.strerror}") \
                from err
        name = protocol.make_beside(path, lambda n: os.mkdir(n, 0o700), what)
        if name != path:
            log.warning("%s: %s is taken; its placeholder is %s, which /proc will show", what, path, name)
        self.made[path] = name
        try:
            FileAttrs(**attrs).apply(name)
        except (OSError, TypeError) as err:
            raise RestoreError(f"{what}: cannot give the placeholder {name} the owner, mode and times of {path}: "
                               f"{getattr(err, 'strerror', None) or err}") from err
        return name

    def prepare_process(self, ckpt: model.Checkpoint) -> None:
        if ckpt.task.cwd_removed:
            ckpt.task.cwd = self.placeholder(ckpt.task.cwd, ckpt.task.cwd_removed,
                                             f"pid {ckpt.task.pid}: removed working directory {ckpt.task.cwd}")

    def open_fd(self, entry: model.FdEntry, proc: Restoring) -> int:
        what = f"fd {entry.fd}: removed directory {entry.path}"
        name = self.placeholder(entry.path, entry.params, what)
        return protocol.open_path(name, protocol.open_flags(entry) | os.O_DIRECTORY, what)

    def ready(self) -> None:
        self._remove()

    def finish(self, ok: bool) -> None:
        self._remove()

    def _remove(self) -> None:
        for path in list(self.made.values()) + self.parents[::-1]:
            with contextlib.suppress(OSError):
                os.rmdir(path)
        self.made.clear()
        self.parents.clear()


def check_image(ckpt: model.Checkpoint, image) -> list[str]:
    p = protocol.bad_fd_paths(ckpt, Prepare.fd_kinds)
    keys = {f.name for f in dataclasses.fields(FileAttrs)}
    p += [f"fd {fd.fd}: removed directory {fd.path}: attributes {sorted(fd.params)} are not {sorted(keys)}"
          for fd in ckpt.fds if fd.kind == model.FdKind.GHOST_DIR and set(fd.params) != keys]
    if ckpt.task.cwd_removed and (set(ckpt.task.cwd_removed) != keys or protocol.bad_path(ckpt.task.cwd)):
        p.append(f"removed working directory {ckpt.task.cwd!r}: bad path or attributes")
    return p
