"""A TCP segment made up as if the peer had sent it, for a restored
connection in repair mode (soccr's send_fin): its FIN (the peer's FIN was
in our receive queue at the dump: CLOSE_WAIT, LAST_ACK, CLOSING) or the
ACK of our FIN (FIN_WAIT2). The kernel has no way to put either back with
TCP_REPAIR, so the socket is made to receive them.

Sent from a raw socket (IPPROTO_RAW: the IP header is ours, IP_HDRINCL /
IPV6_HDRINCL implied) marked with SO_MARK MARK, which the network lock lets
through (netlock.py; CRIU's SOCCR_MARK). No TCP options: Linux takes a
segment without a timestamp on a connection that has them (PAWS checks
only segments that carry one).
"""

from __future__ import annotations

import struct

from .netlock import MARK  # CRIU's SOCCR_MARK: the network lock lets packets with it through

TH_FIN, TH_ACK = 0x01, 0x10
SO_MARK = 36


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _packed(addr: str) -> tuple[int, bytes]:
    """(family, address bytes) of an address as packets carry it: a
    v4-mapped IPv6 socket's packets are IPv4."""
    import socket  # here: every dump imports this module, few send a FIN (socket costs ~6 ms to import)

    if addr.startswith("::ffff:") and "." in addr:
        addr = addr[7:]
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    return family, socket.inet_pton(family, addr)


def segment(src: tuple, dst: tuple, seq: int, ack: int, flags: int, window: int) -> tuple[int, bytes, str]:
    """(family, the IP packet, destination address) of a TCP segment from
    src (address, port) to dst, without payload or options."""
    import socket

    family, saddr = _packed(str(src[0]))
    _, daddr = _packed(str(dst[0]))
    tcp = struct.pack("!HHIIBBHHH", int(src[1]), int(dst[1]), seq & 0xFFFFFFFF, ack & 0xFFFFFFFF,
                      5 << 4, flags, min(max(window, 0), 0xFFFF), 0, 0)
    if family == socket.AF_INET:
        pseudo = saddr + daddr + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(tcp))
    else:
        pseudo = saddr + daddr + struct.pack("!I3xB", len(tcp), socket.IPPROTO_TCP)
    tcp = tcp[:16] + struct.pack("!H", _checksum(pseudo + tcp)) + tcp[18:]
    if family == socket.AF_INET:  # version/IHL, TOS, length, id, frag, TTL, proto, checksum (the kernel's)
        ip = struct.pack("!BBHHHBBH", 0x45, 0, 20 + len(tcp), 0, 0, 64, socket.IPPROTO_TCP, 0) + saddr + daddr
    else:  # version, flow label, payload length, next header, hop limit
        ip = struct.pack("!IHBB", 6 << 28, len(tcp), socket.IPPROTO_TCP, 64) + saddr + daddr
    return family, ip + tcp, socket.inet_ntop(family, daddr)


def send(src: tuple, dst: tuple, seq: int, ack: int, flags: int, window: int) -> None:
    """Send the segment (raises OSError)."""
    import socket

    family, packet, daddr = segment(src, dst, seq, ack, flags, window)
    with socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_RAW) as raw:
        raw.setsockopt(socket.SOL_SOCKET, SO_MARK, MARK)
        raw.sendto(packet, (daddr, 0))
