"""Terminals of the outside world (--shell-job): an fd on the dumping
terminal (a pty whose master is outside the tree, a virtual terminal, the
console) is reattached to the restoring one, as CRIU's --shell-job does;
refused by name without it. Ptys of the tree are pty.py's."""

from __future__ import annotations

import os
import stat

from .. import model
from ..errors import RestoreError, Unsupported
from . import protocol
from .protocol import OpenFd, Restoring

TTY_MAJORS = set(range(136, 144)) | {4}  # /dev/pts/N, /dev/ttyN (and serial lines)
CONSOLE = (5, 1)  # /dev/console


class Collect(protocol.Collect):
    def collect_fd(self, fd: OpenFd) -> model.FdEntry | None:
        if not stat.S_ISCHR(fd.st.st_mode):
            return None
        if os.major(fd.st.st_rdev) not in TTY_MAJORS and (os.major(fd.st.st_rdev), os.minor(fd.st.st_rdev)) != CONSOLE:
            return None
        if not fd.shell_job:
            raise Unsupported(f"{fd.where} is a terminal ({fd.link}); dump with --shell-job", fd.pid)
        return model.FdEntry(fd.fd, model.FdKind.TTY, fd.flags, 0, fd.link)


class Prepare(protocol.Prepare):
    fd_kinds = (model.FdKind.TTY,)

    def open_fd(self, entry: model.FdEntry, proc: Restoring) -> int:
        if not proc.shell_job:
            raise RestoreError(f"fd {entry.fd} was the terminal {entry.path}; restore with --shell-job")
        return protocol.open_path(_terminal(), protocol.open_flags(entry) | os.O_NOCTTY, f"fd {entry.fd}")


def _terminal() -> str:
    for fd in (0, 1, 2):
        if os.isatty(fd):
            return os.ttyname(fd)
    raise RestoreError("the image has terminal fds (--shell-job) but procsnap is not running on a terminal")


def check_image(ckpt: model.Checkpoint, image) -> list[str]:
    return protocol.bad_fd_paths(ckpt, Prepare.fd_kinds)
