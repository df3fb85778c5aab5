"""`restore --inherit-fd fd[N]:RESOURCE`, as CRIU's: a file the tree held,
given by the caller as its fd N, used instead of the one the restore
would make or open again.

    RESOURCE     what the tree held                    instead of
    --------     ------------------                    ----------
    pipe:[INO]   an end of the pipe with that inode    a new pipe (refilled with the dumped bytes):
                 when dumped (its ends of the same     the caller's pipe, as it is; its bytes are
                 direction as fd N)                    the caller's
    PATH         a regular file opened at PATH         PATH opened again at its position: the
                                                       caller's open file, at its own position

`procsnap show DIR` lists the resources an image has (`inherit-fd:`
lines), the names to pass. Every fd of the tree that held the resource
gets the caller's description (a dup of fd N); nothing is refilled,
seeked or truncated in it. A resource the image does not have, an fd N
not open, or a pipe end of the other direction is bad input, said in one
line before anything is made.
"""

from __future__ import annotations

import fcntl
import os
import re
import typing

from . import model
from .errors import ProcsnapError, RestoreError

_SPEC = re.compile(r"fd\[(?P<fd>\d+)\]:(?P<resource>.+)")


class InheritFdError(ProcsnapError):
    """A malformed --inherit-fd, or one naming what the image does not hold."""

    exit_code = 2


def parse(specs: typing.Iterable[str] | None) -> dict[str, int]:
    """RESOURCE -> the caller's fd N, of each `fd[N]:RESOURCE`."""
    out: dict[str, int] = {}
    for spec in specs or ():
        m = _SPEC.fullmatch(spec)
        if m is None:
            raise InheritFdError(f"--inherit-fd {spec!r}: expected fd[N]:RESOURCE, e.g. fd[0]:pipe:[12345] "
                                 "or fd[3]:/var/log/app.log (procsnap show DIR lists an image's)")
        fd, resource = int(m["fd"]), m["resource"]
        try:
            os.fstat(fd)
        except OSError as err:
            raise InheritFdError(f"--inherit-fd {spec!r}: fd {fd} is not open here ({err.strerror})") from err
        if resource in out:
            raise InheritFdError(f"--inherit-fd {spec!r}: {resource} given twice")
        out[resource] = fd
    return out


def resource_of(entry: model.FdEntry, pipes: dict[int, typing.Any]) -> str | None:
    """The name --inherit-fd gives what `entry` holds, or None (a kind it does not take)."""
    if entry.kind == model.FdKind.PIPE and entry.file_id in pipes and not pipes[entry.file_id].path:
        ino = pipes[entry.file_id].ino
        return f"pipe:[{ino}]" if ino else None
    if entry.kind == model.FdKind.REG:
        return entry.path
    return None


def resources(tree) -> list[tuple[str, int, int]]:
    """(resource, pid, fd) of every fd of the tree --inherit-fd can replace (restorer.tree.open_tree's list)."""
    root = next(img for _, img in tree if img is not None)
    pipes = {p.id: p for p in root.checkpoint.pipes}
    out = []
    for p, img in tree:
        if img is None:
            continue
        for e in sorted(img.checkpoint.fds, key=lambda e: e.fd):
            name = resource_of(e, pipes) if e.shares_with < 0 else None
            if name is not None:
                out.append((name, p.pid, e.fd))
    return out


def check(tree, inherit: dict[str, int]) -> None:
    """Every resource given is one the image holds."""
    if not inherit:
        return
    held = {name for name, _, _ in resources(tree)}
    for name, fd in inherit.items():
        if name not in held:
            listed = ", ".join(sorted(held)[:6]) or "none"
            raise InheritFdError(f"--inherit-fd fd[{fd}]:{name}: the image holds no such resource (it holds: "
                                 f"{listed}; procsnap show lists them)")


def open_inherited(entry: model.FdEntry, inherit: dict[str, int], pipes: list) -> int | None:
    """A restorer fd (a dup of the caller's, close-on-exec) for `entry` if
    its resource was given; None if not. pipes: the root's Pipe records."""
    if not inherit:
        return None
    name = resource_of(entry, {p.id: p for p in pipes})
    if name not in inherit:
        return None
    fd = inherit[name]
    if entry.kind == model.FdKind.PIPE:
        theirs = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
        if theirs != entry.flags & os.O_ACCMODE:
            raise RestoreError(f"fd {entry.fd}: --inherit-fd fd[{fd}]:{name}: fd {fd} is the "
                               f"{'write' if theirs else 'read'} end of a pipe, the tree's fd {entry.fd} was "
                               f"the {'write' if entry.flags & os.O_ACCMODE else 'read'} end")
    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 0)
