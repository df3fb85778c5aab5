"""dump(): freeze -> collect -> write -> thaw or kill.

Each stage is acquired in an ExitStack, so a failure anywhere unwinds
everything before it: the partial image is removed, the task's registers
and signal mask are put back, and it is detached and running again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal

from .. import model
from ..errors import ProcessGone, ProcsnapError, translated
from ..image.writer import ImageWriter
from ..kernel import infect, proc, ptrace
from . import collect as C
from .pages import write_ghosts_seized, write_pages_seized

log = logging.getLogger("procsnap.dumper")


def dump(pid: int, images_dir: str, leave_running: bool = False, shell_job: bool = False,
         progress=None) -> model.Checkpoint:
    """Checkpoint process `pid` into the existing directory `images_dir`.

    The target is killed once the image is complete, unless leave_running.
    On any error the target runs on as before and no image is left.
    """
    st, status = read_target(pid)
    with contextlib.ExitStack() as stack:
        with translated(pid, "freeze"):
            C.check_supported(pid, st, status)
            task = stack.enter_context(frozen(pid))
        log.info("pid %d: frozen", pid)
        with translated(pid, "collect"):
            ckpt, runs, ghost_fds = collect_seized(pid, shell_job)
        log.info("pid %d: collected %d VMAs, %d fds, %d page runs", pid, len(ckpt.vmas), len(ckpt.fds), len(runs))
        with translated(pid, f"write {images_dir}"):
            writer = stack.enter_context(image_writer(images_dir))
            write_pages_seized(pid, runs, writer.pages, progress)
            write_ghosts_seized(pid, ghost_fds, writer, ckpt)
            writer.commit(ckpt)
        log.info("pid %d: image written to %s", pid, images_dir)
        if not leave_running:
            with translated(pid, "kill"):
                task.kill()
            log.info("pid %d: killed", pid)
    return ckpt


def read_target(pid: int) -> tuple[proc.Stat, dict[str, str]]:
    if pid == os.getpid():
        raise ProcsnapError(f"pid {pid}: is procsnap itself", pid)
    with translated(pid, f"read /proc/{pid}"):
        try:
            return proc.read_stat(pid), proc.read_status(pid)
        except FileNotFoundError as err:
            raise ProcessGone(f"pid {pid}: no such process", pid) from err


class FrozenTask:
    def __init__(self, pid: int):
        self.pid = pid
        self.killed = False

    def kill(self) -> None:
        """SIGKILL the frozen task and wait until it is dead (not reaped:
        that stays its parent's job, even when the parent is us)."""
        os.kill(self.pid, signal.SIGKILL)
        self.killed = True
        os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOWAIT | ptrace.WALL)


@contextlib.contextmanager
def frozen(pid: int):
    ptrace.freeze(pid)
    task = FrozenTask(pid)
    try:
        yield task
    finally:
        if not task.killed:
            with translated(pid, "thaw"):
                ptrace.detach(pid)


@contextlib.contextmanager
def image_writer(images_dir: str):
    if not os.path.isdir(images_dir):
        raise FileNotFoundError(2, f"{images_dir}: no such directory")
    writer = ImageWriter(images_dir)
    try:
        yield writer
    except BaseException:
        writer.abort()
        raise


def collect_seized(pid: int, shell_job: bool):
    """Everything but the page data: (checkpoint, page runs, ghost fds)."""
    files = C.FileTable()
    maps = proc.read_smaps(pid)
    st = proc.read_stat(pid)
    status = proc.read_status(pid)
    vmas = C.collect_vmas(pid, maps, files)
    regs = ptrace.get_regs(pid)
    sigmask = ptrace.get_sigmask(pid)
    ghosts: list = []
    fds = C.collect_fds(pid, files, ghosts, shell_job)
    pending = C.collect_pending(pid)
    with infect.infected(pid, maps) as target:
        C.check_itimers_seized(target)
        mm = C.collect_mm_seized(pid, st, target, files)
        task = C.collect_task_seized(pid, st, status, target, regs, sigmask)
        sigactions = C.collect_sigactions_seized(target)
    runs = C.collect_page_runs(pid, vmas)
    ckpt = model.Checkpoint(task=task, mm=mm, vmas=vmas, pages=[], sigactions=sigactions, pending=pending,
                            files=files.refs, fds=fds, ghosts=[g for g, _ in ghosts])
    return ckpt, runs, ghosts
