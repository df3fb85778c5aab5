"""Pipes and named FIFOs of the tree, with the bytes that were in them.

dump     every end an fd of the tree holds names its pipe by (device,
         inode); once all are collected, each pipe's bytes are read with
         tee() (which does not consume them), and a pipe that a process
         outside the tree also holds is refused.
restore  the pipe made once in the restorer (a FIFO opened again at its
         path; one unlinked while open made again beside its old path, with
         its owner, mode and times, and unlinked again), refilled, and its
         ends handed to every process that had one.
"""

from __future__ import annotations

import ctypes
from .. import records as dataclasses  # the dataclasses API, cheap to import
import fcntl
import os
import stat

from .. import model
from ..errors import RestoreError, Unsupported
from ..kernel.libc import libc, oserror
from . import protocol
from .protocol import FileAttrs, OpenFd, Restoring

SPLICE_F_NONBLOCK = 2
O_LARGEFILE = 0o100000
DELETED = " (deleted)"


@dataclasses.dataclass
class Pipe:
    """A pipe of the tree, with the bytes that were in it."""

    id: int
    capacity: int  # F_GETPIPE_SZ
    data: bytes
    path: str = ""  # a named FIFO's path; "" for a pipe()
    attrs: FileAttrs | None = None  # 1.2: a FIFO unlinked while open: its owner, mode, times
    ino: int = 0  # 1.6: a pipe()'s inode when dumped, its name for --inherit-fd (pipe:[INO], inheritfd.py)


class Collect(protocol.Collect):
    def __init__(self):
        self.pipes: dict[tuple[int, int], Pipe] = {}  # by (st_dev, st_ino)
        self.ends: dict[int, tuple[int, int]] = {}  # pipe id -> (pid, fd) to read it through
        self.ours: set[tuple[int, int]] = set()  # (pid, fd) of procsnap's copies of ends in flight

    def collect_fd(self, fd: OpenFd) -> model.FdEntry | None:
        if not stat.S_ISFIFO(fd.st.st_mode):
            return None
        if fd.in_flight:
            self.ours.add((fd.pid, fd.fd))
        path = "" if fd.link.startswith("pipe:[") else fd.link
        unlinked = path.endswith(DELETED) and fd.st.st_nlink == 0
        if unlinked:
            path = path[: -len(DELETED)]
        elif path and not protocol.same_file(fd.st, _stat_or_none(path)):
            raise Unsupported(f"{fd.where}: named FIFO {path} was removed or replaced", fd.pid)
        key = (fd.st.st_dev, fd.st.st_ino)
        if key not in self.pipes:
            self.pipes[key] = Pipe(len(self.pipes), 0, b"", path, FileAttrs.of(fd.st) if unlinked else None,
                                   0 if path else fd.st.st_ino)
            self.ends[self.pipes[key].id] = (fd.pid, fd.fd)
        return model.FdEntry(fd.fd, model.FdKind.PIPE, fd.flags, 0, path, self.pipes[key].id)

    def collect_tree(self, root: model.Checkpoint, tree_pids: set[int]) -> None:
        """Every pipe's bytes; a pipe another process outside the tree holds
        an end of is refused (restored, it would be a new pipe that process
        knows nothing of: a writer would get EPIPE, a reader EOF)."""
        outside = _held_outside({key for key, p in self.pipes.items() if not p.path}, tree_pids, self.ours)
        for key, (other, fd) in outside.items():
            pid, tfd = self.ends[self.pipes[key].id]
            raise Unsupported(f"pid {pid}: fd {tfd} is a pipe (pipe:[{key[1]}]) that pid {other} (fd {fd}), outside "
                              "the dumped tree, also holds; not supported", pid)
        for pipe in self.pipes.values():
            pipe.capacity, pipe.data = read_pipe(*self.ends[pipe.id])
        root.pipes = sorted(self.pipes.values(), key=lambda p: p.id)


def _stat_or_none(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None


def read_pipe(pid: int, fd: int) -> tuple[int, bytes]:
    """(capacity, bytes in it) of the pipe at `fd` of `pid`, not consumed:
    a read end of our own (the pipe opened again through /proc) is tee'd
    into a pipe of ours as big, and that one is read."""
    src = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        capacity = fcntl.fcntl(src, fcntl.F_GETPIPE_SZ)
        r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            if fcntl.fcntl(w, fcntl.F_GETPIPE_SZ) < capacity:
                fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, capacity)
            n = libc.tee(src, w, ctypes.c_size_t(capacity), SPLICE_F_NONBLOCK)
            if n < 0:
                err = oserror(f"tee from pipe fd {fd} of pid {pid}")
                if err.errno != 11:  # EAGAIN: empty
                    raise err
                n = 0
            data = bytearray()
            while len(data) < n:
                data += os.read(r, n - len(data))
            return capacity, bytes(data)
        finally:
            os.close(r)
            os.close(w)
    finally:
        os.close(src)


