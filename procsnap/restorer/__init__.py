"""restore(): validate -> prepare files -> spawn -> rebuild memory ->
per-task state -> registers -> run.

Nothing touches a process before the whole image has been validated and
every file it needs is open. From the spawn on, any failure kills and
reaps the half-built child: no half-restored process remains, and the
image is only ever read.
"""

from __future__ import annotations

import contextlib
from .. import records as dataclasses  # the dataclasses API, cheap to import
import functools
from .. import log as logging  # the logging API, cheap to import
import os
import signal
import threading
import typing

from .. import externals, faults, inheritfd, model, nsworker, objects, workers
from ..errors import ProcsnapError, RestoreError, plural, translated
from ..image import schema
from ..image.reader import Image, PageSource, open_image, open_pages
from ..kernel import infect, proc, ptrace
from ..kernel.arch.x86_64 import PAGE_SIZE
from . import memory as M
from . import task as T
from ..objects.cgroups import restore_cgroups
from ..objects import namespaces as NS
from ..objects import netns
from .files import SharedFiles, map_key, prepare_files
from .forkbuild import (child_target, finish_seized, fork_built, fork_child_seized, helper_numbers, make_zombie_seized,
                        setup_seized)
from .inherit import kept_vmas, restore_kept_seized
from .spawn import Child, Node, spawn, wait_pid_free, wait_stopped
from .tree import open_tree
from .verify import check_restorable

log = logging.getLogger("procsnap.restorer")


def restore(images_dir: str, detach: bool = True, shell_job: bool = False, progress=None,
            allow_other_owner: bool = False, allow_setuid: bool = False, ext_unix_sk: bool = False,
            key: bytes | None = None, tcp_established: bool = False, tcp_close: bool = False,
            skip_net_lock: bool = False, lazy_pages: bool = False, lazy_log: str | None = None,
            lazy_server=None, before_release=None, checked: bool = False, external: dict | None = None,
            root: str | None = None, inherit_fd: dict[str, int] | None = None) -> int:
    """Bring the process tree in `images_dir` back; returns the root's pid.

    The restored root is a child of the caller, running. `detach` is
    accepted for the API's symmetry with the CLI, where -d decides whether
    the restorer waits; waiting is the caller's business. ext_unix_sk: unix
    sockets dumped connected outside the tree are connected again by name.
    key: an encrypted image's (image/sealing.py). Live TCP connections
    are restored with tcp_established, restored closed with tcp_close; the
    dump's network lock is removed after success, unless skip_net_lock.
    lazy_pages: private anonymous memory is left to a lazy-pages server
    (restorer/lazy.py) that outlives the restore, logging to lazy_log;
    lazy_server(pid) is told its pid.
    before_release(): called once every process is rebuilt and ready, before
    any runs (a migration's last word with its source); raising, it fails
    the restore as any stage does. checked: the page data was checked whole
    moments ago (a migration's receiver did): not read again here.
    root: a container's root directory, given again (it had pivoted into
    it; objects/mountns.py).
    inherit_fd: resource -> an fd of the caller's, used for every fd of the
    tree that held that resource (restore --inherit-fd, inheritfd.py).
    """
    externals.check_used(external, ("mnt", "veth"))  # the kinds the restore reads (externals.py)
    root_image = open_image(images_dir, not checked, progress=progress and functools.partial(progress, "check pages"),
                            key=key)
    tree = open_tree(root_image, progress, verify_pages=not checked)
    pid = root_image.checkpoint.task.pid
    if lazy_pages and root_image.checkpoint.namespaces:
        raise RestoreError(f"{images_dir}: --lazy-pages: not supported for a container's image (pid {pid} "
                           "is the init of its own pid namespace)", pid)
    # a container's mount namespace, made first: the tree's files are looked up in it (objects/mountns.py)
    mounts = NS.make_mounts(root_image.checkpoint, root_image, (external or {}).get("mnt", {}), root)
    try:
        for proc_entry, image in tree:
            if image is not None:
                check_restorable(image, allow_other_owner, allow_setuid,
                                 root_image.checkpoint.task if proc_entry.ppid else None, set(inherit_fd or ()))
                objects.check_task_state(image.checkpoint)
        inheritfd.check(tree, inherit_fd)
    except BaseException:
        if mounts is not None:
            mounts.close()
        raise
    if lazy_pages:
        from . import lazy as L

        L.check_lazy(tree, lambda image: image.codec is not None)
    with contextlib.ExitStack() as stack:
        if mounts is not None:
            stack.callback(mounts.close)
        stack.callback(M.close_fill_pool)
        NS.enter_ipc(root_image.checkpoint, stack, root_image)  # a container's: its IPC objects are made in it
        netns.enter_net(root_image.checkpoint, stack, (external or {}).get("veth", {}))  # and its sockets in this
        succeeded = [False]
        lazy = None
        if lazy_pages:
            lazy = L.Client(root_image, lazy_log)
            stack.callback(lambda: lazy.end(succeeded[0]))
            if lazy_server:
                lazy_server(lazy.pid)
        shared = SharedFiles(root_image, ext_unix_sk=ext_unix_sk, tcp_established=tcp_established,
                             tcp_close=tcp_close, skip_net_lock=skip_net_lock)
        stack.callback(shared.close)
        shared.inherit = inherit_fd or {}
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
        forked = fork_built(nodes[pid], images)
        if forked:
            log.info("pid %d: %s forked from their parents: %s", pid, plural(len(forked), "process"),
                     " ".join(map(str, sorted(forked))))
        container = NS.prepare_root(nodes[pid], root_image.checkpoint, mounts)
        with translated(pid, "spawn", RestoreError):
            for image in images.values() if not container else ():  # in a new pid namespace, every pid is free
                for th in image.checkpoint.threads:
                    wait_pid_free(th.tid)
            children = spawn(nodes[pid])
        log.info("pid %d: spawned %s", pid, plural(len(children), "process"))
        rebuild_tree = functools.partial(_rebuild_tree, tree, root_image, nodes, images, children, forked, shared,
                                         stack, progress, lazy, before_release)
        if not container:
            rebuild_tree()
        else:  # from inside its pid namespace, where the image's pids are the pids (nsworker.py)
            host = children[pid].host_pid
            log.info("pid %d: the init of a new pid namespace, pid %d here", pid, host)
            try:
                ids = NS.tree_ids(tree)
                nsworker.run_inside(host, rebuild_tree, avoid=ids,
                                    last_pid=root_image.checkpoint.namespaces[0].last_pid or max(ids),
                                    setup=mounts.mount_proc if mounts is not None else None)
            except BaseException:  # the init from outside, and the namespace with it (never its pids here)
                kill_children({pid: dataclasses.replace(children[pid], pid=host)}, host)
                for other, child in children.items():
                    if other != pid and child.sync_w >= 0:
                        os.close(child.sync_w)
                raise
            pid = host
        for child in children.values():
            if child.sync_w >= 0:
                os.close(child.sync_w)
        succeeded[0] = True
    log.info("pid %d: running", pid)
    return pid


