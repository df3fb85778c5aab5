"""collect_*: read a frozen task into the model.

Everything readable from outside is read from /proc and ptrace; the rest
(brk, clear_child_tid, sigaltstack, sigactions) is asked of the task itself
through injected syscalls. Whatever procsnap cannot restore is refused
here, before anything is written, naming the pid and the resource. Each
fd, and each mapping of a kind's object, is described by its kind
(objects/), offered it in the registry's order.
"""

from __future__ import annotations

import ctypes
from .. import log as logging  # the logging API, cheap to import
import os
import signal
import stat
import struct

from .. import model, nsworker
from ..errors import Unsupported
from ..kernel import infect, memory, ptrace, proc
from ..kernel.arch import x86_64 as arch
from ..kernel.arch.x86_64 import NR, PAGE_SIZE
from ..kernel.infect import Target
from ..kernel.libc import syscall
from ..kernel.proc import MapsEntry
from ..objects import ghostdir, memlock
from ..objects.refused import refused_kind, vma_name
from ..objects.namespaces import check_namespaces
from ..objects.seccomp import check_seccomp_dumpable
from ..kernel.structs import KSIGACTION, NSIG, SIGSET_SIZE, SS_ONSTACK, STACK_T, Prctl
from ..objects.file import FileTable
from ..objects.protocol import Collect, OpenFd, same_file
from ..objects.shm import SECRETMEM
from .tree import same_description

log = logging.getLogger("procsnap.dumper")

SIGKILL, SIGSTOP = 9, 19


def check_supported(pid: int, st: proc.Stat, status: dict[str, str]) -> None:
    """Refuse what this version cannot checkpoint, before freezing."""
    check_seccomp_dumpable(pid)
    if st.state == "Z":
        raise Unsupported(f"pid {pid}: is a zombie", pid)
    check_namespaces(pid)
    if st.exit_signal != signal.SIGCHLD:
        raise Unsupported(f"pid {pid}: signals its parent with {_signame(st.exit_signal)} when it exits, not "
                          "SIGCHLD (a clone() with another exit signal); not supported", pid)


def _signame(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}" if sig else "no signal"


# plain ints and members made once: IntFlag arithmetic per VMA cost more than the rest of classifying it
_PROTS = {perms: model.Prot(sum(bit for ch, bit in zip(perms, (1, 2, 4)) if ch != "-"))  # "r-x" -> Prot
          for perms in (r + w + x for r in "r-" for w in "w-" for x in "x-")}
_MAP_FLAGS = model.FlagMembers(model.MapFlag)
INT_SHARED, INT_PRIVATE, INT_DROPPABLE, INT_GROWSDOWN, INT_ANONYMOUS = (int(f) for f in (
    model.MapFlag.MAP_SHARED, model.MapFlag.MAP_PRIVATE, model.MapFlag.MAP_DROPPABLE, model.MapFlag.MAP_GROWSDOWN,
    model.MapFlag.MAP_ANONYMOUS))
_ADVICE_BITS = [(name, int(bit)) for bit, (name, _) in model.ADVICE_TABLE.items()]
_ADVICE_NAMES = frozenset(name for name, _ in _ADVICE_BITS)
_ADVICES = model.FlagMembers(model.Advice)
_REFUSED_VMFLAGS = (("ht", "hugetlb"), ("io", "an I/O mapping"), ("pf", "a PFN mapping"), ("ss", "a shadow stack"),
                    ("um", "registered with a userfaultfd for missing pages (a lazy restore not done yet: dump "
                           "once its lazy-pages server has exited)"))
_REFUSED_NAMES = frozenset(vf for vf, _ in _REFUSED_VMFLAGS)


def classify_vma(pid: int, m: MapsEntry, files: FileTable, kinds: list[Collect]) -> model.Vma | None:
    """The model VMA for one maps entry, or None for [vsyscall]. A mapping
    of a kind's object (shared memory) is that kind's to describe."""
    prot = _PROTS[m.perms[:3]]
    vmflags = m.vmflags
    flags = INT_SHARED if m.shared else INT_PRIVATE
    if "dp" in vmflags:  # pages the kernel may drop under memory pressure (it implies wf, dd, nr)
        flags = INT_DROPPABLE
    if "gd" in vmflags:
        flags |= INT_GROWSDOWN
    flags = _MAP_FLAGS[flags]
    if m.path == "[vsyscall]":
        return None
    if m.path in model.SPECIAL_NAMES:
        return model.Vma(m.start, m.end, model.SPECIAL_NAMES[m.path], prot, flags, 0, -1, m.path)
    if m.path == SECRETMEM:
        raise Unsupported(f"pid {pid}: VMA {m.start:#x}-{m.end:#x} is a memfd_secret area ({m.path}); not "
                          "supported: its pages cannot be read from outside the process", pid)
    if m.path and (what := vma_name(m.path)):
        raise Unsupported(f"pid {pid}: VMA {m.start:#x}-{m.end:#x} is {what} ({m.path}); not supported", pid)
    if not _REFUSED_NAMES.isdisjoint(vmflags):
        for vf, what in _REFUSED_VMFLAGS:
            if vf in vmflags:
                raise Unsupported(f"pid {pid}: VMA {m.start:#x}-{m.end:#x} ({m.path or 'anonymous'}) is {what}; "
                                  "not supported", pid)
    vma = next((v for k in kinds if (v := k.collect_vma(pid, m, prot, flags)) is not None), None)
    if vma is None:
        vma = _classify(pid, m, files, f"pid {pid}: VMA {m.start:#x}-{m.end:#x}", prot, flags)
    if not _ADVICE_NAMES.isdisjoint(vmflags):
        vma.advice = _ADVICES[sum(bit for name, bit in _ADVICE_BITS if name in vmflags)]
    memlock.collect_vma(pid, m, vma)
    return vma


