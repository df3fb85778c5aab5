"""pre_dump(): copy a running process's memory in passes, for a final dump
with a short freeze: freeze -> track -> collect -> re-arm -> thaw -> copy
-> write. Each pass copies only the pages written since the one before;
the final `dump --prev-images-dir` copies the pages written since the
last pass and refers to the rest where the chain stores them.

    pass 1       uffd made in the target, its VMAs registered and
                 write-protected; every page copied (the process runs)
    pass 2..n    PAGEMAP_SCAN: pages written since pass n-1, protected
                 again in the same walk; those copied, the rest referred
                 to in the parents (by address)
    final dump   PAGEMAP_SCAN without re-arming, the uffd closed in the
                 target (frozen), then the dump as usual

Which pages are unchanged since the parent (`clean`): those of ranges the
parent pass registered and protected that are registered still (PAGEMAP_SCAN
category PAGE_IS_WPALLOWED, "uw" in smaps VmFlags; an munmap, a new mmap
or an mremap there makes a VMA without it) and that PAGEMAP_SCAN does not report written. Everything
else of the process is copied: new VMAs (tracked from this pass on),
VMAs that cannot be registered (MAP_DROPPABLE, shared ones).

Pages are read after the thaw, while the process writes: a page written
after the re-arm and before it is read is reported at the next pass and
copied again, so the chain is consistent at the final dump, never before
(a pre-dump image is refused by restore, objects/tracking.py).

The uffd stays in the target between passes, at a high fd number
(Tracking.uffd); it is procsnap's, not the process's: never collected as
its state, closed by the final dump after the freeze. A failed pass
closes it if it made it or had re-armed it (a re-arm whose image is
never written would hide the pages written before it from the next
pass); a pass that fails before keeps the parent's tracking as it was.
Without tracking a later pass or the final dump compares pages by
content (image/series.py), as where the kernel has no async
write-protection.
"""

from __future__ import annotations

import contextlib
from .. import records as dataclasses  # the dataclasses API, cheap to import
from .. import log as logging  # the logging API, cheap to import
import os
import time

from .. import faults, model, objects
from ..errors import DumpError, ImageError, ProcessGone, Unsupported, plural, translated
from ..image import series
from ..image.reader import open_image
from ..image.staging import staged
from ..kernel import infect, proc, uffdwp
from ..kernel.arch.x86_64 import NR, PAGE_SIZE
from ..kernel.libc import copy_fd
from ..objects.tracking import HASHES, UFFD_WP, Tracking
from . import collect as C
from .pages import write_pages_seized

log = logging.getLogger("procsnap.dumper")

TRACKED_KINDS = (model.VmaKind.ANON, model.VmaKind.FILE_PRIVATE)
UFFD_LINK = "anon_inode:[userfaultfd]"
O_NONBLOCK, O_CLOEXEC = 0o4000, 0o2000000
F_DUPFD_CLOEXEC = 1030
# The uffd goes this far below the soft RLIMIT_NOFILE (at most 1024), out of the way of
# the fds the process opens; not higher: the kernel's fd table grows to the highest fd.
HIGH_FD_MARGIN = 64
# A clean stretch shorter than this is read again rather than referred to. Each run costs the
# page writer ~75 us here (loaded), so scattered writes make the final copy slow per byte; but
# 8 made the passes copy 812 MiB of 1 GiB instead of 186 and the final freeze longer (7.4 s
# against 4.6 s, notes/issue-13-predump.md): every page that is unchanged is referred to.
MIN_REFERRED = 1


@dataclasses.dataclass
class PreDumpStats:
    method: str
    passes: int
    copied: int  # pages read from the process
    referred: int  # pages referred to in the parents
    frozen_s: float = 0.0
    total_s: float = 0.0


