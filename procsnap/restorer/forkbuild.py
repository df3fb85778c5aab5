"""Fork-built processes: made by a fork injected into their rebuilt parent,
as CRIU does, so that the pages they shared copy-on-write when dumped are
shared again (restore today: one private copy each; issue 9).

    fork_built            which processes of the tree are made so
    fork_child_seized     the fork, from the parent, right after its memory
                          is rebuilt and before anything else of it is
                          restored: the child holds the parent's dump-time
                          memory; it is auto-attached, stopped at birth
    setup_seized          the injected twin of spawn._child_setup: session,
                          group, fds (from the restorer's, by pidfd_getfd),
                          helper fds, cwd, umask
    make_zombie_seized    a zombie child of a fork-built process, forked
                          and let go to exit as it did

The rest of its rebuild is the spawned processes' (restorer.rebuild), but
that it keeps the VMAs inherit.py keeps.

Everything else is spawned by Python as before. A process is fork-built
only when clearly safe: not the root, its parent live; no
epoll or terminal step (its watches, a controlling terminal: Python steps
in the spawned child, in_child and in_session); the same
resource limits and root ("/") as its parent (it inherits them; raising a
hard limit needs CAP_SYS_RESOURCE); the vdso where its parent has it; some
private anonymous VMA it keeps from its parent and pages stored by another
image; its session its own or its parent's; every child of it fork-built
too (a spawned process needs its parent while the spawn runs); its image
and its parent's plain and local (not compressed, encrypted or remote); and every
process of its group or session made after it, on the same rebuilder
thread (its subtree of fork-built processes, in tree order). A zombie is
forked when its parent is.
"""

from __future__ import annotations

import os
import signal
import struct
import time

from .. import model
from ..errors import RestoreError
from ..image import schema
from ..kernel import infect, proc, ptrace
from ..kernel.arch import x86_64 as arch
from ..kernel.arch.x86_64 import NR
from ..kernel.infect import Target
from .inherit import kept_vmas
from .spawn import Node
from .task import CLONE_ARGS

F_SETFD = 2
F_DUPFD_CLOEXEC = 1030
RLIMIT_CORE = 4
RLIMIT_NOFILE = 7
RLIMIT = struct.Struct("<QQ")  # struct rlimit64
RLIM64_INFINITY = (1 << 64) - 1
FORK_OPTIONS = (ptrace.PTRACE_O_TRACESYSGOOD | ptrace.PTRACE_O_EXITKILL | ptrace.PTRACE_O_TRACECLONE
                | ptrace.PTRACE_O_TRACEFORK)


def _page_vaddrs(ckpt: model.Checkpoint) -> list[tuple[int, int, int, int]]:
    """Where a process has pages (addresses only: no page source is open yet)."""
    out = [(r.vaddr, r.npages, 0, 0) for r in ckpt.pages]
    for refs in ckpt.page_refs:
        out += [(vaddr, npages, 0, 0) for vaddr, npages, _, _ in schema.unpack_page_refs(refs)]
    return out


def _specials(ckpt: model.Checkpoint) -> dict:
    return {v.kind: (v.start, v.end) for v in ckpt.vmas if v.kind in model.SPECIAL_KINDS}


def _may_fork(node: Node, images: dict) -> bool:
    parent = node.parent
    if parent is None or node.proc.zombie or parent.proc.zombie or node.task is None:
        return False
    if node.task.stopped_by:
        return False  # restored stopped: spawn.py's path waits for its stop
    if any(images[pid].codec is not None or images[pid].remote for pid in (node.proc.pid, parent.proc.pid)):
        return False  # pages decoded by chunk (image/chunks.py): inherit.py writes from plain mappings only
    mine, theirs = images[node.proc.pid].checkpoint, images[parent.proc.pid].checkpoint
    p = node.proc
    return (not node.files.in_child and not node.files.in_session
            and node.task.rlimits == parent.task.rlimits
            and node.task.root == parent.task.root == "/"
            and (p.sid == parent.proc.sid or p.sid == p.pid == p.pgid)
            and _specials(mine) == _specials(theirs)
            and bool(mine.page_refs)
            and bool(kept_vmas(mine, theirs, _page_vaddrs(theirs))))


