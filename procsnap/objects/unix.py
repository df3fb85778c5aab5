"""Unix sockets of the tree: socket pairs, sockets bound to a path (its
file made again with its owner and mode, or the stale one replaced, as
CRIU does) or to an abstract name, bound to a path since unlinked or
replaced, listening ones with the connections waiting in their backlog,
connected stream, seqpacket and datagram sockets with their names, queued
messages (boundaries and senders), shutdown state and options. sock_diag
names each socket's peer, its bound file and a listener's waiting clients.

dump     queues read without consuming them: through a copy of the fd
         (pidfd_getfd), peeking message after message (SO_PEEK_OFF).
         Files in flight (SCM_RIGHTS; the peek installs them here): the fd
         of a process of the tree holding the same open file description,
         or dumped from procsnap's copy as the file it is (unixrights.py);
         sent again at restore in Prepare.ready, one description each.
         Refused by name: a peer outside the tree, a file in flight of a
         kind not dumped that way, files in flight on a stream whose place
         is not readable, credentials from outside, data sent on a
         connection not yet accepted.
restore  every unix socket of the tree at once, in the order names need
         (see build): named ones bound with their files in place, listeners
         listening, pairs made (socketpair, or connect + accept through
         their listener, or a stand-in one at their name), waiting clients
         connected in their backlog's order, datagram sockets connected by
         name; then queues refilled, options set, and the files of names
         unlinked or replaced at the dump put back as they were.
"""

from __future__ import annotations

import contextlib
from .. import records as dataclasses  # the dataclasses API, cheap to import
import fcntl
import os
import stat
import struct
import typing

from .. import model
from ..errors import RestoreError, Unsupported
from . import protocol, unixrights
from .protocol import FileAttrs, OpenFd, Restoring

if typing.TYPE_CHECKING:
    import socket as socket_mod

    from ..kernel.sockdiag import UnixSocket

# socket and sock_diag are imported where they are used: reading an image
# (show, verify) needs only the record, and importing them costs start-up.
SO_PEEK_OFF = 42
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33
TCP_ESTABLISHED, TCP_CLOSE, TCP_LISTEN = 1, 7, 10
SIOCOUTQ = 0x5411  # TIOCOUTQ: bytes (truesize) this socket sent that no one has read yet
UNIX_PATH_MAX = 108
SOCK_STREAM, SOCK_DGRAM, SOCK_SEQPACKET = 1, 2, 5


@dataclasses.dataclass
class Socket:
    """A unix socket of the tree, with the messages queued to it (a
    stream: its bytes, as one piece)."""

    id: int
    type: int  # SOCK_STREAM, SOCK_DGRAM, SOCK_SEQPACKET
    peer: int  # Socket.id of the other end; -1 if none (or that was closed)
    queued: list[bytes] = dataclasses.field(default_factory=list)
    shutdown: int = 0  # RCV_SHUTDOWN 1 | SEND_SHUTDOWN 2
    sndbuf: int = 0
    rcvbuf: int = 0
    # 1.3: named, listening and unconnected sockets
    connected: bool = True  # images before 1.3 hold socket pairs only
    name: bytes = b""  # its address: a path, or \0 and an abstract name; b"" if unnamed
    linked: bool = False  # a path: its socket file was still there (else unlinked or replaced)
    attrs: FileAttrs | None = None  # linked: the socket file's owner, mode, times
    backlog: int = -1  # listening: its backlog; -1 if not listening
    waiting: int = -1  # a client whose connection waits in this listener's backlog (Socket.id)
    icons: list[int] = dataclasses.field(default_factory=list)  # a listener: its waiting clients, in order
    senders: list[bytes] = dataclasses.field(default_factory=list)  # a datagram's sender's name, per message
    options: dict[str, int | str] = dataclasses.field(default_factory=dict)  # objects/sockopt.py
    filter: bytes = b""  # an attached classic BPF program
    ext_peer: bytes = b""  # --ext-unix-sk: the name of the datagram peer outside the tree it is connected to
    creds: list[list[int]] = dataclasses.field(default_factory=list)  # SCM_CREDENTIALS [pid, uid, gid] per message
    # SCM_RIGHTS per message: the files in flight, each as [pid, fd] of a process of the
    # tree holding the same open file description (sent again from there at restore)
    rights: list[list[list[int]]] = dataclasses.field(default_factory=list)

    @property
    def path(self) -> str:
        return "" if not self.name or self.name[0] == 0 else os.fsdecode(self.name)

    def describe(self) -> str:
        name = self.path or ("@" + self.name[1:].decode(errors="replace") if self.name else "unnamed")
        return f"unix socket {self.id} ({name})"


