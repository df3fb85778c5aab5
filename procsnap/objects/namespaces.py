"""Namespaces: a tree that lives in any namespace other than procsnap's own
is refused at dump, naming the namespace, until namespaces are restored.

Restored into procsnap's namespaces such a tree would lose what it is: a
pid-namespace init would be pid 1 of nothing, a UTS namespace's hostname
would be the host's, a network namespace's sockets would see the host's
devices. `*_for_children` count too: a process that unshared a pid or time
namespace for the children it has not forked yet.
"""

from __future__ import annotations

import os

from ..errors import Unsupported

KINDS = ("cgroup", "ipc", "mnt", "net", "pid", "pid_for_children", "time", "time_for_children", "user", "uts")


def foreign_namespaces(pid: int) -> list[str]:
    """The namespaces of `pid` that are not procsnap's, as 'kind:[inode]'."""
    out = []
    for kind in KINDS:
        try:
            mine = os.readlink(f"/proc/self/ns/{kind}")
            theirs = os.readlink(f"/proc/{pid}/ns/{kind}")
        except FileNotFoundError:
            continue  # a kind this kernel does not have
        if theirs != mine:
            out.append(theirs)
    return out


def check_namespaces(pid: int) -> None:
    foreign = foreign_namespaces(pid)
    if foreign:
        raise Unsupported(f"pid {pid}: lives in namespaces other than procsnap's: {', '.join(foreign)}; "
                          "namespaces are not restored, so the tree is refused (run procsnap inside them, "
                          "or dump a tree that does not use them)", pid)
