"""Local mmap/munmap with addresses, for handing the kernel pointers into
files and buffers (Python's mmap object does not expose its address)."""

from __future__ import annotations

import ctypes

from .libc import libc, oserror

libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]

PROT_READ = 0x1
MAP_SHARED = 0x01
MAP_FAILED = ctypes.c_void_p(-1).value


def map_file(fd: int, size: int, offset: int = 0) -> int:
    address = libc.mmap(None, size, PROT_READ, MAP_SHARED, fd, offset)
    if address == MAP_FAILED:
        raise oserror("mmap")
    return address


PROT_RW = 0x3
MAP_ANONYMOUS = 0x20


def map_shared_anon(size: int) -> int:
    """Shared anonymous memory of our own (a shmem object)."""
    address = libc.mmap(None, size, PROT_RW, MAP_SHARED | MAP_ANONYMOUS, -1, 0)
    if address == MAP_FAILED:
        raise oserror("mmap(MAP_SHARED|MAP_ANONYMOUS)")
    return address


def unmap(address: int, size: int) -> None:
    if libc.munmap(address, size) != 0:
        raise oserror("munmap")


MADV_DONTNEED = 4
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def drop(address: int, size: int) -> None:
    """Unmap the pages of [address, address+size) from this process (they
    stay in the page cache): keeps RSS bounded while streaming a file."""
    if libc.madvise(address, size, MADV_DONTNEED) != 0:
        raise oserror("madvise(MADV_DONTNEED)")


MAP_PRIVATE = 0x02
MAP_FIXED = 0x10
MAP_NORESERVE = 0x4000  # mmap has no name for it before Python 3.13


def map_file_fixed(address: int, fd: int, size: int, offset: int) -> None:
    """Map [offset, offset+size) of fd read-only at `address`, replacing what is there (our own reservation)."""
    if libc.mmap(address, size, PROT_READ, MAP_PRIVATE | MAP_FIXED, fd, offset) != address:
        raise oserror("mmap(MAP_FIXED)")
