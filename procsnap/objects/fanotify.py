"""fanotify: a group with its init flags, event flags and every mark
(FdEntry.params: flags, event_flags; FdEntry.marks: MARK each).

    fdinfo "fanotify flags: event-flags:"     fanotify_init(flags, event_flags)
    "fanotify ino: sdev: mflags: mask:        an inode mark: the inode found by its
      ignored_mask: fhandle-..."                handle (inotify.open_by_handle), marked
                                                through /proc/self/fd/N
    "fanotify mnt_id: mflags: mask: ..."      a mount mark: the mount point of that
                                                mount id (mountinfo)
    "fanotify sdev: mflags: mask: ..."        a filesystem mark: a mount point of it
    each with FAN_MARK_ADD of its mask, and of its ignored mask
    (FAN_MARK_IGNORED_MASK, with FAN_MARK_IGNORED_SURV_MODIFY if set)

Refused by name: events not yet read (FIONREAD), a permission class
(FAN_CLASS_CONTENT/PRE_CONTENT: events read and not yet answered are held
by the kernel for this group alone), mark flags other than
IGNORED_SURV_MODIFY and EVICTABLE.
"""

from __future__ import annotations

import ctypes
import os

from .. import model
from ..errors import RestoreError, Unsupported
from ..kernel.libc import libc
from . import inotify, protocol
from .protocol import OpenFd, Restoring

LINK = "anon_inode:[fanotify]"
INODE, MOUNT, FILESYSTEM = 0, 1, 2
MARK = ("type", "mflags", "mask", "ignored_mask", "sdev", "ino", "fhandle_type", "fhandle_bytes", "f_handle",
        "mnt_id")
FAN_CLOEXEC, FAN_NONBLOCK = 0x1, 0x2
FAN_CLASS_BITS = 0xC  # FAN_CLASS_CONTENT | FAN_CLASS_PRE_CONTENT (include/uapi/linux/fanotify.h)
FAN_MARK_ADD = 0x1
FAN_MARK_MOUNT = 0x10
FAN_MARK_IGNORED_MASK = 0x20
FAN_MARK_IGNORED_SURV_MODIFY = 0x40
FAN_MARK_FILESYSTEM = 0x100
FAN_MARK_EVICTABLE = 0x200
MARK_FLAGS = FAN_MARK_IGNORED_SURV_MODIFY | FAN_MARK_EVICTABLE
AT_FDCWD = -100
libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p]


def parse_fanotify(text: str) -> tuple[dict[str, int], list[list[int]]]:
    """(params, marks) of a fanotify's fdinfo (fs/notify/fdinfo.c fanotify_show_fdinfo)."""
    params: dict[str, int] = {}
    marks = []
    for line in text.splitlines():
        if not line.startswith("fanotify "):
            continue
        f = dict(word.split(":", 1) for word in line.split()[1:])
        if "event-flags" in f:
            params = {"flags": int(f["flags"], 16), "event_flags": int(f["event-flags"], 16)}
            continue
        kind = INODE if "ino" in f else MOUNT if "mnt_id" in f else FILESYSTEM
        handle = f.get("f_handle", "")
        marks.append([kind, int(f["mflags"], 16), int(f["mask"], 16), int(f["ignored_mask"], 16),
                      int(f.get("sdev", "0"), 16), int(f.get("ino", "0"), 16), int(f.get("fhandle-type", "0"), 16),
                      int(f.get("fhandle-bytes", "0"), 16), int(handle, 16) if handle else 0,
                      int(f.get("mnt_id", "0"), 16)])
    return params, sorted(marks)


