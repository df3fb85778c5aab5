"""Sockets of the network stack that are not live connections: TCP
sockets listening or never connected (IPv4, IPv6, v4-mapped IPv6), UDP
and UDP-Lite bound or connected, ICMP ping sockets, raw sockets, packet
sockets, netlink sockets with their groups; each with its options
(objects/sockopt.py) and classic BPF filter.

dump     read through a copy of the fd (pidfd_getfd): family, type,
         protocol, TCP state (TCP_INFO), addresses, options. Refused by
         name: a live TCP connection (any state but LISTEN and CLOSE), a
         listener with connections in its accept queue, datagrams or
         messages queued, a packet socket in a fanout group.
restore  made again with its options; bound with SO_REUSEADDR (the port
         of a socket the dump's kill closed, or one in TIME_WAIT, binds
         again; the stored value is set after), connected, listening.

The record (InetSocket) is the socket as a program sees it; a live TCP
connection (TCP_REPAIR) is to be a record of its own that names one.
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
from ..errors import ProcsnapError, RestoreError, Unsupported
from .. import faults
from . import netlock, protocol, tcp
from .netlock import NetLock
from .protocol import OpenFd, Restoring
from .tcp import Repaired, TcpConnection

if typing.TYPE_CHECKING:
    import socket as socket_mod

AF_INET, AF_INET6, AF_NETLINK, AF_PACKET = 2, 10, 16, 17
SOCK_STREAM, SOCK_DGRAM, SOCK_RAW = 1, 2, 3
IPPROTO_TCP, IPPROTO_UDP, IPPROTO_UDPLITE, IPPROTO_ICMP, IPPROTO_ICMPV6 = 6, 17, 136, 1, 58
SO_DOMAIN, SO_TYPE, SO_PROTOCOL = 39, 3, 38
TCP_INFO = 11
PACKET_FANOUT, PACKET_VERSION = 18, 10
NETLINK_ADD_MEMBERSHIP, NETLINK_LIST_MEMBERSHIPS = 1, 9
MSG_PEEK, MSG_DONTWAIT, MSG_TRUNC = 0x2, 0x40, 0x20
# TCP states (include/net/tcp_states.h)
TCP_STATES = {1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2", 6: "TIME_WAIT",
              7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING", 12: "NEW_SYN_RECV"}
TCP_CLOSE, TCP_LISTEN = 7, 10
FAMILIES = {AF_INET: "IPv4", AF_INET6: "IPv6", AF_NETLINK: "netlink", AF_PACKET: "packet"}


@dataclasses.dataclass
class InetSocket:
    """A socket of the network stack (1.3), as its program sees it."""

    id: int
    family: int  # AF_INET, AF_INET6, AF_PACKET, AF_NETLINK
    type: int  # SOCK_STREAM, SOCK_DGRAM, SOCK_RAW
    proto: int  # IPPROTO_*, a netlink family, a packet socket's ethertype (host order)
    state: int = 0  # TCP: TCP_LISTEN or TCP_CLOSE; 0 for others
    # addresses as Python's socket module takes them: inet [host, port], IPv6
    # [host, port, flowinfo, scope_id], packet [ifname, proto], netlink [portid, groups]
    local: list[int | str] = dataclasses.field(default_factory=list)  # [] if not bound
    peer: list[int | str] = dataclasses.field(default_factory=list)  # [] if not connected
    backlog: int = -1  # listening: its backlog
    options: dict[str, int | str] = dataclasses.field(default_factory=dict)
    filter: bytes = b""  # an attached classic BPF program (struct sock_filter each)
    groups: list[int] = dataclasses.field(default_factory=list)  # netlink: every group it listens to

    def describe(self) -> str:
        kind = {SOCK_STREAM: "TCP", SOCK_DGRAM: "UDP" if self.proto != IPPROTO_UDPLITE else "UDP-Lite",
                SOCK_RAW: "raw"}.get(self.type, str(self.type))
        if self.type == SOCK_DGRAM and self.proto in (IPPROTO_ICMP, IPPROTO_ICMPV6):
            kind = "ping"
        if self.family in (AF_NETLINK, AF_PACKET):
            kind = {SOCK_DGRAM: "datagram", SOCK_RAW: "raw"}.get(self.type, str(self.type))
        return f"{FAMILIES.get(self.family, self.family)} {kind} socket {self.id} ({_addr(self.local)})"


def _addr(addr: list) -> str:
    if not addr:
        return "unbound"
    if len(addr) >= 2 and isinstance(addr[0], str) and ":" in addr[0]:
        return f"[{addr[0]}]:{addr[1]}"
    return ":".join(str(x) for x in addr[:2])


class Collect(protocol.Collect):
    def __init__(self):
        self.sockets: dict[int, InetSocket] = {}  # by inode
        self.connections: list[tuple[TcpConnection, bytes, bytes]] = []  # live ones, with their queues
        self.repaired = Repaired()

    def collect_fd(self, fd: OpenFd) -> model.FdEntry | None:
        if not stat.S_ISSOCK(fd.st.st_mode):
            return None
        import socket

        from . import sockopt

        if fd.st.st_ino not in self.sockets:
            with sockopt.copy_fd(fd.pid, fd.fd) as sk:
                family = sk.getsockopt(socket.SOL_SOCKET, SO_DOMAIN)
                if family not in FAMILIES:
                    return None
                sock = _collect(fd, sk, family, len(self.sockets), self.options)
                if sock.state not in (0, TCP_CLOSE, TCP_LISTEN) and self.options.get("tcp_established"):
                    self.connections.append(_collect_connection(fd, sk, sock, self.options, self.repaired))
            self.sockets[fd.st.st_ino] = sock
        return model.FdEntry(fd.fd, model.FdKind.INET, fd.flags, 0, fd.link, self.sockets[fd.st.st_ino].id)

    def collect_tree(self, root: model.Checkpoint, tree_pids: set[int]) -> None:
        root.inet_sockets = sorted(self.sockets.values(), key=lambda s: s.id)
        lock = self.options.get("net_lock")
        if self.options.get("tcp_established") or self.options.get("tcp_close"):
            rec = lock.record if lock is not None else NetLock()
            rec.tcp_established = bool(self.options.get("tcp_established"))
            rec.tcp_close = bool(self.options.get("tcp_close"))
            root.net_lock = [rec]

    def write_tree(self, writer, root: model.Checkpoint) -> None:
        for conn, send, recv in self.connections:
            if send:
                conn.send_queue = list(writer.write_ghost(send))
            if recv:
                conn.recv_queue = list(writer.write_ghost(recv))
        root.tcp_connections = [c for c, _, _ in self.connections]

    def end_dump(self, killed: bool) -> None:
        self.repaired.release(killed)


def _collect(fd: OpenFd, sk: socket_mod.socket, family: int, sid: int, options: dict) -> InetSocket:
    import socket

    from . import sockopt

    stype = sk.getsockopt(socket.SOL_SOCKET, SO_TYPE)
    proto = sk.getsockopt(socket.SOL_SOCKET, SO_PROTOCOL)
    from .sockname import describe_socket

    where = f"{fd.where} is {describe_socket(fd.pid, fd.fd, fd.st.st_ino)} ({fd.link})"
    sock = InetSocket(sid, family, stype, proto)
    local = list(sk.getsockname())
    try:
        peer = list(sk.getpeername())
    except OSError:
        peer = []
    if family in (AF_INET, AF_INET6):
        if stype == SOCK_STREAM and proto != IPPROTO_TCP:
            raise Unsupported(f"{where}: protocol {proto} (not TCP); not supported", fd.pid)
        if stype not in (SOCK_STREAM, SOCK_DGRAM, SOCK_RAW):
            raise Unsupported(f"{where}: type {stype}; not supported", fd.pid)
        sock.local = local if local[1] or local[0] not in ("0.0.0.0", "::") else []
        if stype == SOCK_STREAM:
            info = sk.getsockopt(socket.IPPROTO_TCP, TCP_INFO, 104)
            sock.state = info[0]
            # struct tcp_info (linux/tcp.h): of a listener, tcpi_unacked (at 24) is
            # its accept queue, tcpi_sacked (at 28) its backlog
            queued, backlog = struct.unpack_from("<II", info, 24)
            if sock.state == TCP_LISTEN:
                if queued:
                    raise Unsupported(f"{where}, with {queued} connection"
                                      f"{'s' if queued > 1 else ''} in its accept queue; not supported", fd.pid)
                sock.backlog = backlog
            elif sock.state != TCP_CLOSE:
                if not (options.get("tcp_established") or options.get("tcp_close")):
                    raise Unsupported(f"{where}: a live TCP connection ({TCP_STATES.get(sock.state, sock.state)} "
                                      f"to {_addr(peer)}); live TCP connections are dumped only with "
                                      "--tcp-established (or --tcp-close)", fd.pid)
                sock.peer = peer or _connecting_peer(family, fd, where, sock.state)
        else:
            sock.peer = peer
    elif family == AF_PACKET:
        ifname, sock.proto = local[0], local[1]
        sock.local = [ifname, local[1]] if ifname else []
        if sk.getsockopt(sockopt.SOL_PACKET, PACKET_FANOUT):
            raise Unsupported(f"{where} in a fanout group (PACKET_FANOUT); not supported", fd.pid)
        # A ring is not readable; PACKET_VERSION cannot change while one is set
        # (EBUSY): set to the value it has, it tells without changing anything.
        version = sk.getsockopt(sockopt.SOL_PACKET, PACKET_VERSION)
        try:
            sk.setsockopt(sockopt.SOL_PACKET, PACKET_VERSION, version)
        except OSError as err:
            if err.errno != 16:  # EBUSY
                raise
            raise Unsupported(f"{where} has a packet ring (PACKET_RX_RING or PACKET_TX_RING); not supported",
                              fd.pid) from err
    else:
        sock.local = local if local[0] else []
        sock.peer = peer if peer[0] or peer[1] else []
        bitmap = sk.getsockopt(sockopt.SOL_NETLINK, NETLINK_LIST_MEMBERSHIPS, 1024)
        sock.groups = [i * 32 + b + 1 for i, (word,) in enumerate(struct.iter_unpack("<I", bitmap))
                       for b in range(32) if word >> b & 1]
    if sock.state != TCP_LISTEN and stype != SOCK_STREAM:
        _refuse_queued(sk, fd, where)
    if family in (AF_INET, AF_INET6) and stype != SOCK_STREAM:
        _refuse_memberships(sk, family, fd, where)
    sock.options = sockopt.collect_options(sk, family, stype, sock.proto if family != AF_PACKET else 0)
    sock.filter = sockopt.read_filter(sk)
    return sock


def _refuse_queued(sk, fd: OpenFd, where: str) -> None:
    import socket

    try:
        data = sk.recv(1, MSG_PEEK | MSG_DONTWAIT | MSG_TRUNC)
    except (BlockingIOError, InterruptedError):
        return
    except OSError:
        return  # nothing to read (a pending error is not data)
    n = struct.unpack("<i", fcntl.ioctl(sk.fileno(), 0x541B, bytes(4)))[0]  # FIONREAD: the first one's size
    raise Unsupported(f"{where} with {'datagrams' if sk.type != socket.SOCK_STREAM else 'data'} queued "
                      f"(the first of {max(n, len(data))} bytes); not supported", fd.pid)


MCAST_MSFILTER = 48  # linux/in.h, linux/in6.h
# struct group_filter (linux/in.h): u32 gf_interface; sockaddr_storage gf_group (at 8);
# u32 gf_fmode; u32 gf_numsrc; sockaddr_storage gf_slist[]
GROUP_FILTER_SIZE = 8 + 128 + 4 + 4 + 128


def multicast_groups() -> list[tuple[int, int, bytes]]:
    """(family, ifindex, group address) of every group some socket of this
    network namespace joined, from /proc/net/igmp and igmp6."""
    out = []
    with contextlib.suppress(OSError), open("/proc/net/igmp") as f:
        index = 0
        for line in f.read().splitlines()[1:]:
            words = line.split()
            if not line.startswith("\t") and words:
                index = int(words[0])
            elif len(words) >= 2:
                out.append((AF_INET, index, struct.pack("<I", int(words[0], 16))))
    with contextlib.suppress(OSError), open("/proc/net/igmp6") as f:
        for line in f.read().splitlines():
            words = line.split()
            if len(words) >= 3:
                out.append((AF_INET6, int(words[0]), bytes.fromhex(words[2])))
    return out


def _refuse_memberships(sk, family: int, fd: OpenFd, where: str) -> None:
    """A multicast membership (IP_ADD_MEMBERSHIP ...) is not readable from
    the socket, only testable group by group: MCAST_MSFILTER answers for a
    group the socket joined and fails (EADDRNOTAVAIL) for any other."""
    import ctypes
    import socket

    from ..kernel.libc import libc

    for fam, index, group in multicast_groups():
        if fam != family:
            continue
        buf = ctypes.create_string_buffer(GROUP_FILTER_SIZE)
        struct.pack_into("<I", buf, 0, index)
        if family == AF_INET:
            struct.pack_into("<H2x4s", buf, 8, AF_INET, group)
            level = socket.IPPROTO_IP
        else:
            struct.pack_into("<H6x16s", buf, 8, AF_INET6, group)
            level = socket.IPPROTO_IPV6
        length = ctypes.c_uint(GROUP_FILTER_SIZE)
        if libc.getsockopt(sk.fileno(), level, MCAST_MSFILTER, buf, ctypes.byref(length)) == 0:
            name = socket.inet_ntop(family, group)
            raise Unsupported(f"{where} joined the multicast group {name} (interface {index}); "
                              "multicast memberships are not supported", fd.pid)


def _connecting_peer(family: int, fd: OpenFd, where: str, state: int) -> list:
    """The peer of a socket still connecting (SYN_SENT: getpeername fails), from inet_diag."""
    from ..kernel.inetdiag import tcp_peer

    found = tcp_peer(family, fd.st.st_ino, 1 << state)
    if found is None:
        raise Unsupported(f"{where}: a TCP connection in state {TCP_STATES.get(state, state)} whose peer "
                          "inet_diag does not show (another network namespace?)", fd.pid)
    return list(found) + ([0, 0] if family == AF_INET6 else [])


def _collect_connection(fd: OpenFd, sk, sock: InetSocket, options: dict, repaired: Repaired):
    """Lock the connection, then read it in repair mode (kept on: see tcp.py)."""
    what = f"{fd.where} is {sock.describe()} connected to {_addr(sock.peer)}"
    tcp.check_state(sock.state, what)
    if options.get("net_lock") is not None:
        options["net_lock"].lock(sock.local, sock.peer, what)
    # an accepted socket's multicast TTL (IPv6: hops, interface) is its SYN's, which
    # no one can set on a TCP socket (EINVAL) nor uses; of a connected one,
    # TCP_MAXSEG reads the MSS in use (restored by TCP_REPAIR_OPTIONS), not a
    # setting (a program's own TCP_MAXSEG is not told apart from it)
    for name in ("IP_MULTICAST_TTL", "IPV6_MULTICAST_HOPS", "IPV6_MULTICAST_IF", "TCP_MAXSEG"):
        sock.options.pop(name, None)
    if options.get("leave_running"):  # it runs on: repair off before any thaw, whatever happens
        tcp.set_repair(sk, True)
        try:
            return tcp.collect_repaired(sk, sock.id, sock.state, what)
        finally:
            with contextlib.suppress(OSError):
                tcp.set_repair(sk, False)
    repaired.hold(sk)
    tcp.set_repair(sk, True)
    return tcp.collect_repaired(sk, sock.id, sock.state, what)


class Prepare(protocol.Prepare):
    fd_kinds = (model.FdKind.INET,)

    def __init__(self, root, tree_fds):
        super().__init__(root, tree_fds)
        self.sockets = {s.id: s for s in root.checkpoint.inet_sockets}
        self.connections = {c.socket: c for c in root.checkpoint.tcp_connections}
        self.lock = root.checkpoint.net_lock[0] if root.checkpoint.net_lock else None
        self.fds: dict[int, int] = {}
        self.repaired: list[int] = []  # restorer fds of connections still in repair mode

    def check_options(self) -> None:
        """Refuse before anything is made: live connections need --tcp-established or --tcp-close."""
        live = [s for s in self.sockets.values() if s.state not in (0, TCP_CLOSE, TCP_LISTEN)]
        if not live or self.options.get("tcp_close"):
            return
        if self.lock is not None and self.lock.tcp_close:
            raise RestoreError(f"the image was dumped with --tcp-close ({len(live)} live TCP connection"
                               f"{'s' if len(live) > 1 else ''}, not read); restore with --tcp-close")
        if not self.options.get("tcp_established"):
            raise RestoreError(f"{live[0].describe()} is a live TCP connection to {_addr(live[0].peer)} "
                               f"(of {len(live)}, dumped with --tcp-established); restore with "
                               "--tcp-established, or --tcp-close to restore them closed")

    def open_fd(self, entry: model.FdEntry, proc: Restoring) -> int:
        if entry.file_id not in self.fds:
            sock = self.sockets[entry.file_id]
            conn = self.connections.get(sock.id)
            if sock.state in (0, TCP_CLOSE, TCP_LISTEN):
                made = make(sock)
            elif conn is not None and not self.options.get("tcp_close"):
                made = make(sock, lambda sk: tcp.restore_repaired(sk, sock, conn, self.root))
            else:  # --tcp-close: a TCP socket never connected, its options kept
                made = make(dataclasses.replace(sock, state=TCP_CLOSE, local=[], peer=[]))
            self.fds[entry.file_id] = self.own(made.detach())
            if conn is not None and not self.options.get("tcp_close"):
                self.repaired.append((self.fds[entry.file_id], sock))
        fd = self.fds[entry.file_id]
        fcntl.fcntl(fd, fcntl.F_SETFL, int(entry.flags) & os.O_NONBLOCK)
        return fd

    def prepare_process(self, ckpt: model.Checkpoint) -> None:
        self.check_options()

    def ready(self) -> None:
        """Every process is rebuilt, none runs: repair off (it resets
        SO_REUSEADDR, which is set again)."""
        if not self.repaired:  # every restore comes here: socket (~6 ms to import) only when some are
            self.done_repair = True
            return
        import socket

        for fd, sock in self.repaired:
            sk = socket.socket(fileno=os.dup(fd))
            try:
                tcp.set_repair(sk, False)
                sk.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, int(sock.options.get("SO_REUSEADDR", 0)))
            except OSError as err:
                raise RestoreError(f"{sock.describe()}: cannot turn TCP_REPAIR off: {err.strerror}") from err
            finally:
                sk.close()
        self.done_repair = True

    def finish(self, ok: bool) -> None:
        """After a success the lock goes; after a failure it stays (the image
        can still be restored; netlock.py), and sockets that left repair
        mode enter it again before they are closed, so that they send
        nothing and leave the address pairs free for the next attempt."""
        if ok:
            if self.lock is not None and not self.options.get("skip_net_lock"):
                try:
                    faults.point("before-net-unlock")
                    netlock.unlock(self.lock)
                except ProcsnapError as err:
                    raise RestoreError(f"pid {self.root.checkpoint.task.pid}: restored and running, but its "
                                       f"network lock {self.lock.table} ({self.lock.method}) stays: {err}") from err
            return
        if getattr(self, "done_repair", False):
            import socket

            for fd, _ in self.repaired:
                with contextlib.suppress(OSError), socket.socket(fileno=os.dup(fd)) as sk:
                    tcp.set_repair(sk, True)


def _address(sock: InetSocket, addr: list) -> tuple:
    if sock.family == AF_PACKET:
        return (addr[0], addr[1])
    return tuple(addr)


def make(sock: InetSocket, connect=None) -> socket_mod.socket:
    """connect(sk): instead of bind, connect and listen (a live TCP connection, tcp.py)."""
    import socket

    from . import sockopt

    what = sock.describe()
    proto = socket.htons(sock.proto) if sock.family == AF_PACKET else sock.proto
    try:
        sk = socket.socket(sock.family, sock.type | socket.SOCK_CLOEXEC, proto)
    except OSError as err:
        raise RestoreError(f"{what}: cannot make it: {err.strerror}") from err
    try:
        for name in sockopt.BEFORE_BIND:
            if name in sock.options:
                sockopt.set_option(sk, name, sock.options[name], what)
        step = "bind it"
        try:
            if connect is not None:
                connect(sk)
            elif sock.local:
                if sock.family in (AF_INET, AF_INET6):
                    sk.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sk.bind(_address(sock, sock.local))
            for group in sock.groups:
                if group > 32 or not sock.local:
                    sk.setsockopt(sockopt.SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)
            step = "connect it"
            if sock.peer and connect is None:
                sk.connect(_address(sock, sock.peer))
            step = "listen"
            if sock.backlog >= 0 and connect is None:
                sk.listen(sock.backlog)
        except OSError as err:
            addr = _addr(sock.peer) if step == "connect it" else _addr(sock.local)
            raise RestoreError(f"{what}: cannot {step} ({addr}): {err.strerror}") from err
        sockopt.attach_filter(sk, sock.filter, what)
        # those set before bind stay (IPV6_V6ONLY cannot change once bound), but
        # SO_REUSEADDR, which the bind itself needed
        sockopt.apply_options(sk, sock.options, what, skip=tuple(n for n in sockopt.BEFORE_BIND if n != "SO_REUSEADDR"))
    except BaseException:
        sk.close()
        raise
    return sk


def check_tree(ckpt: model.Checkpoint, root: model.Checkpoint) -> list[str]:
    ids = {s.id for s in root.inet_sockets}
    problems = [f"fd {e.fd}: unknown inet socket {e.file_id}" for e in ckpt.fds
                if e.kind == model.FdKind.INET and e.file_id not in ids]
    conns = {c.socket: c for c in root.tcp_connections}
    lock = root.net_lock[0] if root.net_lock else None
    if lock is not None:
        problems += netlock.check(lock)
    for s in root.inet_sockets:
        live = s.state not in (0, TCP_CLOSE, TCP_LISTEN)
        if live and s.id not in conns and not (lock is not None and lock.tcp_close):
            problems.append(f"inet socket {s.id}: state {TCP_STATES.get(s.state, s.state)}, "
                            "but no TCP connection record and not dumped with --tcp-close")
        if s.family not in FAMILIES or s.type not in (SOCK_STREAM, SOCK_DGRAM, SOCK_RAW) \
                or (s.state not in (0, TCP_CLOSE, TCP_LISTEN) and s.state not in TCP_STATES) or not -1 <= s.backlog < 1 << 31 \
                or len(s.filter) % 8 or len(s.filter) > 8 * 4096 or len(s.local) > 4 or len(s.peer) > 4:
            problems.append(f"inet socket {s.id}: family {s.family}, type {s.type}, state {s.state}, "
                            f"backlog {s.backlog}")
        if s.options:
            from .sockopt import check_options

            problems += check_options(s.options, f"inet socket {s.id}")
    return problems


def check_image(ckpt: model.Checkpoint, image) -> list[str]:
    socks = {s.id: s for s in ckpt.inet_sockets}
    return [p for c in ckpt.tcp_connections for p in tcp.check(c, socks.get(c.socket), image)]


def blobs(ckpt: model.Checkpoint) -> list[tuple[str, int, int, int]]:
    return tcp.blobs(ckpt.tcp_connections)