def _name(raw: bytes) -> bytes:
    """A diag name as bind takes it: a path without the NUL the kernel keeps."""
    return raw.split(b"\0", 1)[0] if raw and raw[0] != 0 else raw


class Collect(protocol.Collect):
    def __init__(self):
        self.unix: dict[int, UnixSocket] | None = None  # every unix socket, asked once
        self.sockets: dict[int, Socket] = {}  # by inode
        self.ends: dict[int, tuple[int, int, UnixSocket]] = {}  # Socket id -> (pid, fd, diag)
        self.flight: unixrights.Flight | None = None  # the files in flight, once read

    def collect_fd(self, fd: OpenFd) -> model.FdEntry | None:
        if not stat.S_ISSOCK(fd.st.st_mode):
            return None
        if self.unix is None:
            from ..kernel import sockdiag

            self.unix = sockdiag.unix_sockets()
        unix = self.unix.get(fd.st.st_ino)
        if unix is None:
            return None
        if unix.inode not in self.sockets:
            sock = Socket(len(self.sockets), unix.type, -1, shutdown=unix.shutdown, name=_name(unix.name),
                          connected=unix.state == TCP_ESTABLISHED,
                          backlog=unix.wqueue if unix.state == TCP_LISTEN else -1)
            if sock.name and sock.name[0] != 0:
                _collect_path(fd, sock, unix)
            self.sockets[unix.inode] = sock
            self.ends[sock.id] = (fd.pid, fd.fd, unix)
        return model.FdEntry(fd.fd, model.FdKind.UNIX, fd.flags, 0, fd.link, self.sockets[unix.inode].id)

    def collect_in_flight(self, root: model.Checkpoint, tree_pids: set[int], offer) -> None:
        """Every socket's queue read, its files in flight found in the tree
        or offered to the kinds (unixrights.py); a socket in flight is one
        more socket, whose queue is read in turn."""
        self.flight = unixrights.Flight(root, tree_pids, offer, lambda ino: ino in (self.unix or {}))
        read: set[int] = set()
        while todo := [s for s in self.sockets.values() if s.id not in read]:
            for sock in todo:
                read.add(sock.id)
                pid, fd, unix = self.ends[sock.id]
                sock.queued, sock.senders, sock.creds, sock.options, sock.filter, sock.rights = \
                    _read_socket(pid, fd, unix, self.flight)
        for sock in self.sockets.values():
            if sock.type == SOCK_STREAM and sock.rights:
                pid, fd, unix = self.ends[sock.id]
                peer = self.sockets.get(unix.peer)
                sender = _outq(*self.ends[peer.id][:2]) if peer is not None else None
                unixrights.check_stream_pieces(f"pid {pid}: fd {fd} is a unix stream socket (socket:[{unix.inode}])",
                                               pid, sock.queued, sender)

    def end_dump(self, killed: bool) -> None:
        if self.flight is not None:
            self.flight.close()

    def collect_tree(self, root: model.Checkpoint, tree_pids: set[int]) -> None:
        """Peers linked (queues read by collect_in_flight)."""
        if self.flight is None:
            self.collect_in_flight(root, tree_pids, None)
        waiting = {client: self.sockets[ino] for ino, (_, _, unix) in
                   ((ino, self.ends[s.id]) for ino, s in self.sockets.items()) for client in unix.icons}
        # a connection waiting in the backlog of a listener outside the tree
        outside_listeners = {client: lst for lst in (self.unix or {}).values() if lst.inode not in self.sockets
                             for client in lst.icons}
        for ino, sock in self.sockets.items():
            pid, fd, unix = self.ends[sock.id]
            where = f"pid {pid}: fd {fd} is a unix socket (socket:[{unix.inode}])"
            for client in unix.icons:
                if client not in self.sockets:
                    raise Unsupported(f"{where} listening, with a connection from socket:[{client}], outside the "
                                      "dumped tree, waiting to be accepted; not supported", pid)
                sock.icons.append(self.sockets[client].id)
            listener = outside_listeners.get(ino)
            if listener is not None and ino not in waiting:
                sock.ext_peer = self._outside_peer(where, pid, unix, listener)
            elif ino in waiting:
                sock.waiting = waiting[ino].id
                if _outq(pid, fd):
                    raise Unsupported(f"{where} whose connection waits to be accepted by "
                                      f"{waiting[ino].describe()} with data already sent on it; not supported", pid)
            elif unix.peer:
                peer = self.sockets.get(unix.peer)
                if peer is None:
                    sock.ext_peer = self._outside_peer(where, pid, unix, self.unix.get(unix.peer))
                else:
                    sock.peer = peer.id
            for cred in sock.creds:
                if cred and cred[0] not in tree_pids:
                    raise Unsupported(f"pid {pid}: fd {fd} is a unix socket with credentials in flight from pid "
                                      f"{cred[0]}, outside the dumped tree; not supported", pid)
            if sock.creds and sock.connected and sock.peer < 0:
                raise Unsupported(f"pid {pid}: fd {fd} is a unix socket with credentials in flight from a peer "
                                  "since closed; not supported", pid)
            sock.sndbuf, sock.rcvbuf = int(sock.options.pop("SO_SNDBUF", 0)), int(sock.options.pop("SO_RCVBUF", 0))
        names = {s.name: s for s in self.sockets.values() if s.name}
        for sock in self.sockets.values():
            if sock.type == SOCK_DGRAM and sock.senders and any(n and n not in names for n in sock.senders):
                pid, fd, _ = self.ends[sock.id]
                raise Unsupported(f"pid {pid}: fd {fd} is a unix socket with a datagram queued from a socket "
                                  f"outside the dumped tree ({next(n for n in sock.senders if n not in names)!r}); "
                                  "not supported", pid)
            peer = next((s for s in self.sockets.values() if s.id == sock.peer), None)
            if sock.type == SOCK_DGRAM and peer is not None and not peer.name and peer.peer != sock.id:
                pid, fd, _ = self.ends[sock.id]
                raise Unsupported(f"pid {pid}: fd {fd} is a unix datagram socket connected to an unnamed one that "
                                  "is connected elsewhere; not supported", pid)
        root.sockets = sorted(self.sockets.values(), key=lambda s: s.id)


    def _outside_peer(self, where: str, pid: int, unix: UnixSocket, outside: UnixSocket | None) -> bytes:
        """The name a socket whose peer (or the listener it waits on) is
        outside the tree connects to again (--ext-unix-sk, as CRIU:
        datagram sockets only), or refused."""
        name = _name(outside.name) if outside is not None else b""
        peer = outside.inode if outside is not None else unix.peer
        if not self.options.get("ext_unix_sk"):
            raise Unsupported(f"{where} whose peer (socket:[{peer}]) is outside the dumped tree; not supported "
                              "(--ext-unix-sk dumps a datagram socket connected to a named one)", pid)
        if unix.type != SOCK_DGRAM:
            raise Unsupported(f"{where} whose peer (socket:[{peer}]) is outside the dumped tree: a stream "
                              "connection cannot be made again with a process that is not restored, "
                              "even with --ext-unix-sk", pid)
        if not name:
            raise Unsupported(f"{where} whose peer (socket:[{peer}]) is outside the dumped tree and unnamed: "
                              "there is no name to connect to again, even with --ext-unix-sk", pid)
        return name


