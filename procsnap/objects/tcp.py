"""Live TCP connections (dump/restore --tcp-established), with TCP_REPAIR,
as CRIU's soccr does it; the socket itself is an InetSocket (inet.py), and
a TcpConnection record (TCPC) names it by id.

dump     through the pidfd_getfd copy of the fd, the connection locked
         (netlock.py) first: TCP_REPAIR on, then state, queue sizes
         (SIOCINQ, SIOCOUTQ, SIOCOUTQNSD), both sequence numbers
         (TCP_REPAIR_QUEUE + TCP_QUEUE_SEQ), both queues (MSG_PEEK in
         repair mode: the send queue's sent but unacked part too), MSS,
         window scale, SACK and timestamps (TCP_INFO, TCP_MAXSEG,
         TCP_TIMESTAMP), the window (TCP_REPAIR_WINDOW). The copy is kept,
         in repair mode, until the dump ends: a dump that kills the tree
         closes it after the kill, still in repair, and a socket closed in
         repair mode sends nothing (tcp_disconnect, no FIN, no RST) and
         leaves nothing holding its address pair; any other end (failure,
         --leave-running) turns repair off first.
restore  a socket in repair mode: bound (repair forces SO_REUSEADDR, so it
         binds beside its restored listener), both sequence numbers set
         back, connected (no SYN), the options, the receive queue, the
         send queue's sent part in repair mode and its unsent part with
         repair off (sent as new data later), the window. Repair stays on
         while the tree is rebuilt (a failed restore closes the sockets in
         repair, so that a second attempt finds the address pair free) and
         is turned off once every process is ready, before any runs.

Sequence numbers (soccr.c's picture):

      send queue   snd_una ... snd_nxt ... write_seq    SIOCOUTQ  = write_seq - snd_una
                   |<-- sent, unacked -->|<- unsent ->|  SIOCOUTQNSD = write_seq - snd_nxt
      recv queue   copied_seq ........... rcv_nxt       SIOCINQ   = rcv_nxt - copied_seq

TCP_QUEUE_SEQ reads write_seq and rcv_nxt; on restore it sets the start
of each queue, and writing a queue back moves it on by what is written.
"""

from __future__ import annotations

import contextlib
import errno
from .. import records as dataclasses  # the dataclasses API, cheap to import
import fcntl
import os
import select
import struct
import typing

from ..errors import RestoreError, Unsupported
from . import tcpfin

if typing.TYPE_CHECKING:
    import socket as socket_mod

    from ..image.reader import Image
    from .inet import InetSocket

SOL_TCP = 6
SOL_IP, IP_LOCAL_PORT_RANGE = 0, 51  # linux/in.h (6.3): u32, low port | high port << 16
TCP_MAXSEG, TCP_INFO = 2, 11
TCP_REPAIR, TCP_REPAIR_QUEUE, TCP_QUEUE_SEQ, TCP_REPAIR_OPTIONS, TCP_TIMESTAMP, TCP_REPAIR_WINDOW = 19, 20, 21, 22, 24, 29
TCP_REPAIR_ON, TCP_REPAIR_OFF = 1, 0
TCP_NO_QUEUE, TCP_RECV_QUEUE, TCP_SEND_QUEUE = 0, 1, 2
# tcp_info.tcpi_options (linux/tcp.h)
TCPI_OPT_TIMESTAMPS, TCPI_OPT_SACK, TCPI_OPT_WSCALE = 1, 2, 4
# TCP option kinds, for struct tcp_repair_opt {u32 opt_code; u32 opt_val;} (linux/tcp.h)
TCPOPT_MAXSEG, TCPOPT_WINDOW, TCPOPT_SACK_PERM, TCPOPT_TIMESTAMP = 2, 3, 4, 8
REPAIR_OPT = struct.Struct("<II")
# struct tcp_repair_window (linux/tcp.h): snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup
REPAIR_WINDOW = struct.Struct("<IIIII")
SIOCINQ, SIOCOUTQ, SIOCOUTQNSD = 0x541B, 0x5411, 0x894B  # linux/sockios.h
MSG_PEEK, MSG_DONTWAIT = 0x2, 0x40
SHUT_WR = 1

