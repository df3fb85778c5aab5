"""libc loaded with errno, and a checked raw syscall.

Every call here raises OSError(errno, "<call>: <strerror>") on failure, so
the layer above can name what failed.
"""

from __future__ import annotations

import ctypes
import os

from .arch import x86_64 as arch

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
libc.ptrace.restype = ctypes.c_long
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
libc.prctl.restype = ctypes.c_int
libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
pylibc = ctypes.PyDLL(None, use_errno=True)  # keeps the GIL across clone3
pylibc.syscall.restype = ctypes.c_long


def oserror(call: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{call}: {os.strerror(err)}")


def syscall(nr: int, *args) -> int:
    """Raw syscall; ints and ctypes pointers/buffers as arguments."""
    conv = []
    for a in args:
        if isinstance(a, int):
            conv.append(ctypes.c_long(arch.signed(arch.unsigned(a))))
        else:
            conv.append(a)
    ret = libc.syscall(ctypes.c_long(nr), *conv)
    if ret == -1:
        name = arch.NR(nr).name if nr in arch.NR.__members__.values() else str(nr)
        raise oserror(name)
    return ret


def prctl(option: int, a2: int = 0, a3: int = 0, a4: int = 0, a5: int = 0) -> int:
    ret = libc.prctl(option, a2, a3, a4, a5)
    if ret == -1:
        raise oserror(f"prctl({option})")
    return ret


def copy_fd(pid: int, fd: int) -> int:
    """A copy of fd `fd` of `pid` (pidfd_open + pidfd_getfd): the same open
    file description, where opening it again would make another."""
    pidfd = os.pidfd_open(pid)
    try:
        return syscall(arch.NR.pidfd_getfd, pidfd, fd, 0)
    finally:
        os.close(pidfd)


SYNC_FILE_RANGE_WRITE = 2  # include/uapi/linux/fs.h: start writeback of dirty pages, do not wait
libc.sync_file_range.restype = ctypes.c_int
libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]


def start_writeback(fd: int, offset: int, length: int) -> None:
    """sync_file_range(SYNC_FILE_RANGE_WRITE): the disk starts writing these
    bytes now, so that the fsync at the end waits for the last of them only
    (on tmpfs it does nothing). Only a hint: a failure is left to fsync."""
    libc.sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE)