def _collect_path(fd: OpenFd, sock: Socket, unix: UnixSocket) -> None:
    """Whether the socket's file is still at its path, and its attributes."""
    path = sock.path
    if not path.startswith("/"):
        raise Unsupported(f"{fd.where} is a unix socket bound to a relative path ({path}); not supported", fd.pid)
    try:
        st = os.lstat(path)
    except OSError:
        return  # unlinked
    if unix.vfs is not None and (st.st_ino, os.major(st.st_dev) << 20 | os.minor(st.st_dev)) == tuple(unix.vfs):
        sock.linked = True
        sock.attrs = FileAttrs.of(st)


def _outq(pid: int, fd: int) -> int:
    from . import sockopt

    with sockopt.copy_fd(pid, fd) as sk:
        return int.from_bytes(fcntl.ioctl(sk.fileno(), SIOCOUTQ, bytes(4)), "little", signed=True)


def _read_socket(pid: int, fd: int, unix: UnixSocket, flight: unixrights.Flight):
    """(queued messages, their senders, credentials, options, filter, files
    in flight) through a copy of the fd."""
    import socket

    from . import sockopt

    with sockopt.copy_fd(pid, fd) as sk:
        options = sockopt.collect_options(sk, socket.AF_UNIX, unix.type, 0)
        options["SO_SNDBUF"] = sk.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        options["SO_RCVBUF"] = sk.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        program = sockopt.read_filter(sk)
        if unix.state == TCP_LISTEN:
            return [], [], [], options, program, []
        queued, senders, creds, rights = _peek_queue(pid, fd, unix, sk, options["SO_RCVBUF"], flight)
        return queued, senders, creds, options, program, rights


