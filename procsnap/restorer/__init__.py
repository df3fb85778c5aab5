"""restore(): validate -> prepare files -> spawn -> rebuild memory ->
per-task state -> registers -> run.

Nothing touches a process before the whole image has been validated and
every file it needs is open. From the spawn on, any failure kills and
reaps the half-built child: no half-restored process remains, and the
image is only ever read.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal

from .. import faults
from ..errors import ProcsnapError, RestoreError, translated
from ..image.reader import Image, PageSource, open_image
from ..kernel import infect, proc, ptrace
from . import memory as M
from . import task as T
from .files import prepare_files
from .spawn import Child, spawn, wait_pid_free
from .verify import check_restorable

log = logging.getLogger("procsnap.restorer")


def restore(images_dir: str, detach: bool = True, shell_job: bool = False, progress=None,
            allow_other_owner: bool = False, allow_setuid: bool = False) -> int:
    """Bring the process in `images_dir` back; returns its pid.

    The restored process is a child of the caller, running. `detach` is
    accepted for the API's symmetry with the CLI, where -d decides whether
    the restorer waits; waiting is the caller's business.
    """
    image = open_image(images_dir)
    check_restorable(image, allow_other_owner, allow_setuid)
    ckpt = image.checkpoint
    pid = ckpt.task.pid
    with contextlib.ExitStack() as stack:
        files = prepare_files(image, shell_job)
        stack.callback(files.close)
        pages = PageSource(image)
        stack.callback(pages.close)
        with translated(pid, "spawn", RestoreError):
            for th in ckpt.threads:
                wait_pid_free(th.tid)
            child = spawn(ckpt.task, files)
        log.info("pid %d: spawned", pid)
        try:
            faults.point("after-spawn")
            with translated(pid, "restore", RestoreError):
                rebuild(child, image, pages, progress)
        except BaseException:
            kill_child(child)
            raise
        os.close(child.sync_w)
    log.info("pid %d: running", pid)
    return pid


def kill_child(child: Child) -> None:
    tids = []
    with contextlib.suppress(OSError):
        tids = proc.list_tids(child.pid)[1:]
    with contextlib.suppress(OSError):
        os.kill(child.pid, signal.SIGKILL)
    for tid in tids:  # threads made by the rebuild are traced by us: reaped by us
        with contextlib.suppress(ChildProcessError):
            os.waitpid(tid, ptrace.WALL)
    with contextlib.suppress(OSError):
        os.close(child.sync_w)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(child.pid, 0)


def rebuild(child: Child, image: Image, pages: PageSource, progress=None) -> None:
    ckpt = image.checkpoint
    pid = child.pid
    # EXITKILL: the half-built process dies with the restorer, until detach
    # TRACECLONE: the threads it is made to create are stopped at birth
    ptrace.freeze(pid, options=ptrace.PTRACE_O_EXITKILL | ptrace.PTRACE_O_TRACECLONE)
    maps = proc.read_smaps(pid)
    busy = [(m.start, m.end) for m in maps] + [(v.start, v.end) for v in ckpt.vmas]
    helper = child.helper_fds
    map_fds = {int(name[3:]): fd for name, fd in helper.items() if name.startswith("map")}
    with infect.infected(pid, maps, busy, put_back=False) as target:
        T.unregister_rseq_seized(target)
        M.unmap_seized(target, maps)
        M.restore_mm_seized(target, ckpt.mm, map_fds[ckpt.mm.exe_file_id])
        M.move_vdso_seized(target, maps, ckpt.vmas)
        M.map_vmas_seized(target, ckpt.vmas, ckpt.pages, pages, map_fds, progress)
        T.restore_signals_seized(target, ckpt.sigactions, ckpt.pending)
        T.restore_task_seized(target, ckpt.task)
        T.create_threads_seized(target, ckpt.threads)
        for name, fd in helper.items():
            if name.startswith("map") or name == "sync":
                target.call(infect.NR.close, fd)
        target.call(infect.NR.prctl, T.PR_SET_PDEATHSIG, 0)  # the child's safety net, see spawn
    faults.point("before-registers")
    T.resume(pid, ckpt.task, ckpt.threads)


__all__ = ["restore", "ProcsnapError"]
