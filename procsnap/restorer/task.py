"""Per-task state of the restored process, set from inside, then registers.

restore_signals_seized  every handler is the saved one or SIG_DFL again
                        (the child carried Python's), pending signals queued
restore_task_seized     tid address, robust list, sigaltstack, personality,
                        comm, rseq
resume                  registers, xstate, signal mask; detached and running
"""

from __future__ import annotations

from .. import faults, model
from ..kernel import ptrace
from ..kernel.arch import x86_64 as arch
from ..kernel.arch.x86_64 import NR
from ..kernel.infect import Target
from ..kernel.structs import (KSIGACTION, NSIG, ROBUST_LIST_HEAD_SIZE, RSEQ_FLAG_UNREGISTER, SIGSET_SIZE, SS_DISABLE,
                              STACK_T, Prctl)

PR_SET_PDEATHSIG = 1
UNCATCHABLE = (9, 19)  # SIGKILL, SIGSTOP


def restore_signals_seized(target: Target, sigactions: list[model.SigAction],
                           pending: list[model.PendingSignal]) -> None:
    saved = {sa.signo: sa for sa in sigactions}
    for sig in range(1, NSIG + 1):
        if sig in UNCATCHABLE:
            continue
        sa = saved.get(sig)
        act = KSIGACTION.pack(sa.handler, int(sa.flags), sa.restorer, sa.mask) if sa else KSIGACTION.pack(0, 0, 0, 0)
        target.write_scratch(act)
        target.call(NR.rt_sigaction, sig, target.scratch, 0, SIGSET_SIZE)
    for p in pending:
        target.write_scratch(p.siginfo)
        if p.shared:
            target.call(NR.rt_sigqueueinfo, target.pid, p.signo, target.scratch)
        else:
            target.call(NR.rt_tgsigqueueinfo, target.pid, target.pid, p.signo, target.scratch)


def restore_task_seized(target: Target, task: model.Task) -> None:
    target.call(NR.set_tid_address, task.clear_child_tid)
    if task.robust_list:
        target.call(NR.set_robust_list, task.robust_list, task.robust_list_len or ROBUST_LIST_HEAD_SIZE)
    if task.altstack_flags & SS_DISABLE:
        ss = STACK_T.pack(0, SS_DISABLE, 0, 0)
    else:
        ss = STACK_T.pack(task.altstack_sp, task.altstack_flags, 0, task.altstack_size)
    target.write_scratch(ss)
    target.call(NR.sigaltstack, target.scratch, 0)
    target.call(NR.personality, task.personality)
    target.write_scratch(task.comm.encode()[:15] + b"\0")
    target.call(NR.prctl, Prctl.PR_SET_NAME, target.scratch)
    if task.rseq_ptr:
        target.call(NR.rseq, task.rseq_ptr, task.rseq_len, 0, task.rseq_sig)


def unregister_rseq_seized(target: Target) -> None:
    """The child's own rseq area is about to be unmapped; the kernel would
    write to it on the next return to user space."""
    conf = ptrace.get_rseq_config(target.pid)
    if conf.rseq_abi_pointer:
        target.call(NR.rseq, conf.rseq_abi_pointer, conf.rseq_abi_size, RSEQ_FLAG_UNREGISTER, conf.signature)


def resume(pid: int, task: model.Task) -> None:
    """Saved registers (with the syscall-restart rule applied), then go."""
    regs = arch.user_regs_struct(**task.regs)
    arch.rewind_to_syscall(regs, reexecute_restartblock=True)
    ptrace.set_regs(pid, regs)
    ptrace.set_xstate(pid, task.xstate)
    ptrace.set_sigmask(pid, task.sigmask)
    faults.point("before-detach")
    ptrace.set_options(pid, 0)  # no more EXITKILL: from here on it is a process of its own
    ptrace.detach(pid)