def _peek_queue(pid: int, fd: int, unix: UnixSocket, sk: socket_mod.socket, rcvbuf: int, flight: unixrights.Flight):
    import socket

    queued: list[bytes] = []
    rights: list[list[list[int]]] = []
    senders: list[bytes] = []
    creds: list[list[int]] = []
    # sock_diag's rqueue is every byte of a stream's queue, but only the
    # first message's length for datagrams: those are peeked until none
    # is left, each whole (a truncated peek is refused, never stored cut).
    if unix.type == socket.SOCK_STREAM and not unix.rqueue:
        return queued, senders, creds, rights
    size = max(unix.rqueue, rcvbuf, 1 << 16)
    peek_off = sk.getsockopt(socket.SOL_SOCKET, SO_PEEK_OFF)
    sk.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)
    try:
        while True:
            try:
                data, anc, msg_flags, addr = sk.recvmsg(size, socket.CMSG_SPACE(4 * 253),
                                                        socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            cred = []
            got: list[int] = []  # the files in flight, installed in this process by the peek
            other = False
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    got += [int.from_bytes(payload[i:i + 4], "little")
                            for i in range(0, len(payload) - len(payload) % 4, 4)]
                elif level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(payload) >= 12:
                    cred = list(struct.unpack_from("<iII", payload))  # struct ucred: pid, uid, gid
                else:
                    other = True
            try:
                if other or msg_flags & socket.MSG_CTRUNC:
                    raise Unsupported(f"pid {pid}: fd {fd} is a unix socket with ancillary data in flight that "
                                      "is neither SCM_RIGHTS nor SCM_CREDENTIALS, or cut short; not supported", pid)
                held = [flight.record(f"pid {pid}: fd {fd} is a unix socket (socket:[{unix.inode}])", pid, g)
                        for g in got]
            finally:
                for g in got:
                    os.close(g)
            if msg_flags & socket.MSG_TRUNC:
                raise Unsupported(f"pid {pid}: fd {fd} is a unix socket with a message of more than "
                                  f"{size} bytes queued; not supported", pid)
            if not data and (unix.type == socket.SOCK_STREAM
                             or (unix.type == socket.SOCK_SEQPACKET and unix.shutdown & 1)):
                break  # the end of a stream, or of a seqpacket connection shut down by its peer
            queued.append(data)
            creds.append(cred)
            rights.append(held)
            if unix.type == socket.SOCK_DGRAM:
                senders.append(addr if isinstance(addr, bytes) else os.fsencode(addr or ""))
            if unix.type == socket.SOCK_STREAM and sum(map(len, queued)) >= unix.rqueue:
                break
            if len(queued) > 1 << 16:
                raise Unsupported(f"pid {pid}: fd {fd} is a unix socket whose queue does not end", pid)
    finally:
        sk.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, peek_off)
    if not any(rights):
        rights = []
    if not any(creds):
        creds = []
        if unix.type == socket.SOCK_STREAM and not rights:
            queued = [b"".join(queued)]
    return queued, senders, creds, rights


