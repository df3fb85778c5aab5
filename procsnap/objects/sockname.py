"""What a socket is, in words, for the message that refuses it: "a TCP
socket listening on 127.0.0.1:6379", not "socket:[482082]".

Found by its inode in the target's own network namespace's tables
(/proc/PID/net/*), one small read per table until it is found:

    table             says
    tcp, tcp6         state (LISTEN, ESTABLISHED ...), local and remote address
    udp, udp6         bound address, the peer if connected
    raw, raw6         the IP protocol (the "port" field)
    unix              type, listening (__SO_ACCEPTCON), bound path or @abstract name
    netlink           the netlink protocol (the "Eth" field)
    packet            the Ethernet protocol and the interface index

A socket in none of them (an unbound netlink socket, vsock, an unknown
family) is named by its family, type and protocol (SO_DOMAIN, SO_TYPE,
SO_PROTOCOL of a copy taken with pidfd_getfd).
Any kind's refusal of a socket can call describe_socket().
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct

TCP_STATES = {1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2", 6: "TIME_WAIT",
              7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING"}
TCP_LISTEN, TCP_CLOSE = 10, 7
SO_ACCEPTCON = 0x10000  # /proc/net/unix Flags: a listening socket
UNIX_TYPES = {1: "stream", 2: "datagram", 5: "seqpacket"}
NETLINK_PROTOCOLS = {0: "NETLINK_ROUTE", 2: "NETLINK_USERSOCK", 4: "NETLINK_SOCK_DIAG", 6: "NETLINK_XFRM",
                     9: "NETLINK_AUDIT", 10: "NETLINK_FIB_LOOKUP", 12: "NETLINK_NETFILTER",
                     15: "NETLINK_KOBJECT_UEVENT", 16: "NETLINK_GENERIC"}


def _address(text: str) -> str:
    """ "0100007F:18EB" or a 32-digit IPv6 one (32-bit words in host order) -> "127.0.0.1:6379"."""
    host, port = text.split(":")
    raw = bytes.fromhex(host)
    packed = b"".join(struct.pack("=I", struct.unpack(">I", raw[i:i + 4])[0]) for i in range(0, len(raw), 4))
    ip = ipaddress.ip_address(packed)
    if isinstance(ip, ipaddress.IPv6Address):
        mapped = ip.ipv4_mapped
        return f"{mapped}:{int(port, 16)}" if mapped else f"[{ip}]:{int(port, 16)}"
    return f"{ip}:{int(port, 16)}"


def _rows(pid: int, table: str) -> list[list[str]]:
    try:
        with open(f"/proc/{pid}/net/{table}") as f:
            return [line.split() for line in f.read().splitlines()[1:]]
    except OSError:
        return []


def _inet(pid: int, inode: int) -> str | None:
    for table, proto in (("tcp", "TCP"), ("tcp6", "TCP"), ("udp", "UDP"), ("udp6", "UDP"),
                         ("raw", "raw"), ("raw6", "raw")):
        for row in _rows(pid, table):
            if len(row) < 10 or row[9] != str(inode):
                continue
            local, remote, state = _address(row[1]), _address(row[2]), int(row[3], 16)
            version = "IPv6" if table.endswith("6") else "IPv4"
            if proto == "TCP":
                if state == TCP_LISTEN:
                    return f"a TCP socket listening on {local}"
                if state == TCP_CLOSE:
                    return f"a TCP socket bound to {local}" if not local.endswith(":0") else "an unbound TCP socket"
                return f"a TCP connection {local} -> {remote} ({TCP_STATES.get(state, state)})"
            if proto == "UDP":
                connected = f", connected to {remote}" if state == 1 else ""
                return f"a UDP socket bound to {local}{connected}"
            return f"a raw {version} socket (IP protocol {local.rsplit(':', 1)[1]})"
    return None


def _unix(pid: int, inode: int) -> str | None:
    for row in _rows(pid, "unix"):
        if len(row) >= 7 and row[6] == str(inode):
            kind = UNIX_TYPES.get(int(row[4], 16), f"type {int(row[4], 16)}")
            path = row[7] if len(row) > 7 else ""
            if int(row[3], 16) & SO_ACCEPTCON:
                return f"a unix {kind} socket listening on {path or 'an unnamed address'}"
            state = "connected" if int(row[5], 16) == 3 else "unconnected"
            return f"a {state} unix {kind} socket" + (f" bound to {path}" if path else "")
    return None


def _netlink(pid: int, inode: int) -> str | None:
    for row in _rows(pid, "netlink"):
        if len(row) >= 10 and row[9] == str(inode):
            proto = int(row[1])
            return f"a netlink socket ({NETLINK_PROTOCOLS.get(proto, f'protocol {proto}')}, port id {row[2]})"
    return None


def _packet(pid: int, inode: int) -> str | None:
    for row in _rows(pid, "packet"):
        if len(row) >= 9 and row[8] == str(inode):
            kind = {socket.SOCK_RAW: "raw", socket.SOCK_DGRAM: "datagram"}.get(int(row[2]), f"type {row[2]}")
            iface = int(row[4])
            return (f"a {kind} packet socket (protocol {int(row[3], 16):#06x}, "
                    f"{'interface ' + str(iface) if iface else 'every interface'})")
    return None


FAMILIES = {socket.AF_INET: "IPv4", socket.AF_INET6: "IPv6", socket.AF_UNIX: "unix", socket.AF_NETLINK: "netlink",
            socket.AF_PACKET: "packet", 40: "vsock", 31: "bluetooth", 44: "XDP", 38: "AF_ALG", 16: "netlink",
            41: "KCM", 43: "SMC", 42: "qipcrtr", 21: "RDS", 29: "CAN", 30: "TIPC"}
SOCK_TYPES = {socket.SOCK_STREAM: "stream", socket.SOCK_DGRAM: "datagram", socket.SOCK_RAW: "raw",
              socket.SOCK_SEQPACKET: "seqpacket", socket.SOCK_RDM: "RDM"}


def _by_options(pid: int, fd: int) -> str | None:
    """Family, type and protocol of a socket in no table (an unbound netlink
    socket, vsock, ...), asked of a copy of it (pidfd_getfd)."""
    from ..kernel.libc import copy_fd

    try:
        copy = copy_fd(pid, fd)
    except OSError:
        return None
    try:
        s = socket.socket(fileno=os.dup(copy))
        try:
            family = s.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN)
            stype = s.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
            proto = s.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL)
        finally:
            s.close()
    except OSError:
        return None
    finally:
        os.close(copy)
    if family == socket.AF_NETLINK:
        return f"a netlink socket ({NETLINK_PROTOCOLS.get(proto, f'protocol {proto}')}, not bound)"
    name = FAMILIES.get(family, f"family {family}")
    return f"{'an' if name[0] in 'AEIOU' else 'a'} {name} {SOCK_TYPES.get(stype, f'type {stype}')} socket " \
           f"(protocol {proto})"


def describe_socket(pid: int, fd: int, inode: int) -> str:
    """The socket `fd` of `pid`, whose inode is `inode`, in words (with its article)."""
    for find in (_inet, _unix, _netlink, _packet):
        found = find(pid, inode)
        if found:
            return found
    return _by_options(pid, fd) or "a socket"
