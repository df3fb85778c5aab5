"""dump(): freeze -> collect -> write -> thaw or kill.

Each stage is acquired in an ExitStack, so a failure anywhere unwinds
everything before it: the partial image is removed, the task's registers
and signal mask are put back, and it is detached and running again.
"""

from __future__ import annotations

import contextlib
from .. import records as dataclasses  # the dataclasses API, cheap to import
import functools
from .. import log as logging  # the logging API, cheap to import
import os
import signal
import time

from .. import externals, faults, model, nsworker, objects, workers
from ..errors import ProcessGone, ProcsnapError, Unsupported, plural, translated
from ..image.chunks import require_compress
from ..image.series import DedupSink, page_index
from ..image import objseries, objstore, remote
from ..image.staging import staged
from ..image.writer import ImageWriter
from ..kernel import infect, proc, ptrace
from ..objects.fown import check_owners
from ..objects.file import FileTable
from ..objects.netlock import DumpLock, default_method
from ..objects.namespaces import pid_namespace_init
from ..objects import mountns
from ..objects.protocol import Collect
from . import collect as C
from . import tree as T
from . import waits as W
from .pages import write_pages_seized
from .plan import PagePlan

log = logging.getLogger("procsnap.dumper")


@dataclasses.dataclass
class DumpStats:
    """What a dump measured about itself."""

    checkpoint: model.Checkpoint = dataclasses.field(repr=False)  # the root's: tens of KiB printed
    frozen_s: float = 0.0  # from the freeze to the thaw (or the kill)
    total_s: float = 0.0
    pages_bytes: int = 0
    snapshot: bool = False  # pages were read from a copy-on-write snapshot
    replaced: str | None = None  # what was in the directory before, e.g. "the image of pid 1234 taken ..."
    frozen_at: float = 0.0  # time.monotonic() of the freeze