def _held_outside(keys: set[tuple[int, int]], tree_pids: set[int],
                  ours: set[tuple[int, int]] = frozenset()) -> dict[tuple[int, int], tuple[int, int]]:
    """(dev, inode) of those pipes some process outside the tree has open ->
    (that pid, its fd); but for the (pid, fd) in `ours`."""
    if not keys:
        return {}
    links = {f"pipe:[{ino}]": (dev, ino) for dev, ino in keys}
    found: dict[tuple[int, int], tuple[int, int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in tree_pids:
            continue
        try:
            fds = os.listdir(f"/proc/{name}/fd")
        except OSError:
            continue  # gone, or a kernel thread
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{name}/fd/{fd}")
            except OSError:
                continue
            if link in links and (int(name), int(fd)) not in ours:
                found.setdefault(links[link], (int(name), int(fd)))
    return found


class Prepare(protocol.Prepare):
    fd_kinds = (model.FdKind.PIPE,)

    def __init__(self, root, tree_fds):
        super().__init__(root, tree_fds)
        self.pipes = {p.id: p for p in root.checkpoint.pipes}
        self.ends: dict[tuple[int, bool], int] = {}  # (pipe id, write end) -> restorer fd
        self.ends_used: set[tuple[int, bool]] = set()

    def open_fd(self, entry: model.FdEntry, proc: Restoring) -> int:
        return self.end(entry.file_id, bool(entry.flags & (os.O_WRONLY | os.O_RDWR)), int(entry.flags))

    def end(self, pipe_id: int, write: bool, flags: int) -> int:
        """A description of one end of the pipe: the pipe's own the first
        time, another one (the pipe opened again) after that, or when the
        dumped one had been opened again (as /dev/fd/N): open() adds
        O_LARGEFILE, pipe() does not."""
        pipe = self.pipes[pipe_id]
        fresh = (pipe_id, write) in self.ends_used or bool(flags & O_LARGEFILE) or bool(pipe.path)
        if not fresh:
            self.ends_used.add((pipe_id, write))
        if (pipe_id, write) not in self.ends:
            if pipe.attrs is not None:
                r = w = self.own(_make_unlinked(pipe))
            elif pipe.path:  # held open for reading and writing while the restore lasts
                try:  # (never opened if it is not a FIFO: opening a device can act)
                    if not stat.S_ISFIFO(os.stat(pipe.path).st_mode):
                        raise RestoreError(f"named FIFO {pipe.path}: is not a FIFO any more")
                    r = w = self.own(os.open(pipe.path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC))
                except OSError as err:
                    raise RestoreError(f"named FIFO {pipe.path}: cannot open it: {err.strerror}") from err
                if not stat.S_ISFIFO(os.fstat(r).st_mode):
                    raise RestoreError(f"named FIFO {pipe.path}: is not a FIFO any more")
            else:
                r, w = (self.own(fd) for fd in os.pipe2(os.O_CLOEXEC))
            try:
                if pipe.capacity > fcntl.fcntl(w, fcntl.F_GETPIPE_SZ):
                    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, pipe.capacity)
                view = memoryview(pipe.data)
                os.set_blocking(w, False)
                while view:
                    view = view[os.write(w, view):]
            except OSError as err:
                raise RestoreError(f"pipe {pipe_id}: cannot refill it with its {len(pipe.data)} bytes "
                                   f"(capacity {pipe.capacity}): {err.strerror}") from err
            if pipe.attrs is not None:
                pipe.attrs.apply_times(r)  # the refill moved them
            self.ends[pipe_id, False], self.ends[pipe_id, True] = r, w
        fd = self.ends[pipe_id, write]
        if fresh:  # through our own fd, never the path again: it is the same FIFO for sure
            fd = self.own(os.open(f"/proc/self/fd/{fd}", (flags & os.O_ACCMODE) | os.O_CLOEXEC | os.O_NONBLOCK))
        fcntl.fcntl(fd, fcntl.F_SETFL, flags & (os.O_NONBLOCK | os.O_APPEND | os.O_DIRECT))
        return fd


def _make_unlinked(pipe: Pipe) -> int:
    """An unlinked FIFO made again, open for reading and writing."""
    return protocol.open_unlinked(pipe.path, lambda name: os.mkfifo(name, 0o600), pipe.attrs.apply,
                                  os.O_RDWR | os.O_NONBLOCK, f"unlinked FIFO {pipe.path}")


def check_tree(ckpt: model.Checkpoint, root: model.Checkpoint) -> list[str]:
    pipes = {p.id for p in root.pipes}
    problems = [f"fd {e.fd}: unknown pipe {e.file_id}" for e in ckpt.fds
                if e.kind == model.FdKind.PIPE and e.file_id not in pipes]
    return problems + [f"pipe {p.id}: {len(p.data)} bytes in a pipe of {p.capacity}" for p in root.pipes
                       if not 0 < p.capacity <= 1 << 30 or len(p.data) > p.capacity
                       or (p.path and (not p.path.startswith("/") or "\0" in p.path))]


def verify(root: model.Checkpoint) -> list[str]:
    problems = []
    for pipe in root.pipes:
        if pipe.path and pipe.attrs is None:
            try:
                if not stat.S_ISFIFO(os.stat(pipe.path).st_mode):
                    problems.append(f"named FIFO {pipe.path}: not a FIFO any more")
            except OSError as err:
                problems.append(f"named FIFO {pipe.path}: {err.strerror}")
    return problems
