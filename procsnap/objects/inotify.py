"""inotify: an instance with every watch, each with its watch descriptor
and mask, re-added by file handle (FdEntry.marks, see WATCH below).

    dump                                       restore (in the restorer)
    ----                                       -------
    fdinfo "inotify wd: ino: sdev: mask:  -->  inotify_init1(flags)
      ignored_mask: fhandle-bytes:             for each watch, by wd:
      fhandle-type: f_handle:"                   wds below it: a placeholder watch
    FIONREAD of a copy (pidfd_getfd):            added and removed (the kernel
      events not yet read are refused            hands out wds cyclically from 1)
                                                 open_by_handle_at(O_PATH) on its
                                                 filesystem, then inotify_add_watch
                                                 of /proc/self/fd/N with the mask
                                               the placeholders' IN_IGNORED events
                                                 read away

A watch is kept on the inode, not the name: a watched file renamed before
the dump is watched again under any name (the handle finds it).
open_by_handle_at needs CAP_DAC_READ_SEARCH, refused by name without it.
The kernel's cursor of the next wd is not shown: after the restore the next
watch added gets the highest wd + 1 (the kernel may have handed out more
and removed them since).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import struct

from .. import model
from ..errors import RestoreError, Unsupported
from ..kernel.libc import copy_fd, libc, oserror
from . import protocol
from .protocol import OpenFd, Restoring

LINK = "anon_inode:inotify"
# FdEntry.marks of an inotify: one list of ints per watch
WATCH = ("wd", "mask", "ignored_mask", "sdev", "ino", "fhandle_type", "fhandle_bytes", "f_handle")
IN_DONT_FOLLOW = 0x02000000  # an add flag, never in a watch's mask; a /proc/self/fd link is followed
IN_ALL_EVENTS = 0xFFF
FIONREAD = 0x541B
MAX_WD_GAP = 1 << 16  # placeholder watches made at most, to reach a watch's wd
MAX_HANDLE_SZ = 128
libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
libc.open_by_handle_at.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]


def parse_watches(text: str) -> list[list[int]]:
    """The watches of an inotify's fdinfo (fs/notify/fdinfo.c
    inotify_fdinfo), by wd."""
    out = []
    for line in text.splitlines():
        if not line.startswith("inotify "):
            continue
        f = dict(word.split(":", 1) for word in line.split()[1:])
        handle = f.get("f_handle", "")
        out.append([int(f["wd"]), int(f["mask"], 16), int(f["ignored_mask"], 16), int(f["sdev"], 16),
                    int(f["ino"], 16), int(f.get("fhandle-type", "0"), 16), int(f.get("fhandle-bytes", "0"), 16),
                    int(handle, 16) if handle else 0])
    return sorted(out)


def queued_bytes(pid: int, fd: int) -> int:
    """Bytes of events waiting to be read, through a copy of the fd."""
    import fcntl

    local = copy_fd(pid, fd)
    try:
        return struct.unpack("i", fcntl.ioctl(local, FIONREAD, bytes(4)))[0]
    finally:
        os.close(local)


class Collect(protocol.Collect):
    def collect_fd(self, fd: OpenFd) -> model.FdEntry | None:
        if fd.link != LINK:
            return None
        with open(f"/proc/{fd.pid}/fdinfo/{fd.fd}") as f:
            watches = parse_watches(f.read())
        for w in watches:
            if not w[6]:
                raise Unsupported(f"{fd.where}: inotify watch {w[0]} is on inode {w[4]} of a filesystem that "
                                  "gives no file handle; not supported", fd.pid)
        queued = queued_bytes(fd.pid, fd.fd)
        if queued:
            raise Unsupported(f"{fd.where}: inotify has {queued} bytes of events not yet read; not supported "
                              "(the kernel lets no one queue them again)", fd.pid)
        return model.FdEntry(fd.fd, model.FdKind.INOTIFY, fd.flags, 0, fd.link, marks=watches)


def check_image(ckpt: model.Checkpoint, image) -> list[str]:
    problems = []
    for e in ckpt.fds:
        if e.kind != model.FdKind.INOTIFY:
            continue
        wds = [w[0] if w else 0 for w in e.marks]
        for w in e.marks:
            if len(w) != len(WATCH) or any(not isinstance(x, int) or x < 0 for x in w) \
                    or not 0 < w[0] < 1 << 31 or w[6] > MAX_HANDLE_SZ or w[7] >= 1 << (8 * w[6]):
                problems.append(f"fd {e.fd}: inotify watch {w}")
        if wds != sorted(set(wds)):
            problems.append(f"fd {e.fd}: inotify watch descriptors {wds} not distinct and in order")
    return problems


class file_handle(ctypes.Structure):
    """struct file_handle (include/linux/fs.h), with room for the largest handle."""

    _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int),
                ("f_handle", ctypes.c_ubyte * MAX_HANDLE_SZ)]


def mount_of(sdev: int) -> str:
    """A mount point of the filesystem whose (kernel-encoded) device is `sdev`."""
    major, minor = sdev >> 20, sdev & 0xFFFFF
    best = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[2] == f"{major}:{minor}" and (best is None or fields[3] == "/"):
                best = fields[4].replace("\\040", " ")
    if best is None:
        raise RestoreError(f"no filesystem of device {major}:{minor} is mounted here")
    return best


def open_by_handle(sdev: int, ino: int, htype: int, nbytes: int, handle: int, what: str) -> int:
    """An O_PATH fd of a watched inode (`what` names the watch), found by its handle."""
    fh = file_handle(nbytes, htype)
    ctypes.memmove(fh.f_handle, handle.to_bytes(nbytes, "big"), nbytes)
    mount = mount_of(sdev)
    mfd = os.open(mount, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # not O_PATH: EBADF
    try:
        fd = libc.open_by_handle_at(mfd, ctypes.byref(fh), os.O_PATH | os.O_CLOEXEC)
        if fd < 0:
            err = oserror("open_by_handle_at")
            hint = " (needs CAP_DAC_READ_SEARCH)" if err.errno == 1 else ""
            raise RestoreError(f"{what}: the watched inode {ino} on {mount}: "
                               f"{os.strerror(err.errno)}{hint}") from err
        return fd
    finally:
        os.close(mfd)


def _add(ifd: int, path: str, mask: int, what: str) -> int:
    wd = libc.inotify_add_watch(ifd, path.encode(), mask)
    if wd < 0:
        err = oserror("inotify_add_watch")
        raise RestoreError(f"{what}: inotify_add_watch({path}, {mask:#x}): {os.strerror(err.errno)}") from err
    return wd


def make_inotify(entry: model.FdEntry, what: str) -> int:
    ifd = libc.inotify_init1((entry.flags & os.O_NONBLOCK) | os.O_CLOEXEC)
    if ifd < 0:
        raise RestoreError(f"{what}: inotify_init1: {os.strerror(ctypes.get_errno())}")
    ok = False
    placeholder = None
    try:
        next_wd = 1
        for w in entry.marks:
            if w[0] - next_wd > MAX_WD_GAP:
                raise RestoreError(f"{what}: inotify watch {w[0]}: more than {MAX_WD_GAP} watch descriptors to "
                                   "skip to make it again")
            if next_wd < w[0]:
                import tempfile

                placeholder = placeholder or tempfile.mkdtemp(prefix="procsnap-inotify-")
            while next_wd < w[0]:  # a placeholder for each wd not in use, removed at once
                got = _add(ifd, placeholder, IN_ALL_EVENTS, what)
                libc.inotify_rm_watch(ifd, got)
                next_wd = got + 1
            if placeholder:
                drain(ifd)  # their IN_IGNORED, before any event of a real watch
            fd = open_by_handle(*w[3:], f"{what}: inotify watch {w[0]}")
            try:
                got = _add(ifd, f"/proc/self/fd/{fd}", w[1] & ~IN_DONT_FOLLOW, what)
            finally:
                os.close(fd)
            if got != w[0]:
                raise RestoreError(f"{what}: inotify watch made again as wd {got}, expected {w[0]} (is one inode "
                                   "watched twice?)")
            next_wd = got + 1
        ok = True
        return ifd
    finally:
        if placeholder:
            import shutil

            shutil.rmtree(placeholder, ignore_errors=True)
        if not ok:
            os.close(ifd)


def drain(ifd: int) -> None:
    flags = os.get_blocking(ifd)
    os.set_blocking(ifd, False)
    try:
        with contextlib.suppress(BlockingIOError):
            while os.read(ifd, 65536):
                pass
    finally:
        os.set_blocking(ifd, flags)


class Prepare(protocol.Prepare):
    fd_kinds = (model.FdKind.INOTIFY,)

    def open_fd(self, entry: model.FdEntry, proc: Restoring) -> int:
        return self.own(make_inotify(entry, f"fd {entry.fd}"))
