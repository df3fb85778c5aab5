"""The process tree rooted at the target: freezing it, and what its
processes share.

freeze    the root (every thread), then the children of each frozen
          process, breadth first. A frozen process cannot fork, so once it
          is frozen its list of children is final; zombies are recorded,
          not frozen (they cannot be traced, and their frozen parent cannot
          reap them meanwhile).
share     what crosses processes, found once all are collected: open file
          descriptions held by several processes (kcmp), pipes with the
          bytes in them (read with tee(), which does not consume them),
          shared memory objects (stored once, from the object itself).
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import fcntl
import os
import socket

from .. import model
from ..errors import Unsupported
from ..image import schema
from ..kernel import proc, sockdiag
from ..kernel.arch.x86_64 import NR, PAGE_SIZE
from ..kernel.libc import libc, oserror, syscall

KCMP_FILE = 0
SPLICE_F_NONBLOCK = 2
IMAGE_DIR = "proc.{pid}"  # a non-root process's image, inside the root's


def children_of(pid: int) -> list[int]:
    kids: list[int] = []
    for tid in proc.list_tids(pid):
        with contextlib.suppress(FileNotFoundError):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids += [int(k) for k in f.read().split()]
    return sorted(set(kids))


class Table:
    """Tree-wide ids: pipes and shared memory objects by (device, inode)."""

    def __init__(self):
        self.pipes: dict[tuple[int, int], model.Pipe] = {}  # by (st_dev, st_ino)
        self.pipe_ends: dict[int, tuple[int, int]] = {}  # pipe id -> (pid, fd) to read it through
        self.shms: dict[int, model.SharedMem] = {}
        self.shm_sources: dict[int, str] = {}  # SharedMem id -> a /proc path to open it by
        self.unix: dict[int, sockdiag.UnixSocket] | None = None  # every unix socket, asked once
        self.sockets: dict[int, model.Socket] = {}  # by inode
        self.socket_ends: dict[int, tuple[int, int, sockdiag.UnixSocket]] = {}  # Socket id -> (pid, fd, diag)

    def pipe(self, key: tuple[int, int], pid: int, fd: int, path: str = "") -> int:
        """The Pipe id of the pipe `key` = (st_dev, st_ino)."""
        if key not in self.pipes:
            self.pipes[key] = model.Pipe(len(self.pipes), 0, b"", path)
            self.pipe_ends[self.pipes[key].id] = (pid, fd)
        return self.pipes[key].id

    def unix_socket(self, inode: int) -> sockdiag.UnixSocket | None:
        if self.unix is None:
            self.unix = sockdiag.unix_sockets()
        return self.unix.get(inode)

    def socket(self, unix: sockdiag.UnixSocket, pid: int, fd: int) -> int:
        if unix.inode not in self.sockets:
            self.sockets[unix.inode] = model.Socket(len(self.sockets), unix.type, -1, shutdown=unix.shutdown)
            self.socket_ends[self.sockets[unix.inode].id] = (pid, fd, unix)
        return self.sockets[unix.inode].id

    def shm(self, inode, path: str, source: str) -> int:
        """The SharedMem id of a memory object (by (device, inode), or ("sysv", shmid))."""
        if inode not in self.shms:
            self.shms[inode] = model.SharedMem(len(self.shms), 0, path)
            self.shm_sources[self.shms[inode].id] = source
        return self.shms[inode].id


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


SO_PEEK_OFF = 42
MSG_PEEK, MSG_DONTWAIT = socket.MSG_PEEK, socket.MSG_DONTWAIT


def fill_sockets(table: Table) -> list[model.Socket]:
    """Peers linked (both ends must be in the tree, or the peer closed) and
    every socket's queue read without consuming it: through a copy of the
    fd (pidfd_getfd), peeking message after message (SO_PEEK_OFF)."""
    for sock in table.sockets.values():
        pid, fd, unix = table.socket_ends[sock.id]
        if unix.peer:
            peer = table.sockets.get(unix.peer)
            if peer is None:
                raise Unsupported(f"pid {pid}: fd {fd} is a unix socket (socket:[{unix.inode}]) whose peer "
                                  f"(socket:[{unix.peer}]) is outside the dumped tree; not supported", pid)
            sock.peer = peer.id
        sock.queued, sock.sndbuf, sock.rcvbuf = _peek_queue(pid, fd, unix)
    return sorted(table.sockets.values(), key=lambda s: s.id)


def _peek_queue(pid: int, fd: int, unix: sockdiag.UnixSocket) -> tuple[list[bytes], int, int]:
    pidfd = os.pidfd_open(pid)
    try:
        local = syscall(NR.pidfd_getfd, pidfd, fd, 0)
    finally:
        os.close(pidfd)
    sk = socket.socket(fileno=local)
    try:
        sndbuf = sk.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        rcvbuf = sk.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        queued: list[bytes] = []
        # sock_diag's rqueue is every byte of a stream's queue, but only the
        # first message's length for datagrams: those are peeked until none
        # is left, each whole (a truncated peek is refused, never stored cut).
        if unix.type == socket.SOCK_STREAM and not unix.rqueue:
            return queued, sndbuf, rcvbuf
        size = max(unix.rqueue, rcvbuf, 1 << 16)
        peek_off = sk.getsockopt(socket.SOL_SOCKET, SO_PEEK_OFF)
        sk.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)
        try:
            while True:
                try:
                    data, anc, msg_flags, _ = sk.recvmsg(size, socket.CMSG_SPACE(4 * 253), MSG_PEEK | MSG_DONTWAIT)
                except BlockingIOError:
                    break
                if anc:
                    for level, kind, payload in anc:
                        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                            for i in range(0, len(payload) - len(payload) % 4, 4):
                                os.close(int.from_bytes(payload[i:i + 4], "little"))
                    raise Unsupported(f"pid {pid}: fd {fd} is a unix socket with file descriptors or "
                                      "credentials in flight; not supported", pid)
                if msg_flags & socket.MSG_TRUNC:
                    raise Unsupported(f"pid {pid}: fd {fd} is a unix socket with a message of more than "
                                      f"{size} bytes queued; not supported", pid)
                if not data and unix.type == socket.SOCK_STREAM:
                    break
                queued.append(data)
                if unix.type == socket.SOCK_STREAM and sum(map(len, queued)) >= unix.rqueue:
                    break
                if len(queued) > 1 << 16:
                    raise Unsupported(f"pid {pid}: fd {fd} is a unix socket whose queue does not end", pid)
        finally:
            sk.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, peek_off)
        if unix.type == socket.SOCK_STREAM:
            queued = [b"".join(queued)]
        return queued, sndbuf, rcvbuf
    finally:
        sk.close()


def fill_pipes(table: Table, tree_pids: set[int]) -> list[model.Pipe]:
    """Every pipe's bytes; a pipe another process outside the tree holds an
    end of is refused (restored, it would be a new pipe that process knows
    nothing of: a writer would get EPIPE, a reader EOF)."""
    outside = _pipes_held_outside({key for key, p in table.pipes.items() if not p.path}, tree_pids)
    for key, (other, fd) in outside.items():
        pid, tfd = table.pipe_ends[table.pipes[key].id]
        raise Unsupported(f"pid {pid}: fd {tfd} is a pipe (pipe:[{key[1]}]) that pid {other} (fd {fd}), outside the "
                          "dumped tree, also holds; not supported", pid)
    for pipe in table.pipes.values():
        pipe.capacity, pipe.data = read_pipe(*table.pipe_ends[pipe.id])
    return sorted(table.pipes.values(), key=lambda p: p.id)


def _pipes_held_outside(keys: set[tuple[int, int]], tree_pids: set[int]) -> dict[tuple[int, int], tuple[int, int]]:
    """(dev, inode) of those pipes some process outside the tree has open ->
    (that pid, its fd)."""
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
            if link in links:
                found.setdefault(links[link], (int(name), int(fd)))
    return found


def same_description(pid_a: int, fd_a: int, pid_b: int, fd_b: int) -> bool:
    """Whether two fds (of one process or two) are one open file description."""
    return syscall(NR.kcmp, pid_a, pid_b, KCMP_FILE, fd_a, fd_b) == 0


def link_descriptions(ckpts: list[model.Checkpoint]) -> None:
    """Give every open file description held by more than one process of
    the tree a tree-wide id (FdEntry.desc): kcmp says which are one."""
    by_inode: dict[tuple[int, int], list[tuple[int, model.FdEntry]]] = {}
    for ckpt in ckpts:
        pid = ckpt.task.pid
        for entry in ckpt.fds:
            if entry.shares_with >= 0:
                continue
            st = os.stat(f"/proc/{pid}/fd/{entry.fd}")
            by_inode.setdefault((st.st_dev, st.st_ino), []).append((pid, entry))
    next_id = 0
    for group in by_inode.values():
        if len({pid for pid, _ in group}) < 2:
            continue
        for i, (pid, entry) in enumerate(group):
            for prev_pid, prev in group[:i]:
                if prev_pid != pid and same_description(prev_pid, prev.fd, pid, entry.fd):
                    if prev.desc < 0:
                        prev.desc = next_id
                        next_id += 1
                    entry.desc = prev.desc
                    break
    for ckpt in ckpts:  # aliases in a process follow the fd they alias
        first = {e.fd: e for e in ckpt.fds}
        for entry in ckpt.fds:
            if entry.shares_with >= 0:
                entry.desc = first[entry.shares_with].desc


class CowIndex:
    """Pages shared copy-on-write between processes of the tree are stored
    once, by the first process (tree order) that has them.

    Every process claims its shared page frames before any page is read:
    reading a page shared copy-on-write with process_vm_readv (a pinning
    read) makes the kernel give the reader's mm a copy of its own, so the
    sharing is gone once one of them has been read."""

    def __init__(self):
        self.owner: dict[int, tuple[int, int]] = {}  # pfn -> (process index, vaddr)
        self.written: dict[int, tuple[str, list[int], list[model.PageRun]]] = {}  # index -> (source, vaddrs, runs)

    def claim(self, index: int, pid: int, runs: list) -> tuple[list, list[tuple[int, int, int, int]]]:
        """`runs` (vma, address, length) less the pages an earlier process
        owns, and those as (vaddr, owner index, owner's vaddr, VMA start)."""
        keep: list = []
        refs: list[tuple[int, int, int, int]] = []
        fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        try:
            for vma, addr, length in runs:
                pos = addr
                for i, pfn in proc.shared_frames(proc.read_pagemap(fd, addr, addr + length)):
                    page = addr + i * PAGE_SIZE
                    owner = self.owner.setdefault(pfn, (index, page)) if pfn else (index, page)
                    if owner[0] == index:
                        continue
                    if page > pos:
                        keep.append((vma, pos, page - pos))
                    pos = page + PAGE_SIZE
                    refs.append((page, *owner, vma.start))
                if addr + length > pos:
                    keep.append((vma, pos, addr + length - pos))
        finally:
            os.close(fd)
        return keep, refs

    def wrote(self, index: int, source: str, runs: list[model.PageRun]) -> None:
        ordered = sorted(runs, key=lambda r: r.vaddr)
        self.written[index] = (source, [r.vaddr for r in ordered], ordered)

    def resolve(self, refs: list[tuple[int, int, int, int]]) -> model.PageRefs | None:
        """PageRefs for claimed pages, now that their owners are written. A
        page its owner left out (all zeros) is left out here too."""
        sources: list[str] = []
        packed: list[list[int]] = []
        vma_of_last = -1
        for page, owner, owner_page, vma_start in refs:
            source, vaddrs, runs = self.written[owner]
            i = bisect.bisect_right(vaddrs, owner_page) - 1
            if i < 0 or owner_page >= runs[i].vaddr + runs[i].npages * PAGE_SIZE:
                continue  # a zero page, not stored
            offset = runs[i].offset + owner_page - runs[i].vaddr
            if source not in sources:
                sources.append(source)
            src = sources.index(source)
            last = packed[-1] if packed else None
            if last and vma_of_last == vma_start and last[0] + last[1] * PAGE_SIZE == page and last[2] == src \
                    and last[3] + last[1] * PAGE_SIZE == offset:
                last[1] += 1
            else:
                packed.append([page, 1, src, offset])
            vma_of_last = vma_start
        if not packed:
            return None
        return model.PageRefs(sources, b"".join(schema.PAGE_REF.pack(*r) for r in packed))


SEEK_DATA, SEEK_HOLE = 3, 4
EXTENT_CHUNK = 64 << 20


def write_shms(table: Table, writer) -> list[model.SharedMem]:
    """Each shared memory object's data extents (SEEK_DATA/SEEK_HOLE on the
    object itself, opened through /proc: pages no process touched are not
    read) into `writer`'s ghosts.img."""
    for obj in table.shms.values():
        fd = os.open(table.shm_sources[obj.id], os.O_RDONLY | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            obj.size = st.st_size
            if obj.sysv_id < 0:
                obj.mode = st.st_mode & 0o7777
            else:
                obj.mode = (proc.sysv_shm(obj.sysv_id) or {"perms": 0o600})["perms"] & 0o777
            off = 0
            while off < obj.size:
                try:
                    start = os.lseek(fd, off, SEEK_DATA)
                except OSError as err:
                    if err.errno == 6:  # ENXIO: no data after off
                        break
                    raise
                end = min(os.lseek(fd, start, SEEK_HOLE), obj.size)
                for pos in range(start, end, EXTENT_CHUNK):
                    data = os.pread(fd, min(EXTENT_CHUNK, end - pos), pos)
                    blob, xxh3 = writer.write_ghost(data)
                    obj.extents.append([pos, len(data), blob, xxh3])
                off = end
        finally:
            os.close(fd)
    return sorted(table.shms.values(), key=lambda m: m.id)


def check_sessions(procs: list[model.Proc], shell_job: bool = False) -> None:
    """What restore can rebuild: a process is in its parent's session or
    leads its own; it is in its parent's process group, leads its own, or
    joins one led by a process created before it (lower pid, same session).
    The root in a session or group led from outside the tree would be
    restored into the restorer's: refused unless shell_job says so (CRIU)."""
    by_pid = {p.pid: p for p in procs}
    root = procs[0]
    outside = [f"{what} {leader} (leader: pid {leader})" for what, leader in
               (("session", root.sid), ("process group", root.pgid)) if leader != root.pid]
    if outside and not shell_job:
        verb = "are" if len(outside) > 1 else "is"
        raise Unsupported(f"pid {root.pid}: {' and '.join(outside)} {verb} led from outside the dumped tree; "
                          "restored, it would join the restorer's instead; dump with --shell-job if that is wanted",
                          root.pid)
    for p in procs[1:]:
        parent = by_pid[p.ppid]
        if p.sid not in (parent.sid, p.pid):
            raise Unsupported(f"pid {p.pid}: in session {p.sid}, which is neither its parent's ({parent.sid}) "
                              "nor its own; not supported", p.pid)
        if p.pgid in (parent.pgid, p.pid):
            continue
        leader = by_pid.get(p.pgid)
        if leader is None or leader.sid != p.sid:
            raise Unsupported(f"pid {p.pid}: in process group {p.pgid}, led by no process of its session in the "
                              "tree; not supported", p.pid)
