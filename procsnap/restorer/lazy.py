"""Lazy restore (post-copy, `restore --lazy-pages`): the process runs before
its anonymous memory has been written; a lazy-pages server copies each
page in when the process first touches it and pushes the rest meanwhile.

    restore           server          guard
    fork ------------> (S) ------fork--> (G)
    rebuild pid P: map the VMAs, write the pages of all but the lazy
      ones (private anonymous, not locked, no guard pages); inject
      userfaultfd(2), take it (pidfd_getfd), close it in P; UFFDIO_API
      (EVENT_FORK|REMAP|REMOVE|UNMAP), UFFDIO_REGISTER MODE_MISSING on
      each lazy VMA
    send the uffd --------> S: "P"  ----> G: a copy, and a pidfd of P
    the rest of the rebuild and the release: P runs
    "end" ---------------> S serves each fault (UFFDIO_COPY from the
                           image, UFFDIO_ZEROPAGE where it has no page)
                           and pushes the rest; once a process has all
                           its pages, tells G to let go of its uffd and
                           closes its own: the ranges are unregistered
                           and the process is as after a normal restore
                           All done: "done" -> G exits; S exits.

Why G: the last close of a uffd unregisters its ranges, and a page not
copied yet then reads as zeros: a server killed before it is done would
leave the process silently reading zeros (measured here, kernel 6.18; no
SIGBUS). G holds a copy of every uffd, so the ranges stay registered and
a touch of a missing page waits; G sees S's end of their socket close
without "done" and SIGKILLs the processes it serves (their pidfds) and
every descendant with a range still registered ("um" in smaps), then
exits. If G dies first, S serves on alone, unguarded; it logs it.

What the process does meanwhile (the events hold it until S has read
them, and UFFDIO_COPY fails with EAGAIN while one is unread):
    fork       the child's mm gets a uffd of its own, with the parent's
               missing pages still missing: it is served from the
               parent's list of pages still to copy, as it was then
    mremap     the pages still to copy move with the range
    MADV_DONTNEED / MADV_REMOVE / munmap
               the range is dropped from the list: it is never filled
    writes     a page the process wrote (or the restorer, or a fault
               answered) is there: UFFDIO_COPY stops at it with EEXIST,
               and S skips it
    exit/exec  the mm is gone: UFFDIO_COPY fails with ESRCH; S forgets it
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import os
import select
import signal
import socket
import time

from .. import faults, model
from ..errors import RestoreError
from ..kernel import uffd as U
from ..kernel.arch.x86_64 import NR, PAGE_SIZE
from ..kernel.libc import copy_fd

STALL_RETRY_S = 1.0  # a stalled push (Mm.stalled) is tried again this often
PUSH_BYTES = 1 << 20  # one UFFDIO_COPY of the background push
FAULT_BYTES = 64 << 10  # a fault copies this much of its run around the page (read-ahead)
_O_CLOEXEC, _O_NONBLOCK = os.O_CLOEXEC, os.O_NONBLOCK


def lazy_vma(v: model.Vma) -> bool:
    """Private anonymous memory, unless mlocked (mlock would fault every
    page in at once), with guard pages, or droppable."""
    return (v.kind == model.VmaKind.ANON and not v.lock and not v.guards
            and not v.flags & model.MapFlag.MAP_DROPPABLE)


def split_runs(ckpt: model.Checkpoint) -> tuple[list[model.PageRun], list[model.PageRun], list[tuple[int, int]]]:
    """(runs written at restore, runs left to the server, lazy VMA ranges).

    The pages of the command line and environment (on the stack) are
    written at restore all the same: /proc/PID/cmdline and environ (ps,
    the state check) read them with a remote access that cannot wait for
    a fault to be served (no FAULT_FLAG_ALLOW_RETRY) and read nothing."""
    ranges = sorted((v.start, v.end) for v in ckpt.vmas if lazy_vma(v))
    starts = [a for a, _ in ranges]
    mm = ckpt.mm
    keep = (mm.arg_start & ~(PAGE_SIZE - 1), -(-max(mm.env_end, mm.arg_end) // PAGE_SIZE) * PAGE_SIZE)
    eager, lazy = [], []
    for r in ckpt.pages:
        i = bisect.bisect_right(starts, r.vaddr) - 1
        end = r.vaddr + r.npages * PAGE_SIZE
        if not (i >= 0 and end <= ranges[i][1]):
            eager.append(r)
            continue
        a, b = max(r.vaddr, keep[0]), min(end, keep[1])
        if a >= b:
            lazy.append(r)
            continue
        for lo, hi, to in ((r.vaddr, a, lazy), (a, b, eager), (b, end, lazy)):
            if lo < hi:
                to.append(model.PageRun(lo, (hi - lo) // PAGE_SIZE, r.offset + lo - r.vaddr, 0))
    used = sorted({bisect.bisect_right(starts, r.vaddr) - 1 for r in lazy})
    return eager, lazy, [ranges[i] for i in used]


def check_lazy(tree, pages_transformed) -> None:
    """Refuse, by name, what is not restored lazily yet, and a kernel
    without what it needs (kernel/probes.py probe_lazy_pages)."""
    from ..kernel.probes import probe_lazy_pages

    entries = list(tree)  # a zombie has no image but is made by a fork of the root all the same
    live = [(p, image) for p, image in entries if image is not None]
    try:
        probe_lazy_pages()
    except OSError as err:
        raise RestoreError(f"pid {live[0][0].pid}: --lazy-pages: this kernel's userfaultfd cannot serve it: "
                           f"{err.strerror or err}", live[0][0].pid) from err
    if len(entries) > 1:
        raise RestoreError(f"pid {live[0][0].pid}: --lazy-pages: the image is a tree of {len(entries)} processes "
                           f"({' '.join(str(p.pid) for p, _ in entries)}); only a single process is restored lazily",
                           live[0][0].pid)
    p, image = live[0]
    if pages_transformed(image):
        raise RestoreError(f"pid {p.pid}: --lazy-pages: {image.pages_path} is compressed or encrypted; "
                           "only a plain pages.img is served lazily", p.pid)


# -- in the restorer ---------------------------------------------------------


class Client:
    """The restore's end: starts the server, hands it each uffd."""

    def __init__(self, image, log_path: str | None):
        from ..image.reader import PageSource

        pages = PageSource(image)  # mapped before the fork: a streamed image's directory goes once it runs
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:  # the server: never returns into the restorer
            code = 1
            try:
                self.sock.close()
                code = serve(theirs, image, pages, log_path)
            finally:
                os._exit(code)
        theirs.close()
        pages.close()
        self.pid = pid

    def register_seized(self, target, ranges: list[tuple[int, int]]) -> None:
        """A uffd in the target, its lazy ranges registered, handed to the
        server (the target keeps no fd of it)."""
        with_fd = target.call(NR.userfaultfd, _O_CLOEXEC | _O_NONBLOCK)
        local = copy_fd(target.pid, with_fd)
        try:
            target.call(NR.close, with_fd)
            U.enable(local)
            for start, end in ranges:
                U.register_missing(local, start, end)
            faults.point("lazy-after-register")
            socket.send_fds(self.sock, [b"P%d" % target.pid], [local])
        finally:
            os.close(local)

    def end(self, succeeded: bool = True) -> None:
        """The restore is over (it ran, or it failed and its processes are
        gone): the server finishes what it has, then exits; after a failure
        it is waited for (and the guard with it)."""
        with contextlib.suppress(OSError):
            self.sock.send(b"E")
        self.sock.close()
        if not succeeded:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)