def dump(pid: int, images_dir: str, leave_running: bool = False, shell_job: bool = False,
         progress=None, ext_unix_sk: bool = False, compress: bool = False, key: bytes | None = None,
         prev_images_dir: str | None = None, tls=None, tcp_established: bool = False,
         tcp_close: bool = False, net_lock: str = "", migration=None,
         external: dict | None = None) -> DumpStats:
    """Checkpoint process `pid` and all its descendants into the directory
    `images_dir`, made if missing (the root's image; each other process's
    image in a subdirectory of it, tree.IMAGE_DIR).

    One flow for one process and for a tree: freeze, collect, scan the
    pages (plan.py), write the records, snapshot (leave_running), write the
    pages, commit, kill or thaw. The tree is killed once the image is
    complete, unless leave_running: then it is frozen only while its small
    state is collected and a copy-on-write snapshot of each process's
    memory is taken (snapshot.py); the pages are read from the snapshots
    after the thaw.
    The image is written beside the one already in `images_dir` and
    swapped in only once complete (image/staging.py).
    ext_unix_sk: a unix datagram socket connected to a named one outside
    the tree is dumped (connected again by name at restore), as CRIU's.
    compress: pages in
    zstd chunks; key: the image encrypted with it (image/chunks.py, sealing.py).
    prev_images_dir (relative to images_dir, as CRIU's): the root's pages
    found in that image are referred to, not stored (image/series.py).
    images_dir: or `-` / tcp://HOST:PORT, a stream (image/stream.py; tls:
    its stream.Tls files): without leave_running the tree is killed only once the
    receiver has acknowledged the whole image.
    tcp_established: live TCP connections are dumped (objects/tcp.py),
    locked from the freeze on by net_lock ("nftables", "iptables", "skip";
    "": nftables where nft is found, objects/netlock.py); tcp_close: they
    are dumped to be restored closed.
    migration: the final image of a migration (migration.py): its
    staged(leave_running) on the migration's connection, and its `home`,
    the local directory the streamed image stands for in its series
    (prev_images_dir is relative to it; the series is on both sides).
    On any error every process runs on as before and the directory holds
    what it held before.
    """
    started = time.monotonic()
    externals.check_used(external, ("mnt",))  # the kinds the dump reads (externals.py)
    if pid_namespace_init(pid):  # a container's init: dumped from inside its pid namespace (objects/namespaces.py)
        with translated(pid, "enter its pid namespace"):
            return nsworker.run_inside(pid, functools.partial(
                dump, 1, images_dir, leave_running, shell_job, progress, ext_unix_sk, compress, key, prev_images_dir,
                tls, tcp_established, tcp_close, net_lock, external=external), enter=("uts", "ipc", "net"),
                setup=functools.partial(mountns.dump_setup, (external or {}).get("mnt", {})))
    if (external or {}).get("mnt") and not nsworker.inside():
        raise mountns.no_namespace(external["mnt"], f"pid {pid} is not a container's init: it has")
    if compress:
        require_compress()
    home = migration.home if migration is not None else images_dir  # where prev_images_dir is relative to
    chain = _final_chain(pid, home, prev_images_dir, key) if prev_images_dir else None
    parent_pages = _parent_index(home, prev_images_dir, key) if prev_images_dir and not chain else None
    dedup = None
    if progress:  # progress(phase, done, total), as restore reports it
        progress = functools.partial(progress, "write pages")
    st, status = read_target(pid)
    with translated(pid, f"read /proc/{pid}/smaps"):
        early_smaps = proc.read_smaps(pid)
    with contextlib.ExitStack() as stack:
        staging = stack.enter_context(migration.staged(leave_running) if migration is not None else
                                      _stream_staged(images_dir, tls, leave_running)
                                      if remote.is_stream_url(images_dir) else objstore.staged(images_dir)
                                      if objstore.is_url(images_dir) else staged(images_dir))
        if staging.replaces:
            log.info("%s: replacing %s", images_dir, staging.replaces)
        lock = stack.enter_context(DumpLock(pid, net_lock or default_method())) if tcp_established else None
        with translated(pid, "freeze"):
            C.check_supported(pid, st, status)
            tree = stack.enter_context(frozen_tree(pid))
            T.check_shared_tables([task.pid for task in tree.tasks])
        log.info("pid %d: frozen (%s, %s, %s)", pid, plural(len(tree.tasks), "process"),
                 plural(sum(len(t.tids) for t in tree.tasks), "thread"), plural(len(tree.zombies), "zombie"))
        faults.point("after-freeze")
        if chain:  # a pre-dump's uffd-wp tracking: what it found, then taken down (predump.py)
            chain.stop_seized([task.pid for task in tree.tasks])
            early_smaps = chain.flags_after(early_smaps)
        kinds = objects.collectors(ext_unix_sk=ext_unix_sk, tcp_established=tcp_established, tcp_close=tcp_close,
                                   net_lock=lock, leave_running=leave_running)
        killed = [False]
        stack.callback(lambda: [kind.end_dump(killed[0]) for kind in kinds])
        collected = []
        for task in tree.tasks:
            with translated(task.pid, "collect"):
                collected.append(collect_seized(task, shell_job, early_smaps if task.pid == pid else None,
                                                kinds))
        ckpts = [c[0] for c in collected]
        root = ckpts[0]
        stats = DumpStats(root)
        with translated(pid, "collect"):
            root.procs = tree.procs()
            T.check_sessions(root.procs, shell_job)
            T.link_descriptions(ckpts)
            check_owners(ckpts, {task.pid: task.tids for task in tree.tasks}, root.procs)
            offer = in_flight_offer(root, shell_job, kinds)
            for kind in kinds:
                kind.collect_in_flight(root, {task.pid for task in tree.tasks}, offer)
            for kind in kinds:
                kind.collect_tree(root, {task.pid for task in tree.tasks})
        log.info("pid %d: collected %s, %s", pid, plural(sum(len(c.vmas) for c in ckpts), "VMA"),
                 plural(sum(len(c.fds) for c in ckpts), "fd"))
        plan = PagePlan(tree, collected, leave_running)
        with translated(pid, "collect"):
            plan.scan_frozen()
        # In tree order, so that pages shared copy-on-write are stored by the
        # first process; the root's inventory, written last, commits the whole.
        writers = []
        for task, ckpt, now in zip(tree.tasks, ckpts, plan.now):
            where = os.path.join(staging.path, _image_dir(task.pid, pid))
            with translated(task.pid, f"write {where}"):
                writer = stack.enter_context(image_writer(where, create=task.pid != pid, compress=compress, key=key))
                writers.append(writer)
                if task.pid == pid and parent_pages is not None:
                    writer.pages = dedup = DedupSink(writer.pages, parent_pages, _final_dir(home, staging))
                elif task.pid == pid and chain:
                    dedup = DedupSink(writer.pages, {}, home)  # for the references only
                for kind in kinds:
                    kind.write_process(task.pid, writer, ckpt)
                if task.pid == pid:
                    for kind in kinds:
                        kind.write_tree(writer, root)
                if now:
                    write_pages_seized(task.pid, now, writer.pages, cow_shared=not plan.single)
        if leave_running:
            stats.snapshot = plan.snapshot(stack)
        # Each other process's local image is committed (its page writes
        # waited for, its records written, fsync) by one thread while the
        # next process's pages are read; unwound before the writers (abort).
        committer = workers.ThreadPool(1, thread_name_prefix="procsnap-commit")
        stack.callback(_join_commits, committer)
        commits = []
        for index, (task, ckpt, writer) in enumerate(zip(tree.tasks, ckpts, writers)):
            with translated(task.pid, f"write {writer.dir}"):
                runs, claimed = plan.runs(index)
                if index == 0 and dedup is not None:
                    dedup.keep = {owned for _, refs in plan.claims[1:] for _, owner, owned, _ in refs if owner == 0}
                if index == 0 and chain:
                    runs = chain.refer(runs, dedup)
                refs = plan.cow.resolve(claimed)
                ckpt.page_refs = [refs] if refs else []
                write_pages_seized(plan.sources[index], runs, writer.pages, progress,
                                   cow_shared=not plan.single or stats.snapshot)
                plan.cow.wrote(index, _image_dir(task.pid, pid), writer.pages.runs)
            if task.pid != pid and writer.remote:  # a stream's or a store's: in order, as it was
                _commit(task.pid, writer, ckpt)
            elif task.pid != pid:
                commits.append(committer.submit(_commit, task.pid, writer, ckpt))
        for job in commits:
            job.result()  # the first error, as if raised here
        for writer in writers:
            stats.pages_bytes += writer.pages.offset
        root_writer = writers[0]
        if dedup is not None:
            refs = dedup.merged_refs(root.page_refs[0] if root.page_refs else None)
            root.page_refs = [refs] if refs else []
            log.info("pid %d: %d pages found in %s, referred to", pid, dedup.referred, prev_images_dir)
            if objstore.is_url(images_dir):  # the parents' generations stay while this one refers to them
                with translated(pid, f"write {staging.path}"):
                    objseries.refer(staging.path, dedup.parents())
        with translated(pid, f"write {staging.path}"):
            faults.point("before-commit")
            root_writer.commit(root)
        staging.swap_in()
        stats.replaced = staging.replaces
        faults.point("before-thaw")
        log.info("pid %d: image written to %s", pid, images_dir)
        if not leave_running:
            if nsworker.inside() and pid == 1:  # SIGKILL from inside does not reach the init: from outside
                stats.frozen_s, stats.total_s = time.monotonic() - tree.tasks[0].since, time.monotonic() - started
                nsworker.from_outside_kill(stats)
            with translated(pid, "kill"):
                tree.kill()
            killed[0] = True
            if lock is not None:
                lock.keep()
            log.info("pid %d: killed", pid)
    stats.frozen_s = tree.tasks[0].frozen_s
    stats.frozen_at = tree.tasks[0].since
    stats.total_s = time.monotonic() - started
    log.info("pid %d: frozen for %.1f ms of %.1f ms", pid, stats.frozen_s * 1000, stats.total_s * 1000)
    return stats


