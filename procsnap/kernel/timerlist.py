"""/proc/timer_list: the sleepers' hrtimers, to learn how long an
interrupted sleep had left when the kernel keeps that time to itself
(ptrace.freeze_timed: probe() before the freeze, left_ns() after).

A task blocked in a relative nanosleep (rem NULL), in poll or futex with a
timeout, or in epoll_wait, sleeps on an on-stack hrtimer_sleeper whose
function is hrtimer_wakeup. /proc/timer_list lists every armed hrtimer per
CPU and clock base (no pid: the address is printed hashed, but stably);
the expiry of the one that disappears when a task is frozen (the
interrupted sleep cancels it) is that task's deadline:

    now at 9505680753046 nsecs                       <- ktime_get(): CLOCK_MONOTONIC
     clock 1:
      .offset:     1796116841234837813 nsecs          <- this base's time - monotonic
     #1: <00000000540d392f>, hrtimer_wakeup, S:01
     # expires at 9505719384921-9505719434921 nsecs [in ...]
                  soft (asked) - hard (+ slack), in the base's time
"""

from __future__ import annotations

from .. import records as dataclasses  # the dataclasses API, cheap to import
import re
import struct

from .arch.x86_64 import NR, SYSCALL_INSN_LEN, syscall_number_before

PATH = "/proc/timer_list"
LIMIT_SLACK = 1_000_000  # ns: a poll timeout is rounded up to the tick (and slack) by the kernel

_TIMER_RE = re.compile(r"^ #\d+: <([0-9a-f]+)>, (\S+), S:")
_EXPIRES_RE = re.compile(r"^ # expires at (-?\d+)-(-?\d+) nsecs")
_OFFSET_RE = re.compile(r"^\s+\.offset:\s+(-?\d+) nsecs")
_NOW_RE = re.compile(r"^now at (\d+) nsecs")


@dataclasses.dataclass(frozen=True)
class Sleeper:
    """An armed hrtimer_wakeup timer."""

    key: str  # the hashed address of the timer
    expires: int  # its soft expiry, CLOCK_MONOTONIC ns


@dataclasses.dataclass(frozen=True)
class TimerList:
    now: int  # CLOCK_MONOTONIC ns at the read
    sleepers: frozenset[Sleeper]


def parse_timer_list(text: str) -> TimerList:
    now, offset, current = 0, 0, None
    sleepers = set()
    for line in text.splitlines():
        if m := _NOW_RE.match(line):
            now = int(m.group(1))
        elif m := _OFFSET_RE.match(line):
            offset = int(m.group(1))
        elif m := _TIMER_RE.match(line):
            current = m.group(1) if m.group(2) == "hrtimer_wakeup" else None
        elif (m := _EXPIRES_RE.match(line)) and current is not None:
            sleepers.add(Sleeper(current, int(m.group(1)) - offset))
            current = None
    return TimerList(now, frozenset(sleepers))


def read_timer_list() -> TimerList | None:
    """None where the file is missing or unreadable (CONFIG_TIMER_LIST off)."""
    try:
        with open(PATH) as f:
            return parse_timer_list(f.read())
    except OSError:
        return None


def cancelled_deadline(before: TimerList | None, after: TimerList | None, limit: int | None = None) -> int | None:
    """The deadline (CLOCK_MONOTONIC ns) of the one sleeper that was armed
    in `before`, is gone in `after` and had not expired by then (nor is
    further than `limit` ns away, the timeout asked): the sleep a freeze
    between the two reads interrupted. None if there is not exactly one
    (another task's wait ended meanwhile: the time is not known)."""
    if before is None or after is None:
        return None
    far = after.now + limit + LIMIT_SLACK if limit is not None else None
    gone = [s for s in before.sleepers - after.sleepers
            if s.expires > after.now and (far is None or s.expires <= far)]
    return gone[0].expires if len(gone) == 1 else None