def fork_built(root: Node, images: dict) -> set[int]:
    """The pids of the processes to fork from their parents (see the module
    docstring); marks their Nodes. A zombie is forked when its parent is."""
    order = {n.proc.pid: i for i, n in enumerate(root.walk())}
    nodes = {n.proc.pid: n for n in root.walk()}
    out: set[int] = set()

    def decide(node: Node) -> bool:
        if node.proc.zombie:
            return True  # whatever its parent is, it can be made by it
        kids = [decide(c) for c in node.children]  # every child decided, whatever the first says
        if all(kids) and node is not root and _may_fork(node, images):
            out.add(node.proc.pid)
            return True
        return False

    decide(root)

    def zombies_follow() -> None:
        for n in nodes.values():
            if n.proc.zombie:
                (out.add if n.parent.proc.pid in out else out.discard)(n.proc.pid)

    zombies_follow()

    def spawned_ancestor(pid: int) -> int:
        while pid in out:
            pid = nodes[pid].parent.proc.pid
        return pid

    def drop(pid: int) -> None:
        while pid in out:  # and its ancestors, which cannot be fork-built with a spawned child
            out.discard(pid)
            pid = nodes[pid].parent.proc.pid

    changed = True
    while changed:
        changed = False
        for n in nodes.values():
            for leader in {n.proc.pgid, n.proc.sid} - {n.proc.pid}:
                if leader not in out:
                    continue  # spawned (made before any fork) or not of the tree
                if (n.proc.pid in out and spawned_ancestor(n.proc.pid) == spawned_ancestor(leader)
                        and order[leader] < order[n.proc.pid]):
                    continue
                drop(leader)
                zombies_follow()
                changed = True
    for pid in out:
        nodes[pid].fork_built = True
    return out


def fork_child_seized(parent: Target, pid: int, born=lambda pid: None) -> None:
    """fork (clone3 with set_tid) inside `parent`; born(pid) is told as soon
    as the pid is the child's (to kill it if anything fails from there on);
    the child is auto-attached and stopped before its first instruction
    when this returns."""
    ptrace.set_options(parent.pid, FORK_OPTIONS)
    parent.write_scratch(CLONE_ARGS.pack(0, 0, 0, 0, signal.SIGCHLD, 0, 0, 0, parent.scratch + CLONE_ARGS.size, 1, 0)
                         + struct.pack("<i", pid))
    try:
        made = parent.call(NR.clone3, parent.scratch, CLONE_ARGS.size)
    except OSError as err:
        if err.errno == 17:
            raise RestoreError(f"pid {pid} is taken (clone3: EEXIST)", pid) from err
        raise RestoreError(f"pid {parent.pid}: fork of pid {pid}: {err.strerror}", pid) from err
    born(made)
    if made != pid:
        raise RestoreError(f"pid {parent.pid}: the fork made pid {made}, expected {pid}", pid)
    ptrace.wait_stop(pid)


def child_target(parent: Target, pid: int) -> Target:
    """An injector into the fork-built child, through its parent's gadget,
    scratch area and batch area (all inherited: its batches need no area of
    their own until its own VMAs are mapped, see _fork_and_rebuild)."""
    regs, mask = ptrace.get_regs(pid), ptrace.get_sigmask(pid)
    return Target(pid, ptrace.Injector(pid, parent.call.gadget, regs, mask, put_back=False), parent.scratch,
                  parent.busy if parent.batch_area > 0 else None, parent.batch_area)


def helper_numbers(node: Node) -> dict[str, tuple[int, int]]:
    """name -> (restorer fd, number in the child) of the fds its rebuild
    uses (mapped files, shared memory), above every fd it will have."""
    files = node.files
    base = max([2, *files.fd_sources, *files.fd_aliases]) + 1
    helpers = {f"map{k}": src for k, src in files.map_sources.items()}
    helpers.update({f"shm{k}": src for k, src in files.shm_sources.items()})
    return {name: (src, base + i) for i, (name, src) in enumerate(helpers.items())}


def _set_session_seized(target: Target, node: Node) -> None:
    target.batch(_session_calls(node))


def make_zombie_seized(parent: Target, node: Node, born=lambda pid: None, timeout: float = 5.0) -> None:
    """A zombie child of `parent` (spawn._become_zombie, injected): forked,
    put in its session and group, then let go to exit as it did (its exit
    status, or killed by its signal without a core dump). Once it is a
    zombie, the SIGCHLD its exit queued in the parent is taken back: a
    traced task queues even a signal it ignores, and the parent's saved
    pending signals, restored later, are the whole truth."""
    pid, status = node.proc.pid, node.proc.exit_status
    fork_child_seized(parent, pid, born)
    target = child_target(parent, pid)
    _set_session_seized(target, node)
    if os.WIFSIGNALED(status):
        target.write_scratch(RLIMIT.pack(0, 0))
        target.call(NR.prlimit64, 0, RLIMIT_CORE, target.scratch, 0)
        last = (NR.kill, pid, os.WTERMSIG(status))  # its action is SIG_DFL: its parent's are not restored yet
    else:
        last = (NR.exit_group, os.WEXITSTATUS(status))
    ptrace.set_regs(pid, arch.prepare_injection(target.call.base, target.call.gadget, last[0], last[1:]))
    ptrace.set_sigmask(pid, 0)
    ptrace.detach(pid)
    deadline = time.monotonic() + timeout
    while proc.read_stat(pid).state != "Z":  # before the next sibling, which may join its group
        if time.monotonic() > deadline:
            raise RestoreError(f"pid {pid}: made again to exit (status {status:#x}), it did not within {timeout} s",
                               pid)
        time.sleep(0.001)
    parent.write_scratch(struct.pack("<QQQ", 1 << (signal.SIGCHLD - 1), 0, 0))  # set, then timespec 0
    parent.call(NR.rt_sigtimedwait, parent.scratch, 0, parent.scratch + 8, 8, check=False)


