"""TCP sockets as inet_diag describes them (sock_diag netlink,
include/uapi/linux/inet_diag.h): the peer of a socket still connecting,
which getpeername() does not tell (ENOTCONN in SYN_SENT)."""

from __future__ import annotations

import socket
import struct

from .sockdiag import NETLINK_SOCK_DIAG, dump

# struct inet_diag_req_v2: family, protocol, ext, pad, states, struct inet_diag_sockid
# (sport, dport big-endian, src[4], dst[4], if, cookie[2])
INET_DIAG_REQ_V2 = struct.Struct("=BBBBI48x")
# struct inet_diag_msg: family, state, timer, retrans, the sockid, expires, rqueue, wqueue, uid, inode
INET_DIAG_MSG = struct.Struct("=BBBB2s2s16s16s8x4xIIIII")


def tcp_peer(family: int, inode: int, states: int) -> tuple[str, int] | None:
    """(address, port) of the peer of the TCP socket `inode` of this network
    namespace, among those in `states` (a mask of 1 << state); None if none."""
    sk = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG)
    try:
        for msg in dump(sk, INET_DIAG_REQ_V2.pack(family, socket.IPPROTO_TCP, 0, 0, states)):
            fam, _, _, _, _, dport, _, dst, _, _, _, _, ino = INET_DIAG_MSG.unpack_from(msg)
            if ino == inode:
                return socket.inet_ntop(fam, dst[:4] if fam == socket.AF_INET else dst), struct.unpack("!H", dport)[0]
        return None
    finally:
        sk.close()