def pre_dump(pid: int, images_dir: str, prev_images_dir: str | None = None, method: str = "auto",
             shell_job: bool = False, key: bytes | None = None, compress: bool = False,
             tcp_established: bool = False) -> PreDumpStats:
    """One pass: an image in `images_dir` (swapped in once complete) of the
    memory of process `pid`, which runs on; its parent (prev_images_dir,
    relative to images_dir as for dump) is an earlier pass. method: "uffd-wp",
    "hashes" or "auto" (uffd-wp where the kernel has it). tcp_established:
    live TCP connections are let through (the final dump reads them; a pass
    keeps no fds)."""
    from . import FrozenTask, collect_seized, image_writer, read_target

    started = time.monotonic()
    st, status = read_target(pid)
    born = start_time(pid)
    parent = _parent(images_dir, prev_images_dir, pid, born, key) if prev_images_dir else None
    before = parent.checkpoint.tracking[0] if parent is not None else None
    if method == "auto":
        method = UFFD_WP if uffd_wp_missing() is None else HASHES
    elif method == UFFD_WP and (why := uffd_wp_missing()):
        raise Unsupported(f"pid {pid}: --dirty-tracking uffd-wp: {why}", pid)
    tracker = Tracker(pid, before) if method == UFFD_WP else None
    with translated(pid, f"read /proc/{pid}/smaps"):
        early_smaps = proc.read_smaps(pid)  # its VmFlags: smaps counts every page, so not while frozen (as dump)
    with contextlib.ExitStack() as stack:
        staging = stack.enter_context(staged(images_dir))
        if tracker:
            stack.enter_context(tracker.taken_down_on_error())
        task = None
        try:
            with translated(pid, "freeze"):
                C.check_supported(pid, st, status)
                task = FrozenTask(pid)
                task.freeze()
                faults.point("predump-after-freeze")
                maps = proc.read_maps(pid, early_smaps)
            if tracker:
                with translated(pid, "start dirty tracking (userfaultfd)"):
                    tracker.attach_seized(maps)
            with translated(pid, "collect"):
                ckpt, _ = collect_seized(task, shell_job, maps, objects.collectors(tcp_close=tcp_established),
                                         skip_fds={tracker.uffd} if tracker else set())
            with translated(pid, "dirty tracking (PAGEMAP_SCAN)"):
                written = tracker.rearm_seized(ckpt.vmas) if tracker else []
                runs = C.collect_page_runs(pid, ckpt.vmas)
        finally:
            if task is not None:
                with translated(pid, "thaw"):
                    task.thaw()
        log.info("pid %d: pre-dump pass thawed after %.1f ms", pid, task.frozen_s * 1000)
        faults.point("predump-after-thaw")
        mem = memory_checkpoint(ckpt, pid, st)
        clean = subtract(tracker.tracked_before, written) if tracker else []
        with translated(pid, f"write {staging.path}"):
            writer = stack.enter_context(image_writer(staging.path, compress=compress, key=key))
            dedup = series.DedupSink(writer.pages, {}, images_dir)
            if parent is not None and clean:
                runs = refer_clean(runs, clean, series.stored_at(parent), dedup)
            elif parent is not None:  # no tracking to trust: by content
                writer.pages = dedup = series.DedupSink(writer.pages, series.page_index(parent.directory, key),
                                                        images_dir)
            write_pages_seized(pid, runs, writer.pages, cow_shared=False)
            refs = dedup.merged_refs(None)
            mem.page_refs = [refs] if refs else []
            copied = sum(r.npages for r in writer.pages.runs)
            mem.tracking = [Tracking(method, pid, born, (before.passes + 1) if before else 1,
                                     copied=copied, referred=dedup.referred,
                                     **(tracker.record() if tracker else {}))]
            faults.point("before-commit")
            writer.commit(mem)
        staging.swap_in()
    t = mem.tracking[0]
    log.info("pid %d: pre-dump pass %d (%s): %s copied, %s referred to", pid, t.passes, method,
             plural(t.copied, "page"), plural(t.referred, "page"))
    return PreDumpStats(method, t.passes, t.copied, t.referred, task.frozen_s, time.monotonic() - started)


def memory_checkpoint(ckpt: model.Checkpoint, pid: int, st: proc.Stat) -> model.Checkpoint:
    """What a pre-dump image keeps: the memory and what a reader checks it
    against; the rest (fds and the kinds' state) is the final dump's."""
    return model.Checkpoint(task=ckpt.task, mm=ckpt.mm, vmas=ckpt.vmas, pages=[], sigactions=[], pending=[],
                            files=ckpt.files, fds=[], ghosts=[], threads=ckpt.threads,
                            procs=[model.Proc(pid, 0, st.pgrp, st.session)])


def _parent(images_dir: str, prev: str, pid: int, born: int, key: bytes | None):
    where = os.path.normpath(os.path.join(os.path.abspath(images_dir), prev))
    if os.path.realpath(where) == os.path.realpath(images_dir):
        raise Unsupported(f"--prev-images-dir {prev}: is the image directory itself; the new image would replace it")
    parent = open_image(where, key=key)
    tracking = parent.checkpoint.tracking
    if not tracking:
        raise ImageError(f"{where}: not a pre-dump image (a pre-dump's parent is an earlier pre-dump)")
    if tracking[0].pid != pid or tracking[0].start_time != born:
        raise ImageError(f"{where}: is a pre-dump of pid {tracking[0].pid} (started at tick {tracking[0].start_time}), "
                         f"not of this pid {pid} (started at tick {born})")
    return parent