def _rebuild_tree(tree, root_image: Image, nodes: dict[int, Node], images: dict[int, Image],
                  children: dict[int, Child], forked: set[int], shared: SharedFiles, stack: contextlib.ExitStack,
                  progress, lazy=None, before_release=None) -> None:
    """Every spawned process rebuilt and released, or all of them killed."""
    pid = root_image.checkpoint.task.pid
    try:
        faults.point("after-spawn")
        for p, image in tree:  # before any memory is mapped: it is charged where it is made
            if image is not None and p.pid not in forked:  # (those: once forked)
                with translated(p.pid, "restore cgroups", RestoreError):
                    restore_cgroups(p.pid, image.checkpoint.cgroups)
        sources = {}  # every image's pages: a process may map pages another one stored
        for proc_entry, image in tree:
            if image is not None:
                sources[proc_entry.dir] = stack.enter_context(page_source(image))
        for name, parent in root_image.parents.items():  # a series' parents (image/series.py)
            sources[name] = stack.enter_context(page_source(parent))
        expect_pages(tree, sources)
        live = [(p, image) for p, image in tree if image is not None]
        filled = Progress(progress, "fill memory", sum(_fill_bytes(image.checkpoint) for _, image in live))
        ctx = Rebuild(sources, filled.add, {p.pid for p, _ in live}, nodes, images, children)
        rebuild_all(live, lambda p, image: p.pid in forked or rebuild(children[p.pid], image, sources[p.dir],
                                                                      filled.add, sources, ctx.tree_pids, ctx,
                                                                      lazy),
                    shared.ready if before_release is None else lambda: (shared.ready(), before_release()),
                    {p.pid: nodes[p.pid].parent.proc.pid for p, _ in live if p.pid in forked})
    except BaseException:
        if not nsworker.inside():  # else: killed from outside with the namespace's init (SIGKILL from inside
            kill_children(children, pid)  # does not reach it), its tracees with this worker (EXITKILL)
        raise


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