# -- the server ----------------------------------------------------------------


class Pending:
    """What a process still lacks: sorted, disjoint [start, end, src) runs
    of its address space, src the address of the first page's copy in our
    mapping of pages.img."""

    def __init__(self, runs: list[list[int]]):
        self.runs = runs

    def copy(self) -> "Pending":
        return Pending([list(r) for r in self.runs])

    def pages(self) -> int:
        return sum(e - s for s, e, _ in self.runs) // PAGE_SIZE

    def find(self, addr: int) -> int:
        i = bisect.bisect_right(self.runs, [addr, float("inf")]) - 1
        return i if i >= 0 and self.runs[i][0] <= addr < self.runs[i][1] else -1

    def cut(self, start: int, end: int) -> list[list[int]]:
        """Remove [start, end); return the pieces removed."""
        out, keep = [], []
        i = max(0, bisect.bisect_right(self.runs, [start, float("inf")]) - 1)
        j = i
        while j < len(self.runs) and self.runs[j][0] < end:
            s, e, src = self.runs[j]
            if e > start:
                a, b = max(s, start), min(e, end)
                out.append([a, b, src + a - s])
                if s < a:
                    keep.append([s, a, src])
                if b < e:
                    keep.append([b, e, src + b - s])
            else:
                keep.append([s, e, src])
            j += 1
        self.runs[i:j] = keep
        return out

    def add(self, pieces: list[list[int]]) -> None:
        for p in pieces:
            bisect.insort(self.runs, p)