def _join_commits(committer) -> None:
    """The commit thread joined before any writer aborts, also when a second
    SIGTERM interrupts the join (the writer it commits must not be closed
    under it); the interruption is raised once the thread has ended."""
    interrupted = None
    while True:
        try:
            committer.shutdown()
            break
        except KeyboardInterrupt as err:
            interrupted = err
    if interrupted is not None:
        raise interrupted


def _commit(pid: int, writer: ImageWriter, ckpt: model.Checkpoint) -> None:
    with translated(pid, f"write {writer.dir}"):
        faults.point("mid-commit")
        writer.commit(ckpt)


def _parent_index(images_dir: str, prev: str, key: bytes | None):
    if remote.is_stream_url(images_dir):
        raise Unsupported("--prev-images-dir: not supported with a streamed image yet")
    if objstore.is_url(prev) and not objstore.is_url(images_dir) or objstore.is_url(images_dir) and os.path.isabs(prev):
        raise Unsupported(f"--prev-images-dir {prev}: a series is all in object storage or all local, "
                          f"not both (-D {images_dir})")
    if objstore.is_url(images_dir):  # relative to -D too; the prefix itself: its current image, kept beside
        parent = prev if objstore.is_url(prev) else objseries.join(images_dir, prev)
        objseries.relative(parent, images_dir)  # one bucket
        return page_index(parent, key)
    parent = os.path.normpath(os.path.join(os.path.abspath(images_dir), prev))  # as CRIU's: relative to -D
    if os.path.realpath(parent) == os.path.realpath(images_dir):
        raise Unsupported(f"--prev-images-dir {prev}: is the image directory itself; the new image would replace it")
    return page_index(parent, key)


