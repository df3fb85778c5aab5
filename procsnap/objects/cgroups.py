"""Control-group membership, in every hierarchy (cgroup v2 and each v1
hierarchy mounted here).

    dump                                  restore
    ----                                  -------
    /proc/PID/cgroup lines          -->   validate: each saved cgroup exists here,
      "ID:CONTROLLERS:PATH"                 else the restore is refused by name
    every thread in its process's   -->   after the spawn, before the rebuild maps
      cgroups, else refused by name         any memory: the pid written into
                                            MOUNT/PATH/cgroup.procs where the new
                                            process is elsewhere (the restorer's)

The paths are as the restorer's cgroup namespace shows them (the dump's,
the same one: a process in a cgroup namespace of its own is refused with
the namespaces). A cgroup is found by its hierarchy's controllers (v1) or
as the cgroup2 mount, not by the hierarchy id, which is per boot.
"""

from __future__ import annotations

from .. import records as dataclasses  # the dataclasses API, cheap to import
import os

from ..errors import RestoreError, Unsupported


@dataclasses.dataclass
class Cgroup:
    """The process's cgroup in one hierarchy (record CGRP, since format 1.2)."""

    controllers: str  # "memory", "cpu,cpuacct", "name=systemd"; "" for cgroup v2
    path: str

    def describe(self) -> str:
        return f"{self.controllers or 'cgroup2'}:{self.path}"


def parse_cgroups(text: str) -> list[Cgroup]:
    out = []
    for line in text.splitlines():
        _, controllers, path = line.split(":", 2)
        out.append(Cgroup(controllers, path))
    return out


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def collect_cgroups(pid: int, tids: list[int]) -> list[Cgroup]:
    text = _read(f"/proc/{pid}/cgroup")
    for tid in tids[1:]:
        theirs = _read(f"/proc/{pid}/task/{tid}/cgroup")
        if theirs != text:
            mine = {c.controllers: c.path for c in parse_cgroups(text)}
            diff = [c for c in parse_cgroups(theirs) if mine.get(c.controllers) != c.path]
            where = ", ".join(f"{c.describe()} (its process: {mine.get(c.controllers)})" for c in diff)
            raise Unsupported(f"pid {pid}: thread {tid} is in cgroup {where}; threads in other cgroups than "
                              "their process are not supported", pid)
    return parse_cgroups(text)


def _mounts() -> list[tuple[bool, set[str], str, str]]:
    """(cgroup2, super options, mount point, root of the hierarchy at it)
    of each cgroup mount in the restorer's mount namespace."""
    out = []
    for line in _read("/proc/self/mountinfo").splitlines():
        left, _, right = line.partition(" - ")
        fields, (fstype, _, opts) = left.split(), right.split()[:3]
        if fstype in ("cgroup", "cgroup2"):
            out.append((fstype == "cgroup2", set(opts.split(",")), fields[4], fields[3]))
    return out


def _directory(c: Cgroup, mounts: list[tuple[bool, set[str], str, str]]) -> str | None:
    """Where cgroup `c` is in the restorer's mounts, or None (its hierarchy
    is not mounted here): a v1 hierarchy is the mount whose options name
    all its controllers."""
    for v2, opts, point, root in mounts:
        if (not c.controllers) != v2 or (not v2 and not set(c.controllers.split(",")) <= opts):
            continue
        if root != "/" and not (c.path == root or c.path.startswith(root.rstrip("/") + "/")):
            continue
        rel = os.path.relpath(c.path, root)
        return point if rel == "." else os.path.join(point, rel)
    return None


def cgroup_problems(cgroups: list[Cgroup]) -> list[str]:
    """What a restore of these memberships would meet here."""
    problems = []
    mounts = _mounts()
    for c in cgroups:
        if any(part == ".." for part in c.path.split("/")) or not c.path.startswith("/"):
            problems.append(f"cgroup {c.describe()}: not a plain absolute path")
            continue
        where = _directory(c, mounts)
        if where is None:
            problems.append(f"cgroup {c.describe()}: its hierarchy is not mounted here")
        elif not os.path.isdir(where):
            problems.append(f"cgroup {c.describe()} is gone ({where} does not exist)")
    return problems


def restore_cgroups(pid: int, cgroups: list[Cgroup]) -> None:
    """Move the new process (before it has threads or memory of its own)
    into each saved cgroup it is not in already."""
    now = {c.controllers: c.path for c in parse_cgroups(_read(f"/proc/{pid}/cgroup"))}
    mounts = _mounts()
    for c in cgroups:
        if now.get(c.controllers) == c.path:
            continue
        where = _directory(c, mounts)
        if where is None or not os.path.isdir(where):
            raise RestoreError(f"pid {pid}: cgroup {c.describe()} is gone", pid)
        try:
            with open(os.path.join(where, "cgroup.procs"), "w") as f:
                f.write(str(pid))
        except OSError as err:
            raise RestoreError(f"pid {pid}: cannot move it into cgroup {c.describe()}: {err.strerror}", pid) from err


# The task-state protocol (objects/__init__.py TASK_STATE)

def collect_seized(target, tids: list[int], ckpt) -> None:
    ckpt.cgroups = collect_cgroups(target.pid, tids)


def restore_seized(target, ckpt, tree_pids: set[int]) -> None:
    """Nothing here: the process was moved into its cgroups right after the
    spawn (restorer: restore_cgroups), before its memory was made, so that
    the memory is charged where it belongs."""