class Tracker:
    """The userfaultfd in the target and what it tracks. `before`: the
    parent pass's record, whose uffd is used again if the target still
    has it."""

    def __init__(self, pid: int, before: Tracking | None):
        self.pid = pid
        self.before = before if before is not None and before.method == UFFD_WP else None
        self.uffd = -1  # in the target
        self.local = -1  # our copy of it
        self.ino = 0
        self.made = False  # by this pass
        self.rearmed = False  # by this pass: the parent's record no longer says what was written
        self.tracked_before: list[tuple[int, int]] = []  # registered and protected by the parent pass
        self.pagemap = -1
        self.ranges: list[tuple[int, int]] = []

    @contextlib.contextmanager
    def taken_down_on_error(self):
        try:
            yield self
        except BaseException:
            if self.uffd >= 0 and (self.made or self.rearmed):
                with contextlib.suppress(ProcessGone, OSError, DumpError):
                    untrack(self.pid, self.uffd, self.ino)
                log.info("pid %d: pre-dump failed; its dirty tracking (uffd fd %d) taken down", self.pid, self.uffd)
            raise
        finally:
            for fd in (self.local, self.pagemap):
                if fd >= 0:
                    os.close(fd)
            self.local = self.pagemap = -1

    def attach_seized(self, maps: list[proc.MapsEntry]) -> None:
        """The parent's uffd if the target has it still, else a new one."""
        old = self.before
        self.pagemap = os.open(f"/proc/{self.pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        if old is not None and alive(self.pid, old.uffd, old.uffd_ino):
            self.uffd, self.ino = old.uffd, old.uffd_ino
            self.local = copy_fd(self.pid, self.uffd)
            registered = uffdwp.wp_ranges(self.pagemap)
            self.tracked_before = intersect(registered, [tuple(r) for r in old.ranges])
            faults.point("predump-after-uffd")
            return
        if old is not None:
            log.info("pid %d: the dirty tracking of the parent pass is gone; pages compared by content", self.pid)
        for fd in proc.list_fds(self.pid):  # refused by the collect anyway: before one more is made
            if os.readlink(f"/proc/{self.pid}/fd/{fd}") == UFFD_LINK:
                how = ("the dirty tracking of a pre-dump, which --prev-images-dir must name"
                       if uffdwp.uffd_features(self.pid, fd) & uffdwp.UffdFeature.WP_ASYNC else "its own")
                raise Unsupported(f"pid {self.pid}: fd {fd} is a userfaultfd ({how}); not supported", self.pid)
        with infect.infected(self.pid, maps, scratch_area=False) as target:
            low = target.call(NR.userfaultfd, O_CLOEXEC | O_NONBLOCK | uffdwp.UFFD_USER_MODE_ONLY)
            self.uffd, self.made = low, True
            high = max(3, min(proc_nofile(self.pid), 1024) - HIGH_FD_MARGIN)
            if high > low:
                with contextlib.suppress(OSError):  # no free fd up there: it stays where it is
                    self.uffd = target.call(NR.fcntl, low, F_DUPFD_CLOEXEC, high)
                    target.call(NR.close, low)
        self.ino = os.stat(f"/proc/{self.pid}/fd/{self.uffd}").st_ino
        self.local = copy_fd(self.pid, self.uffd)
        uffdwp.enable_wp_async(self.local)
        faults.point("predump-after-uffd")

    def rearm_seized(self, vmas: list[model.Vma]) -> list[tuple[int, int]]:
        """Register the VMAs not tracked yet, then read and re-arm every
        tracked range; returns the ranges of pages written since the parent
        pass (of the ranges tracked since)."""
        self.rearmed = True
        regs = uffdwp.wp_ranges(self.pagemap)
        for v in vmas:
            if v.kind in TRACKED_KINDS and not v.flags & model.MapFlag.MAP_DROPPABLE and \
                    subtract([(v.start, v.end)], regs):
                try:
                    uffdwp.register_wp(self.local, v.start, v.end)
                except OSError as err:  # stays untracked: copied whole at every pass
                    log.info("pid %d: VMA %#x-%#x not tracked (%s)", self.pid, v.start, v.end, err.strerror or err)
        self.ranges = uffdwp.wp_ranges(self.pagemap)
        written: list[tuple[int, int]] = []
        for start, end in self.ranges:
            written += uffdwp.written_ranges(self.pagemap, start, end, protect=True)
        faults.point("predump-after-rearm")
        return written

    def record(self) -> dict:
        return {"uffd": self.uffd, "uffd_ino": self.ino, "ranges": [list(r) for r in self.ranges]}


def start_time(pid: int) -> int:
    """When the process started, in clock ticks after boot (/proc/PID/stat field 22)."""
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rpartition(")")[2].split()[22 - 3])