TIMER_ABSTIME = 1
FUTEX_CMD_MASK = ~(128 | 256)  # FUTEX_PRIVATE_FLAG, FUTEX_CLOCK_REALTIME
FUTEX_WAIT = 0
UNKNOWN = -1


def as_int(value: int) -> int:
    """An int argument (poll's, epoll_wait's timeout) from a register."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def kernel_timed(nr: int, args: list[int]) -> bool:
    """Whether a wait in syscall `nr` keeps a timeout only the kernel knows
    (select, pselect6 and ppoll write theirs back to the caller)."""
    if nr in (NR.nanosleep, NR.restart_syscall):
        return True
    if nr == NR.clock_nanosleep:
        return not args[1] & TIMER_ABSTIME
    if nr == NR.poll:
        return as_int(args[2]) > 0
    if nr == NR.futex:
        return args[1] & FUTEX_CMD_MASK == FUTEX_WAIT and args[3] != 0
    if nr in (NR.epoll_wait, NR.epoll_pwait):
        return as_int(args[3]) > 0
    return False


def blocked_in(tid: int) -> tuple[int, list[int], int] | None:
    """The syscall, arguments and user pc `tid` is blocked in (/proc/TID/syscall)."""
    try:
        with open(f"/proc/{tid}/syscall") as f:
            fields = f.read().split()
    except OSError:
        return None
    if len(fields) < 9 or not fields[0].isdigit():  # "running", or -1 (not in a syscall)
        return None
    return int(fields[0]), [int(x, 16) for x in fields[1:7]], int(fields[8], 16)


@dataclasses.dataclass
class Probe:
    """A task about to be frozen in a wait with a timeout the kernel keeps."""

    nr: int
    args: list[int]
    limit: int | None  # ns: the timeout it asked for, where it can be read
    sleepers: TimerList | None


TIMESPEC = struct.Struct("<qq")  # struct __kernel_timespec
# where the timeout is: (argument, a timespec pointer (else int ms))
TIMEOUT_ARG = {NR.nanosleep: (0, True), NR.clock_nanosleep: (2, True), NR.futex: (3, True),
               NR.poll: (2, False), NR.epoll_wait: (3, False), NR.epoll_pwait: (3, False)}


def _timeout(tid: int, nr: int, args: list[int], pc: int) -> int | None:
    """The timeout (ns) the blocked call asked for; a restart_syscall is told
    from its wrapper's code, as the dumper does (arch.syscall_number_before)."""
    from . import memory  # which imports ptrace, which imports this module

    try:
        if nr == NR.restart_syscall:
            code = memory.read_mem_file(tid, pc - SYSCALL_INSN_LEN - 8, 8)
            nr = syscall_number_before(code)
        if nr not in TIMEOUT_ARG:
            return None
        arg, is_timespec = TIMEOUT_ARG[nr]
        if not is_timespec:
            return as_int(args[arg]) * 1_000_000
        sec, nsec = TIMESPEC.unpack(memory.read_mem_file(tid, args[arg], TIMESPEC.size))
        return sec * 1_000_000_000 + nsec
    except (OSError, struct.error):
        return None


def probe(tid: int) -> Probe | None:
    """Before `tid` is frozen: the sleepers, if it waits with a timeout the
    kernel keeps (else None: nothing to measure)."""
    blocked = blocked_in(tid)
    if blocked is None or not kernel_timed(*blocked[:2]):
        return None
    nr, args, pc = blocked
    return Probe(nr, args, _timeout(tid, nr, args, pc), read_timer_list())


def left_ns(before: Probe | None) -> int:
    """Once frozen: ns its wait had left (UNKNOWN if not measured)."""
    if before is None:
        return UNKNOWN
    after = read_timer_list()
    deadline = cancelled_deadline(before.sleepers, after, before.limit)
    return UNKNOWN if deadline is None else max(0, deadline - after.now)