class Mm:
    """One process's address space as the server sees it: its uffd and what it lacks."""

    def __init__(self, key: int, uffd: int, pending: Pending, pid: int = 0):
        self.key, self.uffd, self.pending, self.pid = key, uffd, pending, pid
        # the push met an address with no registered VMA (ENOENT): the area moved or went, and
        # the REMAP or UNMAP event that says so is not queued yet (mremap looks the VMA up before
        # it checks that the layout is changing, and queues the event only after the move). The
        # pages stay pending until an event comes: dropping them then would lose a moved area's.
        self.stalled = False


class Server:
    def __init__(self, sock, guard, base: int, lazy_runs: list[model.PageRun], log):
        self.sock, self.guard, self.base, self.log = sock, guard, base, log
        self.runs = [[r.vaddr, r.vaddr + r.npages * PAGE_SIZE, base + r.offset] for r in lazy_runs]
        self.mms: dict[int, Mm] = {}
        self.next_key = 0
        self.ended = False
        self.started = time.monotonic()
        self.stats = dict(faults=0, zero=0, pushed=0, skipped=0, dropped=0, stalls=0)

    def say(self, text: str) -> None:
        self.log.write(f"procsnap lazy-pages (pid {os.getpid()}): {text}\n")
        self.log.flush()

    def tell_guard(self, msg: bytes, fds=()) -> None:
        if self.guard is None:
            return
        try:
            socket.send_fds(self.guard, [msg], list(fds)) if fds else self.guard.send(msg)
        except OSError as err:
            self.say(f"guard gone ({err.strerror}): serving on unguarded")
            self.guard.close()
            self.guard = None

    def add_mm(self, uffd: int, pending: Pending, pid: int = 0) -> Mm:
        mm = Mm(self.next_key, uffd, pending, pid)
        self.next_key += 1
        self.mms[mm.key] = mm
        self.tell_guard(b"H%d %d" % (mm.key, pid), [uffd])
        return mm

    def drop_mm(self, mm: Mm, why: str) -> None:
        """Let go of a uffd: the guard's copy first, so the last close (ours)
        unregisters its ranges."""
        self.tell_guard(b"R%d" % mm.key)
        os.close(mm.uffd)
        del self.mms[mm.key]
        left = mm.pending.pages()
        self.stats["dropped"] += left
        self.say(f"mm {mm.key}" + (f" (pid {mm.pid})" if mm.pid else "") + f": {why}"
                 + (f", {left} pages not copied" if left else ""))

    def run(self) -> int:
        while not self.ended or self.mms:
            # the push starts once the restore is over: until then it would only slow the restorer
            # down, and the faults of the restore itself are served in any case
            busy = self.ended and any(mm.pending.runs and not mm.stalled for mm in self.mms.values())
            stalled = any(mm.stalled for mm in self.mms.values())
            fds = [self.sock.fileno()] if not self.ended else []
            fds += [mm.uffd for mm in self.mms.values()]
            if not fds:
                break
            ready, _, _ = select.select(fds, [], [], 0 if busy else STALL_RETRY_S if stalled else None)
            if not ready and not busy:  # again: an mm gone is ESRCH, the event may have come
                for mm in self.mms.values():
                    mm.stalled = False
            if not self.ended and self.sock.fileno() in ready:
                self.from_restorer()
            for mm in list(self.mms.values()):
                if mm.key in self.mms and mm.uffd in ready:
                    self.events(mm)
            if busy:
                faults.point("lazy-mid-push")
                self.push_one()
            for mm in list(self.mms.values()):
                if mm.key in self.mms and not mm.pending.runs:
                    self.drop_mm(mm, "all pages in")
        s = self.stats
        self.say(f"done in {time.monotonic() - self.started:.3f} s: {s['faults']} faults served from the image, "
                 f"{s['zero']} with the zero page, {s['pushed']} pages pushed, {s['skipped']} skipped "
                 f"(there already), {s['dropped']} dropped (removed, unmapped or the process gone), {s['stalls']} pushes "
                 "waited for an event (no VMA where the pages were)")
        self.tell_guard(b"D")
        return 0

    def from_restorer(self) -> None:
        try:
            msg, fds, _, _ = socket.recv_fds(self.sock, 64, 4)
        except OSError:
            msg, fds = b"", []
        if msg.startswith(b"P") and fds:
            pid = int(msg[1:])
            self.add_mm(fds[0], Pending([list(r) for r in self.runs]), pid)
            self.say(f"pid {pid}: serving {self.runs and sum(e - s for s, e, _ in self.runs) // PAGE_SIZE} pages")
            return
        self.ended = True  # "E", or the restorer gone (its processes with it, if it failed)

    def events(self, mm: Mm) -> None:
        try:
            msgs = U.read_msgs(mm.uffd)
        except OSError as err:
            self.drop_mm(mm, f"read: {err.strerror}")
            return
        if msgs:
            mm.stalled = False
        for m in msgs:
            ev = m.event
            if ev == U.Event.PAGEFAULT:
                self.fault(mm, m.arg1 & ~(PAGE_SIZE - 1))
            elif ev == U.Event.FORK:
                child = self.add_mm(m.arg0 & 0xFFFFFFFF, mm.pending.copy())
                self.say(f"mm {mm.key} forked: mm {child.key}, {child.pending.pages()} pages to copy")
            elif ev == U.Event.REMAP:
                moved = mm.pending.cut(m.arg0, m.arg0 + m.arg2)
                mm.pending.add([[s - m.arg0 + m.arg1, e - m.arg0 + m.arg1, src] for s, e, src in moved])
            elif ev in (U.Event.REMOVE, U.Event.UNMAP):
                gone = mm.pending.cut(m.arg0, m.arg1)
                self.stats["dropped"] += sum(e - s for s, e, _ in gone) // PAGE_SIZE

    def fault(self, mm: Mm, page: int) -> None:
        i = mm.pending.find(page)
        while True:
            if i < 0:
                got = U.zeropage(mm.uffd, page, PAGE_SIZE)
                self.stats["zero"] += 1
            else:
                s, e, src = mm.pending.runs[i]
                lo = max(s, page - FAULT_BYTES // 2)
                hi = min(e, lo + FAULT_BYTES)
                got = self.copy(mm, lo, hi, src + lo - s)
                self.stats["faults"] += 1
            if got == -errno.EAGAIN:
                self.events(mm)  # an event is unread: it changes what to copy
                if mm.key not in self.mms:
                    return
                i = mm.pending.find(page)
                continue
            if got == -errno.ESRCH:
                self.drop_mm(mm, "gone")
            else:  # the page may have been there already (EEXIST, skipped): no copy woke the thread
                U.wake(mm.uffd, page, PAGE_SIZE)
            return

    def copy(self, mm: Mm, start: int, end: int, src: int) -> int:
        """UFFDIO_COPY [start, end), skipping pages there already; the run
        leaves the pending list as it is copied or skipped."""
        at = start
        while at < end:
            got = U.copy(mm.uffd, at, src + at - start, end - at)
            if got > 0:
                mm.pending.cut(at, at + got)
                self.stats["pushed"] += got // PAGE_SIZE
                at += got
                continue
            if got == -errno.EEXIST:
                mm.pending.cut(at, at + PAGE_SIZE)
                self.stats["skipped"] += 1
                at += PAGE_SIZE
                continue
            return got  # EAGAIN, ENOENT, ESRCH: the caller's
        return end - start

    def push_one(self) -> None:
        for mm in list(self.mms.values()):
            if not mm.pending.runs or mm.stalled:
                continue
            s, e, src = mm.pending.runs[-1]
            lo = max(s, e - PUSH_BYTES)
            got = self.copy(mm, lo, e, src + lo - s)
            if got == -errno.EAGAIN:
                self.events(mm)
            elif got == -errno.ENOENT:
                mm.stalled = True
                self.stats["stalls"] += 1
            elif got == -errno.ESRCH:
                self.drop_mm(mm, "gone")


def serve(sock, image, pages, log_path: str | None) -> int:
    """The lazy-pages server's body (a child of the restore); `pages`: the
    image's PageSource, mapped."""
    keep = {sock.fileno(), pages.fd}
    log = open(log_path or os.devnull, "a")
    keep.add(log.fileno())
    os.setsid()  # not in the restore's terminal's process group: no ^C
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    _close_except(keep | {0, 1, 2})  # the restore's fds (a pipe end held here would never see EOF)
    _, lazy, _ = split_runs(image.checkpoint)
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    guard = os.fork()
    if guard == 0:
        code = 1
        try:
            mine.close()
            sock.close()
            code = guard_loop(theirs, log)
        finally:
            os._exit(code)
    theirs.close()
    server = Server(sock, mine, pages.base, lazy, log)
    try:
        return server.run()
    except BaseException as err:  # the guard sees no "done" and kills what was served
        import traceback
        server.say(f"failed: {err!r}\n" + traceback.format_exc())
        return 1
    finally:
        if server.guard is not None:
            server.guard.close()
        with contextlib.suppress(ChildProcessError):
            os.waitpid(guard, 0)


def guard_loop(sock, log) -> int:
    """Hold a copy of each uffd the server holds; if the server goes before
    it is done, kill what it served (see the module docstring)."""
    held: dict[int, tuple[int, int, int]] = {}  # key -> (uffd, pid, pidfd)
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(sock, 64, 4)
        except OSError:
            msg, fds = b"", []
        if msg.startswith(b"H") and fds:
            key, pid = map(int, msg[1:].split())
            pidfd = -1
            if pid:
                with contextlib.suppress(OSError):
                    pidfd = os.pidfd_open(pid)
            held[key] = (fds[0], pid, pidfd)
        elif msg.startswith(b"R"):
            uffd, _, pidfd = held.pop(int(msg[1:]), (-1, 0, -1))
            for fd in (uffd, pidfd):
                if fd >= 0:
                    os.close(fd)
        elif msg == b"D":
            return 0
        elif not msg:
            break
    roots = [(pid, pidfd) for _, pid, pidfd in held.values() if pid]
    victims = [pid for pid, _ in roots]
    for pid, pidfd in roots:
        with contextlib.suppress(OSError):
            signal.pidfd_send_signal(pidfd, signal.SIGSTOP)  # nobody forks away meanwhile
    others = [p for pid, _ in roots for p in _descendants(pid) if _registered(p)]
    for pid, pidfd in roots:
        with contextlib.suppress(OSError):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    for pid in others:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    log.write(f"procsnap lazy-pages guard (pid {os.getpid()}): the server died before all pages were in; "
              f"killed {' '.join(map(str, victims + others)) or 'nothing'} (their missing pages would read as zeros)\n")
    log.flush()
    return 1


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    for c in f.read().split():
                        out.append(int(c))
                        todo.append(int(c))
    return out


def _registered(pid: int) -> bool:
    """Some area of `pid` is registered with a userfaultfd for missing pages ("um")."""
    try:
        with open(f"/proc/{pid}/smaps") as f:
            return any(line.startswith("VmFlags:") and " um" in line for line in f)
    except OSError:
        return False


def _close_except(keep: set[int]) -> None:
    for fd in map(int, os.listdir("/proc/self/fd")):
        if fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)