def proc_nofile(pid: int) -> int:
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                soft = line.split()[3]
                return 1 << 20 if soft == "unlimited" else int(soft)
    return 1024


def alive(pid: int, fd: int, ino: int) -> bool:
    """Whether fd `fd` of `pid` is the tracking userfaultfd (same inode, async WP)."""
    try:
        if os.readlink(f"/proc/{pid}/fd/{fd}") != UFFD_LINK or os.stat(f"/proc/{pid}/fd/{fd}").st_ino != ino:
            return False
        return bool(uffdwp.uffd_features(pid, fd) & uffdwp.UffdFeature.WP_ASYNC)
    except OSError:
        return False


def untrack(pid: int, fd: int, ino: int, task_frozen: bool = False) -> None:
    """Close the tracking uffd in the target (frozen for it if it is not):
    its ranges are unregistered when the last fd of it goes."""
    from . import FrozenTask

    if not alive(pid, fd, ino):
        return
    task = None
    if not task_frozen:
        task = FrozenTask(pid)
        task.freeze()
    try:
        if alive(pid, fd, ino):  # still, now that it is stopped
            with infect.infected(pid, proc.read_maps(pid), scratch_area=False) as target:
                target.call(NR.close, fd)
    finally:
        if task is not None:
            task.thaw()


def untrack_image(pid: int, images_dir: str, key: bytes | None = None) -> int:
    """Take down the tracking the pre-dump in `images_dir` left in `pid`
    (a migration given up); the fd it was at, or -1 if there was none."""
    image = open_image(images_dir, key=key)
    if not image.checkpoint.tracking:
        raise ImageError(f"{images_dir}: not a pre-dump image")
    t = image.checkpoint.tracking[0]
    if t.pid != pid:
        raise ImageError(f"{images_dir}: is a pre-dump of pid {t.pid}, not of pid {pid}")
    with translated(pid, f"take down the dirty tracking (uffd fd {t.uffd})"):
        if t.method != UFFD_WP or start_time(pid) != t.start_time or not alive(pid, t.uffd, t.uffd_ino):
            return -1
        untrack(pid, t.uffd, t.uffd_ino)
    return t.uffd


