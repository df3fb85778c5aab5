"""Unix sockets as the kernel describes them (sock_diag netlink,
include/uapi/linux/unix_diag.h): type, state, peer, queue, shutdown, the
bound file, and a listener's connections not yet accepted (icons)."""

from __future__ import annotations

from .. import records as dataclasses  # the dataclasses API, cheap to import
import os
import socket
import struct

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
UDIAG_SHOW_NAME, UDIAG_SHOW_VFS, UDIAG_SHOW_PEER, UDIAG_SHOW_ICONS, UDIAG_SHOW_RQLEN = 0x1, 0x2, 0x4, 0x8, 0x10
UNIX_DIAG_NAME, UNIX_DIAG_VFS, UNIX_DIAG_PEER, UNIX_DIAG_ICONS, UNIX_DIAG_RQLEN, UNIX_DIAG_SHUTDOWN = 0, 1, 2, 3, 4, 6
NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
UNIX_DIAG_REQ = struct.Struct("=BBHIIIII")  # family, protocol, pad, states, ino, show, cookie[2]
UNIX_DIAG_MSG = struct.Struct("=BBBBIII")  # family, type, state, pad, ino, cookie[2]
RTATTR = struct.Struct("=HH")


@dataclasses.dataclass
class UnixSocket:
    inode: int
    type: int  # SOCK_STREAM, SOCK_DGRAM, SOCK_SEQPACKET
    state: int  # TCP_ESTABLISHED (1) when connected, TCP_LISTEN (10), TCP_CLOSE (7)
    peer: int = 0  # the peer's inode, 0 if none
    name: bytes = b""  # bound address, b"" if unnamed
    rqueue: int = 0  # a listener: connections waiting to be accepted
    shutdown: int = 0  # RCV_SHUTDOWN 1 | SEND_SHUTDOWN 2
    wqueue: int = 0  # a listener: its backlog (sk_max_ack_backlog)
    vfs: tuple[int, int] | None = None  # (inode, kernel dev_t) of the file it was bound at
    icons: list[int] = dataclasses.field(default_factory=list)  # a listener: inodes of the clients waiting


def unix_sockets() -> dict[int, UnixSocket]:
    """Every unix socket of this network namespace, by inode."""
    sk = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG)
    try:
        req = UNIX_DIAG_REQ.pack(socket.AF_UNIX, 0, 0, 0xFFFFFFFF, 0,
                                 UDIAG_SHOW_NAME | UDIAG_SHOW_VFS | UDIAG_SHOW_PEER | UDIAG_SHOW_ICONS
                                 | UDIAG_SHOW_RQLEN | 0x40, 0xFFFFFFFF,
                                 0xFFFFFFFF)
        out: dict[int, UnixSocket] = {}
        for msg in dump(sk, req):
            _parse(msg, out)
        return out
    finally:
        sk.close()


def dump(sk: socket.socket, req: bytes):
    """The messages that a SOCK_DIAG_BY_FAMILY dump request `req` gets on `sk`."""
    sk.send(NLMSGHDR.pack(NLMSGHDR.size + len(req), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + req)
    while True:
        data = sk.recv(1 << 16)
        off = 0
        while off + NLMSGHDR.size <= len(data):
            length, kind, _, _, _ = NLMSGHDR.unpack_from(data, off)
            if kind == NLMSG_DONE:
                return
            if kind == NLMSG_ERROR:
                (err,) = struct.unpack_from("=i", data, off + NLMSGHDR.size)
                raise OSError(-err, f"sock_diag: {os.strerror(-err)}")
            yield data[off + NLMSGHDR.size : off + length]
            off += (length + 3) & ~3


def _parse(msg: bytes, out: dict[int, UnixSocket]) -> None:
    _, stype, state, _, ino, _, _ = UNIX_DIAG_MSG.unpack_from(msg)
    s = UnixSocket(ino, stype, state)
    off = UNIX_DIAG_MSG.size
    while off + RTATTR.size <= len(msg):
        alen, atype = RTATTR.unpack_from(msg, off)
        if alen < RTATTR.size:
            break
        payload = msg[off + RTATTR.size : off + alen]
        if atype == UNIX_DIAG_NAME:
            s.name = payload
        elif atype == UNIX_DIAG_PEER:
            (s.peer,) = struct.unpack_from("=I", payload)
        elif atype == UNIX_DIAG_RQLEN:
            s.rqueue, s.wqueue = struct.unpack_from("=II", payload)
        elif atype == UNIX_DIAG_VFS:
            s.vfs = struct.unpack_from("=II", payload)
        elif atype == UNIX_DIAG_ICONS:
            s.icons = [x for (x,) in struct.iter_unpack("=I", payload[: len(payload) & ~3])]
        elif atype == UNIX_DIAG_SHUTDOWN:
            s.shutdown = payload[0]
        off += (alen + 3) & ~3
    out[ino] = s
