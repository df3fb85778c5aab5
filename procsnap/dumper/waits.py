"""How long an interrupted wait had left when its task was frozen.

A relative sleep or a wait with a timeout that a freeze interrupts keeps
its deadline in the kernel (the restart block, ERESTART_RESTARTBLOCK), or
nowhere (epoll_wait returns EINTR); neither survives a restore. What the
restorer needs to resume it with the time that was left (restorer/waits.py):

    syscall at the freeze                      time left, from
    nanosleep / clock_nanosleep, rem != NULL   *rem: the kernel wrote it when the freeze stopped the task
    the same with rem == NULL,                 the deadline of the task's hrtimer_sleeper, which the
      poll, futex FUTEX_WAIT with a timeout,     freeze cancelled: the timer that is gone from
      epoll_wait / epoll_pwait, restart_syscall  /proc/timer_list after the freeze (kernel/timerlist.py,
                                                 measured by ptrace.freeze_timed, which also gives an
                                                 epoll_wait that time as its new timeout at once)
    select, pselect6, ppoll                    nothing to do: the kernel wrote the time left into
                                                 the caller's timeval/timespec, re-executed as it is
    absolute sleeps (TIMER_ABSTIME)            nothing to do: re-executed with the same deadline

Time left is that at the freeze: the time the tree was not running does
not count (the rule of CRIU's timers, which objects/timers.py follows too).
"""

from __future__ import annotations

import struct

from ..kernel import memory
from ..kernel.arch import x86_64 as arch
from ..kernel.arch.x86_64 import NR
from ..kernel.structs import TIMESPEC, WAIT_LEFT_UNKNOWN as UNKNOWN


def wait_left(pid: int, regs: dict[str, int], measured: int) -> int:
    """The time left (ns) of the restart-block wait (ERESTART_RESTARTBLOCK)
    a frozen thread with saved registers `regs` was interrupted in, which
    the restorer resumes with that time; UNKNOWN for any other state (the
    registers alone resume it)."""
    nr, code = regs["orig_rax"], -arch.signed(regs["rax"])
    if arch.signed(nr) < 0 or code != arch.Restart.ERESTART_RESTARTBLOCK:
        return UNKNOWN
    rem = {NR.nanosleep: regs["rsi"], NR.clock_nanosleep: regs["r10"]}.get(nr, 0)
    if rem:
        try:
            sec, nsec = TIMESPEC.unpack(memory.read_mem_file(pid, rem, TIMESPEC.size))
            return sec * 1_000_000_000 + nsec
        except (OSError, struct.error):
            pass
    return measured