def rebuild_all(live: list, rebuild_one, ready=lambda: None, forked_from: dict[int, int] | None = None) -> None:
    """Rebuild every process, REBUILDERS at a time, then give every one its
    registers, and release them all only once all are ready (and ready()
    has run, in one of the threads: the kinds' last word on what the tree
    shares, such as seals added after every mapping). A process is
    rebuilt, loaded and released by one thread: ptrace requests must come
    from the thread that seized the tracee (which is also the one whose exit
    kills it, PTRACE_O_EXITKILL, if the restore fails), or made it: a
    fork-built process (forked_from: pid -> parent) goes with its parent,
    whose rebuild makes it."""
    groups: dict[int, list] = {}
    for p, image in live:
        at = p.pid
        while forked_from and at in forked_from:
            at = forked_from[at]
        groups.setdefault(at, []).append((p, image))
    subtrees = list(groups.values())
    shares = [[x for g in subtrees[i::REBUILDERS] for x in g] for i in range(REBUILDERS)] \
        if len(subtrees) > 1 else [live]
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
    with workers.ThreadPool(len(shares), thread_name_prefix="procsnap-rebuild") as pool:
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


def expect_pages(tree, sources: dict) -> None:
    """Tell encoded page sources which of their pages will be written, so
    that each chunk is dropped once all its readers are done (chunks.py)."""
    for p, image in tree:
        if image is None:
            continue
        if sources[p.dir].transformed:
            for run in image.checkpoint.pages:
                sources[p.dir].expect(run.offset, run.npages * PAGE_SIZE)
        for refs in image.checkpoint.page_refs:
            for _, npages, src, offset in schema.unpack_page_refs(refs):
                if sources[refs.sources[src]].transformed:
                    sources[refs.sources[src]].expect(offset, npages * PAGE_SIZE)


@contextlib.contextmanager
def page_source(image: Image):
    pages = open_pages(image)
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


@dataclasses.dataclass
class Rebuild:
    """What the rebuild of one process needs of the whole tree's, to make
    its fork-built children (restorer/forkbuild.py) too."""

    sources: dict[str, PageSource]
    filled: typing.Callable[[int], None] | None
    tree_pids: set[int]
    nodes: dict[int, Node]
    images: dict[int, Image]
    children: dict[int, Child]  # fork-built ones are added as they are made, for kill_children


def _ref_sources(ckpt, sources: dict[str, PageSource]) -> dict[int, PageSource]:
    """The source index of each PREF run -> its PageSource."""
    return {i: sources[d] for refs in ckpt.page_refs for i, d in enumerate(refs.sources)}


def rebuild(child: Child, image: Image, pages: PageSource, filled=None,
            sources: dict[str, PageSource] | None = None, tree_pids: set[int] = frozenset(),
            ctx: Rebuild | None = None, lazy=None) -> None:
    """filled(nbytes): told of every batch of pages written; lazy: the
    lazy-pages Client that gets the private anonymous memory."""
    ckpt = image.checkpoint
    pid = child.pid
    # EXITKILL: the half-built process dies with the restorer, until detach
    # TRACECLONE: the threads it is made to create are stopped at birth
    if ckpt.task.stopped_by:
        wait_stopped(pid)
    # TRACEFORK: so are the children forked from it (forkbuild.py)
    ptrace.freeze(pid, options=ptrace.PTRACE_O_EXITKILL | ptrace.PTRACE_O_TRACECLONE | ptrace.PTRACE_O_TRACEFORK)
    maps = proc.read_layout(pid)  # the layout only: nothing here reads VmFlags
    busy = [(m.start, m.end) for m in maps] + [(v.start, v.end) for v in ckpt.vmas]
    with infect.infected(pid, maps, busy, put_back=False) as target:
        _rebuild_seized(target, child, image, pages, maps, filled, sources or {}, tree_pids, ctx, lazy=lazy)


