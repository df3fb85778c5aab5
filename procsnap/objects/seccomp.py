"""seccomp: strict mode and the filters of every thread (record SECC, 1.3).

A thread's filters are a chain, newest to oldest; threads of a process share
the part of it they had when one was made from the other (clone) or when a
filter was installed with TSYNC. The kernel shows no identity of a filter
(kcmp has no seccomp kind), so two threads whose chains are equal from the
oldest filter up to some filter are taken to share that part; this is also
the only sharing TSYNC itself asks for (every other thread's filter must be
an ancestor of the caller's).

    dump (every thread seized, seccomp suspended)    restore
    ----                                             -------
    /proc/PID/task/TID/status Seccomp: 1 strict ->   prctl(PR_SET_SECCOMP, STRICT) in that thread
      2 filter: PTRACE_SECCOMP_GET_FILTER n    ->    Filter records: a forest (prev), shared
      (0 = oldest) and _GET_METADATA (LOG)            nodes installed once, with TSYNC while
                                                      every thread shares them, else in each
                                                      thread that has them

Every tracee procsnap seizes has its filters suspended
(PTRACE_O_SUSPEND_SECCOMP, kernel/ptrace.py): the dump's and the restore's
injected syscalls are never filtered, and the filters are installed before
the credentials, with the restorer's privileges (a process that installed a
filter as root and dropped to a user without no_new_privs could not install
it again afterwards).

Across processes (fork) a filter is shared in the kernel too, but nothing a
process can do tells a shared filter from an equal copy (TSYNC is within a
thread group); restored, each process has its own copy.
Refused by name: a filter that is not classic BPF (the kernel keeps no
program to give back: EMEDIUMTYPE).
"""

from __future__ import annotations

import ctypes
from .. import records as dataclasses  # the dataclasses API, cheap to import
import errno
import os
import struct

from ..errors import RestoreError, Unsupported
from ..kernel import infect, memory, proc, ptrace
from ..kernel.arch.x86_64 import NR, PAGE_SIZE
from ..kernel.infect import Target

SECCOMP_MODE_DISABLED, SECCOMP_MODE_STRICT, SECCOMP_MODE_FILTER = 0, 1, 2  # include/uapi/linux/seccomp.h
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_TSYNC = 1 << 0
SECCOMP_FILTER_FLAG_LOG = 1 << 1  # the one flag PTRACE_SECCOMP_GET_METADATA reports
PR_SET_SECCOMP = 22
SOCK_FILTER_SIZE = 8  # struct sock_filter (include/uapi/linux/filter.h): u16 code, u8 jt, u8 jf, u32 k
BPF_MAXINSNS = 4096
SOCK_FPROG = struct.Struct("<H6xQ")  # struct sock_fprog: unsigned short len; struct sock_filter *filter
PROT_RW = 0x3
MAP_PRIVATE_ANON = 0x02 | 0x20