def _final_dir(images_dir: str, staging) -> str:
    """Where the root's image will be once swapped in: DIR, or the new s3:// generation."""
    return staging.path if objstore.is_url(images_dir) else images_dir


def _final_chain(pid: int, images_dir: str, prev: str, key: bytes | None):
    if objstore.is_url(images_dir) or objstore.is_url(prev) or remote.is_stream_url(images_dir):
        return None
    from .predump import final_chain

    return final_chain(pid, os.path.normpath(os.path.join(os.path.abspath(images_dir), prev)), key)


def _stream_staged(url: str, tls, leave_running: bool):
    from ..image import stream  # ssl and sockets: imported only for a streamed dump

    return stream.staged(url, tls, leave_running)


def _image_dir(pid: int, root: int) -> str:
    """Where a process's image is, relative to the root's."""
    return "" if pid == root else T.IMAGE_DIR.format(pid=pid)


def read_target(pid: int) -> tuple[proc.Stat, dict[str, str]]:
    if pid == os.getpid():
        raise ProcsnapError(f"pid {pid}: is procsnap itself", pid)
    with translated(pid, f"read /proc/{pid}"):
        try:
            return proc.read_stat(pid), proc.read_status(pid)
        except FileNotFoundError as err:
            raise ProcessGone(f"pid {pid}: no such process", pid) from err


class FrozenTask:
    """A frozen process: its leader `pid` and every thread, `tids` (leader first)."""

    def __init__(self, pid: int):
        self.pid = pid
        self.tids: list[int] = []
        self.killed = False
        self.attached = True
        self.since = time.monotonic()
        self.frozen_s = 0.0
        self.stopped_by = 0  # it was in a group-stop (state T): by this signal; thawed, it is again
        self.wait_left: dict[int, int] = {}  # tid -> ns its interrupted wait had left (dumper/waits.py)

    def freeze(self) -> None:
        """Every thread, until no new one appears: a thread not yet frozen
        may still create another."""
        self.tids.append(self.pid)  # before the freeze: a half-done one is undone by thaw too
        self.stopped_by = self._freeze(self.pid)
        while True:
            new = [t for t in proc.list_tids(self.pid) if t not in self.tids]
            if not new:
                return
            for tid in new:
                self.tids.append(tid)
                try:
                    self._freeze(tid)
                except ProcessLookupError:
                    self.tids.remove(tid)  # it exited before we got to it

    def _freeze(self, tid: int) -> int:
        stopped_by, self.wait_left[tid] = ptrace.freeze_timed(tid)
        return stopped_by

    def thaw(self) -> None:
        if self.attached:
            for tid in reversed(self.tids):  # from a group-stop, it stays stopped
                with contextlib.suppress(ProcessLookupError):
                    ptrace.detach(tid)
            self.attached = False
            self.frozen_s = time.monotonic() - self.since

    def kill(self, reap: bool = False) -> None:
        """SIGKILL the frozen process and wait until it is dead (not reaped:
        that stays its parent's job, even when the parent is us; with reap,
        reaped as its tracer, which hands it on to its parent). Its other
        threads are reaped: as their tracer we get their exits."""
        os.kill(self.pid, signal.SIGKILL)
        self.killed = True
        self.attached = False
        self.frozen_s = time.monotonic() - self.since
        for tid in self.tids[1:]:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(tid, ptrace.WALL)
        os.waitid(os.P_PID, self.pid, os.WEXITED | ptrace.WALL | (0 if reap else os.WNOWAIT))


