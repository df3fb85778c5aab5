"""Probes, on this kernel, of each feature procsnap uses (for `procsnap
check` and for verify).

Each probe does the real call on a throw-away child process (or on
ourselves where that is harmless) and reports what it found.
"""

from __future__ import annotations

import contextlib
import ctypes
from .. import records as dataclasses  # the dataclasses API, cheap to import
import os
import socket
import signal

from . import memory, ptrace
from .arch.x86_64 import NR, PAGE_SIZE
from .clone import clone_with_pid
from .libc import syscall
from .structs import Prctl


@dataclasses.dataclass
class Result:
    name: str
    ok: bool
    detail: str


@contextlib.contextmanager
def _sleeper():
    """A child that only waits, killed and reaped on exit."""
    pid = os.fork()
    if pid == 0:
        try:
            signal.pause()
        finally:
            os._exit(0)
    try:
        yield pid
    finally:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def _probe(name: str, fn) -> Result:
    try:
        return Result(name, True, fn() or "works")
    except OSError as err:
        return Result(name, False, err.strerror or str(err))


def probe_ptrace(pid: int) -> str:
    ptrace.freeze(pid)
    try:
        ptrace.get_regs(pid)
        size = len(ptrace.get_xstate(pid))
    finally:
        ptrace.detach(pid)
    return f"seize, interrupt, regsets (xstate {size} bytes)"


def probe_rseq(pid: int) -> str:
    ptrace.freeze(pid)
    try:
        conf = ptrace.get_rseq_config(pid)
    finally:
        ptrace.detach(pid)
    return f"PTRACE_GET_RSEQ_CONFIGURATION (registered: {bool(conf.rseq_abi_pointer)})"


def probe_vm_rw(pid: int) -> str:
    buf = ctypes.create_string_buffer(b"procsnap", 8)
    data = memory.read_bytes(os.getpid(), ctypes.addressof(buf), 8)
    memory.write_bytes(os.getpid(), ctypes.addressof(buf), data)
    memory.read_bytes(pid, ctypes.addressof(buf), 8)  # same layout after fork
    return "process_vm_readv/writev"


def probe_mm_map() -> str:
    size = ctypes.c_uint()
    syscall(NR.prctl, Prctl.PR_SET_MM, Prctl.PR_SET_MM_MAP_SIZE, ctypes.addressof(size), 0, 0)
    return f"PR_SET_MM_MAP (struct {size.value} bytes)"


def probe_clone3_set_tid() -> str:
    # A pid that is free now: a child's, once reaped.
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    got, err = clone_with_pid(pid, lambda: 0)
    if got < 0:
        raise OSError(err, f"clone3 set_tid: {os.strerror(err)}")
    os.waitpid(got, 0)
    if got != pid:
        raise OSError(0, f"clone3 set_tid gave pid {got}, asked {pid}")
    return "clone3 with set_tid"


def probe_pidfd_getfd(pid: int) -> str:
    pidfd = syscall(NR.pidfd_open, pid, 0)
    try:
        fd = syscall(NR.pidfd_getfd, pidfd, 0, 0)
        os.close(fd)
    finally:
        os.close(pidfd)
    return "pidfd_open + pidfd_getfd"


def probe_userfaultfd() -> str:
    UFFD_USER_MODE_ONLY = 1
    fd = syscall(NR.userfaultfd, os.O_CLOEXEC | UFFD_USER_MODE_ONLY)
    os.close(fd)
    return "userfaultfd"


def probe_uffd_wp() -> str:
    """Dirty tracking as pre-dump does it (uffdwp.py), on 4 pages of our
    own: registered, protected by a scan, one page written, scanned again."""
    import mmap

    from . import uffdwp

    fd = syscall(NR.userfaultfd, os.O_CLOEXEC | uffdwp.UFFD_USER_MODE_ONLY)
    area = mmap.mmap(-1, 4 * PAGE_SIZE)
    anchor = ctypes.c_char.from_buffer(area)
    try:
        start = ctypes.addressof(anchor)
        area[:] = b"\1" * len(area)
        uffdwp.enable_wp_async(fd)
        uffdwp.register_wp(fd, start, start + len(area))
        with open("/proc/self/pagemap", "rb", buffering=0) as pagemap:
            uffdwp.written_ranges(pagemap.fileno(), start, start + len(area), protect=True)
            area[2 * PAGE_SIZE] = 2
            found = uffdwp.written_ranges(pagemap.fileno(), start, start + len(area), protect=True)
        if found != [(start + 2 * PAGE_SIZE, start + 3 * PAGE_SIZE)]:
            raise OSError(0, f"PAGEMAP_SCAN reported {found} written, expected page 2 of 4 alone")
    finally:
        del anchor
        area.close()
        os.close(fd)
    return "userfaultfd WP_ASYNC + PAGEMAP_SCAN"