class Prepare(protocol.Prepare):
    fd_kinds = (model.FdKind.UNIX,)

    def __init__(self, root, tree_fds):
        super().__init__(root, tree_fds)
        self.sockets = {sk.id: sk for sk in root.checkpoint.sockets}
        self.fds: dict[int, int] | None = None  # Socket id -> restorer fd, once built
        self.held: dict[int, int] = {}  # root.in_flight index -> restorer fd, opened by its kind

    def open_fd(self, entry: model.FdEntry, proc: Restoring) -> int:
        if self.fds is None:
            outside = next((s for s in self.sockets.values() if s.ext_peer), None)
            if outside is not None and not self.options.get("ext_unix_sk"):
                raise RestoreError(f"{outside.describe()} was connected to {outside.ext_peer!r}, outside the dumped "
                                   "tree; restore with --ext-unix-sk to connect it to that name again")
            self.fds = {sid: self.own(sk.detach()) for sid, sk in build(self.sockets).items()}
        fd = self.fds[entry.file_id]
        fcntl.fcntl(fd, fcntl.F_SETFL, int(entry.flags) & os.O_NONBLOCK)
        return fd

    def ready(self) -> None:
        """Queues with credentials in flight, sent again with them (every
        process of the tree exists now, none runs)."""
        waiting = [s for s in self.sockets.values() if s.creds or s.rights]
        if not waiting or self.fds is None:  # every restore comes here: socket only when some wait
            return
        import socket

        from . import sockopt

        made = {sid: socket.socket(fileno=os.dup(fd)) for sid, fd in self.fds.items()}
        try:
            for s in waiting:
                _refill(made, self.sockets, s, None, _files_in_flight(s, self.in_flight))
            for s in self.sockets.values():  # the refill forced buffer sizes: theirs again
                buffers = {k: v for k, v in _options(s).items() if k in ("SO_SNDBUF", "SO_RCVBUF", "SO_BUF_LOCK")}
                sockopt.apply_options(made[s.id], buffers, s.describe())
        finally:
            for sk in made.values():
                sk.close()


    def in_flight(self, index: int) -> int:
        """The restorer's fd of file in flight `index`, opened once by its
        kind: one open file description however often it is in flight."""
        if index not in self.held:
            self.held[index] = self.open_other(self.root.checkpoint.in_flight[index])
        return self.held[index]


class _Names:
    """Binds to paths, with the path's file as the dump found it put back
    at the end: a socket whose file was unlinked is bound (its name is the
    path) and its file unlinked again; one whose path now names another file
    is bound while that file is moved aside, then the file is put back."""

    def __init__(self):
        self.undo: list[typing.Callable[[], None]] = []

    def bind(self, sk: socket_mod.socket, sock: Socket, what: str) -> None:
        if not sock.path:
            _bind(sk, sock.name, what)
            return
        path = sock.path
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None
        except OSError as err:
            raise RestoreError(f"{what}: cannot look at {path}: {err.strerror}") from err
        try:
            if sock.linked:
                if st is not None and not stat.S_ISSOCK(st.st_mode):
                    raise RestoreError(f"{what}: {path} exists and is not a socket; not replaced")
                if st is not None:  # a socket file nothing listens on any more: the dumped one's
                    os.unlink(path)
                _bind(sk, sock.name, what)
                if sock.attrs is not None:
                    sock.attrs.apply(path)
                return
            aside = None
            if st is not None:
                aside = protocol.make_beside(path, lambda name: _rename_new(path, name), what)
            _bind(sk, sock.name, what)
            self.undo.append(lambda: os.unlink(path))
            if aside is not None:
                self.undo.append(lambda: os.rename(aside, path))
        except OSError as err:
            raise RestoreError(f"{what}: cannot bind it at {path}: {err.strerror}") from err

    def finish(self) -> None:
        undo, self.undo = self.undo, []
        for step in undo:
            with contextlib.suppress(OSError):
                step()


def _rename_new(path: str, name: str) -> None:
    if os.path.lexists(name):
        raise FileExistsError(name)
    os.rename(path, name)


def _bind(sk: socket_mod.socket, name: bytes, what: str) -> None:
    try:
        sk.bind(name)
    except OSError as err:
        raise RestoreError(f"{what}: cannot bind it to {name!r}: {err.strerror}") from err


