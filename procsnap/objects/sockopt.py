"""Socket options, shared by the kinds of sockets (unix, inet): which ones
are read at dump, how they are put back, and the fd copy they are read
through.

An option is stored by name as getsockopt returned it: an int for the
4-byte ones, the raw bytes in hex for the others (linger, timeouts, a bound
device, a congestion control name). Only those that differ from a fresh
socket of the same family, type and protocol are stored (ALWAYS excepted),
so the image holds what the program changed.

    dump     collect_options(sk): every option of the tables that the
             socket's levels have, through a copy of the fd (copy_fd)
    restore  apply_options(sk, options, where): in table order; the ones in
             BEFORE_BIND are set by the kind before bind()
"""

from __future__ import annotations

import ctypes
import socket
import struct

from ..errors import RestoreError
from ..kernel import libc as kernel_libc
from ..kernel.libc import libc, oserror

SOL_SOCKET, SOL_IP, SOL_TCP, SOL_UDP, SOL_IPV6, SOL_UDPLITE, SOL_RAW, SOL_PACKET, SOL_NETLINK = \
    1, 0, 6, 17, 41, 136, 255, 263, 270
SO_GET_FILTER, SO_ATTACH_FILTER, SO_LOCK_FILTER = 26, 26, 44
SO_REUSEADDR, SO_SNDBUF, SO_RCVBUF, SO_SNDBUFFORCE, SO_RCVBUFFORCE, SO_BUF_LOCK = 2, 7, 8, 32, 33, 72
INT = 4

