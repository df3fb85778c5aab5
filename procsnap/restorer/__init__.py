"""restore(): validate -> prepare files -> spawn -> rebuild memory ->
per-task state -> registers -> run.

Nothing touches a process before the whole image has been validated and
every file it needs is open. From the spawn on, any failure kills and
reaps the half-built child: no half-restored process remains, and the
image is only ever read.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import logging
import os
import signal
import threading

from .. import faults, objects
from ..errors import ProcsnapError, RestoreError, plural, translated
from ..image import schema
from ..image.reader import Image, PageSource, open_image
from ..kernel import infect, proc, ptrace
from ..kernel.arch.x86_64 import PAGE_SIZE
from . import memory as M
from . import task as T
from ..objects.cgroups import restore_cgroups
from .files import SharedFiles, map_key, prepare_files
from .spawn import Child, Node, spawn, wait_pid_free, wait_stopped
from .tree import open_tree
from .verify import check_restorable

log = logging.getLogger("procsnap.restorer")


def restore(images_dir: str, detach: bool = True, shell_job: bool = False, progress=None,
            allow_other_owner: bool = False, allow_setuid: bool = False) -> int:
    """Bring the process tree in `images_dir` back; returns the root's pid.

    The restored root is a child of the caller, running. `detach` is
    accepted for the API's symmetry with the CLI, where -d decides whether
    the restorer waits; waiting is the caller's business.
    """
    root_image = open_image(images_dir, progress=progress and functools.partial(progress, "check pages"))
    tree = open_tree(root_image, progress)
    for _, image in tree:
        if image is not None:
            check_restorable(image, allow_other_owner, allow_setuid)
            objects.check_task_state(image.checkpoint)
    pid = root_image.checkpoint.task.pid
    with contextlib.ExitStack() as stack:
        shared = SharedFiles(root_image)
        stack.callback(shared.close)
        succeeded = [False]
        stack.callback(lambda: shared.finish(succeeded[0]))
        nodes: dict[int, Node] = {}
        images: dict[int, Image] = {}
        for proc_entry, image in tree:
            files = None
            if image is not None:
                images[proc_entry.pid] = image
                with translated(proc_entry.pid, "prepare files", RestoreError):
                    files = prepare_files(image, shell_job, shared)
                stack.callback(files.close)
            node = Node(proc_entry, image.checkpoint.task if image else None, files)
            nodes[proc_entry.pid] = node
            if proc_entry.ppid:
                node.parent = nodes[proc_entry.ppid]
                node.parent.children.append(node)
        shared.end_prepare()
        with translated(pid, "spawn", RestoreError):
            for image in images.values():
                for th in image.checkpoint.threads:
                    wait_pid_free(th.tid)
            children = spawn(nodes[pid])
        log.info("pid %d: spawned %s", pid, plural(len(children), "process"))
        try:
            faults.point("after-spawn")
            for p, image in tree:  # before any memory is mapped: it is charged where it is made
                if image is not None:
                    with translated(p.pid, "restore cgroups", RestoreError):
                        restore_cgroups(p.pid, image.checkpoint.cgroups)
            sources = {}  # every image's pages: a process may map pages another one stored
            for proc_entry, image in tree:
                if image is not None:
                    sources[proc_entry.dir] = stack.enter_context(page_source(image))
            live = [(p, image) for p, image in tree if image is not None]
            filled = Progress(progress, "fill memory", sum(_fill_bytes(image.checkpoint) for _, image in live))
            tree_pids = {p.pid for p, _ in live}
            rebuild_all(live, lambda p, image: rebuild(children[p.pid], image, sources[p.dir], filled.add,
                                                        sources, tree_pids), shared.ready)
        except BaseException:
            kill_children(children, pid)
            raise
        for child in children.values():
            os.close(child.sync_w)
        succeeded[0] = True
    log.info("pid %d: running", pid)
    return pid


class Progress:
    """One phase's bytes, summed over the processes of the tree (from any
    thread), reported as progress(phase, done, total)."""

    def __init__(self, report, phase: str, total: int):
        self.report, self.phase, self.total, self.done = report, phase, total, 0
        self.lock = threading.Lock()

    def add(self, nbytes: int) -> None:
        if self.report:
            with self.lock:
                self.done += nbytes
                self.report(self.phase, self.done, self.total)


def _fill_bytes(ckpt) -> int:
    """What map_vmas_seized writes into a process: its pages and those it maps from another image."""
    own = sum(r.npages for r in ckpt.pages)
    return (own + sum(n for refs in ckpt.page_refs for _, n, _, _ in schema.unpack_page_refs(refs))) * PAGE_SIZE


REBUILDERS = 2  # threads rebuilding processes at once: each waits on its tracees most of the time


def rebuild_all(live: list, rebuild_one, ready=lambda: None) -> None:
    """Rebuild every process, REBUILDERS at a time, then give every one its
    registers, and release them all only once all are ready (and ready()
    has run, in one of the threads: the kinds' last word on what the tree
    shares, such as seals added after every mapping). A process is
    rebuilt, loaded and released by one thread: ptrace requests must come
    from the thread that seized the tracee (which is also the one whose exit
    kills it, PTRACE_O_EXITKILL, if the restore fails)."""
    shares = [live[i::REBUILDERS] for i in range(REBUILDERS)] if len(live) > 1 else [live]
    barrier = threading.Barrier(len(shares), action=ready)  # an error in ready() is raised in its thread
    failed = threading.Event()

    def work(share) -> None:
        try:
            for p, image in share:
                if failed.is_set():
                    return
                with translated(p.pid, "restore", RestoreError):
                    rebuild_one(p, image)
            faults.point("before-registers")
            for p, image in share:
                with translated(p.pid, "restore", RestoreError):
                    T.load_registers(p.pid, image.checkpoint.task, image.checkpoint.threads)
        except BaseException:
            failed.set()
            barrier.abort()
            raise
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            return  # another one failed: its error is the one reported
        faults.point("before-detach")
        for p, image in reversed(share):  # children first: all are ready
            with translated(p.pid, "restore", RestoreError):
                T.release(p.pid, image.checkpoint.threads)
        for p, image in share:  # back in their group-stop before the restore returns
            if image.checkpoint.task.stopped_by:
                with translated(p.pid, "restore", RestoreError):
                    wait_stopped(p.pid, [th.tid for th in image.checkpoint.threads])

    if len(shares) == 1:
        work(shares[0])
        return
    with concurrent.futures.ThreadPoolExecutor(len(shares), thread_name_prefix="procsnap-rebuild") as pool:
        futures = [pool.submit(work, share) for share in shares]
        errors = [f.exception() for f in futures]
    for err in errors:
        if err is not None:
            raise err


def kill_children(children: dict[int, Child], root: int) -> None:
    """Kill every process of a half-restored tree; reap what is ours to reap."""
    for child in children.values():
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
    for child in children.values():
        if child.pid != root:  # traced by us: reaped as their tracer, then their parent's
            with contextlib.suppress(ChildProcessError):
                os.waitpid(child.pid, ptrace.WALL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(root, 0)
    for child in children.values():  # if we are a subreaper, the root's orphans are ours now
        if child.pid != root:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(child.pid, 0)


@contextlib.contextmanager
def page_source(image: Image):
    pages = PageSource(image)
    try:
        yield pages
    finally:
        pages.close()


def _page_refs(ckpt, sources: dict[str, PageSource]) -> list[tuple[int, int, int, int]]:
    out = []
    for refs in ckpt.page_refs:
        for vaddr, npages, src, offset in schema.unpack_page_refs(refs):
            out.append((vaddr, npages, sources[refs.sources[src]].base + offset, src))
    return out


def rebuild(child: Child, image: Image, pages: PageSource, filled=None,
            sources: dict[str, PageSource] | None = None, tree_pids: set[int] = frozenset()) -> None:
    """filled(nbytes): told of every batch of pages written."""
    ckpt = image.checkpoint
    pid = child.pid
    shm_fds = {int(name[3:]): fd for name, fd in child.helper_fds.items() if name.startswith("shm")}
    # EXITKILL: the half-built process dies with the restorer, until detach
    # TRACECLONE: the threads it is made to create are stopped at birth
    if ckpt.task.stopped_by:
        wait_stopped(pid)
    ptrace.freeze(pid, options=ptrace.PTRACE_O_EXITKILL | ptrace.PTRACE_O_TRACECLONE)
    maps = proc.read_smaps(pid)
    busy = [(m.start, m.end) for m in maps] + [(v.start, v.end) for v in ckpt.vmas]
    helper = child.helper_fds
    map_fds = {name[3:]: fd for name, fd in helper.items() if name.startswith("map")}
    with infect.infected(pid, maps, busy, put_back=False) as target:
        T.unregister_rseq_seized(target)
        M.unmap_seized(target, maps)
        M.restore_mm_seized(target, ckpt.mm, map_fds[map_key(ckpt.mm.exe_file_id, os.O_RDONLY)])
        M.move_vdso_seized(target, maps, ckpt.vmas)
        M.map_vmas_seized(target, ckpt.vmas, ckpt.pages, pages, map_fds, filled, shm_fds,
                          _page_refs(ckpt, sources or {}), child.sysv_ids)
        T.restore_signals_seized(target, ckpt.sigactions, ckpt.pending)
        T.restore_task_seized(target, ckpt.task)
        T.create_threads_seized(target, ckpt.threads)
        objects.restore_task_state_seized(target, ckpt, tree_pids)
        for name, fd in helper.items():
            if name.startswith(("map", "shm")) or name == "sync":
                target.call(infect.NR.close, fd)
        # the child's safety net (see spawn) gives way to its own setting
        target.call(infect.NR.prctl, T.PR_SET_PDEATHSIG, ckpt.task.pdeathsig)


__all__ = ["restore", "ProcsnapError"]
