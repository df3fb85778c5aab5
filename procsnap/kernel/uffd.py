"""userfaultfd in MISSING mode, for lazy restore (restorer/lazy.py): the
ranges of a process registered on a uffd fault to whoever holds it, which
answers each fault with UFFDIO_COPY (or UFFDIO_ZEROPAGE), from any process:
the ioctls act on the uffd's mm and copy from the caller's memory.

    read(uffd) -> uffd_msg (32 bytes), one per
        PAGEFAULT  a thread waits on the missing page at arg.pagefault.address
        FORK       the process forked: arg.fork.ufd is a new uffd (installed
                   in the reader's fd table by the read) for the child's mm
        REMAP      mremap moved [from, from + len) to `to`
        REMOVE     MADV_DONTNEED/MADV_REMOVE on [start, end): the range reads
                   zeros from now on
        UNMAP      munmap of [start, end)
    The non-cooperative events (all but PAGEFAULT) hold the thread that
    caused them until they are read, and UFFDIO_COPY fails with EAGAIN
    while one is unread (the layout is changing): read, then copy again.

Layouts mirror include/uapi/linux/userfaultfd.h (in /usr/include here).
"""

from __future__ import annotations

import ctypes
import enum
import errno
import os

from .libc import pylibc
from .uffdwp import (UFFD_API, UFFDIO_API, UFFDIO_REGISTER, RegisterMode, UffdFeature, _ioctl, _iowr, uffdio_api,
                     uffdio_range, uffdio_register)


LAZY_FEATURES = UffdFeature.EVENT_FORK | UffdFeature.EVENT_REMAP | UffdFeature.EVENT_REMOVE | UffdFeature.EVENT_UNMAP


class Event(enum.IntEnum):  # struct uffd_msg.event
    PAGEFAULT = 0x12
    FORK = 0x13
    REMAP = 0x14
    REMOVE = 0x15
    UNMAP = 0x16


PAGEFAULT_FLAG_WRITE = 1 << 0


class uffd_msg(ctypes.Structure):  # include/uapi/linux/userfaultfd.h (packed; the union as three u64)
    _pack_ = 1
    _fields_ = [("event", ctypes.c_uint8), ("reserved1", ctypes.c_uint8), ("reserved2", ctypes.c_uint16),
                ("reserved3", ctypes.c_uint32), ("arg0", ctypes.c_uint64), ("arg1", ctypes.c_uint64),
                ("arg2", ctypes.c_uint64)]
    # PAGEFAULT: arg0 flags, arg1 address; FORK: arg0 & 0xffffffff ufd;
    # REMAP: arg0 from, arg1 to, arg2 len; REMOVE/UNMAP: arg0 start, arg1 end


class uffdio_copy(ctypes.Structure):  # include/uapi/linux/userfaultfd.h
    _fields_ = [("dst", ctypes.c_uint64), ("src", ctypes.c_uint64), ("len", ctypes.c_uint64),
                ("mode", ctypes.c_uint64), ("copy", ctypes.c_int64)]


class uffdio_zeropage(ctypes.Structure):  # include/uapi/linux/userfaultfd.h
    _fields_ = [("range", uffdio_range), ("mode", ctypes.c_uint64), ("zeropage", ctypes.c_int64)]


UFFDIO_WAKE = (2 << 30) | (ctypes.sizeof(uffdio_range) << 16) | (UFFD_API << 8) | 0x02  # _IOR
UFFDIO_COPY = _iowr(UFFD_API, 0x03, ctypes.sizeof(uffdio_copy))
UFFDIO_ZEROPAGE = _iowr(UFFD_API, 0x04, ctypes.sizeof(uffdio_zeropage))
MSG_SIZE = ctypes.sizeof(uffd_msg)


def enable(uffd: int, features: int = LAZY_FEATURES) -> int:
    """UFFDIO_API asking for `features`; returns what the kernel has (EINVAL
    where it lacks one asked for)."""
    api = uffdio_api(api=UFFD_API, features=features)
    _ioctl(uffd, UFFDIO_API, api, f"ioctl UFFDIO_API (features {features:#x})")
    return api.features


def register_missing(uffd: int, start: int, end: int) -> None:
    reg = uffdio_register(range=uffdio_range(start, end - start), mode=RegisterMode.MISSING)
    _ioctl(uffd, UFFDIO_REGISTER, reg, f"ioctl UFFDIO_REGISTER {start:#x}-{end:#x} (MODE_MISSING)")


def copy(uffd: int, dst: int, src: int, length: int) -> int:
    """UFFDIO_COPY: bytes copied (less than `length` when it stopped at a
    page that is there already: EEXIST, the page at dst + returned), or a
    negative errno: -EEXIST at dst itself, -EAGAIN (an event is unread),
    -ENOENT (no registered VMA at dst: looked up before the EAGAIN check, so
    also while an mremap's REMAP is still to be queued), -ESRCH (the mm is gone)."""
    arg = uffdio_copy(dst=dst, src=src, len=length)
    return _fill(uffd, UFFDIO_COPY, arg, "copy", length, f"UFFDIO_COPY {dst:#x} +{length:#x}")


def zeropage(uffd: int, start: int, length: int) -> int:
    """UFFDIO_ZEROPAGE: as copy(), with the zero page."""
    arg = uffdio_zeropage(range=uffdio_range(start, length))
    return _fill(uffd, UFFDIO_ZEROPAGE, arg, "zeropage", length, f"UFFDIO_ZEROPAGE {start:#x} +{length:#x}")


def _fill(uffd: int, request: int, arg, done_field: str, length: int, what: str) -> int:
    if pylibc.ioctl(uffd, ctypes.c_ulong(request), ctypes.byref(arg)) == 0:
        return length
    err = ctypes.get_errno()
    if getattr(arg, done_field) > 0:
        return getattr(arg, done_field)
    if err in (errno.EEXIST, errno.EAGAIN, errno.ESRCH, errno.ENOENT):
        return -err
    raise OSError(err, f"ioctl {what}: {os.strerror(err)}")


def wake(uffd: int, start: int, length: int) -> None:
    """UFFDIO_WAKE: the threads waiting on a fault in the range retry it
    (after a page that was there already: no copy woke them)."""
    arg = uffdio_range(start, length)
    pylibc.ioctl(uffd, ctypes.c_ulong(UFFDIO_WAKE), ctypes.byref(arg))


def read_msgs(uffd: int, limit: int = 64) -> list[uffd_msg]:
    """The messages waiting on a non-blocking uffd (at most `limit`)."""
    try:
        data = os.read(uffd, MSG_SIZE * limit)
    except BlockingIOError:
        return []
    return [uffd_msg.from_buffer_copy(data, o) for o in range(0, len(data) - MSG_SIZE + 1, MSG_SIZE)]
