"""Files in flight (SCM_RIGHTS) on the unix sockets of the tree.

A peek of a queued message (unix.py) installs in procsnap a copy of each
file it carries: the same open file description. Socket.rights names each
one as

    [pid, fd]   the lowest fd of a process of the tree holding the same
                description (kcmp KCMP_FILE); sent again at restore from a
                pidfd_getfd copy of that restored fd
    [-1, i]     root.in_flight[i]: no process of the tree holds it (its
                sender closed it after sending)

A file of the second sort is dumped as the file it is, from procsnap's own
copy: the copy is kept open until the dump ends and offered to every kind
as an fd of procsnap's (protocol.Collect.collect_in_flight), which records
it as it would a process's fd: a regular file or directory (path, flags,
offset), a pipe end (of the same Pipe as a tree process's other end), a
unix socket (connected to its peer of the tree, its own queue read in
turn), a memfd, an eventfd, signalfd or timerfd. At restore the kind opens
it in the restorer (protocol.Prepare.open_other) and unix.py sends it in
its message. One description in flight several times is one record,
opened once and sent each time: still one description, one offset.
Other kinds (epoll, inotify, a terminal, an inet socket, a pidfd...) stay
refused by name: their records name fds of the process that holds them,
or make state the restorer cannot hold for a file no process has.
"""

from __future__ import annotations

import os
import stat
import typing

from .. import model
from ..errors import Unsupported

K = model.FdKind
# the kinds a file in flight is dumped as (what their collect_fd and open_fd
# do needs no process of the tree)
KINDS = frozenset({K.REG, K.DIR, K.PIPE, K.UNIX, K.SHM, K.EVENTFD, K.SIGNALFD, K.TIMERFD})
SIOCOUTQ = 0x5411  # of a unix socket: the truesize of the skbs it sent that are still queued
ANON_LINKS = ("anon_inode:[eventfd]", "anon_inode:[signalfd]", "anon_inode:[timerfd]")


class Flight:
    """The files in flight of one dump: found in the tree, or kept here."""

    def __init__(self, root: model.Checkpoint, tree_pids: set[int],
                 offer: typing.Callable[[int], model.FdEntry] | None, is_unix: typing.Callable[[int], bool]):
        self.root = root
        self.tree_pids = tree_pids
        self.offer = offer
        self.is_unix = is_unix
        self.kept: list[int] = []  # procsnap's copies, by index in root.in_flight

    def record(self, where: str, pid: int, got: int) -> list[int]:
        """[pid, fd] of a process of the tree holding the file `got` (a
        copy the peek installed here), else [-1, index in root.in_flight]."""
        from ..dumper.tree import same_description

        st = os.fstat(got)
        holder = _tree_holder(got, st, self.tree_pids)
        if holder is not None:
            return holder
        me = os.getpid()
        for i, kept in enumerate(self.kept):
            other = os.fstat(kept)
            if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino) and same_description(me, kept, me, got):
                return [-1, i]
        link = _link(got)
        what = f"{where} with a file descriptor in flight (SCM_RIGHTS: {link}, {_kind(got, link, st)}) that no " \
               "process of the dumped tree holds"
        if self.offer is None or not self._dumpable(link, st):
            raise Unsupported(f"{what}; not supported (files in flight are dumped when they are regular files, "
                              "directories, pipes, unix sockets, memfds, eventfds, signalfds or timerfds)", pid)
        kept = os.dup(got)  # close-on-exec, closed by close() when the dump ends
        self.kept.append(kept)
        try:
            entry = self.offer(kept)
        except Unsupported as err:
            raise Unsupported(f"{what}, which cannot be dumped: {err}", pid) from err
        if entry.kind not in KINDS:
            raise Unsupported(f"{what}: {entry.kind.value} files in flight are not supported", pid)
        entry.fd = len(self.root.in_flight)
        self.root.in_flight.append(entry)
        return [-1, entry.fd]

    def _dumpable(self, link: str, st: os.stat_result) -> bool:
        """Whether a kind that needs no process takes it, told before any
        kind sees it (an inet socket's or a terminal's collect acts)."""
        if stat.S_ISSOCK(st.st_mode):
            return self.is_unix(st.st_ino)
        if stat.S_ISFIFO(st.st_mode):
            return True
        if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
            if link.startswith("/memfd:"):
                return True
            return link.startswith("/") and not link.startswith("/proc/") and not link.endswith(" (deleted)")
        return link in ANON_LINKS

    def close(self) -> None:
        kept, self.kept = self.kept, []
        for fd in kept:
            os.close(fd)