def _rebuild_seized(target, child: Child, image: Image, pages: PageSource, maps, filled,
                    sources: dict[str, PageSource], tree_pids: set[int], ctx: Rebuild | None,
                    parent: tuple[model.Checkpoint, list] | None = None, lazy=None) -> None:
    """`parent`: (checkpoint, page segments) of the process a fork-built
    one was forked from, whose memory it holds."""
    ckpt = image.checkpoint
    helper = child.helper_fds
    shm_fds = {int(name[3:]): fd for name, fd in helper.items() if name.startswith("shm")}
    map_fds = {name[3:]: fd for name, fd in helper.items() if name.startswith("map")}
    refs = _page_refs(ckpt, sources)
    runs, lazy_ranges = ckpt.pages, []
    if lazy is not None:
        from .lazy import split_runs
        runs, _, lazy_ranges = split_runs(ckpt)
    inherited = kept_vmas(ckpt, parent[0], parent[1]) if parent is not None else {}
    mine = {v.start: v for v in ckpt.vmas}
    kept = {start: functools.partial(_restore_kept, target, mine[start], v, parent[1], filled)
            for start, v in inherited.items()}
    M.unmap_seized(target, maps, [(start, mine[start].end) for start in inherited], T.unregister_rseq_calls(target),
                   ckpt.mm, map_fds[map_key(ckpt.mm.exe_file_id, os.O_RDONLY)])
    M.move_vdso_seized(target, maps, ckpt.vmas)
    M.map_vmas_seized(target, ckpt.vmas, runs, pages, map_fds, filled, shm_fds, refs, child.sysv_ids, kept,
                      _ref_sources(ckpt, sources))
    if lazy is not None:  # before anything touches the memory left to it
        lazy.register_seized(target, lazy_ranges)
    if ctx is not None:
        segments = None  # made only for a fork-built child: a tuple per run, 20 MiB per GiB of half-zero memory
        for node in ctx.nodes[child.pid].children:
            if node.fork_built and node.proc.zombie:
                make_zombie_seized(target, node, lambda made: ctx.children.setdefault(made, Child(made, -1, {})))
            elif node.fork_built:
                if segments is None:
                    segments = M.page_segments(runs, pages, refs)
                _fork_and_rebuild(target, node, ckpt, segments, ctx)
    T.restore_signals_seized(target, ckpt.sigactions, ckpt.pending)
    T.restore_task_seized(target, ckpt.task)
    T.create_threads_seized(target, ckpt.threads)
    objects.restore_task_state_seized(target, ckpt, tree_pids)
    # the child's safety net (see spawn) gives way to its own setting
    target.batch([(infect.NR.close, fd) for name, fd in helper.items() if name.startswith(("map", "shm")) or name == "sync"]
                 + [(infect.NR.prctl, T.PR_SET_PDEATHSIG, ckpt.task.pdeathsig)])


def _restore_kept(target, v: model.Vma, inherited: model.Vma, theirs: list, filled, mine: list) -> None:
    written = restore_kept_seized(target, v, inherited, mine, theirs, filled)
    if filled:  # what the fork shared counts as filled
        filled(sum(seg[1] for seg in mine) * PAGE_SIZE - written)


def _fork_and_rebuild(parent, node: Node, parent_ckpt: model.Checkpoint, parent_segments: list,
                      ctx: Rebuild) -> None:
    """Fork `node` from `parent` (its memory rebuilt, nothing else yet),
    set it up and rebuild it, its own fork-built children included."""
    pid = node.proc.pid
    helpers = helper_numbers(node)
    child = Child(pid, -1, {name: want for name, (_, want) in helpers.items()}, node.files.sysv_ids)
    fork_child_seized(parent, pid, lambda made: ctx.children.setdefault(made, dataclasses.replace(child, pid=made)))
    faults.point("after-fork")
    image = ctx.images[pid]
    target = child_target(parent, pid)
    with translated(pid, "restore cgroups", RestoreError):
        restore_cgroups(pid, image.checkpoint.cgroups)
    setup_seized(target, node, helpers)
    maps = proc.read_layout(pid)  # the layout only: nothing here reads VmFlags
    target.busy = [(m.start, m.end) for m in maps] + [(v.start, v.end) for v in image.checkpoint.vmas]
    area = target.batch_area
    if area > 0 and any(v.start < area + infect.BATCH_AREA_SIZE and area < v.end for v in image.checkpoint.vmas):
        target.drop_batch_area()  # the parent's is where this one has a VMA: it makes its own
    _rebuild_seized(target, child, image, ctx.sources[node.proc.dir], maps, ctx.filled, ctx.sources,
                    ctx.tree_pids, ctx, (parent_ckpt, parent_segments))
    finish_seized(target, node)
    target.drop_batch_area()
    target.call(infect.NR.munmap, target.scratch, infect.SCRATCH_SIZE)  # the parent's, inherited


__all__ = ["restore", "ProcsnapError"]
