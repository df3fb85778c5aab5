"""Dirty-page tracking without soft-dirty bits: userfaultfd write-protection
in asynchronous mode, read and re-armed with the PAGEMAP_SCAN ioctl.

    target's uffd (made by an injected userfaultfd(2))
        |  pidfd_getfd: a copy here; UFFDIO_API and UFFDIO_REGISTER work on
        |  the uffd's mm (the target's), from any process
        v
    UFFDIO_REGISTER_MODE_WP on a range: its VMAs show "uw" in smaps VmFlags
    PAGEMAP_SCAN on /proc/PID/pagemap, category PAGE_IS_WRITTEN,
        PM_SCAN_WP_MATCHING: the pages written since the last scan, and
        write-protected again in the same walk (nothing written between
        the report and the re-protection is lost)

With UFFD_FEATURE_WP_ASYNC (which implies WP_UNPOPULATED) a write to a
protected page is resolved by the kernel itself: the page loses its
uffd-wp bit, which PAGEMAP_SCAN reports as PAGE_IS_WRITTEN; nobody reads
the uffd. Closing its last fd unregisters every range.

Layouts mirror include/uapi/linux/userfaultfd.h and include/uapi/linux/fs.h
(6.7+); this machine's /usr/include (6.1) lacks WP_ASYNC and PAGEMAP_SCAN.
"""

from __future__ import annotations

import ctypes
import enum
import os

from .arch import x86_64 as arch
from .libc import pylibc

UFFD_API = 0xAA
UFFD_USER_MODE_ONLY = 1  # flag of userfaultfd(2): faults of user mode only (no CAP_SYS_PTRACE needed)


class UffdFeature(enum.IntFlag):  # struct uffdio_api.features
    EVENT_FORK = 1 << 1  # the events of lazy restore (kernel/uffd.py)
    EVENT_REMAP = 1 << 2
    EVENT_REMOVE = 1 << 3
    EVENT_UNMAP = 1 << 6
    WP_HUGETLBFS_SHMEM = 1 << 12
    WP_UNPOPULATED = 1 << 13
    WP_ASYNC = 1 << 15


TRACKING_FEATURES = UffdFeature.WP_ASYNC | UffdFeature.WP_UNPOPULATED | UffdFeature.WP_HUGETLBFS_SHMEM


class RegisterMode(enum.IntFlag):  # struct uffdio_register.mode
    MISSING = 1 << 0
    WP = 1 << 1


class PageCategory(enum.IntFlag):  # PAGE_IS_* of struct pm_scan_arg's masks and page_region.categories
    WPALLOWED = 1 << 0
    WRITTEN = 1 << 1
    FILE = 1 << 2
    PRESENT = 1 << 3
    SWAPPED = 1 << 4
    PFNZERO = 1 << 5
    HUGE = 1 << 6
    SOFT_DIRTY = 1 << 7


class ScanFlag(enum.IntFlag):  # struct pm_scan_arg.flags
    WP_MATCHING = 1 << 0  # write-protect the pages reported
    CHECK_WPASYNC = 1 << 1  # fail (EPERM) on a VMA without async write-protection