class seccomp_metadata(ctypes.Structure):
    """struct seccomp_metadata (include/uapi/linux/ptrace.h)."""

    _fields_ = [("filter_off", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


@dataclasses.dataclass
class Filter:
    """One installed filter: its program and the filter it was stacked on."""

    prev: int  # index of the older filter in Seccomp.filters, -1 for the oldest
    insns: bytes  # struct sock_filter[]
    flags: int = 0  # SECCOMP_FILTER_FLAG_LOG


@dataclasses.dataclass
class ThreadSeccomp:
    tid: int
    mode: int  # SECCOMP_MODE_*
    filter: int = -1  # its newest filter (index in Seccomp.filters), -1 for none


@dataclasses.dataclass
class Seccomp:
    """A process's seccomp state: every thread that has one (record SECC, since format 1.3)."""

    threads: list[ThreadSeccomp]
    filters: list[Filter] = dataclasses.field(default_factory=list)  # older before newer


def thread_mode(pid: int, tid: int) -> int:
    with open(f"/proc/{pid}/task/{tid}/status") as f:
        for line in f:
            if line.startswith("Seccomp:"):
                return int(line.split()[1])
    return SECCOMP_MODE_DISABLED


def check_seccomp_dumpable(pid: int) -> None:
    """Before the freeze: a thread with seccomp can only be dumped by a
    procsnap that suspends it (its filter could refuse or kill on the
    injected syscalls) and may read its filters."""
    if ptrace.suspend_seccomp():
        return
    for tid in proc.list_tids(pid):
        mode = thread_mode(pid, tid)
        if mode != SECCOMP_MODE_DISABLED:
            raise Unsupported(f"pid {pid}: thread {tid} uses seccomp (mode {mode}); dumping it needs "
                              "CAP_SYS_ADMIN and a procsnap without seccomp of its own", pid)


def read_filter(tid: int, index: int) -> tuple[bytes, int] | None:
    """Filter `index` (0: the oldest) of a seized, stopped thread: (program,
    flags), or None past the newest."""
    try:
        n = ptrace.ptrace(ptrace.Req.SECCOMP_GET_FILTER, tid, index, 0)
    except OSError as err:
        if err.errno == errno.ENOENT:
            return None
        raise
    buf = ctypes.create_string_buffer(n * SOCK_FILTER_SIZE)
    ptrace.ptrace(ptrace.Req.SECCOMP_GET_FILTER, tid, index, ctypes.addressof(buf))
    meta = seccomp_metadata(filter_off=index)
    ptrace.ptrace(ptrace.Req.SECCOMP_GET_METADATA, tid, ctypes.sizeof(meta), ctypes.addressof(meta))
    return buf.raw, meta.flags


def read_chain(pid: int, tid: int) -> list[tuple[bytes, int]]:
    """Every filter of a seized thread, oldest first; refused by name where
    the kernel cannot give one back."""
    chain = []
    while True:
        try:
            f = read_filter(tid, len(chain))
        except OSError as err:
            what = f"pid {pid}: thread {tid}: seccomp filter {len(chain)}"
            if err.errno == errno.EMEDIUMTYPE:
                raise Unsupported(f"{what} is not a classic BPF program; not supported", pid) from err
            if err.errno in (errno.EACCES, errno.EPERM):
                raise Unsupported(f"{what}: reading it needs CAP_SYS_ADMIN and a procsnap without seccomp "
                                  f"of its own ({os.strerror(err.errno)})", pid) from err
            raise
        if f is None:
            return chain
        chain.append(f)


def collect_seccomp(pid: int, tids: list[int]) -> Seccomp | None:
    out = Seccomp(threads=[])
    nodes: dict[tuple[int, bytes, int], int] = {}
    for tid in tids:
        mode = thread_mode(pid, tid)
        if mode == SECCOMP_MODE_DISABLED:
            continue
        if mode == SECCOMP_MODE_STRICT:
            out.threads.append(ThreadSeccomp(tid, mode))
            continue
        prev = -1
        for insns, flags in read_chain(pid, tid):
            key = (prev, insns, flags)
            if key not in nodes:
                nodes[key] = len(out.filters)
                out.filters.append(Filter(prev, insns, flags))
            prev = nodes[key]
        out.threads.append(ThreadSeccomp(tid, mode, prev))
    return out if out.threads else None


def _chain(s: Seccomp, newest: int) -> list[int]:
    """Filter indexes from the oldest to `newest`."""
    out = []
    while newest >= 0:
        out.append(newest)
        newest = s.filters[newest].prev
    return out[::-1]


def check_seccomp(s: Seccomp, pid: int) -> None:
    problems = []
    for i, f in enumerate(s.filters):
        if not -1 <= f.prev < i:
            problems.append(f"filter {i}: its older filter {f.prev} is not one before it")
        n = len(f.insns) // SOCK_FILTER_SIZE
        if len(f.insns) % SOCK_FILTER_SIZE or not 0 < n <= BPF_MAXINSNS:
            problems.append(f"filter {i}: {len(f.insns)} bytes is not 1 to {BPF_MAXINSNS} BPF instructions")
        if f.flags & ~SECCOMP_FILTER_FLAG_LOG:
            problems.append(f"filter {i}: flags {f.flags:#x}")
    for t in s.threads:
        if t.mode not in (SECCOMP_MODE_STRICT, SECCOMP_MODE_FILTER):
            problems.append(f"thread {t.tid}: seccomp mode {t.mode}")
        elif (t.mode == SECCOMP_MODE_FILTER) != (0 <= t.filter < len(s.filters)):
            problems.append(f"thread {t.tid}: mode {t.mode} with filter {t.filter}")
    if problems:
        raise RestoreError(f"pid {pid}: seccomp record: " + "; ".join(problems), pid)


def _install(target: Target, f: Filter, tsync: bool, where: str) -> None:
    """One filter into the thread `target` injects into (and, with tsync,
    into every thread of its process)."""
    size = SOCK_FPROG.size + len(f.insns)
    area, length = target.scratch, 0
    if size > 4 * PAGE_SIZE:  # infect.SCRATCH_SIZE: a big program gets an area of its own
        length = (size + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
        area = target.call(NR.mmap, 0, length, PROT_RW, MAP_PRIVATE_ANON, -1, 0)
    try:
        memory.write_bytes(target.pid, area, SOCK_FPROG.pack(len(f.insns) // SOCK_FILTER_SIZE,
                                                             area + SOCK_FPROG.size) + f.insns)
        flags = f.flags | (SECCOMP_FILTER_FLAG_TSYNC if tsync else 0)
        ret = target.call(NR.seccomp, SECCOMP_SET_MODE_FILTER, flags, area, check=False)
        if ret != 0:
            why = os.strerror(-ret) if ret < 0 else f"thread {ret} cannot be synchronized"
            raise RestoreError(f"{where}: cannot install its seccomp filter: {why}", target.pid)
    finally:
        if length:
            target.call(NR.munmap, area, length)


def restore_seccomp_seized(target: Target, s: Seccomp) -> None:
    """Into the rebuilt process, its threads made (all without filters: the
    leader made them). A filter every thread of the process has is installed
    once, with TSYNC, by the leader, so they share it again; the rest by
    each thread that has it, oldest first. Strict mode last in its thread."""
    check_seccomp(s, target.pid)
    tids = proc.list_tids(target.pid)
    by_tid = {t.tid: t for t in s.threads}
    chains = {tid: _chain(s, by_tid[tid].filter) if tid in by_tid else [] for tid in tids}
    common = 0  # the length of the chain every thread shares
    while all(len(c) > common for c in chains.values()) and len({c[common] for c in chains.values()}) == 1:
        common += 1
    for i in chains[target.pid][:common]:
        _install(target, s.filters[i], tsync=len(tids) > 1, where=f"pid {target.pid}")
    for tid in tids:
        rest = chains[tid][common:]
        strict = tid in by_tid and by_tid[tid].mode == SECCOMP_MODE_STRICT
        if not rest and not strict:
            continue
        if tid == target.pid:
            _install_own(target, s, rest, strict, f"pid {target.pid}")
            continue
        with infect.infected(tid, [], scratch_area=False, put_back=False, gadget=target.call.gadget) as t:
            _install_own(Target(target.pid, t.call, target.scratch), s, rest, strict,
                         f"pid {target.pid}: thread {tid}")


def _install_own(target: Target, s: Seccomp, indexes: list[int], strict: bool, where: str) -> None:
    for i in indexes:
        _install(target, s.filters[i], tsync=False, where=where)
    if strict:
        ret = target.call(NR.prctl, PR_SET_SECCOMP, SECCOMP_MODE_STRICT, check=False)
        if ret != 0:
            raise RestoreError(f"{where}: cannot enter seccomp strict mode: {os.strerror(-ret)}", target.pid)


# The task-state protocol (objects/__init__.py TASK_STATE)

def collect_seized(target: Target, tids: list[int], ckpt) -> None:
    s = collect_seccomp(target.pid, tids)
    ckpt.seccomp = [s] if s else []


def check_restore(ckpt) -> None:
    for s in ckpt.seccomp:
        check_seccomp(s, ckpt.task.pid)
        if not ptrace.suspend_seccomp():  # the filters would act on the rest of the rebuild's injections
            raise RestoreError(f"pid {ckpt.task.pid}: restoring its seccomp state needs CAP_SYS_ADMIN "
                               "(PTRACE_O_SUSPEND_SECCOMP) and a procsnap without seccomp of its own", ckpt.task.pid)


def restore_seized(target: Target, ckpt, tree_pids: set[int]) -> None:
    for s in ckpt.seccomp:
        restore_seccomp_seized(target, s)