TCP_ESTABLISHED, TCP_SYN_SENT, TCP_FIN_WAIT1, TCP_FIN_WAIT2, TCP_CLOSE_WAIT, TCP_LAST_ACK, TCP_CLOSING = \
    1, 2, 4, 5, 8, 9, 11
# The states restored (soccr's picture of the half-closed ones); every
# other one but LISTEN and CLOSE is refused by name. A FIN is not data: the
# queues' sizes and write_seq / rcv_nxt count it, MSG_PEEK does not read it.
#   our FIN in the send queue: put back by shutdown() in repair mode, after
#     the queue; before the peer's FIN (FIN_WAIT1/2, CLOSING) or after it
#     (LAST_ACK); FIN_WAIT2's is acknowledged: shut down with the send queue
#     chosen (queued as sent), then an ACK of it from the peer (tcpfin.py)
#   the peer's FIN in the receive queue (CLOSE_WAIT, LAST_ACK, CLOSING):
#     a FIN from the peer, made up (tcpfin.py), after the queue
# SYN_SENT (connecting): the send queue's sequence number set one before
# write_seq (the SYN counts one), then connect() with repair off: the SYN
# goes out again with the ISN it had (the lock drops it until the end of
# the restore; the kernel retransmits it); nothing else to restore.
FIN_FIRST_IN_SEND_QUEUE = (TCP_FIN_WAIT1, TCP_FIN_WAIT2, TCP_CLOSING)
FIN_SECOND_IN_SEND_QUEUE = (TCP_LAST_ACK,)
FIN_IN_SEND_QUEUE = FIN_FIRST_IN_SEND_QUEUE + FIN_SECOND_IN_SEND_QUEUE
FIN_ACKED = (TCP_FIN_WAIT2,)
FIN_IN_RECV_QUEUE = (TCP_CLOSE_WAIT, TCP_LAST_ACK, TCP_CLOSING)
RESTORED = (TCP_ESTABLISHED, TCP_SYN_SENT, TCP_FIN_WAIT1, TCP_FIN_WAIT2, TCP_CLOSE_WAIT, TCP_LAST_ACK, TCP_CLOSING)


@dataclasses.dataclass
class TcpConnection:
    """A live TCP connection of the InetSocket `socket` (1.4), as TCP_REPAIR reads it."""

    socket: int  # InetSocket.id
    state: int  # TCP_ESTABLISHED ...
    send_seq: int  # write_seq: the sequence number after the last byte queued
    recv_seq: int  # rcv_nxt: the sequence number after the last byte received
    send_len: int  # SIOCOUTQ: bytes in the send queue, sent but unacknowledged and unsent
    unsent_len: int  # SIOCOUTQNSD: of those, never sent
    recv_len: int  # SIOCINQ: bytes received, not read yet
    mss: int  # TCP_MAXSEG: the clamp
    options: int  # tcpi_options: TCPI_OPT_TIMESTAMPS | TCPI_OPT_SACK | TCPI_OPT_WSCALE
    snd_wscale: int = 0
    rcv_wscale: int = 0
    timestamp: int = 0  # TCP_TIMESTAMP, the socket's clock: restored so the peer sees it go on
    window: list[int] = dataclasses.field(default_factory=list)  # struct tcp_repair_window
    send_queue: list[int] = dataclasses.field(default_factory=list)  # [offset in ghosts.img, xxh3] if send_len
    recv_queue: list[int] = dataclasses.field(default_factory=list)  # [offset in ghosts.img, xxh3] if recv_len


def set_repair(sk: socket_mod.socket, on: bool) -> None:
    sk.setsockopt(SOL_TCP, TCP_REPAIR, TCP_REPAIR_ON if on else TCP_REPAIR_OFF)


def _ioctl_int(sk: socket_mod.socket, request: int) -> int:
    return struct.unpack("<i", fcntl.ioctl(sk.fileno(), request, bytes(4)))[0]


def _read_queue(sk: socket_mod.socket, queue: int, length: int, what: str) -> tuple[int, bytes]:
    """(TCP_QUEUE_SEQ, the queue's bytes) of one queue of a socket in repair mode."""
    sk.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, queue)
    seq = struct.unpack("<I", sk.getsockopt(SOL_TCP, TCP_QUEUE_SEQ, 4))[0]
    data = b""
    if length:
        # one byte more than there should be: a longer queue is not read short
        data = sk.recv(length + 1, MSG_PEEK | MSG_DONTWAIT)
        if len(data) != length:
            name = "receive" if queue == TCP_RECV_QUEUE else "send"
            raise Unsupported(f"{what}: its {name} queue holds {len(data)} bytes, its size says {length}")
    return seq, data