class uffdio_api(ctypes.Structure):  # include/uapi/linux/userfaultfd.h
    _fields_ = [("api", ctypes.c_uint64), ("features", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class uffdio_range(ctypes.Structure):  # include/uapi/linux/userfaultfd.h
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class uffdio_register(ctypes.Structure):  # include/uapi/linux/userfaultfd.h
    _fields_ = [("range", uffdio_range), ("mode", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class page_region(ctypes.Structure):  # include/uapi/linux/fs.h
    _fields_ = [("start", ctypes.c_uint64), ("end", ctypes.c_uint64), ("categories", ctypes.c_uint64)]


class pm_scan_arg(ctypes.Structure):  # include/uapi/linux/fs.h
    _fields_ = [(name, ctypes.c_uint64) for name in (
        "size", "flags", "start", "end", "walk_end", "vec", "vec_len", "max_pages",
        "category_inverted", "category_mask", "category_anyof_mask", "return_mask")]


def _iowr(kind: int, nr: int, size: int) -> int:  # include/uapi/asm-generic/ioctl.h, _IOWR
    return (3 << 30) | (size << 16) | (kind << 8) | nr


UFFDIO_REGISTER = _iowr(UFFD_API, 0x00, ctypes.sizeof(uffdio_register))
UFFDIO_API = _iowr(UFFD_API, 0x3F, ctypes.sizeof(uffdio_api))
PAGEMAP_SCAN = _iowr(ord("f"), 16, ctypes.sizeof(pm_scan_arg))
REGIONS = 512  # page_regions per PAGEMAP_SCAN call; a scan that fills them goes on from walk_end


def _ioctl(fd: int, request: int, arg, what: str) -> int:
    got = pylibc.ioctl(fd, ctypes.c_ulong(request), ctypes.byref(arg))
    if got < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return got


def enable_wp_async(uffd: int) -> None:
    """UFFDIO_API asking for asynchronous write-protection (EINVAL where the
    kernel has no UFFD_FEATURE_WP_ASYNC)."""
    api = uffdio_api(api=UFFD_API, features=TRACKING_FEATURES)
    _ioctl(uffd, UFFDIO_API, api, "ioctl UFFDIO_API (features WP_ASYNC)")


def register_wp(uffd: int, start: int, end: int) -> None:
    reg = uffdio_register(range=uffdio_range(start, end - start), mode=RegisterMode.WP)
    _ioctl(uffd, UFFDIO_REGISTER, reg, f"ioctl UFFDIO_REGISTER {start:#x}-{end:#x} (MODE_WP)")


def scan(pagemap_fd: int, start: int, end: int, flags: int = 0, category_mask: int = 0, anyof_mask: int = 0,
         return_mask: int = 0) -> list[tuple[int, int]]:
    """PAGEMAP_SCAN over start..end: (start, end) of the runs of pages of
    the categories asked for, adjacent runs joined; the walk goes on from
    walk_end whenever the regions filled up."""
    vec = (page_region * REGIONS)()
    out: list[tuple[int, int]] = []
    while start < end:
        arg = pm_scan_arg(size=ctypes.sizeof(pm_scan_arg), flags=flags, start=start, end=end,
                          vec=ctypes.addressof(vec), vec_len=REGIONS, category_mask=category_mask,
                          category_anyof_mask=anyof_mask, return_mask=return_mask)
        n = _ioctl(pagemap_fd, PAGEMAP_SCAN, arg, f"ioctl PAGEMAP_SCAN {start:#x}-{end:#x}")
        for r in vec[:n]:
            if out and out[-1][1] == r.start:
                out[-1] = (out[-1][0], r.end)
            else:
                out.append((r.start, r.end))
        if arg.walk_end <= start:
            raise OSError(0, f"PAGEMAP_SCAN {start:#x}-{end:#x} made no progress")
        start = arg.walk_end
    return out


def written_ranges(pagemap_fd: int, start: int, end: int, protect: bool) -> list[tuple[int, int]]:
    """(start, end) of the runs of pages in start..end written since they
    were last write-protected; protect: write-protected again in the same
    walk. Every VMA in the range must be registered for async WP.

    Only pages that are there (present or swapped) are asked for: with
    category WRITTEN alone the kernel takes a fast path that counts a
    never-touched page as written and, protecting it, installs a uffd-wp
    pte marker there, which fills the page tables of a sparse area and
    shows in /proc/PID/pagemap as a swapped page. A page faulted in later
    is not protected, so it is reported written."""
    flags = ScanFlag.CHECK_WPASYNC | (ScanFlag.WP_MATCHING if protect else 0)
    return scan(pagemap_fd, start, end, flags, PageCategory.WRITTEN, PageCategory.PRESENT | PageCategory.SWAPPED,
                PageCategory.WRITTEN)


def wp_ranges(pagemap_fd: int, end: int = arch.TASK_SIZE) -> list[tuple[int, int]]:
    """(start, end) of the areas registered for async write-protection (the
    "uw" of smaps, without smaps' count of every page). A VMA without it is
    skipped whole; one with it is walked, holes included. (`end` at most
    TASK_SIZE: beyond, EFAULT.)"""
    return scan(pagemap_fd, 0, end, 0, PageCategory.WPALLOWED, 0, PageCategory.WPALLOWED)


def uffd_features(pid: int, fd: int) -> int:
    """The features a userfaultfd was opened with (its fdinfo "API:" line:
    api:features:ioctls in hex); 0 when it shows none."""
    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("API:"):
                return int(line.split()[1].split(":")[1], 16)
    return 0


def has_soft_dirty() -> bool:
    """CONFIG_MEM_SOFT_DIRTY: new VMAs carry VM_SOFTDIRTY ("sd" in VmFlags)."""
    with open("/proc/self/smaps") as f:
        return any(line.startswith("VmFlags:") and " sd" in line for line in f)
