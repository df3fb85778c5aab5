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

POSIX timers (timer_create), the same rule:

    /proc/PID/timers: ID, signal/value, notify, ClockID  -->  PTMR
    timer_gettime(id), timer_getoverrun(id) injected
                   prctl(PR_TIMER_CREATE_RESTORE_IDS, ON); timer_create(clock,
                   sigevent, &id) takes *id as the id to make (6.15+); then
                   timer_settime(id, 0, {interval, time left})

A pending overrun count (timer_getoverrun: the expirations merged into the
last signal delivered) cannot be set again (the kernel counts it from the
next expiry on): a timer with one is refused by name. So is a
CLOCK_THREAD_CPUTIME_ID timer of a process with several threads: it counts
the CPU time of the thread that made it, which /proc does not show, and the
restore makes it from the main thread.
"""

from __future__ import annotations

from .. import records as dataclasses  # the dataclasses API, cheap to import
import enum
import struct

from .. import model
from ..errors import RestoreError, Unsupported
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


PR_TIMER_CREATE_RESTORE_IDS = 77  # include/uapi/linux/prctl.h, since 6.15
RESTORE_IDS_OFF, RESTORE_IDS_ON = 0, 1
# struct sigevent (include/uapi/asm-generic/siginfo.h, 64 bytes): sigev_value,
# sigev_signo, sigev_notify, then the union whose first int is _tid
SIGEVENT = struct.Struct("<Qiii44x")
ITIMERSPEC = struct.Struct("<4q")  # struct __kernel_itimerspec: it_interval, it_value {sec, nsec}


class Notify(enum.IntEnum):
    """sigev_notify as the kernel keeps it (SIGEV_THREAD is glibc's, made of SIGEV_THREAD_ID)."""

    SIGEV_SIGNAL = 0
    SIGEV_NONE = 1
    SIGEV_THREAD_ID = 4


@dataclasses.dataclass
class PosixTimer:
    """A timer_create timer (record PTMR, since format 1.3)."""

    id: int
    clock: int
    notify: Notify
    signo: int
    value: int  # sigev_value (sival_ptr)
    tid: int  # the thread notified (SIGEV_THREAD_ID), else 0
    value_ns: int  # time left at the dump, 0: disarmed
    interval_ns: int
    overrun: int = 0  # a timer with one is refused (see above)


def parse_timers(text: str) -> list[dict[str, str]]:
    """/proc/PID/timers: one {key: value} per timer."""
    out: list[dict[str, str]] = []
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key == "ID":
            out.append({})
        if out:
            out[-1][key] = value.strip()
    return out


def _timer(entry: dict[str, str], value_ns: int, interval_ns: int, overrun: int) -> PosixTimer:
    signo, _, value = entry["signal"].partition("/")
    how, _, who = entry["notify"].partition("/")
    kind, _, num = who.partition(".")
    notify = {"signal": Notify.SIGEV_SIGNAL, "none": Notify.SIGEV_NONE}[how]
    if kind == "tid":
        notify = Notify.SIGEV_THREAD_ID
    return PosixTimer(int(entry["ID"]), int(entry["ClockID"]), notify, int(signo), int(value, 16),
                      int(num) if kind == "tid" else 0, value_ns, interval_ns, overrun)


def collect_posix_timers_seized(target: Target) -> list[PosixTimer]:
    with open(f"/proc/{target.pid}/timers") as f:
        entries = parse_timers(f.read())
    out = []
    # /proc lists them newest first (each is added at the head of the
    # process's list): made again oldest first, they list the same
    for e in reversed(entries):
        tid = int(e["ID"])
        target.call(NR.timer_gettime, tid, target.scratch)
        isec, insec, vsec, vnsec = ITIMERSPEC.unpack(target.read_scratch(ITIMERSPEC.size))
        overrun = target.call(NR.timer_getoverrun, tid)
        out.append(_timer(e, vsec * 1_000_000_000 + vnsec, isec * 1_000_000_000 + insec, overrun))
    return out


def restore_posix_timers_seized(target: Target, timers: list[PosixTimer]) -> None:
    if not timers:
        return
    try:
        target.call(NR.prctl, PR_TIMER_CREATE_RESTORE_IDS, RESTORE_IDS_ON)
    except OSError as err:
        raise RestoreError(f"pid {target.pid}: POSIX timer ids {', '.join(str(t.id) for t in timers)} cannot be "
                           "made again here: the kernel has no PR_TIMER_CREATE_RESTORE_IDS (6.15+)",
                           target.pid) from err
    try:
        for t in timers:
            target.write_scratch(SIGEVENT.pack(t.value, t.signo, int(t.notify), t.tid))
            target.write_scratch(struct.pack("<i", t.id), SIGEVENT.size)
            target.call(NR.timer_create, t.clock, target.scratch, target.scratch + SIGEVENT.size)
            (made,) = struct.unpack("<i", target.read_scratch(4, SIGEVENT.size))
            if made != t.id:
                raise RestoreError(f"pid {target.pid}: POSIX timer {t.id}: made as id {made}", target.pid)
            if t.value_ns:
                target.write_scratch(ITIMERSPEC.pack(*divmod(t.interval_ns, 1_000_000_000),
                                                     *divmod(t.value_ns, 1_000_000_000)))
                target.call(NR.timer_settime, t.id, 0, target.scratch, 0)
    finally:
        target.call(NR.prctl, PR_TIMER_CREATE_RESTORE_IDS, RESTORE_IDS_OFF)


def _us(sec: int, usec: int) -> int:
    return sec * 1_000_000 + usec


# CLOCK_THREAD_CPUTIME_ID as /proc/PID/timers shows it: MAKE_THREAD_CPUCLOCK(0, CPUCLOCK_SCHED),
# the calling thread's (include/linux/posix-timers_types.h)
THREAD_CLOCK = -2


def collect_seized(target: Target, tids: list[int], ckpt: model.Checkpoint) -> None:
    ckpt.posix_timers = collect_posix_timers_seized(target)
    for t in ckpt.posix_timers:
        if t.overrun > 0:
            raise Unsupported(f"pid {target.pid}: POSIX timer {t.id} has an overrun count of {t.overrun} (expirations "
                              "merged into its last signal), which cannot be set again; not supported", target.pid)
        if t.clock == THREAD_CLOCK and len(tids) > 1:
            raise Unsupported(f"pid {target.pid}: POSIX timer {t.id} counts the CPU time of the thread that made it "
                              f"(CLOCK_THREAD_CPUTIME_ID), one of its {len(tids)} threads, which /proc does not say; "
                              "not supported", target.pid)
    ckpt.itimers = []
    for which in Which:
        target.call(NR.getitimer, which, target.scratch)
        isec, iusec, vsec, vusec = ITIMERVAL.unpack(target.read_scratch(ITIMERVAL.size))
        if vsec or vusec:  # a zero value is a disarmed timer, whatever its interval
            ckpt.itimers.append(ITimer(which, _us(vsec, vusec), _us(isec, iusec)))


def restore_seized(target: Target, ckpt: model.Checkpoint, tree_pids: set[int]) -> None:
    restore_posix_timers_seized(target, ckpt.posix_timers)
    for t in ckpt.itimers:
        target.write_scratch(ITIMERVAL.pack(*divmod(t.interval_us, 1_000_000), *divmod(t.value_us, 1_000_000)))
        target.call(NR.setitimer, t.which, target.scratch, 0)

