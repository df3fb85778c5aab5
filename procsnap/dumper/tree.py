"""The process tree rooted at the target: freezing it, and what its
processes share.

freeze    the root (every thread), then the children of each frozen
          process, breadth first. A frozen process cannot fork, so once it
          is frozen its list of children is final; zombies are recorded,
          not frozen (they cannot be traced, and their frozen parent cannot
          reap them meanwhile).
share     what crosses processes, found once all are collected: open file
          descriptions held by several processes (kcmp), pages shared
          copy-on-write (stored once). An fd table or fs struct (root,
          cwd, umask) shared by two processes (CLONE_FILES, CLONE_FS) is
          refused by name once the tree is frozen: the spawn makes every
          process with its own. What each kind of object shares
          (pipes, sockets, shared memory) is the kind's (objects/).
"""

from __future__ import annotations

import bisect
import contextlib
import enum
import functools
import os
import typing

from .. import model, nsworker
from ..errors import Unsupported
from ..image import schema
from ..kernel import proc
from ..kernel.arch.x86_64 import NR, PAGE_SIZE
from ..kernel.libc import syscall


class Kcmp(enum.IntEnum):
    """kcmp types (include/uapi/linux/kcmp.h) used here."""

    KCMP_FILE = 0
    KCMP_FILES = 2
    KCMP_FS = 3


IMAGE_DIR = "proc.{pid}"  # a non-root process's image, inside the root's


def children_of(pid: int) -> list[int]:
    kids: list[int] = []
    for tid in proc.list_tids(pid):
        with contextlib.suppress(FileNotFoundError):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids += [int(k) for k in f.read().split()]
    return sorted(set(kids))


def same_description(pid_a: int, fd_a: int, pid_b: int, fd_b: int) -> bool:
    """Whether two fds (of one process or two) are one open file description."""
    return syscall(NR.kcmp, pid_a, pid_b, Kcmp.KCMP_FILE, fd_a, fd_b) == 0


def check_shared_tables(pids: list[int]) -> None:
    """Refuse two processes of the tree (not threads: those share both by
    being one process) that share one fd table or one fs struct. kcmp
    orders the objects, so a sort finds the pairs: neighbours that are equal."""
    for what, kind, flag in (("fd table", Kcmp.KCMP_FILES, "CLONE_FILES"),
                             ("root, working directory and umask", Kcmp.KCMP_FS, "CLONE_FS")):
        def order(a: int, b: int, kind=kind) -> int:  # kcmp: 0 equal, 1 less, 2 greater
            return (0, -1, 1)[syscall(NR.kcmp, a, b, kind, 0, 0)]

        ranked = sorted(pids, key=functools.cmp_to_key(order))
        for a, b in zip(ranked, ranked[1:]):
            if order(a, b) == 0:
                first, then = sorted((a, b), key=pids.index)
                raise Unsupported(f"pid {then}: shares its {what} with pid {first} ({flag}); "
                                  "processes sharing one are not supported", then)


def link_descriptions(ckpts: list[model.Checkpoint]) -> None:
    """Give every open file description held by more than one process of
    the tree a tree-wide id (FdEntry.desc): kcmp says which are one."""
    by_inode: dict[tuple[int, int], list[tuple[int, model.FdEntry]]] = {}
    for ckpt in ckpts:
        pid = ckpt.task.pid
        for entry in ckpt.fds:
            if entry.shares_with >= 0:
                continue
            st = os.stat(f"/proc/{pid}/fd/{entry.fd}")
            by_inode.setdefault((st.st_dev, st.st_ino), []).append((pid, entry))
    next_id = 0
    for group in by_inode.values():
        if len({pid for pid, _ in group}) < 2:
            continue
        for i, (pid, entry) in enumerate(group):
            for prev_pid, prev in group[:i]:
                if prev_pid != pid and same_description(prev_pid, prev.fd, pid, entry.fd):
                    if prev.desc < 0:
                        prev.desc = next_id
                        next_id += 1
                    entry.desc = prev.desc
                    break
    for ckpt in ckpts:  # aliases in a process follow the fd they alias
        first = {e.fd: e for e in ckpt.fds}
        for entry in ckpt.fds:
            if entry.shares_with >= 0:
                entry.desc = first[entry.shares_with].desc


