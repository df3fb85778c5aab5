"""Character devices that hold no state of the process (/dev/null,
/dev/zero, /dev/urandom ...): reopened by path. Any other character device
is refused."""

from __future__ import annotations

import os
import stat

from .. import model
from ..errors import Unsupported
from . import protocol
from .protocol import OpenFd, Restoring

DEVICES = {(1, 3): "/dev/null", (1, 5): "/dev/zero", (1, 7): "/dev/full", (1, 8): "/dev/random",
           (1, 9): "/dev/urandom"}


class Collect(protocol.Collect):
    def collect_fd(self, fd: OpenFd) -> model.FdEntry | None:
        if not stat.S_ISCHR(fd.st.st_mode):
            return None
        dev = (os.major(fd.st.st_rdev), os.minor(fd.st.st_rdev))
        if dev not in DEVICES:
            raise Unsupported(f"{fd.where} is character device {fd.link} ({dev[0]}:{dev[1]}); not supported", fd.pid)
        return model.FdEntry(fd.fd, model.FdKind.DEVICE, fd.flags, fd.pos, DEVICES[dev])


class Prepare(protocol.Prepare):
    fd_kinds = (model.FdKind.DEVICE,)

    def open_fd(self, entry: model.FdEntry, proc: Restoring) -> int:
        return protocol.open_path(entry.path, protocol.open_flags(entry), f"fd {entry.fd}")


def check_image(ckpt: model.Checkpoint, image) -> list[str]:
    return protocol.bad_fd_paths(ckpt, Prepare.fd_kinds)