def check_state(state: int, what: str) -> None:
    if state not in RESTORED:
        from .inet import TCP_STATES

        raise Unsupported(f"{what}: a TCP connection in state {TCP_STATES.get(state, state)}; only ESTABLISHED, "
                          "SYN_SENT, FIN_WAIT1, FIN_WAIT2, CLOSE_WAIT, LAST_ACK and CLOSING ones are restored")


def collect_repaired(sk: socket_mod.socket, sid: int, state: int, what: str) -> tuple[TcpConnection, bytes, bytes]:
    """A connection read from `sk`, already in repair mode: (its record, send queue, receive queue)."""
    check_state(state, what)
    info = sk.getsockopt(SOL_TCP, TCP_INFO, 104)
    options, wscale = info[5], info[6]
    conn = TcpConnection(sid, state, 0, 0, _ioctl_int(sk, SIOCOUTQ), _ioctl_int(sk, SIOCOUTQNSD),
                         _ioctl_int(sk, SIOCINQ), sk.getsockopt(SOL_TCP, TCP_MAXSEG), options)
    if state in FIN_IN_SEND_QUEUE:  # the FIN is counted, not data
        conn.send_len, conn.unsent_len = max(conn.send_len - 1, 0), max(conn.unsent_len - 1, 0)
    if options & TCPI_OPT_WSCALE:  # tcpi_snd_wscale:4, tcpi_rcv_wscale:4
        conn.snd_wscale, conn.rcv_wscale = wscale & 0xF, wscale >> 4
    if options & TCPI_OPT_TIMESTAMPS:
        conn.timestamp = struct.unpack("<I", sk.getsockopt(SOL_TCP, TCP_TIMESTAMP, 4))[0]
    conn.window = list(REPAIR_WINDOW.unpack(sk.getsockopt(SOL_TCP, TCP_REPAIR_WINDOW, REPAIR_WINDOW.size)))
    conn.recv_seq, recv = _read_queue(sk, TCP_RECV_QUEUE, conn.recv_len, what)
    conn.send_seq, send = _read_queue(sk, TCP_SEND_QUEUE, conn.send_len, what)
    sk.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, TCP_NO_QUEUE)
    return conn, send, recv


SO_SNDBUF, SO_RCVBUF, SO_SNDBUFFORCE, SO_RCVBUFFORCE, SOL_SOCKET = 7, 8, 32, 33, 1
BUFFERS = ((SO_SNDBUFFORCE, SO_SNDBUF), (SO_RCVBUFFORCE, SO_RCVBUF))


def _make_room(sk: socket_mod.socket, send: int, recv: int) -> list[int]:
    """Buffers that hold the queues: a fresh socket's are a few KiB.
    Returns the sizes they had, for _put_back_room (the stored sizes and
    locks are set after that, with the other options)."""
    had = [sk.getsockopt(SOL_SOCKET, size) for _, size in BUFFERS]
    for (force, _), need, now in zip(BUFFERS, (send, recv), had):
        if need and now < 2 * need + (1 << 16):
            sk.setsockopt(SOL_SOCKET, force, need + (1 << 16))  # the kernel doubles it
    return had