def build(sockets: dict[int, Socket]) -> dict[int, socket_mod.socket]:
    """Every unix socket of the tree, connected as it was:

    1. every socket that is not made by a pair below, bound to its name
    2. listeners listen
    3. unnamed pairs: socketpair (a stand-in end closed again for a closed peer)
    4. stream pairs with a name: the unnamed (or client) end connects to the
       other's name, through its listener, or a stand-in listener at that
       name, and the accepted end is the other
    5. listeners get their options (a connection made to one takes its
       SO_PASSCRED, the accepted ends above must not), and the clients
       waiting in a backlog connect to it, in order
    6. datagram sockets connect to their peer's name (outside the tree: --ext-unix-sk)
    7. queues refilled, options set, stand-ins closed, files put back; a
       queue with credentials in flight is refilled by Prepare.ready: a
       credential names a pid, which must exist when it is sent
    """
    import socket

    made: dict[int, socket.socket] = {}
    temps: list[socket.socket] = []
    stand_ins: dict[int, socket.socket] = {}  # Socket id -> the stand-in of its closed peer
    names = _Names()
    by_name = {s.name: s for s in sockets.values() if s.name and s.backlog >= 0}
    pairs, accepted = _pairs(sockets)
    try:
        for s in sockets.values():  # 1
            if s.id in accepted or any(s.id in (a, b) for a, b in pairs if not _named_pair(sockets, a, b)):
                continue
            made[s.id] = _new(s.type, s.describe())
            if s.name:
                names.bind(made[s.id], s, s.describe())
        for s in sockets.values():  # 2
            if s.backlog >= 0:
                made[s.id].listen(max(s.backlog, len(sockets)))
        stand_in_listeners: dict[bytes, socket.socket] = {}
        for a_id, b_id in pairs:
            a, b = sockets.get(a_id), sockets[b_id]
            if not _named_pair(sockets, a_id, b_id):  # 3
                x, y = socket.socketpair(socket.AF_UNIX, b.type | socket.SOCK_CLOEXEC)
                made[b.id] = x
                if a is not None:
                    made[a.id] = y
                else:
                    temps.append(y)
                    stand_ins[b.id] = y
                continue
            listener = by_name.get(b.name)  # 4
            if listener is not None and listener.id in made:
                lsk = made[listener.id]
            else:
                if b.name not in stand_in_listeners:
                    lsk = _new(b.type, b.describe())
                    names.bind(lsk, b, b.describe())
                    lsk.listen(len(sockets))
                    stand_in_listeners[b.name] = lsk
                    temps.append(lsk)
                lsk = stand_in_listeners[b.name]
            client = made[a.id] if a is not None else _new(b.type, b.describe())
            if a is None:
                temps.append(client)
                stand_ins[b.id] = client
            _connect(client, b.name, b.describe())
            made[b.id], _ = lsk.accept()
        for listener in sorted((s for s in sockets.values() if s.backlog >= 0), key=lambda s: s.id):  # 5
            _finish(made[listener.id], listener)  # a connection takes its credential flags from it
            for client in listener.icons:
                _connect(made[client], listener.name, sockets[client].describe())
        for s in sockets.values():  # 6
            peer = sockets.get(s.peer)
            if s.type == SOCK_DGRAM and s.connected and peer is not None and peer.name:
                _connect(made[s.id], peer.name, s.describe())
            elif s.ext_peer:
                _connect(made[s.id], s.ext_peer, s.describe())
        for s in sockets.values():  # 7 (with credentials or files: once their processes exist, Prepare.ready)
            if not s.creds and not s.rights:
                _refill(made, sockets, s, stand_ins.get(s.id))
        for sk in temps:
            sk.close()
        temps.clear()
        for s in sockets.values():
            if s.backlog < 0:
                _finish(made[s.id], s)
    except OSError as err:
        for sk in [*made.values(), *temps]:
            sk.close()
        raise RestoreError(f"unix sockets: {err.strerror}") from err
    except BaseException:
        for sk in [*made.values(), *temps]:
            sk.close()
        raise
    finally:
        names.finish()
    return made


def _new(stype: int, what: str):
    import socket

    try:
        return socket.socket(socket.AF_UNIX, stype | socket.SOCK_CLOEXEC)
    except OSError as err:
        raise RestoreError(f"{what}: cannot make it: {err.strerror}") from err


def _connect(sk, name: bytes, what: str) -> None:
    try:
        sk.connect(name)
    except OSError as err:
        raise RestoreError(f"{what}: cannot connect it to {name!r}: {err.strerror}") from err