class FinalChain:
    """The final dump of a process a pre-dump tracks (`dump --prev-images-dir`
    naming the last pass): the pages written since are found and the
    tracking is taken down once the process is frozen (stop_seized); the
    root's other pages are referred to in the chain by address (refer)."""

    def __init__(self, pid: int, parent, tracking: Tracking):
        self.pid, self.parent, self.tracking = pid, parent, tracking
        self.clean: list[tuple[int, int]] = []

    def stop_seized(self, pids: list[int]) -> None:
        """`pids`: the frozen tree, root first; a child forked since the
        pre-dump has the uffd too, and loses it as the root does."""
        t = self.tracking
        with translated(self.pid, f"dirty tracking (uffd fd {t.uffd})"):
            if not alive(self.pid, t.uffd, t.uffd_ino):
                log.info("pid %d: the pre-dump's dirty tracking is gone; pages compared by content", self.pid)
                return
            written: list[tuple[int, int]] = []
            with open(f"/proc/{self.pid}/pagemap", "rb", buffering=0) as pagemap:
                tracked = intersect(uffdwp.wp_ranges(pagemap.fileno()), [tuple(r) for r in t.ranges])
                for start, end in tracked:
                    written += uffdwp.written_ranges(pagemap.fileno(), start, end, protect=False)
            untrack(self.pid, t.uffd, t.uffd_ino, task_frozen=True)
            for pid in pids[1:]:
                for fd in proc.list_fds(pid):
                    if alive(pid, fd, t.uffd_ino):
                        untrack(pid, fd, t.uffd_ino, task_frozen=True)
            self.clean = subtract(tracked, written)
        faults.point("final-after-untrack")
        log.info("pid %d: dirty tracking taken down; %s unchanged since pass %d", self.pid,
                 plural(sum(e - s for s, e in self.clean) // PAGE_SIZE, "tracked page"), t.passes)

    def flags_after(self, early: list[proc.MapsEntry]) -> list[proc.MapsEntry]:
        """`early` (smaps read before the freeze, for its VmFlags) fitted to
        the layout once the tracking is gone: closing the uffd merges VMAs
        that only its registration kept apart, whose flags are the same
        but for "uw". Spares the dump a read of smaps while frozen."""
        by_start = {m.start: m for m in early}
        with open(f"/proc/{self.pid}/maps") as f:
            now = proc.parse_maps(f.read())
        for m in now:
            old = by_start.get(m.start)
            if old is None:
                return early  # another change: the dump reads smaps again
            m.vmflags = tuple(flag for flag in old.vmflags if flag != "uw")
        return now

    def refer(self, runs, dedup: series.DedupSink):
        return refer_clean(runs, self.clean, series.stored_at(self.parent), dedup)


def final_chain(pid: int, parent_dir: str, key: bytes | None) -> FinalChain | None:
    """A FinalChain if the image in `parent_dir` is a uffd-wp pre-dump of
    `pid` (this very process) whose tracking the target still has."""
    try:
        parent = open_image(parent_dir, key=key)
    except ImageError:
        return None  # the dump's own --prev-images-dir handling says what is wrong with it
    if not parent.checkpoint.tracking:
        return None
    t = parent.checkpoint.tracking[0]
    try:
        born = start_time(pid)
    except OSError:
        return None
    if t.method != UFFD_WP or t.pid != pid or t.start_time != born or not alive(pid, t.uffd, t.uffd_ino):
        return None
    return FinalChain(pid, parent, t)


def uffd_wp_missing() -> str | None:
    """None if this kernel tracks dirty pages with async uffd-wp and
    PAGEMAP_SCAN, else why not (kernel/probes.py shows the probe)."""
    from ..kernel.probes import probe_uffd_wp

    try:
        probe_uffd_wp()
    except OSError as err:
        return err.strerror or str(err)
    return None


# Page ranges: sorted lists of disjoint (start, end).

def merge(ranges) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s, e in sorted(ranges):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(e, out[-1][1]))
        else:
            out.append((s, e))
    return out


def intersect(a, b) -> list[tuple[int, int]]:
    a, b, out, i, j = merge(a), merge(b), [], 0, 0
    while i < len(a) and j < len(b):
        s, e = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if s < e:
            out.append((s, e))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def subtract(a, b) -> list[tuple[int, int]]:
    out, b = [], merge(b)
    j = 0
    for s, e in merge(a):
        while j < len(b) and b[j][1] <= s:
            j += 1
        k = j
        while k < len(b) and b[k][0] < e:
            if b[k][0] > s:
                out.append((s, b[k][0]))
            s = max(s, b[k][1])
            k += 1
        if s < e:
            out.append((s, e))
    return out


def refer_clean(runs, clean, stored, dedup: series.DedupSink):
    """The page runs (vma, addr, length) still to read: the pages of `runs`
    in `clean` ranges that `stored` (series.stored_at) has are referred to
    through `dedup` instead, but for those in dedup.keep. One sweep: runs,
    ranges and stored runs are all sorted by address."""
    stored_ranges = [(v, v + n * PAGE_SIZE) for v, n, _, _ in stored]
    referable = [(s, e) for s, e in subtract(intersect(clean, stored_ranges), [(p, p + PAGE_SIZE)
                                                                                for p in sorted(dedup.keep)])
                 if e - s >= MIN_REFERRED * PAGE_SIZE]
    out = []
    j = k = 0
    for vma, addr, length in runs:
        pos, end = addr, addr + length
        while j < len(referable) and referable[j][1] <= pos:
            j += 1
        i = j
        while i < len(referable) and referable[i][0] < end:
            s, e = max(pos, referable[i][0]), min(end, referable[i][1])
            if s > pos:
                out.append((vma, pos, s - pos))
            while stored_ranges[k][1] <= s:
                k += 1
            at = k
            while s < e:  # a referred range may span several stored runs
                vaddr, npages, where, offset = stored[at]
                stop = min(e, stored_ranges[at][1])
                dedup.refer_run(s, (stop - s) // PAGE_SIZE, where, offset + (s - vaddr))
                s, at = stop, at + 1
            pos = e
            if referable[i][1] > end:
                break
            i += 1
        if pos < end:
            out.append((vma, pos, end - pos))
    return out
