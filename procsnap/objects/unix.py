"""Connected, unnamed unix sockets of the tree (socketpair), with the
messages queued to them. sock_diag names each socket's peer; both ends
must be in the tree, or the peer closed. Listening and bound sockets are
refused.

dump     queues read without consuming them: through a copy of the fd
         (pidfd_getfd), peeking message after message (SO_PEEK_OFF).
restore  a socketpair per pair (a stand-in closed again for a closed
         peer), each end refilled from the other.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import stat
import typing

from .. import model
from ..errors import RestoreError, Unsupported
from ..kernel.arch.x86_64 import NR
from ..kernel.libc import syscall
from . import protocol
from .protocol import OpenFd, Restoring

if typing.TYPE_CHECKING:
    from ..kernel.sockdiag import UnixSocket

# socket and sock_diag are imported where they are used: reading an image
# (show, verify) needs only the record, and importing them costs start-up.
SO_PEEK_OFF = 42
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33
TCP_LISTEN = 10


@dataclasses.dataclass
class Socket:
    """A connected, unnamed unix socket of the tree (socketpair), with the
    messages queued to it (a stream: its bytes, as one piece)."""

    id: int
    type: int  # SOCK_STREAM, SOCK_DGRAM, SOCK_SEQPACKET
    peer: int  # Socket.id of the other end; -1 if that was closed
    queued: list[bytes] = dataclasses.field(default_factory=list)
    shutdown: int = 0  # RCV_SHUTDOWN 1 | SEND_SHUTDOWN 2
    sndbuf: int = 0
    rcvbuf: int = 0


class Collect(protocol.Collect):
    def __init__(self):
        self.unix: dict[int, UnixSocket] | None = None  # every unix socket, asked once
        self.sockets: dict[int, Socket] = {}  # by inode
        self.ends: dict[int, tuple[int, int, UnixSocket]] = {}  # Socket id -> (pid, fd, diag)

    def collect_fd(self, fd: OpenFd) -> model.FdEntry | None:
        if not stat.S_ISSOCK(fd.st.st_mode):
            return None
        if self.unix is None:
            from ..kernel import sockdiag

            self.unix = sockdiag.unix_sockets()
        unix = self.unix.get(fd.st.st_ino)
        if unix is None:
            return None
        if unix.state == TCP_LISTEN or unix.name:
            raise Unsupported(f"{fd.where} is a {'listening' if unix.state == TCP_LISTEN else 'bound'} unix socket "
                              f"({fd.link}{' ' + unix.name.decode(errors='replace') if unix.name else ''}); "
                              "only socket pairs are supported", fd.pid)
        if unix.inode not in self.sockets:
            self.sockets[unix.inode] = Socket(len(self.sockets), unix.type, -1, shutdown=unix.shutdown)
            self.ends[self.sockets[unix.inode].id] = (fd.pid, fd.fd, unix)
        return model.FdEntry(fd.fd, model.FdKind.UNIX, fd.flags, 0, fd.link, self.sockets[unix.inode].id)

    def collect_tree(self, root: model.Checkpoint, tree_pids: set[int]) -> None:
        """Peers linked and every socket's queue read."""
        for sock in self.sockets.values():
            pid, fd, unix = self.ends[sock.id]
            if unix.peer:
                peer = self.sockets.get(unix.peer)
                if peer is None:
                    raise Unsupported(f"pid {pid}: fd {fd} is a unix socket (socket:[{unix.inode}]) whose peer "
                                      f"(socket:[{unix.peer}]) is outside the dumped tree; not supported", pid)
                sock.peer = peer.id
            sock.queued, sock.sndbuf, sock.rcvbuf = _peek_queue(pid, fd, unix)
        root.sockets = sorted(self.sockets.values(), key=lambda s: s.id)


def _peek_queue(pid: int, fd: int, unix: UnixSocket) -> tuple[list[bytes], int, int]:
    import socket

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
                    data, anc, msg_flags, _ = sk.recvmsg(size, socket.CMSG_SPACE(4 * 253),
                                                              socket.MSG_PEEK | socket.MSG_DONTWAIT)
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


class Prepare(protocol.Prepare):
    fd_kinds = (model.FdKind.UNIX,)

    def __init__(self, root, tree_fds):
        super().__init__(root, tree_fds)
        self.sockets = {sk.id: sk for sk in root.checkpoint.sockets}
        self.fds: dict[int, int] = {}  # Socket id -> restorer fd

    def open_fd(self, entry: model.FdEntry, proc: Restoring) -> int:
        """One end of a socket pair, made with its peer (or, if the peer was
        closed, with a stand-in closed again), each refilled with the
        messages queued to it, sent from the other end."""
        import socket

        sock_id = entry.file_id
        if sock_id not in self.fds:
            sock = self.sockets[sock_id]
            peer = self.sockets.get(sock.peer)
            what = f"unix socket {sock_id}"
            try:
                a, b = socket.socketpair(socket.AF_UNIX, sock.type | socket.SOCK_CLOEXEC)
            except OSError as err:
                raise RestoreError(f"{what}: socketpair: {err.strerror}") from err
            a_fd, b_fd = self.own(a.detach()), self.own(b.detach())
            self.fds[sock.id] = a_fd
            if peer is not None:
                self.fds[peer.id] = b_fd
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
                self.tree_fds.close(b_fd)
        fd = self.fds[sock_id]
        fcntl.fcntl(fd, fcntl.F_SETFL, int(entry.flags) & os.O_NONBLOCK)
        return fd


def _refill(into: int, frm: int, sock: Socket) -> None:
    import socket

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


def _buffers_and_shutdown(fd: int, sock: Socket) -> None:
    import socket

    with socket.socket(fileno=os.dup(fd)) as sk:
        for opt, value in ((SO_SNDBUFFORCE, sock.sndbuf), (SO_RCVBUFFORCE, sock.rcvbuf)):
            if value:
                sk.setsockopt(socket.SOL_SOCKET, opt, value // 2)  # the kernel doubles what it is given
        if sock.shutdown & 1:
            sk.shutdown(socket.SHUT_RD)
        if sock.shutdown & 2:
            sk.shutdown(socket.SHUT_WR)


def check_tree(ckpt: model.Checkpoint, root: model.Checkpoint) -> list[str]:
    sockets = {sk.id for sk in root.sockets}
    problems = [f"fd {e.fd}: unknown unix socket {e.file_id}" for e in ckpt.fds
                if e.kind == model.FdKind.UNIX and e.file_id not in sockets]
    problems += [f"unix socket {sk.id}: type {sk.type}, peer {sk.peer}" for sk in root.sockets
                 if sk.type not in (1, 2, 5) or (sk.peer >= 0 and sk.peer not in sockets) or sk.peer == sk.id]
    return problems + [f"unix socket {sk.id}: buffers {sk.sndbuf}/{sk.rcvbuf}, {sum(map(len, sk.queued))} bytes "
                       "queued" for sk in root.sockets if not (0 <= sk.sndbuf < 1 << 31 and 0 <= sk.rcvbuf < 1 << 31)
                       or sum(map(len, sk.queued)) > 1 << 30 or not 0 <= sk.shutdown <= 3]