def setup_seized(target: Target, node: Node, helpers: dict[str, tuple[int, int]]) -> None:
    """What spawn._child_setup does in Python, in the same order, injected:
    the child holds its parent's fd table as the spawn left it, its signal
    actions are all SIG_DFL (its parent's have not been restored yet).

    Two batches (kernel/infect.py): its session and its fd limit read,
    then everything else. The fd numbers the second one's calls return
    are known beforehand (the lowest free one, in a table emptied by
    close_range, of a task of one thread), so its calls are all written
    at once; each result is checked against that all the same."""
    p, files = node.proc, node.files
    rlimit_at, path_at = target.scratch, target.scratch + RLIMIT.size
    path = node.task.cwd.encode() + b"\0"
    if len(path) > infect.SCRATCH_SIZE - RLIMIT.size:
        raise RestoreError(f"pid {p.pid}: cwd {node.task.cwd!r} is longer than the scratch area", p.pid)
    # fd numbers up to the hard limit meanwhile (the saved limit is set back at the end)
    target.batch(_session_calls(node) + [(NR.prlimit64, 0, RLIMIT_NOFILE, 0, rlimit_at)])
    _, hard = RLIMIT.unpack(target.read_scratch(RLIMIT.size))
    target.write_scratch(RLIMIT.pack(hard, hard) + path)
    wanted = [(target_fd, src, target_fd not in files.cloexec) for target_fd, src in files.fd_sources.items()]
    wanted += [(want, src, False) for src, want in helpers.values()]
    top = max([2, *files.fd_aliases] + [w for w, _, _ in wanted]) + 1
    calls = [(NR.prlimit64, 0, RLIMIT_NOFILE, rlimit_at, 0), (NR.close_range, 0, 0xFFFFFFFF, 0),
             (NR.pidfd_open, os.getpid(), 0), (NR.fcntl, 0, F_DUPFD_CLOEXEC, top), (NR.close, 0)]
    expect = {2: 0, 3: top}  # call index -> the fd it returns
    pidfd, taken = top, {top}
    for want, src, inheritable in wanted:
        got = min(set(range(len(taken) + 1)) - taken)  # what the kernel gives: the lowest free number
        expect[len(calls)] = got
        calls.append((NR.pidfd_getfd, pidfd, src, 0))  # close-on-exec
        taken.add(got)
        if got == want:
            if inheritable:
                calls.append((NR.fcntl, want, F_SETFD, 0))
            continue
        calls += [(NR.dup3, got, want, 0 if inheritable else os.O_CLOEXEC), (NR.close, got)]
        taken.add(want)
        taken.discard(got)
    for target_fd, first_fd in files.fd_aliases.items():
        calls.append((NR.dup3, first_fd, target_fd, os.O_CLOEXEC if target_fd in files.cloexec else 0))
    calls += [(NR.close, pidfd), (NR.chdir, path_at), (NR.umask, node.task.umask)]
    try:
        results = target.batch(calls)
    except infect.BatchFailed as err:
        if calls[err.index][0] == NR.chdir:
            raise RestoreError(f"pid {p.pid}: cannot enter its cwd {node.task.cwd}: {err.strerror}", p.pid) from err
        raise
    wrong = [f"{infect.call_name(*calls[i])} returned {results[i]}, expected {fd}"
             for i, fd in expect.items() if results[i] != fd]
    if wrong:
        raise RestoreError(f"pid {p.pid}: its fd table is not the one set up: " + "; ".join(wrong), p.pid)


def _session_calls(node: Node) -> list[tuple[int, ...]]:
    p = node.proc
    if p.sid == p.pid:
        return [(NR.setsid,)]
    if p.pgid != node.parent.proc.pgid:
        return [(NR.setpgid, 0, p.pgid)]
    return []


def finish_seized(target: Target, node: Node) -> None:
    """Its saved limit on fds again, once the helper fds are closed."""
    for r in node.task.rlimits:
        if r.resource == RLIMIT_NOFILE:
            target.write_scratch(RLIMIT.pack(*(v if v < 1 << 63 else RLIM64_INFINITY for v in (r.soft, r.hard))))
            target.call(NR.prlimit64, 0, RLIMIT_NOFILE, target.scratch, 0)
