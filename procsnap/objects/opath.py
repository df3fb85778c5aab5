"""O_PATH fds: a handle on a place in the filesystem (a file, a directory,
a symlink itself with O_NOFOLLOW, a device or FIFO node), never opened for
I/O. Reopened by their path with their flags (O_PATH, O_NOFOLLOW,
O_DIRECTORY as fdinfo shows them); nothing of the object is read or
stored, and no object is opened for I/O (a FIFO is not a pipe here).

Refused at dump, by name: one whose path no longer names the same inode
(renamed, replaced, or deleted: "PATH (deleted)").
"""

from __future__ import annotations

import os
import stat

from .. import model, nsworker
from ..errors import Unsupported
from . import protocol
from .protocol import OpenFd, Restoring

DELETED = " (deleted)"


class Collect(protocol.Collect):
    def collect_fd(self, fd: OpenFd) -> model.FdEntry | None:
        if not fd.flags & model.OpenFlag.O_PATH:
            return None
        what = f"{fd.where} (O_PATH, {_kind(fd.st)})"
        if not fd.link.startswith("/"):
            raise Unsupported(f"{what} is of {fd.link}, which has no path; not supported", fd.pid)
        if fd.link.endswith(DELETED):
            raise Unsupported(f"{what} is of {fd.link}, which was removed; not supported", fd.pid)
        try:
            here = nsworker.in_root(fd.link)
            now = os.lstat(here) if stat.S_ISLNK(fd.st.st_mode) else os.stat(here)
        except OSError as err:
            raise Unsupported(f"{what}: {fd.link}: {err.strerror}", fd.pid) from err
        if not protocol.same_file(fd.st, now):
            raise Unsupported(f"{what}: {fd.link} now names another file than the one open", fd.pid)
        return model.FdEntry(fd.fd, model.FdKind.PATH, fd.flags, 0, fd.link)


def _kind(st: os.stat_result) -> str:
    for test, name in ((stat.S_ISLNK, "a symlink"), (stat.S_ISDIR, "a directory"), (stat.S_ISREG, "a file"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(st.st_mode):
            return name
    return "a file"


class Prepare(protocol.Prepare):
    fd_kinds = (model.FdKind.PATH,)

    def open_fd(self, entry: model.FdEntry, proc: Restoring) -> int:
        return protocol.open_path(entry.path, protocol.open_flags(entry), f"fd {entry.fd} (O_PATH)")


def check_image(ckpt: model.Checkpoint, image) -> list[str]:
    p = protocol.bad_fd_paths(ckpt, Prepare.fd_kinds)
    p += [f"fd {fd.fd}: an O_PATH fd without O_PATH in its flags" for fd in ckpt.fds
          if fd.kind == model.FdKind.PATH and not fd.flags & model.OpenFlag.O_PATH]
    return p