# level -> (name, optname, size) of the options a program can set and read
# back (include/uapi/asm-generic/socket.h, linux/in.h, linux/in6.h,
# linux/tcp.h, linux/udp.h, linux/if_packet.h, linux/netlink.h). Read-only
# ones (SO_TYPE, SO_ERROR, TCP_INFO ...) and the ones whose value is the
# kernel's (SO_COOKIE, SO_INCOMING_CPU) are not here.
TABLES: dict[int, tuple[tuple[str, int, int], ...]] = {
    SOL_SOCKET: (
        ("SO_DEBUG", 1, INT), ("SO_REUSEADDR", 2, INT), ("SO_DONTROUTE", 5, INT), ("SO_BROADCAST", 6, INT),
        ("SO_SNDBUF", 7, INT), ("SO_RCVBUF", 8, INT), ("SO_KEEPALIVE", 9, INT), ("SO_OOBINLINE", 10, INT),
        ("SO_NO_CHECK", 11, INT), ("SO_PRIORITY", 12, INT), ("SO_LINGER", 13, 8), ("SO_REUSEPORT", 15, INT),
        ("SO_PASSCRED", 16, INT), ("SO_RCVLOWAT", 18, INT), ("SO_RCVTIMEO", 20, 16), ("SO_SNDTIMEO", 21, 16),
        ("SO_BINDTODEVICE", 25, 16), ("SO_TIMESTAMP", 29, INT), ("SO_PASSSEC", 34, INT),
        ("SO_TIMESTAMPNS", 35, INT), ("SO_MARK", 36, INT), ("SO_RXQ_OVFL", 40, INT), ("SO_WIFI_STATUS", 41, INT),
        ("SO_PEEK_OFF", 42, INT), ("SO_NOFCS", 43, INT), ("SO_SELECT_ERR_QUEUE", 45, INT),
        ("SO_BUSY_POLL", 46, INT), ("SO_MAX_PACING_RATE", 47, INT), ("SO_ZEROCOPY", 60, INT),
        ("SO_PREFER_BUSY_POLL", 69, INT), ("SO_BUSY_POLL_BUDGET", 70, INT), ("SO_BUF_LOCK", 72, INT),
        ("SO_TXREHASH", 74, INT), ("SO_RCVMARK", 75, INT), ("SO_PASSPIDFD", 76, INT),
    ),
    SOL_IP: (
        ("IP_TOS", 1, INT), ("IP_TTL", 2, INT), ("IP_HDRINCL", 3, INT), ("IP_RECVOPTS", 6, INT),
        ("IP_RETOPTS", 7, INT), ("IP_PKTINFO", 8, INT), ("IP_MTU_DISCOVER", 10, INT), ("IP_RECVERR", 11, INT),
        ("IP_RECVTTL", 12, INT), ("IP_RECVTOS", 13, INT), ("IP_FREEBIND", 15, INT), ("IP_PASSSEC", 18, INT),
        ("IP_RECVORIGDSTADDR", 20, INT), ("IP_ROUTER_ALERT", 5, INT),
        ("IP_TRANSPARENT", 19, INT), ("IP_MINTTL", 21, INT), ("IP_NODEFRAG", 22, INT), ("IP_CHECKSUM", 23, INT),
        ("IP_BIND_ADDRESS_NO_PORT", 24, INT), ("IP_RECVFRAGSIZE", 25, INT), ("IP_RECVERR_RFC4884", 26, INT),
        ("IP_MULTICAST_IF", 32, INT), ("IP_MULTICAST_TTL", 33, INT), ("IP_MULTICAST_LOOP", 34, INT),
        ("IP_MULTICAST_ALL", 49, INT), ("IP_UNICAST_IF", 50, INT), ("IP_LOCAL_PORT_RANGE", 51, INT),
    ),
    SOL_IPV6: (
        ("IPV6_RECVPKTINFO", 49, INT), ("IPV6_UNICAST_HOPS", 16, INT), ("IPV6_MULTICAST_IF", 17, INT),
        ("IPV6_MULTICAST_HOPS", 18, INT), ("IPV6_MULTICAST_LOOP", 19, INT), ("IPV6_MTU_DISCOVER", 23, INT),
        ("IPV6_RECVERR", 25, INT), ("IPV6_V6ONLY", 26, INT), ("IPV6_RECVHOPLIMIT", 51, INT),
        ("IPV6_RECVRTHDR", 56, INT), ("IPV6_RECVHOPOPTS", 53, INT), ("IPV6_RECVDSTOPTS", 58, INT),
        ("IPV6_RECVTCLASS", 66, INT), ("IPV6_TCLASS", 67, INT), ("IPV6_AUTOFLOWLABEL", 70, INT),
        ("IPV6_ADDR_PREFERENCES", 72, INT), ("IPV6_MINHOPCOUNT", 73, INT), ("IPV6_TRANSPARENT", 75, INT),
        ("IPV6_UNICAST_IF", 76, INT), ("IPV6_RECVFRAGSIZE", 77, INT), ("IPV6_FREEBIND", 78, INT),
        ("IPV6_MULTICAST_ALL", 29, INT), ("IPV6_DONTFRAG", 62, INT), ("IPV6_RECVPATHMTU", 60, INT),
        ("IPV6_CHECKSUM", 7, INT), ("IPV6_RECVORIGDSTADDR", 74, INT),
    ),
    SOL_TCP: (
        ("TCP_NODELAY", 1, INT), ("TCP_MAXSEG", 2, INT), ("TCP_CORK", 3, INT), ("TCP_KEEPIDLE", 4, INT),
        ("TCP_KEEPINTVL", 5, INT), ("TCP_KEEPCNT", 6, INT), ("TCP_SYNCNT", 7, INT), ("TCP_LINGER2", 8, INT),
        ("TCP_DEFER_ACCEPT", 9, INT), ("TCP_WINDOW_CLAMP", 10, INT), ("TCP_QUICKACK", 12, INT),
        ("TCP_CONGESTION", 13, 16), ("TCP_THIN_LINEAR_TIMEOUTS", 16, INT), ("TCP_USER_TIMEOUT", 18, INT),
        ("TCP_FASTOPEN", 23, INT), ("TCP_NOTSENT_LOWAT", 25, INT), ("TCP_FASTOPEN_CONNECT", 30, INT),
        ("TCP_FASTOPEN_NO_COOKIE", 34, INT), ("TCP_TX_DELAY", 37, INT), ("TCP_SAVE_SYN", 27, INT),
        ("TCP_INQ", 36, INT), ("TCP_THIN_DUPACK", 17, INT),
    ),
    SOL_UDP: (("UDP_CORK", 1, INT), ("UDP_NO_CHECK6_TX", 101, INT), ("UDP_NO_CHECK6_RX", 102, INT),
              ("UDP_SEGMENT", 103, INT), ("UDP_GRO", 104, INT)),
    SOL_UDPLITE: (("UDPLITE_SEND_CSCOV", 10, INT), ("UDPLITE_RECV_CSCOV", 11, INT)),
    SOL_RAW: (("ICMP_FILTER", 1, INT),),
    SOL_PACKET: (("PACKET_AUXDATA", 8, INT), ("PACKET_ORIGDEV", 9, INT), ("PACKET_VERSION", 10, INT),
                 ("PACKET_RESERVE", 12, INT), ("PACKET_LOSS", 14, INT), ("PACKET_VNET_HDR", 15, INT),
                 ("PACKET_TIMESTAMP", 17, INT), ("PACKET_QDISC_BYPASS", 20, INT),
                 ("PACKET_IGNORE_OUTGOING", 23, INT)),
    SOL_NETLINK: (("NETLINK_PKTINFO", 3, INT), ("NETLINK_BROADCAST_ERROR", 4, INT),
                  ("NETLINK_NO_ENOBUFS", 5, INT), ("NETLINK_LISTEN_ALL_NSID", 8, INT),
                  ("NETLINK_CAP_ACK", 10, INT), ("NETLINK_EXT_ACK", 11, INT), ("NETLINK_GET_STRICT_CHK", 12, INT)),
}
BY_NAME = {name: (level, opt, size) for level, table in TABLES.items() for name, opt, size in table}
# Set before bind() (they decide whether and where it binds) ...
BEFORE_BIND = ("SO_REUSEADDR", "SO_REUSEPORT", "SO_BINDTODEVICE", "IP_FREEBIND", "IP_TRANSPARENT",
               "IP_BIND_ADDRESS_NO_PORT", "IPV6_V6ONLY", "IPV6_FREEBIND", "IPV6_TRANSPARENT",
               "IP_LOCAL_PORT_RANGE")