def _classify(pid: int, m: MapsEntry, files: FileTable, where: str, prot: model.Prot,
              flags: model.MapFlag) -> model.Vma:
    anon = m.inode == 0 and (m.path in ("", "[heap]", "[stack]") or m.path.startswith("[anon:"))
    if anon and not m.shared:
        return model.Vma(m.start, m.end, model.VmaKind.ANON, prot, _MAP_FLAGS[int(flags) | INT_ANONYMOUS],
                         0, -1, m.path)
    if not m.path.startswith("/") or m.path.startswith(("/SYSV", "/memfd:")) or m.deleted:
        raise Unsupported(f"{where} maps {m.path or 'an unnamed object'}; not supported", pid)
    try:
        st = os.stat(f"/proc/{pid}/map_files/{m.start:x}-{m.end:x}")
        now = os.stat(nsworker.in_root(m.path))
    except OSError as err:
        raise Unsupported(f"{where}: mapped file {m.path}: {err.strerror}", pid) from err
    if not same_file(st, now):
        raise Unsupported(f"{where}: {m.path} now names another file than the one mapped", pid)
    if not stat.S_ISREG(st.st_mode):
        raise Unsupported(f"{where} maps {m.path}, which is not a regular file; not supported", pid)
    kind = model.VmaKind.FILE_SHARED if m.shared else model.VmaKind.FILE_PRIVATE
    # the link's mode is the open file's f_mode: r-- for read, -w- for write
    link = os.lstat(f"/proc/{pid}/map_files/{m.start:x}-{m.end:x}").st_mode
    access = {0o600: os.O_RDWR, 0o200: os.O_WRONLY}.get(link & 0o600, os.O_RDONLY)
    return model.Vma(m.start, m.end, kind, prot, flags, m.offset, files.add(m.path, st), m.path,
                     access=access)


def collect_vmas(pid: int, maps: list[MapsEntry], files: FileTable, kinds: list[Collect]) -> list[model.Vma]:
    kinds = [k for k in kinds if type(k).collect_vma is not Collect.collect_vma]  # those that map objects
    return [v for v in (classify_vma(pid, m, files, kinds) for m in maps) if v is not None]