def _put_back_room(sk: socket_mod.socket, had: list[int]) -> None:
    """The sizes of before _make_room (halved: the kernel doubles them);
    the lock that SO_*BUFFORCE set goes with SO_BUF_LOCK's stored value."""
    for (force, size), was in zip(BUFFERS, had):
        if sk.getsockopt(SOL_SOCKET, size) != was:
            sk.setsockopt(SOL_SOCKET, force, was // 2)


def _write_queue(sk: socket_mod.socket, data: bytes, what: str) -> None:
    """All of `data` into the queue chosen; in repair mode the kernel takes
    a queue's data in one linear buffer each send (ENOMEM when too big for
    the allocator): halved until it fits, as soccr does."""
    view, chunk = memoryview(data), max(len(data), 1)
    while view:
        try:
            sent = sk.send(view[:chunk])
        except OSError as err:
            if chunk > 1024:
                chunk //= 2
                continue
            raise RestoreError(f"{what}: cannot write its queue back ({len(view)} bytes left): {err.strerror}") \
                from err
        view = view[sent:]


def restore_repaired(sk: socket_mod.socket, sock: InetSocket, conn: TcpConnection, image: Image) -> None:
    """Make `sk` (a fresh TCP socket with its pre-bind options) the
    connection again; it is left in repair mode (see repair_off)."""
    what = sock.describe()
    send = image.read_blob(conn.send_queue[0], conn.send_len, conn.send_queue[1]) if conn.send_len else b""
    recv = image.read_blob(conn.recv_queue[0], conn.recv_len, conn.recv_queue[1]) if conn.recv_len else b""
    step = "turn TCP_REPAIR on"
    try:
        set_repair(sk, True)
        step = "bind it"
        autobound = _autobound(sock)  # a bind() to its address would set IPV6_V6ONLY
        if autobound and _listened_on(sock, image):  # accepted: beside its listener (repair forces the reuse)
            sk.bind(("::", sock.local[1]))
        elif autobound:  # a client bound at connect: connects from its port again
            sk.setsockopt(SOL_IP, IP_LOCAL_PORT_RANGE, struct.pack("<I", sock.local[1] * 0x10001))
        else:
            sk.bind(tuple(sock.local))
        step = "set its sequence numbers"
        fin = 1 if conn.state in FIN_IN_SEND_QUEUE else 0  # write_seq counts the FIN
        peer_fin = 1 if conn.state in FIN_IN_RECV_QUEUE else 0  # rcv_nxt counts the peer's
        for queue, seq in ((TCP_RECV_QUEUE, conn.recv_seq - peer_fin - conn.recv_len),
                           (TCP_SEND_QUEUE, conn.send_seq - fin - conn.send_len)):
            sk.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, queue)
            sk.setsockopt(SOL_TCP, TCP_QUEUE_SEQ, struct.pack("<I", seq & 0xFFFFFFFF))
        if conn.state == TCP_SYN_SENT:
            step = "connect it again (SYN_SENT)"
            sk.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
            sk.setsockopt(SOL_TCP, TCP_QUEUE_SEQ, struct.pack("<I", (conn.send_seq - 1) & 0xFFFFFFFF))
            sk.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, TCP_NO_QUEUE)
            set_repair(sk, False)
            sk.setblocking(False)  # the program's flags are set after
            err = sk.connect_ex(tuple(sock.peer))
            set_repair(sk, True)
            if err not in (0, errno.EINPROGRESS):
                raise OSError(err, os.strerror(err))
            if autobound:
                step = "put its IP_LOCAL_PORT_RANGE back"
                _connected_from(sk, sock, what)
            _check_restored(sk, conn, what)
            return
        step = "connect it"
        sk.connect(tuple(sock.peer))  # in repair mode: no SYN, the state is ESTABLISHED at once
        if autobound:
            step = "put its IP_LOCAL_PORT_RANGE back"
            _connected_from(sk, sock, what)
        step = "set its TCP options"
        opts = []
        if conn.options & TCPI_OPT_SACK:
            opts.append(REPAIR_OPT.pack(TCPOPT_SACK_PERM, 0))
        if conn.options & TCPI_OPT_WSCALE:
            opts.append(REPAIR_OPT.pack(TCPOPT_WINDOW, conn.snd_wscale | conn.rcv_wscale << 16))
        if conn.options & TCPI_OPT_TIMESTAMPS:
            opts.append(REPAIR_OPT.pack(TCPOPT_TIMESTAMP, 0))
        opts.append(REPAIR_OPT.pack(TCPOPT_MAXSEG, conn.mss))
        sk.setsockopt(SOL_TCP, TCP_REPAIR_OPTIONS, b"".join(opts))
        if conn.options & TCPI_OPT_TIMESTAMPS:
            sk.setsockopt(SOL_TCP, TCP_TIMESTAMP, struct.pack("<I", conn.timestamp & 0xFFFFFFFF))
        step = "write its queues back"
        had = _make_room(sk, len(send), len(recv))
        sk.setblocking(False)  # a queue the buffers cannot take fails, it does not block the restore
        if recv:
            sk.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)
            _write_queue(sk, recv, what)
        sent = conn.send_len - conn.unsent_len
        if sent:  # in repair mode: queued as sent, retransmitted until acknowledged
            sk.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
            _write_queue(sk, send[:sent], what)
        if conn.unsent_len:  # never sent: queued as new data, repair off for it
            set_repair(sk, False)
            _write_queue(sk, send[sent:], what)
            set_repair(sk, True)
        sk.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, TCP_NO_QUEUE)
        _put_back_room(sk, had)
        if conn.window:
            step = "set its window"
            window = list(conn.window)
            if peer_fin:  # rcv_wup counts the FIN: one back, and room for it (soccr)
                window[4], window[3] = (window[4] - 1) & 0xFFFFFFFF, window[3] + 1
            sk.setsockopt(SOL_TCP, TCP_REPAIR_WINDOW, REPAIR_WINDOW.pack(*window))
        if conn.state in FIN_FIRST_IN_SEND_QUEUE:
            step = "put its FIN back (shutdown)"
            _shutdown(sk, conn.state in FIN_ACKED)
        if peer_fin:
            step = "receive the peer's FIN again"
            _from_peer(sk, sock, conn, conn.recv_seq - 1, conn.send_seq - fin - conn.send_len,
                       tcpfin.TH_FIN | tcpfin.TH_ACK, what)
        if conn.state in FIN_SECOND_IN_SEND_QUEUE:
            step = "put its FIN back (shutdown)"
            _shutdown(sk, False)
        if conn.state in FIN_ACKED:
            step = "receive the ACK of its FIN again"
            _from_peer(sk, sock, conn, conn.recv_seq, conn.send_seq, tcpfin.TH_ACK, what)
        step = "check its state"
        _check_restored(sk, conn, what)
    except OSError as err:
        where = f" ({sock.local[0]}:{sock.local[1]} to {sock.peer[0]}:{sock.peer[1]})"
        raise RestoreError(f"{what}: cannot {step}{where}: {err.strerror}") from err