class FrozenTree:
    """The root and its descendants, frozen, breadth first; zombies apart."""

    def __init__(self):
        self.tasks: list[FrozenTask] = []
        self.zombies: list[model.Proc] = []

    def procs(self) -> list[model.Proc]:
        out = []
        for task in self.tasks:
            st = proc.read_stat(task.pid)
            out.append(model.Proc(task.pid, st.ppid if task is not self.tasks[0] else 0, st.pgrp, st.session,
                                  dir=_image_dir(task.pid, self.tasks[0].pid)))
        return out + self.zombies

    def add(self, pid: int) -> None:
        """Freeze `pid` (a child of a frozen process) or record it as a zombie."""
        st, status = proc.read_stat(pid), proc.read_status(pid)
        if st.state == "Z" and len(proc.list_tids(pid)) > 1:
            raise Unsupported(f"pid {pid}: its main thread has exited while its other threads run; "
                              "not supported", pid)
        if st.state != "Z":
            C.check_supported(pid, st, status)
            task = FrozenTask(pid)
            try:
                task.freeze()
            except OSError:
                task.thaw()
                if proc.read_stat(pid).state != "Z":
                    raise
            else:
                self.tasks.append(task)
                return
            st = proc.read_stat(pid)
        self.zombies.append(model.Proc(pid, st.ppid, st.pgrp, st.session, zombie=True,
                                       exit_status=st.exit_code))

    def kill(self) -> None:
        for task in self.tasks[1:]:
            task.kill(reap=True)  # as their tracer we see them die; their parent gets them next
        root = self.tasks[0]
        # Ours, it stays a zombie for us to reap. Another's, it is reaped as our
        # tracee, which hands it on to its parent: left traced, its parent could
        # not reap it (nor a restore by us reuse its pid) until we exit.
        root.kill(reap=proc.read_stat(root.pid).ppid != os.getpid())


@contextlib.contextmanager
def frozen_tree(pid: int):
    tree = FrozenTree()
    try:
        tree.tasks.append(FrozenTask(pid))
        tree.tasks[0].freeze()
        i = 0
        while i < len(tree.tasks):
            parent = tree.tasks[i].pid
            i += 1
            for child in T.children_of(parent):
                with translated(child, "freeze"):
                    tree.add(child)
        yield tree
    finally:
        for task in reversed(tree.tasks):
            if not task.killed:
                with translated(task.pid, "thaw"):
                    task.thaw()


@contextlib.contextmanager
def image_writer(images_dir: str, create: bool = False, compress: bool = False, key: bytes | None = None):
    """create: the directory is made here (a non-root process's image) and
    removed again with the files if the dump fails."""
    if remote.backend(images_dir) is not None:
        pass  # objects and streams need no directory
    elif create:
        os.makedirs(images_dir, exist_ok=True)
    elif not os.path.isdir(images_dir):
        raise FileNotFoundError(2, "No such directory", images_dir)
    writer = ImageWriter(images_dir, compress, key)
    try:
        yield writer
    except BaseException:
        writer.abort()
        if create and not objstore.is_url(images_dir):
            with contextlib.suppress(OSError):
                os.rmdir(images_dir)
        raise


def in_flight_offer(root: model.Checkpoint, shell_job: bool, kinds: list[Collect]):
    """offer(fd) -> the record of an fd of procsnap's own holding a file in
    flight (protocol.Collect.collect_in_flight), its file in the root's FileRefs."""
    files = FileTable()
    files.refs = root.files
    return lambda fd: C.collect_fd(os.getpid(), fd, files, shell_job, kinds, in_flight=True)[0]


def collect_seized(frozen_task: FrozenTask, shell_job: bool, early_smaps: list[proc.MapsEntry] | None,
                   kinds: list[Collect], skip_fds: set[int] = frozenset()):
    """Everything but the page data (dumper/plan.py scans that): (checkpoint, maps)."""
    pid = frozen_task.pid
    files = FileTable()
    maps = proc.read_maps(pid, early_smaps)
    st = proc.read_stat(pid)
    status = proc.read_status(pid)
    vmas = C.collect_vmas(pid, maps, files, kinds)
    regs = ptrace.get_regs(pid)
    sigmask = ptrace.get_sigmask(pid)
    fds = C.collect_fds(pid, files, shell_job, kinds, skip_fds)
    pending = C.collect_pending(pid)
    with infect.infected(pid, maps) as target:
        for kind in kinds:
            kind.collect_seized(target, fds)
        mm = C.collect_mm_seized(pid, st, target, files)
        faults.point("mid-collect")
        task = C.collect_task_seized(pid, st, status, target, regs, sigmask)
        sigactions = C.collect_sigactions_seized(target, status)
        threads = [C.collect_thread_seized(tid, target) for tid in frozen_task.tids[1:]]
        ckpt = model.Checkpoint(task=task, mm=mm, vmas=vmas, pages=[], sigactions=sigactions, pending=pending,
                                files=files.refs, fds=fds, ghosts=[], threads=threads)
        objects.collect_task_state_seized(target, frozen_task.tids, ckpt)
    for tid, state in [(pid, task)] + [(th.tid, th) for th in threads]:
        state.wait_left_ns = W.wait_left(pid, state.regs, frozen_task.wait_left.get(tid, W.UNKNOWN))
    task.stopped_by = frozen_task.stopped_by
    return ckpt, maps