class Collect(protocol.Collect):
    def collect_fd(self, fd: OpenFd) -> model.FdEntry | None:
        if fd.link != LINK:
            return None
        with open(f"/proc/{fd.pid}/fdinfo/{fd.fd}") as f:
            params, marks = parse_fanotify(f.read())
        if params.get("flags", 0) & FAN_CLASS_BITS:
            raise Unsupported(f"{fd.where}: a fanotify group of a permission class (flags {params['flags']:#x}); "
                              "not supported", fd.pid)
        for m in marks:
            if m[1] & ~MARK_FLAGS:
                raise Unsupported(f"{fd.where}: fanotify mark flags {m[1]:#x}; not supported", fd.pid)
            if m[0] == INODE and not m[7]:
                raise Unsupported(f"{fd.where}: fanotify mark on inode {m[5]} of a filesystem that gives no file "
                                  "handle; not supported", fd.pid)
        queued = inotify.queued_bytes(fd.pid, fd.fd)
        if queued:
            raise Unsupported(f"{fd.where}: fanotify has {queued} bytes of events not yet read; not supported",
                              fd.pid)
        return model.FdEntry(fd.fd, model.FdKind.FANOTIFY, fd.flags, 0, fd.link, params=params, marks=marks)


def check_image(ckpt: model.Checkpoint, image) -> list[str]:
    return [f"fd {e.fd}: fanotify mark {m}" for e in ckpt.fds if e.kind == model.FdKind.FANOTIFY for m in e.marks
            if len(m) != len(MARK) or any(not isinstance(x, int) or x < 0 for x in m) or m[0] > FILESYSTEM
            or m[7] > inotify.MAX_HANDLE_SZ or m[8] >= 1 << (8 * m[7])]


def _mount_point(mnt_id: int) -> str:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if int(fields[0]) == mnt_id:
                return fields[4].replace("\\040", " ")
    raise RestoreError(f"mount {mnt_id} is not mounted here")


def _mark(gfd: int, flags: int, mask: int, path: str, what: str) -> None:
    if libc.fanotify_mark(gfd, flags, mask, AT_FDCWD, path.encode()) != 0:
        raise RestoreError(f"{what}: fanotify_mark({flags:#x}, {mask:#x}, {path}): "
                           f"{os.strerror(ctypes.get_errno())}")


def make_fanotify(entry: model.FdEntry, what: str) -> int:
    flags = entry.params.get("flags", 0) & ~(FAN_CLOEXEC | FAN_NONBLOCK)
    flags |= FAN_CLOEXEC | (FAN_NONBLOCK if entry.flags & os.O_NONBLOCK else 0)
    gfd = libc.fanotify_init(flags, entry.params.get("event_flags", 0))
    if gfd < 0:
        raise RestoreError(f"{what}: fanotify_init({flags:#x}): {os.strerror(ctypes.get_errno())}")
    try:
        for kind, mflags, mask, ignored, sdev, ino, htype, nbytes, handle, mnt_id in entry.marks:
            where = f"{what}: fanotify mark"
            ofd = -1
            if kind == INODE:
                ofd = inotify.open_by_handle(sdev, ino, htype, nbytes, handle, where)
                path, how = f"/proc/self/fd/{ofd}", 0
            elif kind == MOUNT:
                path, how = _mount_point(mnt_id), FAN_MARK_MOUNT
            else:
                path, how = inotify.mount_of(sdev), FAN_MARK_FILESYSTEM
            try:
                evictable = mflags & FAN_MARK_EVICTABLE
                if mask:
                    _mark(gfd, FAN_MARK_ADD | how | evictable, mask, path, where)
                if ignored:
                    _mark(gfd, FAN_MARK_ADD | how | evictable | FAN_MARK_IGNORED_MASK
                          | (mflags & FAN_MARK_IGNORED_SURV_MODIFY), ignored, path, where)
            finally:
                if ofd >= 0:
                    os.close(ofd)
    except BaseException:
        os.close(gfd)
        raise
    return gfd


class Prepare(protocol.Prepare):
    fd_kinds = (model.FdKind.FANOTIFY,)

    def open_fd(self, entry: model.FdEntry, proc: Restoring) -> int:
        return self.own(make_fanotify(entry, f"fd {entry.fd}"))
