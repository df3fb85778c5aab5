"""Connected, unnamed unix sockets of the tree (socketpair), with the
messages queued to them. sock_diag names each socket's peer; both ends
must be in the tree, or the peer closed. A listening socket bound to a
path or an abstract name with no connection waiting (a tmux server's) is
bound and listens again; other bound sockets are refused.

dump     queues read without consuming them: through a copy of the fd
         (pidfd_getfd), peeking message after message (SO_PEEK_OFF).
restore  a socketpair per pair (a stand-in closed again for a closed
         peer), each end refilled from the other.
"""

from __future__ import annotations

import contextlib
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
from .protocol import FileAttrs, OpenFd, Restoring

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
    # 1.3: a listening socket: its address (a path, or "\0" and an abstract name), backlog, the path's file
    address: bytes = b""
    backlog: int = 0
    attrs: FileAttrs | None = None


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
        if unix.state == TCP_LISTEN and unix.name:
            return self._listener(fd, unix)
        if unix.state == TCP_LISTEN or unix.name:
            raise Unsupported(f"{fd.where} is a {'listening' if unix.state == TCP_LISTEN else 'bound'} unix socket "
                              f"({fd.link}{' ' + unix.name.decode(errors='replace') if unix.name else ''}); "
                              "only socket pairs are supported", fd.pid)
        if unix.inode not in self.sockets:
            self.sockets[unix.inode] = Socket(len(self.sockets), unix.type, -1, shutdown=unix.shutdown)
            self.ends[self.sockets[unix.inode].id] = (fd.pid, fd.fd, unix)
        return model.FdEntry(fd.fd, model.FdKind.UNIX, fd.flags, 0, fd.link, self.sockets[unix.inode].id)

    def _listener(self, fd: OpenFd, unix: UnixSocket) -> model.FdEntry:
        address = unix.name if unix.name.startswith(b"\0") else unix.name.rstrip(b"\0")  # a path's NUL counted
        name = address.decode(errors="replace")
        if unix.rqueue:
            raise Unsupported(f"{fd.where} is a unix socket listening on {name} with {unix.rqueue} connections "
                              "waiting to be accepted; not supported", fd.pid)
        attrs = None
        if not address.startswith(b"\0"):
            try:
                st = os.stat(address)
            except OSError as err:
                raise Unsupported(f"{fd.where} is a unix socket listening on {name}: {err.strerror}", fd.pid) from err
            if not stat.S_ISSOCK(st.st_mode):
                raise Unsupported(f"{fd.where} is a unix socket listening on {name}, which is no socket now "
                                  "(removed or replaced); not supported", fd.pid)
            attrs = FileAttrs.of(st)
        if unix.inode not in self.sockets:
            self.sockets[unix.inode] = Socket(len(self.sockets), unix.type, -1, address=address,
                                              backlog=unix.wqueue, attrs=attrs)
        return model.FdEntry(fd.fd, model.FdKind.UNIX, fd.flags, 0, fd.link, self.sockets[unix.inode].id)

    def collect_tree(self, root: model.Checkpoint, tree_pids: set[int]) -> None:
        """Peers linked and every socket's queue read."""
        for sock in self.sockets.values():
            if sock.address:
                continue
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
        if sock_id not in self.fds and self.sockets[sock_id].address:
            self.fds[sock_id] = self.own(_listen(self.sockets[sock_id]))
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


def _listen(sock: Socket) -> int:
    """A listening socket bound to its address again. The path the killed
    tree left behind is a socket nobody listens on: it is removed first; a
    path someone listens on, or that is no socket, fails the restore."""
    import socket

    name = sock.address.decode(errors="replace")
    what = f"unix socket listening on {name}"
    if sock.attrs is not None:
        stale = _stale(sock.address)
        if stale:
            raise RestoreError(f"{what}: {stale}")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock.address)
    sk = socket.socket(socket.AF_UNIX, sock.type | socket.SOCK_CLOEXEC)
    try:
        sk.bind(sock.address)
        if sock.attrs is not None:
            sock.attrs.apply(sock.address)
        sk.listen(sock.backlog)
    except OSError as err:
        sk.close()
        raise RestoreError(f"{what}: {err.strerror}") from err
    return sk.detach()


def _stale(path: bytes) -> str | None:
    """Why `path` cannot be bound again (None: it is free, or a socket nobody listens on)."""
    import socket

    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISSOCK(st.st_mode):
        return "the path is there and is no socket"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as probe:
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            return None
        except OSError as err:
            if err.errno == 91:  # EPROTOTYPE: a datagram or seqpacket socket; listened on
                return "another socket is bound there"
            return None
    return "another process listens there"


def verify(root: model.Checkpoint) -> list[str]:
    problems = []
    for sock in root.sockets:
        if sock.attrs is not None:
            why = _stale(sock.address)
            if why:
                problems.append(f"unix socket listening on {sock.address.decode(errors='replace')}: {why}")
    return problems


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
    problems += [f"unix socket {sk.id}: listening on {sk.address!r}, backlog {sk.backlog}" for sk in root.sockets
                 if sk.address and (sk.peer != -1 or not 0 <= sk.backlog < 1 << 31 or (
                     (not sk.address.startswith(b"/") or b"\0" in sk.address) if sk.attrs is not None
                     else not sk.address.startswith(b"\0")))]
    problems += [f"unix socket {sk.id}: type {sk.type}, peer {sk.peer}" for sk in root.sockets
                 if sk.type not in (1, 2, 5) or (sk.peer >= 0 and sk.peer not in sockets) or sk.peer == sk.id]
    return problems + [f"unix socket {sk.id}: buffers {sk.sndbuf}/{sk.rcvbuf}, {sum(map(len, sk.queued))} bytes "
                       "queued" for sk in root.sockets if not (0 <= sk.sndbuf < 1 << 31 and 0 <= sk.rcvbuf < 1 << 31)
                       or sum(map(len, sk.queued)) > 1 << 30 or not 0 <= sk.shutdown <= 3]