def check_stream_pieces(where: str, pid: int, pieces: list[bytes], sender_outq: int | None) -> None:
    """Refuse files in flight on a stream socket unless each piece its
    peeks found is one skb: then sent again one sendmsg each, the files
    are attached where they were.

    A peek of a unix stream runs on across skbs and stops after the first
    that carries files, returning them: a piece ends where such an skb
    ends. Where it begins is not readable: a peek that runs out of bytes
    in an skb without files walks on (zero-length chunks) to the next skb
    that has some and returns its files too, so even a 1-byte peek of a
    byte sent before the files returns them. What tells the skbs apart is
    what they cost their sender: its SIOCOUTQ is the sum of their
    truesize. Every skb costs at least t = truesize(1 byte); if every
    piece costs less than 2t sent alone, a piece of two skbs or more costs
    more than it, and a partly read one no less, so only when the sum of
    the pieces sent alone is the sender's SIOCOUTQ is each piece one skb.
    """
    why = ""
    if sender_outq is None:
        why = "its peer is closed, so what its skbs cost cannot be read"
    else:
        t = truesize(1)
        costs = [truesize(len(p)) for p in pieces]
        if any(c >= 2 * t for c in costs):
            why = f"a piece of {max(map(len, pieces))} bytes is too long to tell whether it is one skb"
        elif sum(costs) != sender_outq:
            why = (f"its {len(pieces)} pieces would cost their sender {sum(costs)} bytes sent alone, it has "
                   f"{sender_outq} in flight: bytes sent before the files are glued to them")
    if why:
        raise Unsupported(f"{where} with file descriptors in flight (SCM_RIGHTS) whose place in the byte stream "
                          f"is not readable ({why}); not supported", pid)


_truesize: dict[int, int] = {}


def truesize(n: int) -> int:
    """What one skb of n bytes on a unix stream socket costs its sender
    (SIOCOUTQ after one send), measured on a socket pair of our own."""
    import fcntl
    import socket

    if n not in _truesize:
        a, b = socket.socketpair()
        with a, b:
            b.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
            b.send(bytes(n))
            _truesize[n] = int.from_bytes(fcntl.ioctl(b.fileno(), SIOCOUTQ, bytes(4)), "little", signed=True)
    return _truesize[n]


def _link(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "?"


def _kind(fd: int, link: str, st: os.stat_result) -> str:
    from .protocol import OpenFd
    from .refused import refused_kind

    return refused_kind(OpenFd(os.getpid(), fd, link, st, model.OpenFlag(0), 0, None, False))


def _tree_holder(got: int, st: os.stat_result, tree_pids: set[int]) -> list[int] | None:
    """[pid, fd] of the lowest fd of a process of the tree holding the open
    file description of `got`, or None."""
    from ..dumper.tree import same_description

    me = os.getpid()
    for p in sorted(tree_pids):
        try:
            fds = sorted(int(n) for n in os.listdir(f"/proc/{p}/fd"))
        except OSError:
            continue
        for n in fds:
            try:
                other = os.stat(f"/proc/{p}/fd/{n}")
            except OSError:
                continue
            if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino) and same_description(me, got, p, n):
                return [p, n]
    return None


def check_tree(root: model.Checkpoint, rights: list[list[list[int]]], what: str) -> list[str]:
    """Problems of a socket's files in flight held by no process."""
    problems = [f"{what}: file in flight {f[1]} is not in the image" for m in rights for f in m
                if len(f) == 2 and f[0] == -1 and not 0 <= f[1] < len(root.in_flight)]
    return problems


def check_image(root: model.Checkpoint) -> list[str]:
    """The root's files in flight: kinds that are restored, referring to
    what the image holds."""
    problems = []
    refs = {f.id for f in root.files}
    tables = {K.PIPE: {p.id for p in root.pipes}, K.UNIX: {s.id for s in root.sockets},
              K.SHM: {m.id for m in root.shms}, K.REG: refs, K.DIR: refs}
    for i, entry in enumerate(root.in_flight):
        if entry.fd != i or entry.kind not in KINDS:
            problems.append(f"file in flight {i}: fd {entry.fd}, kind {entry.kind.value}")
        elif entry.kind in tables and entry.file_id not in tables[entry.kind]:
            problems.append(f"file in flight {i}: unknown {entry.kind.value} {entry.file_id}")
    return problems
