"""A copy-on-write snapshot of the frozen target, for --leave-running.

While the target is frozen, an injected clone() (fork semantics, exit
signal 0 so the target is never told) makes a child that shares all of
its private memory copy-on-write. The child is auto-attached to us with
PTRACE_O_TRACECLONE and stays stopped: it never runs a single instruction
of its own. The target is thawed at once and the pages are read from the
child at leisure; whatever the target writes meanwhile is copied by the
kernel and does not reach the image.

What fork does not copy is read while the target is still frozen:
MADV_DONTFORK and MADV_WIPEONFORK areas, and shared anonymous memory
(shared, not copied, so the target could change it under us).

Costs: one pid for the life of the dump, and the memory of every page the
target writes meanwhile (it is copied). The snapshot is killed at the end;
its zombie belongs to the target, so the target is frozen once more for
about a millisecond to reap it with wait4(__WALL).
"""

from __future__ import annotations

import contextlib
from .. import log as logging  # the logging API, cheap to import
import os
import signal

from .. import model
from ..kernel import infect, proc, ptrace
from ..kernel.arch.x86_64 import NR
from ..kernel.proc import MapsEntry

log = logging.getLogger("procsnap.dumper")
CLONE_FORK_NO_SIGNAL = 0  # clone flags: share nothing, exit signal 0


def read_while_frozen(vma: model.Vma) -> bool:
    """Areas whose pages a fork'ed snapshot would not have as they are now."""
    return vma.kind == model.VmaKind.SHARED_ANON or bool(
        vma.advice & (model.Advice.DONTFORK | model.Advice.WIPEONFORK))


@contextlib.contextmanager
def cow_snapshot(task, maps: list[MapsEntry]):
    """Yields the pid of a stopped COW copy of the frozen task, or None when
    the kernel refuses the clone (e.g. RLIMIT_NPROC): then the caller dumps
    with the target frozen throughout."""
    pid = task.pid
    child = None
    ptrace.set_options(pid, ptrace.PTRACE_O_TRACECLONE | ptrace.PTRACE_O_TRACESYSGOOD | ptrace.suspend_seccomp())
    try:
        with infect.infected(pid, maps, scratch_area=False) as target:
            try:
                target.call(NR.clone, CLONE_FORK_NO_SIGNAL, 0, 0, 0, 0)
            except OSError as err:
                log.warning("pid %d: no copy-on-write snapshot (%s); staying frozen for the dump", pid, err)
            if target.call.clones:
                child = target.call.clones[-1]
    finally:
        ptrace.set_options(pid, ptrace.PTRACE_O_TRACESYSGOOD | ptrace.suspend_seccomp())
    try:
        if child is not None:
            ptrace.wait_stop(child)
            # The snapshot must never run: if procsnap dies, it dies too.
            # (EXITKILL is for the snapshot only, never for the target.)
            ptrace.set_options(child, ptrace.PTRACE_O_EXITKILL | ptrace.PTRACE_O_TRACESYSGOOD)
        yield child
    finally:
        if child is not None:
            release(task, child, maps)


def release(task, child: int, maps: list[MapsEntry]) -> None:
    """Kill the snapshot and have the target reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(child, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        while True:  # as its tracer we see it die; then its zombie passes to the target
            _, status = os.waitpid(child, ptrace.WALL)
            if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                break
    try:
        if not task.attached:
            ptrace.freeze(task.pid)
        try:
            # maps read again: thawed, the target may have changed them (an exec); with the
            # VmFlags of the dump's read when the layout is the same: smaps, read while
            # frozen again, walks every page (about 45 ms more stopped at 4 GiB)
            with infect.infected(task.pid, proc.read_maps(task.pid, maps), scratch_area=False) as target:
                target.call(NR.wait4, child, 0, ptrace.WALL, 0, check=False)
        finally:
            if not task.attached:
                ptrace.detach(task.pid)
    except ProcessLookupError:
        pass  # the target exited meanwhile; its children went to its reaper
    except OSError as err:  # never fails the dump (the image may be complete): the zombie stays
        log.warning("pid %d: could not reap its snapshot %d (%s); it stays a zombie child of it",
                    task.pid, child, err)