def probe_dirty_tracking() -> Result:
    """Which dirty tracking pre-dump uses here; the content-hash fallback is
    no missing feature, so this result is ok either way."""
    from .uffdwp import has_soft_dirty

    soft = "soft-dirty bits: " + ("present (not used)" if has_soft_dirty() else "not in this kernel")
    try:
        how = probe_uffd_wp()
    except OSError as err:
        return Result("dirty_tracking", True, f"content hashes (uffd-wp async missing: {err.strerror or err}); {soft}")
    return Result("dirty_tracking", True, f"uffd-wp ({how}); {soft}")


def probe_lazy_pages() -> str:
    """userfaultfd as restore --lazy-pages uses it (uffd.py): MISSING mode
    with the fork, remap, remove and unmap events, made without
    UFFD_USER_MODE_ONLY (the kernel's own accesses to a missing page, of
    the restorer's injected calls and process_vm_writev, must wait for the
    server too), one private anonymous page of ours filled by UFFDIO_COPY."""
    from . import mapping, uffd

    fd = syscall(NR.userfaultfd, os.O_CLOEXEC | os.O_NONBLOCK)
    start = mapping.libc.mmap(None, PAGE_SIZE, mapping.PROT_RW, mapping.MAP_PRIVATE | mapping.MAP_ANONYMOUS, -1, 0)
    src = ctypes.create_string_buffer(b"\7" * PAGE_SIZE)
    try:
        if start == mapping.MAP_FAILED:
            raise OSError(ctypes.get_errno(), "mmap")
        uffd.enable(fd)
        uffd.register_missing(fd, start, start + PAGE_SIZE)
        got = uffd.copy(fd, start, ctypes.addressof(src), PAGE_SIZE)
        if got != PAGE_SIZE:  # never touch the page then: the fault would wait for us
            raise OSError(-got, f"UFFDIO_COPY into a registered page: {os.strerror(-got) if got < 0 else got}")
        if ctypes.string_at(start, 1) != b"\7":
            raise OSError(0, "UFFDIO_COPY did not fill the registered page")
    finally:
        os.close(fd)
        if start != mapping.MAP_FAILED:
            mapping.unmap(start, PAGE_SIZE)
    return "userfaultfd MISSING + EVENT_FORK/REMAP/REMOVE/UNMAP, UFFDIO_COPY"


def probe_lazy_pages_result() -> Result:
    """restore --lazy-pages is optional: ok either way, saying which."""
    try:
        return Result("lazy_pages", True, probe_lazy_pages())
    except OSError as err:
        return Result("lazy_pages", True, f"not available (restore --lazy-pages refused): {err.strerror or err}")


def probe_sock_diag() -> str:
    from . import sockdiag

    a, b = socket.socketpair()
    try:
        found = sockdiag.unix_sockets().get(os.fstat(a.fileno()).st_ino)
        if found is None or found.peer != os.fstat(b.fileno()).st_ino:
            raise OSError(0, "sock_diag does not show a socket pair's peer")
    finally:
        a.close()
        b.close()
    return "sock_diag unix sockets with peers"


def probe_checkpoint_restore_knobs() -> str:
    """shm_next_id (SysV segments with their ids) and the timerfd ticks
    ioctl come with CONFIG_CHECKPOINT_RESTORE."""
    if not os.path.exists("/proc/sys/kernel/shm_next_id"):
        raise OSError(0, "no /proc/sys/kernel/shm_next_id (CONFIG_CHECKPOINT_RESTORE)")
    from . import anonfd

    fd = anonfd.make_timerfd(1, True, 10**12, 0, 3)
    try:
        if int.from_bytes(os.read(fd, 8), "little") != 3:
            raise OSError(0, "TFD_IOC_SET_TICKS did not set the ticks")
    finally:
        os.close(fd)
    return "shm_next_id, TFD_IOC_SET_TICKS"


def run_checks() -> list[Result]:
    with _sleeper() as pid:
        return [
            _probe("ptrace", lambda: probe_ptrace(pid)),
            _probe("process_vm_rw", lambda: probe_vm_rw(pid)),
            _probe("clone3_set_tid", probe_clone3_set_tid),
            _probe("prctl_mm_map", probe_mm_map),
            _probe("rseq_config", lambda: probe_rseq(pid)),
            _probe("pidfd_getfd", lambda: probe_pidfd_getfd(pid)),
            _probe("userfaultfd", probe_userfaultfd),
            _probe("sock_diag", probe_sock_diag),
            _probe("checkpoint_restore_knobs", probe_checkpoint_restore_knobs),
            probe_dirty_tracking(),
            probe_lazy_pages_result(),
        ]