def _autobound(sock: InetSocket) -> bool:
    """An IPv6 socket with a specific, not v4-mapped, address and
    IPV6_V6ONLY off was never bound to that address by its program (bind()
    to such an address sets IPV6_V6ONLY, __inet6_bind): a client got its
    address and port at connect, and does again, its port range narrowed
    to its port; a connection accepted by a listener on :: (whose
    IPV6_V6ONLY it inherits) is bound to :: and its port, and connected."""
    import socket

    addr = str(sock.local[0])
    return sock.family == socket.AF_INET6 and addr not in ("::", "") and not addr.startswith("::ffff:") \
        and not sock.options.get("IPV6_V6ONLY")


def _listened_on(sock: InetSocket, image: Image) -> bool:
    """Whether a listener of the tree, or one listening here now (outside
    the tree), has the port of `sock`, which is then a connection it
    accepted: a connect() cannot take a port a bind() holds
    (__inet_hash_connect skips it), a bind() to :: in repair mode can."""
    import socket

    port = sock.local[1]
    if any(s.family == socket.AF_INET6 and s.type == socket.SOCK_STREAM and s.backlog >= 0 and s.local
           and s.local[1] == port for s in image.checkpoint.inet_sockets):
        return True
    try:
        with open("/proc/net/tcp6") as f:
            rows = [line.split() for line in f.readlines()[1:]]
    except OSError:
        return False
    return any(len(r) > 3 and r[3] == "0A" and int(r[1].rsplit(":", 1)[1], 16) == port for r in rows)  # LISTEN


def _connected_from(sk: socket_mod.socket, sock: InetSocket, what: str) -> None:
    """After the connect of an IPv6 socket not bound to its address: its
    IP_LOCAL_PORT_RANGE as it was, and the address the route gave it must
    be its own (else the restore fails, naming both)."""
    had = int(sock.options.get("IP_LOCAL_PORT_RANGE", 0))
    sk.setsockopt(SOL_IP, IP_LOCAL_PORT_RANGE, struct.pack("<I", had))
    if list(sk.getsockname()[:2]) != list(sock.local[:2]):
        raise RestoreError(f"{what}: connected from {sk.getsockname()[:2]}, not {sock.local[:2]} (not bound to "
                           "its address, which would set IPV6_V6ONLY, it gets the one the route to its peer gives)")