# ... and stored even when they are the default: the buffer sizes the
# restore sets through SO_*BUFFORCE lock them (SO_BUF_LOCK says which were
# set by the program).
ALWAYS = ("SO_BUF_LOCK", "SO_REUSEADDR")  # and SO_REUSEADDR, which an inet bind sets for itself
# Never set from the table: what setting them does differs from what
# reading shows (the kernel doubles a buffer size; a peek offset is set
# once the queue is refilled; the filter lock once the filter is on).
SPECIAL = ("SO_SNDBUF", "SO_RCVBUF", "SO_PEEK_OFF", "SO_BUF_LOCK", "SO_PRIORITY")
# SO_PRIORITY goes after IP_TOS, which sets the priority from the TOS (rt_tos2priority).


def copy_fd(pid: int, fd: int) -> socket.socket:
    """A socket object over a copy of fd `fd` of `pid` (pidfd_getfd: the
    same open file description, so reading its options reads theirs)."""
    return socket.socket(fileno=kernel_libc.copy_fd(pid, fd))


def levels(family: int, stype: int, proto: int) -> tuple[int, ...]:
    """The option levels a socket of this kind has."""
    if family in (socket.AF_INET, socket.AF_INET6):
        ip = (SOL_IP, SOL_IPV6) if family == socket.AF_INET6 else (SOL_IP,)
        if stype == socket.SOCK_STREAM:
            return (SOL_SOCKET, *ip, SOL_TCP)
        if proto == socket.IPPROTO_UDPLITE:
            return (SOL_SOCKET, *ip, SOL_UDP, SOL_UDPLITE)
        if stype == socket.SOCK_DGRAM and proto in (0, socket.IPPROTO_UDP):
            return (SOL_SOCKET, *ip, SOL_UDP)
        if stype == socket.SOCK_RAW and proto == socket.IPPROTO_ICMP and family == socket.AF_INET:
            return (SOL_SOCKET, *ip, SOL_RAW)
        return (SOL_SOCKET, *ip)
    if family == socket.AF_PACKET:
        return (SOL_SOCKET, SOL_PACKET)
    if family == socket.AF_NETLINK:
        return (SOL_SOCKET, SOL_NETLINK)
    return (SOL_SOCKET,)


def read_options(sk: socket.socket, lv: tuple[int, ...]) -> dict[str, int | str]:
    out: dict[str, int | str] = {}
    for level in lv:
        for name, opt, size in TABLES[level]:
            try:
                raw = sk.getsockopt(level, opt, size)
            except OSError:
                continue  # not an option of this kind of socket
            out[name] = struct.unpack("<i", raw)[0] if size == INT and len(raw) == INT else raw.hex()
    return out


