"""An interrupted wait resumed as the kernel would have resumed it after a
signal without a handler, with the time it had left (dumper/waits.py).

    at the freeze                  restored thread
    -512 -513 -514 (no restart     re-executes the call (arch.rewind_to_syscall): what the
      block)                         kernel does; select/pselect6/ppoll were given their
                                     time left in their own timeval/timespec by the kernel
    -516, a restart-block wait     the same call is made in the thread, its timeout the time
      (nanosleep, clock_nanosleep,   left, with an interrupt pending (Injector.call_interrupted):
      poll, futex) with its          the kernel sets up the thread's restart block itself, and
      time left known                the thread resumes in restart_syscall, as after a stop; a
                                     call with nothing left to wait for returns its result
    -516, time left unknown        re-executes the call with its full timeout (warned)
    -4 from epoll_wait (no restart made to be called again by the freeze itself (ptrace.freeze),
      code: EINTR after any stop)    the time left in its timeout (dumper/waits.py)
"""

from __future__ import annotations

from .. import log as logging  # the logging API, cheap to import
import math

from ..kernel.structs import TIMESPEC, WAIT_LEFT_UNKNOWN as UNKNOWN
from ..kernel import memory
from ..kernel.arch import x86_64 as arch
from ..kernel.arch.x86_64 import NR
from ..kernel.ptrace import Injector

log = logging.getLogger("procsnap.restorer")

RED_ZONE = 128  # bytes below rsp the code may use without moving rsp (x86_64 SysV ABI)
CLOCK_MONOTONIC = 1


def _ms(ns: int) -> int:
    return math.ceil(ns / 1_000_000)


def _rearm_args(regs: arch.user_regs_struct, nr: int, ts: int, left: int) -> tuple[int, tuple[int, ...]] | None:
    """The call that sets up the same restart block with `left` ns to go
    (`ts`: where a timespec of `left` is written)."""
    if nr == NR.nanosleep:  # the kernel's nanosleep is clock_nanosleep(CLOCK_MONOTONIC, 0, ...)
        return NR.clock_nanosleep, (CLOCK_MONOTONIC, 0, ts, regs.rsi)
    if nr == NR.clock_nanosleep:
        return NR.clock_nanosleep, (regs.rdi, 0, ts, regs.r10)
    if nr == NR.poll:
        return NR.poll, (regs.rdi, regs.rsi, _ms(left))
    if nr == NR.futex:
        return NR.futex, (regs.rdi, regs.rsi, regs.rdx, ts, regs.r8, regs.r9)
    return None


def resume_wait_seized(tid: int, call: Injector | None, regs: arch.user_regs_struct, left: int) -> None:
    """Edit the saved registers `regs` of thread `tid` (stopped and rebuilt;
    `call` injects into it where needs_injection) so it carries on its
    interrupted wait."""
    nr = arch.interrupted_syscall(regs)
    code = -arch.signed(regs.rax)
    if nr is not None and code == arch.Restart.ERESTART_RESTARTBLOCK:
        if left == UNKNOWN or call is None:
            log.warning("thread %d: the time left of its interrupted %s is not known; it waits its whole "
                        "timeout again", tid, _name(nr))
            return
        ts = (regs.rsp - RED_ZONE - TIMESPEC.size) & ~15
        rearm = _rearm_args(regs, nr, ts, left)
        if rearm is None:
            return
        memory.write_bytes(call.pid, ts, TIMESPEC.pack(*divmod(left, 1_000_000_000)))
        ret = call.call_interrupted(rearm[0], *rearm[1])
        if -ret == arch.Restart.ERESTART_RESTARTBLOCK:
            regs.rax = NR.restart_syscall
            regs.rip -= arch.SYSCALL_INSN_LEN
        else:  # nothing was left to wait for: the call's own result
            regs.rax = arch.unsigned(ret)
        regs.orig_rax = arch.unsigned(-1)


def _name(nr: int) -> str:
    return arch.NR(nr).name if nr in arch.NR.__members__.values() else f"syscall {nr}"


def needs_injection(regs: arch.user_regs_struct, left: int) -> bool:
    return (left != UNKNOWN and arch.interrupted_syscall(regs) is not None
            and -arch.signed(regs.rax) == arch.Restart.ERESTART_RESTARTBLOCK)