def collect_page_runs(pid: int, vmas: list[model.Vma]) -> list[tuple[model.Vma, int, int]]:
    """(vma, address, length) of every run of pages that must be copied.

    `pid` may be the target or its copy-on-write snapshot: a fork copies
    the page tables of every area whose pages are stored.
    """
    runs: list[tuple[model.Vma, int, int]] = []
    fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        for span in _pagemap_spans(v for v in vmas if v.kind in model.COPIED_KINDS):
            begin, end = span[0][1], span[-1][2]
            entries = proc.read_pagemap(fd, begin, end)
            for v, start, stop in span:
                mine = entries if len(span) == 1 else \
                    entries[(start - begin) // PAGE_SIZE * 8 : (stop - begin) // PAGE_SIZE * 8]
                for first, count in proc.classify_pages(mine, v.kind == model.VmaKind.SHARED_ANON):
                    addr, length = start + first * PAGE_SIZE, count * PAGE_SIZE
                    if runs and runs[-1][0] is v and runs[-1][1] + runs[-1][2] == addr:
                        runs[-1] = (v, runs[-1][1], runs[-1][2] + length)  # a run across windows
                    else:
                        runs.append((v, addr, length))
    finally:
        os.close(fd)
    return runs


def _pagemap_spans(vmas):
    """Lists of (vma, start, end) read with one pagemap read: neighbouring
    VMAs together (10,000 one-page VMAs: a read, not 10,000), at most
    PAGEMAP_WINDOW of address space each, so that a huge reservation (64 GiB
    of PROT_NONE) costs time but not 8 bytes of memory per page; a bigger
    VMA in windows of it."""
    span: list[tuple[model.Vma, int, int]] = []
    for v in vmas:
        if span and (span[-1][2] != v.start or v.end - span[0][1] > PAGEMAP_WINDOW):
            yield span
            span = []
        if v.end - v.start > PAGEMAP_WINDOW:
            for start in range(v.start, v.end, PAGEMAP_WINDOW):
                yield [(v, start, min(v.end, start + PAGEMAP_WINDOW))]
            continue
        span.append((v, v.start, v.end))
    if span:
        yield span


def collect_mm_seized(pid: int, st: proc.Stat, target: Target, files: FileTable) -> model.Mm:
    brk = target.call(NR.brk, 0)
    exe = os.readlink(f"/proc/{pid}/exe")
    if exe.endswith(" (deleted)"):
        raise Unsupported(f"pid {pid}: its executable {exe} was deleted; not supported", pid)
    exe_st = os.stat(f"/proc/{pid}/exe")
    if not same_file(exe_st, os.stat(nsworker.in_root(exe))):
        raise Unsupported(f"pid {pid}: {exe} now names another file than its executable", pid)
    with open(f"/proc/{pid}/auxv", "rb") as f:
        auxv = f.read()
    return model.Mm(
        start_code=st.start_code, end_code=st.end_code, start_data=st.start_data, end_data=st.end_data,
        start_brk=st.start_brk, brk=brk, start_stack=st.start_stack, arg_start=st.arg_start,
        arg_end=st.arg_end, env_start=st.env_start, env_end=st.env_end, auxv=auxv,
        exe_file_id=files.add(exe, exe_st),
    )


def collect_sigactions_seized(target: Target, status: dict[str, str]) -> list[model.SigAction]:
    """The handlers of the signals that are caught or ignored (SigCgt,
    SigIgn): the others are SIG_DFL, restored as such. Into the scratch
    area side by side, one read back."""
    wanted = int(status["SigCgt"], 16) | int(status["SigIgn"], 16)
    signals = [sig for sig in range(1, NSIG + 1) if wanted >> (sig - 1) & 1]
    for sig in signals:
        target.call(NR.rt_sigaction, sig, 0, target.scratch + (sig - 1) * KSIGACTION.size, SIGSET_SIZE)
    data = target.read_scratch(NSIG * KSIGACTION.size)
    out = []
    for sig in signals:
        handler, flags, restorer, mask = KSIGACTION.unpack_from(data, (sig - 1) * KSIGACTION.size)
        if handler or flags or mask:
            out.append(model.SigAction(sig, handler, model.SaFlag(flags), restorer, mask))
    return out


def collect_pending(pid: int) -> list[model.PendingSignal]:
    out = []
    for shared in (False, True):
        for info in ptrace.peek_siginfo(pid, shared):
            out.append(model.PendingSignal(shared, struct.unpack_from("<i", info)[0], info))
    return out


def _thread_state_seized(tid: int, target: Target, regs, sigmask: int) -> dict:
    """The per-thread fields (model.ThreadState) of thread `tid`; `target`
    injects into that thread."""
    target.call(NR.prctl, Prctl.PR_GET_TID_ADDRESS, target.scratch)
    (clear_child_tid,) = struct.unpack("<Q", target.read_scratch(8))
    target.call(NR.sigaltstack, 0, target.scratch)
    ss_sp, ss_flags, _, ss_size = STACK_T.unpack(target.read_scratch(STACK_T.size))
    head, length = ctypes.c_uint64(), ctypes.c_size_t()
    syscall(NR.get_robust_list, tid, ctypes.byref(head), ctypes.byref(length))
    rseq = ptrace.get_rseq_config(tid)
    with open(f"/proc/{target.pid}/task/{tid}/comm") as f:
        comm = f.read().rstrip("\n")
    saved = {name: getattr(regs, name) for name, _ in regs._fields_}
    if arch.interrupted_syscall(regs) == NR.restart_syscall:
        saved["orig_rax"] = _restarted_syscall(target.pid, tid, regs)
    return dict(
        comm=comm, regs=saved,
        xstate=ptrace.get_xstate(tid), sigmask=sigmask,
        rseq_ptr=rseq.rseq_abi_pointer, rseq_len=rseq.rseq_abi_size, rseq_sig=rseq.signature,
        robust_list=head.value, robust_list_len=length.value, clear_child_tid=clear_child_tid,
        altstack_sp=ss_sp, altstack_flags=ss_flags & ~SS_ONSTACK, altstack_size=ss_size,
    )


def _restarted_syscall(pid: int, tid: int, regs) -> int:
    """A task stopped before (by a debugger, SIGSTOP, an earlier dump -R)
    while in a sleep the kernel restarts from its restart block is now in
    restart_syscall, and that block does not survive a restore (restart_syscall
    would return EINTR). The wrapper's own load of the syscall number tells
    which call it was; its arguments are still in the registers, so the call
    is made again as a first freeze would have recorded it. Left as
    restart_syscall (EINTR, as CRIU gives every interrupted call) when the
    code before the `syscall` is not a number load."""
    start = regs.rip - arch.SYSCALL_INSN_LEN - 8
    try:
        code = memory.read_mem_file(pid, start, 8)
    except OSError:
        return regs.orig_rax
    nr = arch.syscall_number_before(code)
    if nr is None:
        log.warning("pid %d: thread %d is in restart_syscall after a call that cannot be told from its code; "
                    "it will see EINTR", pid, tid)
        return regs.orig_rax
    return nr


def collect_thread_seized(tid: int, leader: Target) -> model.Thread:
    """A thread other than the leader, through injection into it (using the
    leader's scratch area: they share the address space)."""
    with infect.infected(tid, [], scratch_area=False, gadget=leader.call.gadget) as t:
        state = _thread_state_seized(tid, infect.Target(leader.pid, t.call, leader.scratch), t.call.base,
                                     t.call.mask)
    pending = ptrace.peek_siginfo(tid, shared=False)
    return model.Thread(tid=tid, pending=pending, **state)


def collect_task_seized(pid: int, st: proc.Stat, status: dict[str, str], target: Target,
                        regs, sigmask: int) -> model.Task:
    state = _thread_state_seized(pid, target, regs, sigmask)
    with open(f"/proc/{pid}/limits") as f:
        rlimits = [model.Rlimit(res, soft, hard) for res, (soft, hard) in enumerate(proc.parse_limits(f.read()))]
    cwd = os.readlink(f"/proc/{pid}/cwd")
    cwd_removed = {}
    if cwd.endswith(" (deleted)"):
        cwd, cwd_removed = ghostdir.collect_cwd(pid, cwd)
    root = os.readlink(f"/proc/{pid}/root")
    if root.endswith(" (deleted)"):
        raise Unsupported(f"pid {pid}: its root directory (chroot) {root} was deleted; not supported", pid)
    with open(f"/proc/{pid}/personality") as f:
        personality = int(f.read(), 16)
    target.call(NR.prctl, Prctl.PR_GET_PDEATHSIG, target.scratch)
    (pdeathsig,) = struct.unpack("<i", target.read_scratch(4))
    return model.Task(
        pid=pid, personality=personality, pdeathsig=pdeathsig, umask=int(status["Umask"], 8), cwd=cwd, root=root,
        cwd_removed=cwd_removed, session_leader=st.session == pid, group_leader=st.pgrp == pid, rlimits=rlimits,
        uids=[int(x) for x in status["Uid"].split()], gids=[int(x) for x in status["Gid"].split()],
        **state,
    )


PAGEMAP_WINDOW = 1 << 32  # address space per pagemap read: 8 MiB of entries

def collect_fds(pid: int, files: FileTable, shell_job: bool, kinds: list[Collect],
                skip: set[int] = frozenset()) -> list[model.FdEntry]:
    """Every fd with kind, flags and position, each described by the first
    kind that takes it; shared descriptions linked. skip: fds that are
    procsnap's, not the process's (a pre-dump's userfaultfd, predump.py)."""
    entries: list[model.FdEntry] = []
    identity: dict[tuple[int, int], list[int]] = {}
    for fd in proc.list_fds(pid):
        if fd in skip:
            continue
        entry, st = collect_fd(pid, fd, files, shell_job, kinds)
        identity.setdefault((st.st_dev, st.st_ino), []).append(len(entries))
        entries.append(entry)
    for k in kinds:
        k.check_fds(pid, entries)
    for group in identity.values():
        for i, idx in enumerate(group):
            for prev in group[:i]:
                a, b = entries[prev], entries[idx]
                if a.shares_with == -1 and same_description(pid, a.fd, pid, b.fd):
                    b.shares_with = a.fd
                    break
    return entries


def collect_fd(pid: int, fd: int, files: FileTable, shell_job: bool, kinds: list[Collect],
               in_flight: bool = False) -> tuple[model.FdEntry, os.stat_result]:
    """One fd, described by the first kind that takes it, and its stat.
    in_flight: an fd of procsnap's own, its copy of a file in flight
    (objects/unixrights.py)."""
    link = os.readlink(f"/proc/{pid}/fd/{fd}")
    st = os.stat(f"/proc/{pid}/fd/{fd}")
    info = proc.read_fdinfo(pid, fd)
    found = OpenFd(pid, fd, link, st, model.OpenFlag(info.flags), info.pos, files, shell_job, in_flight)
    entry = next((e for k in kinds if (e := k.collect_fd(found)) is not None), None)
    if entry is None:
        raise Unsupported(f"{found.where} is {refused_kind(found)} ({link}); not supported", pid)
    return entry, st