def _pairs(sockets: dict[int, Socket]) -> tuple[list[tuple[int, int]], set[int]]:
    """(a, b) of each connected stream/seqpacket pair and each mutually
    connected unnamed datagram pair, b the end a pair with a name is
    accepted as (a may be a closed peer, -1); and those accepted ends."""
    pairs: list[tuple[int, int]] = []
    seen: set[int] = set()
    accepted: set[int] = set()
    listening = {s.name for s in sockets.values() if s.backlog >= 0}
    for s in sockets.values():
        if s.id in seen or not s.connected or s.waiting >= 0:
            continue
        peer = sockets.get(s.peer)
        if s.type == SOCK_DGRAM:
            if peer is None:
                if not s.name and not s.ext_peer:  # connected to a peer since closed
                    pairs.append((-1, s.id))
                    seen.add(s.id)
                continue
            if peer.peer != s.id or s.name or peer.name:
                continue  # connected by name (step 6)
        seen.update((s.id, s.peer))
        if peer is None:
            pairs.append((-1, s.id))
            if s.name and s.type != SOCK_DGRAM:
                accepted.add(s.id)
            continue
        a, b = (s, peer) if peer.name and (peer.name in listening or not s.name) else (peer, s)
        pairs.append((a.id, b.id))
        if b.name and b.type != SOCK_DGRAM:
            accepted.add(b.id)
    return pairs, accepted


def _named_pair(sockets: dict[int, Socket], a: int, b: int) -> bool:
    return bool(sockets[b].name) and sockets[b].type != SOCK_DGRAM


def _files_in_flight(sock: Socket, held: typing.Callable[[int], int]):
    """Per message, a function giving the fds of its files in flight:
    copies (pidfd_getfd) of the fds of the restored processes holding them,
    the same open file descriptions; or for one no process holds, a dup of
    the restorer's fd `held(index)`."""
    from ..kernel import libc as kernel_libc

    def files(i: int) -> list[int]:
        fds: list[int] = []
        try:
            for pid, fd in sock.rights[i] if i < len(sock.rights) else []:
                fds.append(os.dup(held(fd)) if pid == -1 else kernel_libc.copy_fd(pid, fd))
        except OSError as err:
            for f in fds:
                os.close(f)
            raise RestoreError(f"{sock.describe()}: cannot take fd {fd} of pid {pid} to send it again "
                               f"in flight: {err.strerror}") from err
        return fds
    return files


def _refill(made, sockets: dict[int, Socket], sock: Socket, stand_in, files=None) -> None:
    """The messages queued to `sock`, sent again: from its peer (or the
    stand-in of its closed peer), or (a
    datagram socket receiving from many) from the socket of the tree that
    has the sender's name, or an unnamed one."""
    import socket

    total = sum(map(len, sock.queued))
    if not total:
        return
    into = made[sock.id]
    into.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 2 * total + (1 << 16))
    by_name = {s.name: s for s in sockets.values() if s.name}
    senders = sock.senders if sock.type == SOCK_DGRAM and len(sock.senders) == len(sock.queued) else []
    peer = sockets.get(sock.peer) if sock.connected else None
    for i, msg in enumerate(sock.queued):
        src = peer  # a connected socket receives from its peer only
        if senders and peer is None:
            src = by_name.get(senders[i]) if senders[i] else None
        if stand_in is not None:
            sender, own = stand_in, False
        elif src is not None and src.id in made:
            sender = made[src.id]
            own = False
        else:
            sender = _new(sock.type, sock.describe())
            own = True
        cred = sock.creds[i] if i < len(sock.creds) else []
        anc = [(socket.SOL_SOCKET, socket.SCM_CREDENTIALS, struct.pack("<iII", *cred))] if cred else []
        passed = files(i) if files is not None else []
        if passed:
            anc.append((socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"<{len(passed)}i", *passed)))
        try:
            sender.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 2 * total + (1 << 16))
            if sock.type == SOCK_STREAM:
                view = memoryview(msg)
                while view:
                    view = view[sender.sendmsg([view], anc, socket.MSG_DONTWAIT):]
                    anc = []  # with the first piece only
            elif stand_in is not None or (src is not None and src.peer == sock.id):
                sender.sendmsg([msg], anc, socket.MSG_DONTWAIT)
            else:
                sender.sendmsg([msg], anc, socket.MSG_DONTWAIT, sock.name)
        except OSError as err:
            raise RestoreError(f"{sock.describe()}: cannot refill it with its {len(sock.queued)} messages: "
                               f"{err.strerror}") from err
        finally:
            for f in passed:
                os.close(f)
            if own:
                sender.close()