def _check_restored(sk: socket_mod.socket, conn: TcpConnection, what: str) -> None:
    state = sk.getsockopt(SOL_TCP, TCP_INFO, 1)[0]
    if state != conn.state:
        from .inet import TCP_STATES

        raise RestoreError(f"{what}: restored in state {TCP_STATES.get(state, state)}, not "
                           f"{TCP_STATES.get(conn.state, conn.state)}")


def _shutdown(sk: socket_mod.socket, acked: bool) -> None:
    """Our FIN into the send queue; acknowledged: queued as sent, not sent
    (the send queue chosen in repair mode), as soccr's restore_fin_in_snd_queue."""
    if acked:
        sk.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
    sk.shutdown(SHUT_WR)
    if acked:
        sk.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, TCP_NO_QUEUE)


def _from_peer(sk: socket_mod.socket, sock: InetSocket, conn: TcpConnection, seq: int, ack: int, flags: int,
               what: str) -> None:
    """A segment from the peer (tcpfin.py), received before this returns:
    the socket's state must change (loopback delivers at once; a remote
    address's goes through lo too). Its window is the peer's, as we had it."""
    before = sk.getsockopt(SOL_TCP, TCP_INFO, 1)[0]
    window = conn.window[1] >> conn.snd_wscale if conn.window else 0xFFFF
    tcpfin.send(tuple(sock.peer), tuple(sock.local), seq, ack, flags, window)
    for _ in range(200):
        if sk.getsockopt(SOL_TCP, TCP_INFO, 1)[0] != before:
            return
        os.sched_yield()
        select.select([], [], [], 0.005)
    raise RestoreError(f"{what}: the segment made up from the peer ({'FIN' if flags & tcpfin.TH_FIN else 'ACK'}, "
                       f"mark {tcpfin.MARK:#x}) did not arrive (a firewall, or a lock of the caller's, drops it?)")


def check(conn: TcpConnection, sock: InetSocket | None, image: Image) -> list[str]:
    where = f"TCP connection of inet socket {conn.socket}"
    problems = []
    if sock is None:
        return [f"{where}: no such inet socket"]
    if conn.state not in RESTORED or len(sock.local) < 2 or len(sock.peer) < 2:
        problems.append(f"{where}: state {conn.state}, local {sock.local}, peer {sock.peer}")
    if len(conn.window) not in (0, 5) or not 0 <= conn.unsent_len <= conn.send_len or conn.recv_len < 0:
        problems.append(f"{where}: window {conn.window}, queues {conn.send_len}/{conn.unsent_len}/{conn.recv_len}")
    for name, queue, length in (("send", conn.send_queue, conn.send_len), ("receive", conn.recv_queue, conn.recv_len)):
        if length and (len(queue) != 2 or queue[0] < 0 or queue[0] + length > image.ghosts_size):
            problems.append(f"{where}: its {name} queue ({length} bytes) is not in ghosts.img")
    return problems


def blobs(conns: list[TcpConnection]) -> list[tuple[str, int, int, int]]:
    out = []
    for c in conns:
        if c.send_len and len(c.send_queue) == 2:
            out.append((f"send queue of TCP connection {c.socket}", c.send_queue[0], c.send_len, c.send_queue[1]))
        if c.recv_len and len(c.recv_queue) == 2:
            out.append((f"receive queue of TCP connection {c.socket}", c.recv_queue[0], c.recv_len, c.recv_queue[1]))
    return out


class Repaired:
    """The dump's copies of the connections it put in repair mode, held
    until it ends: closed in repair after a kill, repair off otherwise."""

    def __init__(self):
        self.fds: list[int] = []

    def hold(self, sk: socket_mod.socket) -> None:
        self.fds.append(os.dup(sk.fileno()))

    def release(self, killed: bool) -> None:
        if not self.fds:  # every dump ends here: socket only with a connection in repair
            return
        import socket

        for fd in self.fds:
            with contextlib.suppress(OSError), socket.socket(fileno=fd) as sk:
                if not killed:
                    set_repair(sk, False)
        self.fds.clear()