class CowIndex:
    """Pages shared copy-on-write between processes of the tree are stored
    once, by the first process (tree order) that has them.

    Every process claims its shared page frames before any page is read:
    reading a page shared copy-on-write with process_vm_readv (a pinning
    read) makes the kernel give the reader's mm a copy of its own, so the
    sharing is gone once one of them has been read."""

    def __init__(self):
        self.owner: dict[int, tuple[int, int]] = {}  # pfn -> (process index, vaddr)
        self.written: dict[int, tuple[str, typing.Sequence[model.PageRun]]] = {}  # index -> (source, runs)
        self.ordered: dict[int, tuple[list[int], list[model.PageRun]]] = {}  # index -> (vaddrs, runs by vaddr)

    def claim(self, index: int, pid: int, runs: list) -> tuple[list, list[tuple[int, int, int, int]]]:
        """`runs` (vma, address, length) less the pages an earlier process
        owns, and those as (vaddr, owner index, owner's vaddr, VMA start)."""
        keep: list = []
        refs: list[tuple[int, int, int, int]] = []
        fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        try:
            for vma, addr, length in runs:
                pos = addr
                for i, pfn in proc.shared_frames(proc.read_pagemap(fd, addr, addr + length)):
                    page = addr + i * PAGE_SIZE
                    owner = self.owner.setdefault(pfn, (index, page)) if pfn else (index, page)
                    if owner[0] == index:
                        continue
                    if page > pos:
                        keep.append((vma, pos, page - pos))
                    pos = page + PAGE_SIZE
                    refs.append((page, *owner, vma.start))
                if addr + length > pos:
                    keep.append((vma, pos, addr + length - pos))
        finally:
            os.close(fd)
        return keep, refs

    def wrote(self, index: int, source: str, runs: typing.Sequence[model.PageRun]) -> None:
        self.written[index] = (source, runs)

    def _by_vaddr(self, index: int) -> tuple[list[int], list[model.PageRun]]:
        """An owner's runs sorted, made when first referred to (a process
        no other shares pages with never is: a run per page of half-zero
        memory would cost 100 MiB at 4 GiB as objects)."""
        if index not in self.ordered:
            ordered = sorted(self.written[index][1], key=lambda r: r.vaddr)
            self.ordered[index] = ([r.vaddr for r in ordered], ordered)
        return self.ordered[index]

    def resolve(self, refs: list[tuple[int, int, int, int]]) -> model.PageRefs | None:
        """PageRefs for claimed pages, now that their owners are written. A
        page its owner left out (all zeros) is left out here too."""
        sources: list[str] = []
        packed: list[list[int]] = []
        vma_of_last = -1
        at = (-1, 0, 0, 0, 0)  # (owner, its run's vaddr, end, offset, src) of the last page: most follow it
        for page, owner, owner_page, vma_start in refs:
            if owner != at[0] or not at[1] <= owner_page < at[2]:
                vaddrs, runs = self._by_vaddr(owner)
                i = bisect.bisect_right(vaddrs, owner_page) - 1
                if i < 0 or owner_page >= runs[i].vaddr + runs[i].npages * PAGE_SIZE:
                    continue  # a zero page, not stored
                source = self.written[owner][0]
                if source not in sources:
                    sources.append(source)
                run = runs[i]
                at = (owner, run.vaddr, run.vaddr + run.npages * PAGE_SIZE, run.offset, sources.index(source))
            offset, src = at[3] + owner_page - at[1], at[4]
            last = packed[-1] if packed else None
            if last and vma_of_last == vma_start and last[0] + last[1] * PAGE_SIZE == page and last[2] == src \
                    and last[3] + last[1] * PAGE_SIZE == offset:
                last[1] += 1
            else:
                packed.append([page, 1, src, offset])
            vma_of_last = vma_start
        if not packed:
            return None
        return model.PageRefs(sources, b"".join(schema.PAGE_REF.pack(*r) for r in packed))


def check_sessions(procs: list[model.Proc], shell_job: bool = False) -> None:
    """What restore can rebuild: a process is in its parent's session or
    leads its own; it is in its parent's process group, leads its own, or
    joins one led by a process created before it (lower pid, same session).
    The root in a session or group led from outside the tree would be
    restored into the restorer's: refused unless shell_job says so (CRIU)."""
    by_pid = {p.pid: p for p in procs}
    root = procs[0]
    # 0 in a container's worker: led from outside the init's pid namespace; restored, it is in the
    # restorer's, outside the new namespace too: 0 again
    outside = [f"{what} {leader} (leader: pid {leader})" for what, leader in
               (("session", root.sid), ("process group", root.pgid))
               if leader != root.pid and not (leader == 0 and nsworker.inside())]
    if outside and not shell_job:
        verb = "are" if len(outside) > 1 else "is"
        raise Unsupported(f"pid {root.pid}: {' and '.join(outside)} {verb} led from outside the dumped tree; "
                          "restored, it would join the restorer's instead; dump with --shell-job if that is wanted",
                          root.pid)
    for p in procs[1:]:
        parent = by_pid[p.ppid]
        if p.sid not in (parent.sid, p.pid):
            raise Unsupported(f"pid {p.pid}: in session {p.sid}, which is neither its parent's ({parent.sid}) "
                              "nor its own; not supported", p.pid)
        if p.pgid in (parent.pgid, p.pid):
            continue
        leader = by_pid.get(p.pgid)
        if leader is None or leader.sid != p.sid:
            raise Unsupported(f"pid {p.pid}: in process group {p.pgid}, led by no process of its session in the "
                              "tree; not supported", p.pid)
