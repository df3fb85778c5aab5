"""Interval timers (setitimer): ITIMER_REAL, ITIMER_VIRTUAL, ITIMER_PROF,
one of each per process.

    dump                                   restore (the last of the process's state)
    ----                                   -------
    getitimer(which) injected  -->  ITMR   setitimer(which, saved) injected

Time that passed while the process was not running: a timer keeps the
time it had left at the dump, and its interval (CRIU's rule). A timer that
had 2 s left fires 2 s after the restore, not at once: VIRTUAL and PROF
count the process's CPU time, and it had none while it was away; for REAL
the alternative, firing at once for a deadline that passed, would deliver
one signal for any number of periods missed, which is not what the
program saw either. Also the rule of the sleeps (dumper/waits.py).

POSIX timers (timer_create) are not restored yet: refused at the dump by
name (dumper/collect.py), with their ids from /proc/PID/timers.
"""

from __future__ import annotations

import dataclasses
import enum
import struct

from .. import model
from ..kernel.arch.x86_64 import NR
from ..kernel.infect import Target

ITIMERVAL = struct.Struct("<4q")  # struct itimerval: it_interval {sec, usec}, it_value {sec, usec}


class Which(enum.IntEnum):
    """setitimer(2) `which` (include/uapi/linux/time.h)."""

    ITIMER_REAL = 0
    ITIMER_VIRTUAL = 1
    ITIMER_PROF = 2


@dataclasses.dataclass
class ITimer:
    """An armed interval timer of a process (record ITMR, since format 1.3)."""

    which: Which
    value_us: int  # time left at the dump
    interval_us: int  # 0: fires once


def _us(sec: int, usec: int) -> int:
    return sec * 1_000_000 + usec


def collect_seized(target: Target, tids: list[int], ckpt: model.Checkpoint) -> None:
    ckpt.itimers = []
    for which in Which:
        target.call(NR.getitimer, which, target.scratch)
        isec, iusec, vsec, vusec = ITIMERVAL.unpack(target.read_scratch(ITIMERVAL.size))
        if vsec or vusec:  # a zero value is a disarmed timer, whatever its interval
            ckpt.itimers.append(ITimer(which, _us(vsec, vusec), _us(isec, iusec)))


def restore_seized(target: Target, ckpt: model.Checkpoint, tree_pids: set[int]) -> None:
    for t in ckpt.itimers:
        target.write_scratch(ITIMERVAL.pack(*divmod(t.interval_us, 1_000_000), *divmod(t.value_us, 1_000_000)))
        target.call(NR.setitimer, t.which, target.scratch, 0)