def _options(sock: Socket) -> dict[str, int | str]:
    options = dict(sock.options)
    for name, value in (("SO_SNDBUF", sock.sndbuf), ("SO_RCVBUF", sock.rcvbuf)):
        if value:
            options[name] = value
    return options


def _finish(sk, sock: Socket) -> None:
    """Buffers, options, filter, shutdown state and the final backlog."""
    import socket

    from . import sockopt

    what = sock.describe()
    sockopt.attach_filter(sk, sock.filter, what)
    sockopt.apply_options(sk, _options(sock), what)
    try:
        if sock.backlog >= 0:
            sk.listen(sock.backlog)
        if sock.shutdown & 1:
            sk.shutdown(socket.SHUT_RD)
        if sock.shutdown & 2:
            sk.shutdown(socket.SHUT_WR)
    except OSError as err:
        raise RestoreError(f"{what}: cannot restore its backlog or shutdown state: {err.strerror}") from err


def check_tree(ckpt: model.Checkpoint, root: model.Checkpoint) -> list[str]:
    sockets = {sk.id for sk in root.sockets}
    problems = [f"fd {e.fd}: unknown unix socket {e.file_id}" for e in ckpt.fds
                if e.kind == model.FdKind.UNIX and e.file_id not in sockets]
    problems += [f"unix socket {sk.id}: type {sk.type}, peer {sk.peer}" for sk in root.sockets
                 if sk.type not in (1, 2, 5) or (sk.peer >= 0 and sk.peer not in sockets) or sk.peer == sk.id]
    problems += [f"unix socket {sk.id}: buffers {sk.sndbuf}/{sk.rcvbuf}, {sum(map(len, sk.queued))} bytes "
                 "queued" for sk in root.sockets if not (0 <= sk.sndbuf < 1 << 31 and 0 <= sk.rcvbuf < 1 << 31)
                 or sum(map(len, sk.queued)) > 1 << 30 or not 0 <= sk.shutdown <= 3]
    listeners = {sk.id for sk in root.sockets if sk.backlog >= 0}
    if ckpt is root:
        problems += unixrights.check_image(root)
    for sk in root.sockets:
        problems += unixrights.check_tree(root, sk.rights, f"unix socket {sk.id}")
        if len(sk.name) > UNIX_PATH_MAX or len(sk.ext_peer) > UNIX_PATH_MAX or (sk.path and protocol.bad_path(sk.path)) or (sk.linked and not sk.path):
            problems.append(f"unix socket {sk.id}: name {sk.name!r} is not an absolute path or abstract name")
        if (sk.waiting >= 0 and sk.waiting not in listeners) or any(i not in sockets for i in sk.icons):
            problems.append(f"unix socket {sk.id}: waits in the backlog of {sk.waiting}, which is not listening")
        if not -1 <= sk.backlog < 1 << 31 or (sk.senders and len(sk.senders) != len(sk.queued)) \
                or (sk.creds and (len(sk.creds) != len(sk.queued) or any(len(c) not in (0, 3) for c in sk.creds))) \
                or (sk.rights and (len(sk.rights) != len(sk.queued) or any(len(m) > 253 for m in sk.rights)
                                   or any(len(f) != 2 for m in sk.rights for f in m))):
            problems.append(f"unix socket {sk.id}: backlog {sk.backlog}, {len(sk.senders)} senders")
        if len(sk.filter) % 8 or len(sk.filter) > 8 * 4096:
            problems.append(f"unix socket {sk.id}: a filter of {len(sk.filter)} bytes")
        if sk.options:
            from .sockopt import check_options

            problems += check_options(sk.options, f"unix socket {sk.id}")
    return problems


def verify(root: model.Checkpoint) -> list[str]:
    """A socket bound to a path needs its directory."""
    return [f"unix socket {sk.id}: directory {os.path.dirname(sk.path)} of {sk.path} is missing"
            for sk in root.sockets if sk.path and not os.path.isdir(os.path.dirname(sk.path))]