def collect_options(sk: socket.socket, family: int, stype: int, proto: int) -> dict[str, int | str]:
    """The options of `sk` that differ from a fresh socket's (and ALWAYS)."""
    lv = levels(family, stype, proto)
    mine = read_options(sk, lv)
    try:
        with socket.socket(family, stype, proto) as fresh:
            defaults = read_options(fresh, lv)
    except OSError:
        defaults = {}
    return {k: v for k, v in mine.items() if k in ALWAYS or defaults.get(k) != v}


def _raw(name: str, value: int | str) -> bytes:
    return struct.pack("<i", value) if isinstance(value, int) else bytes.fromhex(value)


def set_option(sk: socket.socket, name: str, value: int | str, where: str) -> None:
    level, opt, _ = BY_NAME[name]
    try:
        sk.setsockopt(level, opt, _raw(name, value))
    except OSError as err:
        raise RestoreError(f"{where}: cannot set {name} to {value}: {err.strerror}") from err


def apply_options(sk: socket.socket, options: dict[str, int | str], where: str,
                  skip: tuple[str, ...] = ()) -> None:
    """Every stored option but the special ones, in table order; then the
    buffer sizes (SO_*BUFFORCE: the kernel doubles what it is given), the
    buffer locks and the peek offset."""
    for name in BY_NAME:
        if name in options and name not in SPECIAL and name not in skip:
            set_option(sk, name, options[name], where)
    for name, force in (("SO_SNDBUF", SO_SNDBUFFORCE), ("SO_RCVBUF", SO_RCVBUFFORCE)):
        if name in options:
            try:
                sk.setsockopt(SOL_SOCKET, force, int(options[name]) // 2)
            except OSError as err:
                raise RestoreError(f"{where}: cannot set {name} to {options[name]}: {err.strerror}") from err
    for name in ("SO_BUF_LOCK", "SO_PEEK_OFF", "SO_PRIORITY"):
        if name in options:
            set_option(sk, name, options[name], where)


def check_options(options: dict[str, int | str], where: str) -> list[str]:
    """Problems of an image's options: unknown names, bad hex, wrong sizes."""
    problems = []
    for name, value in options.items():
        if name not in BY_NAME:
            problems.append(f"{where}: unknown socket option {name!r}")
            continue
        if isinstance(value, str):
            try:
                if len(bytes.fromhex(value)) > BY_NAME[name][2]:
                    problems.append(f"{where}: {name} is longer than {BY_NAME[name][2]} bytes")
            except ValueError:
                problems.append(f"{where}: {name} is not hex")
    return problems


# Classic BPF filters (SO_ATTACH_FILTER / SO_GET_FILTER, linux/filter.h):
# struct sock_filter { u16 code; u8 jt; u8 jf; u32 k; } (8 bytes);
# struct sock_fprog { u16 len; struct sock_filter *filter; }.
SOCK_FILTER = 8


class sock_fprog(ctypes.Structure):  # linux/filter.h
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


BPF_MAXINSNS = 4096


def read_filter(sk: socket.socket) -> bytes:
    """The classic BPF program attached to `sk` (b"" if none). SO_GET_FILTER
    takes and gives its length in instructions, not bytes."""
    buf = ctypes.create_string_buffer(BPF_MAXINSNS * SOCK_FILTER)
    length = ctypes.c_uint(BPF_MAXINSNS)
    if libc.getsockopt(sk.fileno(), SOL_SOCKET, SO_GET_FILTER, buf, ctypes.byref(length)) != 0:
        err = oserror("getsockopt(SO_GET_FILTER)")
        if err.errno in (95, 92):  # EOPNOTSUPP, ENOPROTOOPT
            return b""
        raise err
    return buf.raw[: length.value * SOCK_FILTER]


def attach_filter(sk: socket.socket, program: bytes, where: str) -> None:
    if not program:
        return
    buf = ctypes.create_string_buffer(program, len(program))
    prog = sock_fprog(len(program) // SOCK_FILTER, ctypes.addressof(buf))
    if libc.setsockopt(sk.fileno(), SOL_SOCKET, SO_ATTACH_FILTER, ctypes.byref(prog), ctypes.sizeof(prog)) != 0:
        err = oserror("setsockopt(SO_ATTACH_FILTER)")
        raise RestoreError(f"{where}: cannot attach its BPF filter ({len(program) // SOCK_FILTER} "
                           f"instructions): {err.strerror}") from err
