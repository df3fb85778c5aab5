"""Per-task state of the restored process, set from inside, then registers.

restore_signals_seized  every handler is the saved one or SIG_DFL again
                        (the child carried Python's), pending signals queued
restore_task_seized     tid address, robust list, sigaltstack, personality,
                        comm, rseq
create_threads_seized   every other thread, with its tid, by an injected
                        clone3; held stopped (auto-attached) until resume
load_registers          registers, xstate, signal mask of every thread
release                 all of them detached, running
"""

from __future__ import annotations

import struct

from .. import model
from ..errors import RestoreError
from ..kernel import infect, proc, ptrace
from ..kernel.arch import x86_64 as arch
from ..kernel.arch.x86_64 import NR
from ..kernel.infect import Target
from . import waits as W
from ..kernel.structs import (KSIGACTION, ROBUST_LIST_HEAD_SIZE, RSEQ_FLAG_UNREGISTER, SIGSET_SIZE, SS_DISABLE,
                              STACK_T, Prctl)

PR_SET_PDEATHSIG = 1
UNCATCHABLE = (9, 19)  # SIGKILL, SIGSTOP


def restore_signals_seized(target: Target, sigactions: list[model.SigAction],
                           pending: list[model.PendingSignal]) -> None:
    """The saved handlers (every other one is SIG_DFL already: spawn reset
    them all), then the pending signals."""
    catchable = [sa for sa in sigactions if sa.signo not in UNCATCHABLE]
    if catchable:  # all of them side by side in the scratch area, set in one batch
        target.write_scratch(b"".join(KSIGACTION.pack(sa.handler, int(sa.flags), sa.restorer, sa.mask)
                                      for sa in catchable))
    target.batch([(NR.rt_sigaction, sa.signo, target.scratch + i * KSIGACTION.size, 0, SIGSET_SIZE)
                  for i, sa in enumerate(catchable)])
    for p in pending:
        target.write_scratch(p.siginfo)
        if p.shared:
            target.call(NR.rt_sigqueueinfo, target.pid, p.signo, target.scratch)
        else:
            target.call(NR.rt_tgsigqueueinfo, target.pid, target.pid, p.signo, target.scratch)


def restore_task_seized(target: Target, task: model.Task) -> None:
    restore_thread_state_seized(target, task)
    target.call(NR.personality, task.personality)


def restore_thread_state_seized(target: Target, task: model.ThreadState) -> None:
    """The per-thread fields (model.ThreadState) but registers and mask,
    from inside the thread `target` injects into."""
    if task.altstack_flags & SS_DISABLE:
        ss = STACK_T.pack(0, SS_DISABLE, 0, 0)
    else:
        ss = STACK_T.pack(task.altstack_sp, task.altstack_flags, 0, task.altstack_size)
    target.write_scratch(ss + task.comm.encode()[:15] + b"\0")
    calls = [(NR.set_tid_address, task.clear_child_tid)]
    if task.robust_list:
        calls.append((NR.set_robust_list, task.robust_list, task.robust_list_len or ROBUST_LIST_HEAD_SIZE))
    calls += [(NR.sigaltstack, target.scratch, 0), (NR.prctl, Prctl.PR_SET_NAME, target.scratch + STACK_T.size)]
    if task.rseq_ptr:
        calls.append((NR.rseq, task.rseq_ptr, task.rseq_len, 0, task.rseq_sig))
    target.batch(calls)


# clone3 flags of a thread (include/uapi/linux/sched.h): CLONE_VM | CLONE_FS |
# CLONE_FILES | CLONE_SIGHAND | CLONE_THREAD | CLONE_SYSVSEM
CLONE_THREAD_FLAGS = 0x100 | 0x200 | 0x400 | 0x800 | 0x10000 | 0x40000
# struct clone_args (88 bytes): flags, pidfd, child_tid, parent_tid, exit_signal,
# stack, stack_size, tls, set_tid, set_tid_size, cgroup
CLONE_ARGS = struct.Struct("<11Q")


def create_threads_seized(target: Target, threads: list[model.Thread]) -> list[int]:
    """Each thread with its saved tid, made by the leader (clone3 with
    set_tid). A new thread is auto-attached (PTRACE_O_TRACECLONE on the
    leader) and stopped before its first instruction; its per-thread state
    is set by injection into it, its registers at resume. Returns the tids."""
    made = []
    for th in threads:
        args = CLONE_ARGS.pack(CLONE_THREAD_FLAGS, 0, 0, 0, 0, 0, 0, 0, target.scratch + CLONE_ARGS.size, 1, 0)
        target.write_scratch(args + struct.pack("<i", th.tid))
        try:
            tid = target.call(NR.clone3, target.scratch, CLONE_ARGS.size)
        except OSError as err:
            if err.errno == 17:
                raise RestoreError(f"pid {target.pid}: thread id {th.tid} is taken (clone3: EEXIST)",
                                   target.pid) from err
            raise
        if tid != th.tid:
            raise OSError(0, f"clone3 made thread {tid}, expected {th.tid}")
        made.append(tid)
        ptrace.wait_stop(tid)  # its first stop, before any instruction of its own
        with infect.infected(tid, [], scratch_area=False, put_back=False, gadget=target.call.gadget) as t:
            restore_thread_state_seized(Target(target.pid, t.call, target.scratch), th)
            # Queued by the thread itself: the kernel lets a tgkill()-style
            # siginfo (SI_TKILL, or from the kernel) be queued only to oneself.
            for info in th.pending:
                target.write_scratch(info)
                t.call(NR.rt_tgsigqueueinfo, target.pid, tid, struct.unpack_from("<i", info)[0], target.scratch)
    return made


def unregister_rseq_calls(target: Target) -> list[tuple[int, ...]]:
    """The call that unregisters the child's own rseq area, which is about
    to be unmapped (the kernel would write to it on a later return to user
    space), if it has one: to be made before the unmapping."""
    conf = ptrace.get_rseq_config(target.pid)
    if conf.rseq_abi_pointer:
        return [(NR.rseq, conf.rseq_abi_pointer, conf.rseq_abi_size, RSEQ_FLAG_UNREGISTER, conf.signature)]
    return []


def load_registers(pid: int, task: model.Task, threads: list[model.Thread] = ()) -> None:
    """Saved registers (with the syscall-restart rule applied, an
    interrupted wait resumed with its time left: restorer/waits.py), xstate
    and mask of every thread; they run once released."""
    gadget = 0
    for tid, state in [(pid, task)] + [(th.tid, th) for th in threads]:
        regs = arch.user_regs_struct(**state.regs)
        call = None
        if W.needs_injection(regs, state.wait_left_ns):
            gadget = gadget or infect.find_gadget(pid, proc.read_maps(pid))
            call = ptrace.Injector(tid, gadget, ptrace.get_regs(tid), state.sigmask, put_back=False)
        W.resume_wait_seized(tid, call, regs, state.wait_left_ns)
        arch.rewind_to_syscall(regs, reexecute_restartblock=True)
        ptrace.set_regs(tid, regs)
        ptrace.set_xstate(tid, state.xstate)
        ptrace.set_sigmask(tid, state.sigmask)


def release(pid: int, threads: list[model.Thread] = ()) -> None:
    """Detach every thread: from here on it is a process of its own."""
    for tid in [th.tid for th in threads] + [pid]:
        ptrace.set_options(tid, 0)  # no more EXITKILL
        ptrace.detach(tid)
