"""prepare_files: open, in the restorer, every file the new process needs.

Everything that can fail because of the outside world (a library replaced
since the dump, a missing file, no terminal) fails here, before any process
exists. The opened descriptions are handed to the child by clone (it
inherits the restorer's fd table) and moved to their numbers there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import socket
import stat

from .. import model
from ..errors import RestoreError
from ..image.reader import Image
from ..kernel import anonfd, mapping, sysv

O_LARGEFILE = 0o100000

# Flags that only matter at open time, or that fcntl/dup decide.
_OPEN_MASK = ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_CLOEXEC | os.O_NOCTTY)


@dataclasses.dataclass
class PreparedFiles:
    """Descriptions open in the restorer, and where they go in the child."""

    fd_sources: dict[int, int]  # target fd -> restorer fd (first of each shared group)
    fd_aliases: dict[int, int]  # target fd -> target fd it shares a description with
    cloexec: set[int]
    map_sources: dict[str, int]  # map_key() -> restorer fd, for mmap
    exe: int  # restorer fd of the executable
    shm_sources: dict[int, int] = dataclasses.field(default_factory=dict)  # SharedMem id -> restorer fd
    # epoll target fd -> [fd, events, data] watches the child adds once its fds are in place
    epolls: dict[int, list[list[int]]] = dataclasses.field(default_factory=dict)
    shared: set[int] = dataclasses.field(default_factory=set)  # sources owned by the tree's SharedFiles
    sysv_ids: dict[int, int] = dataclasses.field(default_factory=dict)  # SharedMem id -> shmid, attached by shmat

    def all_sources(self) -> list[int]:
        return sorted(set(self.fd_sources.values()) | set(self.map_sources.values()) | {self.exe}
                      | set(self.shm_sources.values()))

    def close(self) -> None:
        for fd in set(self.all_sources()) - self.shared:
            try:
                os.close(fd)
            except OSError:
                pass


def changed_since_dump(ref: model.FileRef, st: os.stat_result) -> str | None:
    if st.st_size != ref.size:
        return f"size {ref.size} at dump, {st.st_size} now"
    if st.st_mtime_ns != ref.mtime_ns:
        return "modified since the dump"
    return None


def _open(path: str, flags: int, what: str) -> int:
    try:
        return os.open(path, flags)
    except OSError as err:
        raise RestoreError(f"{what}: cannot open {path}: {err.strerror}") from err


SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33


def _refill(into: int, frm: int, sock: model.Socket) -> None:
    total = sum(map(len, sock.queued))
    if not total:
        return
    with socket.socket(fileno=os.dup(frm)) as sender, socket.socket(fileno=os.dup(into)) as receiver:
        sender.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 2 * total + (1 << 16))
        receiver.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 2 * total + (1 << 16))
        sender.setblocking(False)
        for msg in sock.queued:
            if sock.type == socket.SOCK_STREAM:
                view = memoryview(msg)
                while view:
                    view = view[sender.send(view):]
            else:
                sender.send(msg)


def _buffers_and_shutdown(fd: int, sock: model.Socket) -> None:
    with socket.socket(fileno=os.dup(fd)) as sk:
        for opt, value in ((SO_SNDBUFFORCE, sock.sndbuf), (SO_RCVBUFFORCE, sock.rcvbuf)):
            if value:
                sk.setsockopt(socket.SOL_SOCKET, opt, value // 2)  # the kernel doubles what it is given
        if sock.shutdown & 1:
            sk.shutdown(socket.SHUT_RD)
        if sock.shutdown & 2:
            sk.shutdown(socket.SHUT_WR)


def _nonblock(entry: model.FdEntry) -> bool:
    return bool(entry.flags & os.O_NONBLOCK)


ANON_MAKERS = {
    model.FdKind.EVENTFD: lambda e: anonfd.make_eventfd(e.params.get("count", 0), bool(e.params.get("semaphore")),
                                                        _nonblock(e)),
    model.FdKind.SIGNALFD: lambda e: anonfd.make_signalfd(e.params.get("mask", 0), _nonblock(e)),
    model.FdKind.TIMERFD: lambda e: anonfd.make_timerfd(e.params.get("clockid", 1), _nonblock(e),
                                                        e.params.get("value_ns", 0), e.params.get("interval_ns", 0),
                                                        e.params.get("ticks", 0)),
    model.FdKind.EPOLL: lambda e: anonfd.make_epoll(),
}


class SharedFiles:
    """What the processes of a tree share, made once in the restorer and
    inherited by all of them: open file descriptions (FdEntry.desc), pipes
    refilled with their bytes, shared anonymous memory objects."""

    def __init__(self, root_image: Image):
        self.image = root_image
        root = root_image.checkpoint
        self.pipes = {p.id: p for p in root.pipes}
        self.shms = {m.id: m for m in root.shms}
        self.descs: dict[int, int] = {}
        self.pipe_ends: dict[tuple[int, bool], int] = {}
        self.ends_used: set[tuple[int, bool]] = set()
        self.shm_fds: dict[int, int] = {}
        self.sockets = {sk.id: sk for sk in root.sockets}
        self.sysv_done: set[int] = set()
        self.sysv_made: set[int] = set()
        self.socket_fds: dict[int, int] = {}
        self.opened: set[int] = set()

    def _own(self, fd: int) -> int:
        self.opened.add(fd)
        return fd

    def pipe_end(self, pipe_id: int, write: bool, flags: int) -> int:
        """A description of one end of the pipe: the pipe's own the first
        time, another one (the pipe opened again) after that, or when the
        dumped one had been opened again (as /dev/fd/N): open() adds
        O_LARGEFILE, pipe() does not."""
        pipe = self.pipes[pipe_id]
        fresh = (pipe_id, write) in self.ends_used or bool(flags & O_LARGEFILE) or bool(pipe.path)
        if not fresh:
            self.ends_used.add((pipe_id, write))
        if (pipe_id, write) not in self.pipe_ends:
            if pipe.path:  # held open for reading and writing while the restore lasts
                try:  # (never opened if it is not a FIFO: opening a device can act)
                    if not stat.S_ISFIFO(os.stat(pipe.path).st_mode):
                        raise RestoreError(f"named FIFO {pipe.path}: is not a FIFO any more")
                    r = w = self._own(os.open(pipe.path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC))
                except OSError as err:
                    raise RestoreError(f"named FIFO {pipe.path}: cannot open it: {err.strerror}") from err
                if not stat.S_ISFIFO(os.fstat(r).st_mode):
                    raise RestoreError(f"named FIFO {pipe.path}: is not a FIFO any more")
            else:
                r, w = (self._own(fd) for fd in os.pipe2(os.O_CLOEXEC))
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
            self.pipe_ends[pipe_id, False], self.pipe_ends[pipe_id, True] = r, w
        fd = self.pipe_ends[pipe_id, write]
        if fresh:  # through our own fd, never the path again: it is the same FIFO for sure
            fd = self._own(os.open(f"/proc/self/fd/{fd}", (flags & os.O_ACCMODE) | os.O_CLOEXEC | os.O_NONBLOCK))
        fcntl.fcntl(fd, fcntl.F_SETFL, flags & (os.O_NONBLOCK | os.O_APPEND | os.O_DIRECT))
        return fd

    def sysv(self, shm_id: int) -> int:
        """The SysV segment with its saved id (made again if it is gone),
        filled with its contents; returns its shmid."""
        obj = self.shms[shm_id]
        if shm_id not in self.sysv_done:
            try:
                if sysv.ensure(obj.sysv_id, obj.sysv_key, obj.size, obj.mode, private_if_taken=obj.sysv_removed):
                    self.sysv_made.add(obj.sysv_id)
                sysv.write(obj.sysv_id, [(pos, self.image.read_blob(blob, length, xxh3))
                                         for pos, length, blob, xxh3 in obj.extents])
            except OSError as err:
                raise RestoreError(f"SysV shared memory segment {obj.sysv_id}: {err.strerror or err}") from err
            self.sysv_done.add(shm_id)
        return obj.sysv_id

    def finish(self, ok: bool) -> None:
        """Segments made here that had been removed at dump are removed again
        once attached (they live while attached); after a failure, every
        segment made here goes. One that was there already is left alone."""
        removed = {m.sysv_id for m in self.shms.values() if m.sysv_removed}
        for shmid in self.sysv_made:
            if not ok or shmid in removed:
                with contextlib.suppress(OSError):
                    sysv.remove(shmid)

    def shm(self, shm_id: int) -> int:
        """An fd of the shared memory object, made as it was: shared anonymous
        memory (taken from /proc/self/map_files, so that it shows as
        /dev/zero (deleted)), a memfd of the same name, or the file at its
        old path, unlinked again once open; then filled with its extents."""
        if shm_id not in self.shm_fds:
            obj = self.shms[shm_id]
            what = f"shared memory {obj.path or '(anonymous)'}"
            try:
                if not obj.path:
                    base = mapping.map_shared_anon(obj.size)
                    try:
                        fd = self._own(os.open(f"/proc/self/map_files/{base:x}-{base + obj.size:x}",
                                               os.O_RDWR | os.O_CLOEXEC))
                    finally:
                        mapping.unmap(base, obj.size)
                elif obj.path.startswith("/memfd:"):
                    fd = self._own(os.memfd_create(obj.path[len("/memfd:"):], os.MFD_CLOEXEC))
                    os.ftruncate(fd, obj.size)
                else:
                    path = _create_beside(obj.path, obj.mode, what)
                    try:
                        fd = self._own(os.open(path, os.O_RDWR | os.O_CLOEXEC))
                    finally:
                        os.unlink(path)
                    os.ftruncate(fd, obj.size)
                for pos, length, blob, xxh3 in obj.extents:
                    data = self.image.read_blob(blob, length, xxh3)
                    view = memoryview(data)
                    while view:
                        view = view[os.pwrite(fd, view, pos + len(data) - len(view)):]
            except OSError as err:
                raise RestoreError(f"{what}: cannot recreate it: {err.strerror}") from err
            self.shm_fds[shm_id] = fd
        return self.shm_fds[shm_id]

    def unix_socket(self, sock_id: int, flags: int) -> int:
        """One end of a socket pair, made with its peer (or, if the peer was
        closed, with a stand-in closed again), each refilled with the
        messages queued to it, sent from the other end."""
        if sock_id not in self.socket_fds:
            sock = self.sockets[sock_id]
            peer = self.sockets.get(sock.peer)
            what = f"unix socket {sock_id}"
            try:
                a, b = socket.socketpair(socket.AF_UNIX, sock.type | socket.SOCK_CLOEXEC)
            except OSError as err:
                raise RestoreError(f"{what}: socketpair: {err.strerror}") from err
            a_fd, b_fd = self._own(a.detach()), self._own(b.detach())
            self.socket_fds[sock.id] = a_fd
            if peer is not None:
                self.socket_fds[peer.id] = b_fd
            try:
                for into, frm, s in ((a_fd, b_fd, sock), (b_fd, a_fd, peer)):
                    if s is not None:
                        _refill(into, frm, s)
                for fd, s in ((a_fd, sock), (b_fd, peer)):
                    if s is not None:
                        _buffers_and_shutdown(fd, s)
            except OSError as err:
                raise RestoreError(f"{what}: cannot refill it: {err.strerror}") from err
            if peer is None:
                os.close(b_fd)
                self.opened.discard(b_fd)
        fd = self.socket_fds[sock_id]
        fcntl.fcntl(fd, fcntl.F_SETFL, flags & os.O_NONBLOCK)
        return fd

    def close(self) -> None:
        for fd in self.opened:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.opened.clear()


def prepare_files(image: Image, shell_job: bool, shared: SharedFiles) -> PreparedFiles:
    ckpt = image.checkpoint
    refs = {f.id: f for f in ckpt.files}
    prepared = PreparedFiles({}, {}, set(), {}, -1)
    prepared.shared = shared.opened  # the same set: what the tree shares is closed by SharedFiles only
    try:
        _prepare_maps(ckpt, refs, prepared)
        for shm_id in sorted({v.shm for v in ckpt.vmas if v.kind == model.VmaKind.SHARED_MEM}):
            prepared.shm_sources[shm_id] = shared.shm(shm_id)
        for shm_id in sorted({v.shm for v in ckpt.vmas if v.kind == model.VmaKind.SYSV_SHM}):
            prepared.sysv_ids[shm_id] = shared.sysv(shm_id)
        _prepare_fds(image, refs, prepared, shell_job, shared)
    except BaseException:
        prepared.close()
        raise
    return prepared


def map_access(vma: model.Vma) -> int:
    """The access mode to open a file mapping's file with: the one it had
    (an r--s mapping of a file opened read-write can be mprotect'ed writable
    later), or for images before 1.2 the least its protection needs."""
    if vma.access >= 0:
        return vma.access
    writable_shared = vma.kind == model.VmaKind.FILE_SHARED and vma.prot & model.Prot.PROT_WRITE
    return os.O_RDWR if writable_shared else os.O_RDONLY


def map_key(file_id: int, access: int) -> str:
    """Names one open of a mapped file: one per file and access mode."""
    return f"{file_id}.{access}"


def _prepare_maps(ckpt: model.Checkpoint, refs: dict[int, model.FileRef], prepared: PreparedFiles) -> None:
    needed = {(v.file_id, map_access(v)) for v in ckpt.vmas
              if v.kind in (model.VmaKind.FILE_PRIVATE, model.VmaKind.FILE_SHARED)}
    needed.add((ckpt.mm.exe_file_id, os.O_RDONLY))
    for fid, access in sorted(needed):
        ref = refs[fid]
        fd = _open(ref.path, access | os.O_CLOEXEC, "mapped file")
        prepared.map_sources[map_key(fid, access)] = fd
        why = changed_since_dump(ref, os.fstat(fd))
        if why:
            raise RestoreError(f"mapped file {ref.path}: {why}; it cannot be mapped again safely")
    prepared.exe = prepared.map_sources[map_key(ckpt.mm.exe_file_id, os.O_RDONLY)]


def _terminal() -> str:
    for fd in (0, 1, 2):
        if os.isatty(fd):
            return os.ttyname(fd)
    raise RestoreError("the image has terminal fds (--shell-job) but procsnap is not running on a terminal")


def _prepare_fds(image: Image, refs: dict[int, model.FileRef], prepared: PreparedFiles, shell_job: bool,
                 shared: SharedFiles) -> None:
    ckpt = image.checkpoint
    ghosts = {g.id: g for g in ckpt.ghosts}
    ghost_paths: dict[int, str] = {}
    try:
        for entry in ckpt.fds:
            if entry.flags & model.OpenFlag.O_CLOEXEC:
                prepared.cloexec.add(entry.fd)
            if entry.shares_with >= 0:
                prepared.fd_aliases[entry.fd] = entry.shares_with
                continue
            flags = (entry.flags & _OPEN_MASK) | os.O_CLOEXEC
            what = f"fd {entry.fd}"
            if entry.desc >= 0 and entry.desc in shared.descs:  # opened for another process of the tree
                prepared.fd_sources[entry.fd] = shared.descs[entry.desc]
                continue
            if entry.kind == model.FdKind.PIPE:
                write = bool(entry.flags & (os.O_WRONLY | os.O_RDWR))
                fd = shared.pipe_end(entry.file_id, write, int(entry.flags))
            elif entry.kind in ANON_MAKERS:
                try:
                    fd = shared._own(ANON_MAKERS[entry.kind](entry))
                except OSError as err:
                    raise RestoreError(f"{what}: cannot make the {entry.kind.value}: {err.strerror}") from err
                if entry.kind == model.FdKind.EPOLL:
                    prepared.epolls[entry.fd] = entry.watches
            elif entry.kind == model.FdKind.UNIX:
                fd = shared.unix_socket(entry.file_id, int(entry.flags))
            elif entry.kind == model.FdKind.SHM:  # a description of its own, as memfd_create made
                fd = shared._own(_open(f"/proc/self/fd/{shared.shm(entry.file_id)}", flags, what))
            elif entry.kind in (model.FdKind.REG, model.FdKind.DIR):
                fd = _open(refs[entry.file_id].path, flags, what)
            elif entry.kind == model.FdKind.DEVICE:
                fd = _open(entry.path, flags, what)
            elif entry.kind == model.FdKind.TTY:
                if not shell_job:
                    raise RestoreError(f"fd {entry.fd} was the terminal {entry.path}; restore with --shell-job")
                fd = _open(_terminal(), flags | os.O_NOCTTY, what)
            elif entry.kind == model.FdKind.GHOST:
                if entry.file_id not in ghost_paths:
                    ghost_paths[entry.file_id] = _recreate_ghost(image, ghosts[entry.file_id])
                fd = _open(ghost_paths[entry.file_id], flags, what)
            else:
                raise RestoreError(f"fd {entry.fd}: kind {entry.kind.value} cannot be restored")
            prepared.fd_sources[entry.fd] = fd
            if entry.desc >= 0:
                shared.descs[entry.desc] = shared._own(fd)
            if entry.kind in (model.FdKind.REG, model.FdKind.GHOST, model.FdKind.SHM) or entry.pos:
                try:
                    os.lseek(fd, entry.pos, os.SEEK_SET)
                except OSError as err:
                    raise RestoreError(f"fd {entry.fd}: cannot seek to {entry.pos}: {err.strerror}") from err
    finally:
        # Ghosts are unlinked again as soon as they are open: as at dump.
        for path in ghost_paths.values():
            try:
                os.unlink(path)
            except OSError:
                pass


def _create_beside(path: str, mode: int, what: str) -> str:
    """Create `path` (or a name beside it, if taken) exclusively; returns it."""
    for n in range(100):
        candidate = path if n == 0 else f"{path}.procsnap-ghost.{n}"
        try:
            fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode & 0o7777)
        except FileExistsError:
            continue
        except OSError as err:
            raise RestoreError(f"{what}: cannot recreate {path}: {err.strerror}") from err
        os.close(fd)
        return candidate
    raise RestoreError(f"{what}: no free name beside {path}")


def _recreate_ghost(image: Image, ghost: model.Ghost) -> str:
    """The file, back at its old path (or beside it if that is taken)."""
    data = image.read_ghost(ghost)
    path = _create_beside(ghost.path, ghost.mode, f"ghost file {ghost.path}")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
    except OSError as err:
        os.unlink(path)
        raise RestoreError(f"ghost file {ghost.path}: cannot write: {err.strerror}") from err
    return path
