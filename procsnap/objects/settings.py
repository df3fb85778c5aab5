"""Per-process and per-thread settings: scheduling, affinity, I/O priority,
timer slack, the prctl flags, oom_score_adj, coredump_filter, membarrier
registrations, the private futex hash and the leader's NUMA memory policy
(other threads' policies are not read: each would need an injection of
its own).

    dump                                    restore (before any task runs)
    ----                                    -------
    sched_getattr / affinity / ioprio  -->  set from outside, for every thread
      / timerslack_ns, of every thread
    PR_GET_* injected into the leader  -->  PR_SET_* injected, where it differs
    /proc/PID/oom_score_adj,           -->  written back
      coredump_filter
    /proc/PID/autogroup nice           -->  written back by a session leader (its
                                            group is made by the restore's setsid);
                                            any other process's must be its leader's
    membarrier(GET_REGISTRATIONS)      -->  each registration made again
    PR_FUTEX_HASH GET_SLOTS/IMMUTABLE  -->  SET_SLOTS, if the rebuilt process has
                                            other than the saved slots

A setting that cannot be made again here (the kernel refuses it to the
restoring user) fails the restore by name: never silently dropped.
"""

from __future__ import annotations

import ctypes
from .. import records as dataclasses  # the dataclasses API, cheap to import
import enum
import os
import struct

from ..errors import RestoreError
from ..kernel.arch.x86_64 import NR
from ..kernel.infect import BatchFailed, Target
from ..kernel.libc import syscall

IOPRIO_WHO_PROCESS = 1


class Pr(enum.IntEnum):
    """prctl options (include/uapi/linux/prctl.h) of the settings here."""

    PR_SET_DUMPABLE = 4
    PR_GET_DUMPABLE = 3
    PR_GET_TSC = 25
    PR_SET_TSC = 26
    PR_MCE_KILL = 33
    PR_MCE_KILL_GET = 34
    PR_SET_CHILD_SUBREAPER = 36
    PR_GET_CHILD_SUBREAPER = 37
    PR_SET_THP_DISABLE = 41
    PR_GET_THP_DISABLE = 42
    PR_GET_SPECULATION_CTRL = 52
    PR_SET_SPECULATION_CTRL = 53
    PR_SET_MDWE = 65
    PR_GET_MDWE = 66
    PR_SET_MEMORY_MERGE = 67
    PR_GET_MEMORY_MERGE = 68
    PR_FUTEX_HASH = 78


PR_MCE_KILL_SET = 1
PR_FUTEX_HASH_SET_SLOTS = 1
PR_FUTEX_HASH_GET_SLOTS = 2
PR_FUTEX_HASH_GET_IMMUTABLE = 3
PR_SPEC_PRCTL = 1  # "can be set by prctl": not itself a setting
# PR_GET_SPECULATION_CTRL "which": store bypass, indirect branch
SPEC_WHICH = {"spec_store_bypass": 0, "spec_indirect_branch": 1}
# membarrier registration bits (include/uapi/linux/membarrier.h) and the
# command that makes each: GLOBAL_EXPEDITED, PRIVATE_EXPEDITED,
# PRIVATE_EXPEDITED_SYNC_CORE, PRIVATE_EXPEDITED_RSEQ
MEMBARRIER_CMD_GET_REGISTRATIONS = 1 << 9
MEMBARRIER_REGISTER = (1 << 2, 1 << 4, 1 << 6, 1 << 8)


class sched_attr(ctypes.Structure):
    """struct sched_attr (include/uapi/linux/sched/types.h), SCHED_ATTR_SIZE_VER1."""

    _fields_ = [("size", ctypes.c_uint32), ("sched_policy", ctypes.c_uint32),
                ("sched_flags", ctypes.c_uint64), ("sched_nice", ctypes.c_int32),
                ("sched_priority", ctypes.c_uint32), ("sched_runtime", ctypes.c_uint64),
                ("sched_deadline", ctypes.c_uint64), ("sched_period", ctypes.c_uint64),
                ("sched_util_min", ctypes.c_uint32), ("sched_util_max", ctypes.c_uint32)]


SCHED_FIELDS = [name for name, _ in sched_attr._fields_[1:]]
SCHED_FLAG_RESET_ON_FORK = 0x01
SCHED_FLAG_UTIL_CLAMP = 0x60  # UTIL_CLAMP_MIN | UTIL_CLAMP_MAX: set only if clamps were set
SCHED_FLAG_KEEP = 0x18  # KEEP_POLICY | KEEP_PARAMS: never stored, never set


@dataclasses.dataclass
class ThreadSettings:
    """What each thread has of its own, read from outside."""

    tid: int
    sched: dict[str, int]  # struct sched_attr by field name
    affinity: list[int]  # CPUs
    ioprio: int
    timerslack_ns: int


@dataclasses.dataclass
class Settings:
    """The process's settings (record SETS, since format 1.2)."""

    threads: list[ThreadSettings]
    prctl: dict[str, int]  # PRCTL_SETTINGS name -> value, the leader's
    oom_score_adj: int = 0
    coredump_filter: int = 0x33
    membarrier: int = 0  # registration bits
    futex_slots: int = 0
    futex_immutable: int = 0
    mempolicy: int = 0  # the leader's NUMA policy: MPOL_* | MPOL_F_* (0: MPOL_DEFAULT)
    mempolicy_nodes: bytes = b""  # its nodemask, MEMPOLICY_MAXNODE bits
    autogroup_nice: int | None = None  # of its session's scheduling autogroup (None: not read, before 1.6)


# name -> (get option, get args, set option, how the value is passed to set)
PRCTL_SETTINGS = {
    "dumpable": (Pr.PR_GET_DUMPABLE, (), Pr.PR_SET_DUMPABLE),
    "child_subreaper": (Pr.PR_GET_CHILD_SUBREAPER, "out", Pr.PR_SET_CHILD_SUBREAPER),
    "thp_disable": (Pr.PR_GET_THP_DISABLE, (), Pr.PR_SET_THP_DISABLE),
    "tsc": (Pr.PR_GET_TSC, "out", Pr.PR_SET_TSC),
    "mce_kill": (Pr.PR_MCE_KILL_GET, (), Pr.PR_MCE_KILL),
    "mdwe": (Pr.PR_GET_MDWE, (), Pr.PR_SET_MDWE),
    "memory_merge": (Pr.PR_GET_MEMORY_MERGE, (), Pr.PR_SET_MEMORY_MERGE),
    "spec_store_bypass": (Pr.PR_GET_SPECULATION_CTRL, (0,), Pr.PR_SET_SPECULATION_CTRL),
    "spec_indirect_branch": (Pr.PR_GET_SPECULATION_CTRL, (1,), Pr.PR_SET_SPECULATION_CTRL),
}


MEMPOLICY_MAXNODE = 1024  # bits of the nodemask passed to get/set_mempolicy


def _get_mempolicy(target: Target) -> tuple[int, bytes]:
    size = MEMPOLICY_MAXNODE // 8
    target.write_scratch(bytes(8 + size))
    target.call(NR.get_mempolicy, target.scratch, target.scratch + 8, MEMPOLICY_MAXNODE, 0, 0)
    data = target.read_scratch(8 + size)
    return struct.unpack_from("<i", data)[0], data[8:]


def _failed(ret: int) -> bool:
    return -4096 < ret < 0


def _get_prctl(target: Target, name: str) -> int | None:
    option, args, _ = PRCTL_SETTINGS[name]
    if args == "out":
        target.write_scratch(bytes(8))
        ret = target.call(NR.prctl, option, target.scratch, check=False)
        return None if _failed(ret) else struct.unpack("<i", target.read_scratch(4))[0]
    ret = target.call(NR.prctl, option, *args, check=False)
    return None if _failed(ret) else ret


def _get_prctls(target: Target, names: list[str]) -> dict[str, int | None]:
    """_get_prctl of each of `names`, in one batch (kernel/infect.py) where
    all succeed, as the ones saved at dump do here; from the first that
    fails on, one by one (a failure is a value not there, as above)."""
    calls = []
    for i, name in enumerate(names):
        option, args, _ = PRCTL_SETTINGS[name]
        calls.append((NR.prctl, option, target.scratch + 8 * i) if args == "out" else (NR.prctl, option, *args))
    target.write_scratch(bytes(8 * len(names)))
    try:
        results = target.batch(calls)
    except BatchFailed as err:
        results = err.results
    data, out = target.read_scratch(8 * len(names)), {}
    for i, (name, ret) in enumerate(zip(names, results)):
        out[name] = struct.unpack_from("<i", data, 8 * i)[0] if PRCTL_SETTINGS[name][1] == "out" else ret
    for name in names[len(results):]:
        out[name] = _get_prctl(target, name)
    return out


def _set_prctl(target: Target, name: str, value: int) -> None:
    _, args, option = PRCTL_SETTINGS[name]
    if option == Pr.PR_SET_SPECULATION_CTRL:
        target.call(NR.prctl, option, args[0], value & ~PR_SPEC_PRCTL)
    elif option == Pr.PR_MCE_KILL:
        target.call(NR.prctl, option, PR_MCE_KILL_SET, value)
    else:
        target.call(NR.prctl, option, value)


def _read_int(path: str, base: int = 10) -> int:
    with open(path) as f:
        return int(f.read().strip(), base)


def collect_thread(pid: int, tid: int) -> ThreadSettings:
    attr = sched_attr()
    syscall(NR.sched_getattr, tid, ctypes.byref(attr), ctypes.sizeof(attr), 0)
    sched = {name: getattr(attr, name) for name in SCHED_FIELDS}
    ioprio = syscall(NR.ioprio_get, IOPRIO_WHO_PROCESS, tid)
    slack = _read_int(f"/proc/{tid}/timerslack_ns")  # /proc/TID: the thread's own
    return ThreadSettings(tid, sched, sorted(os.sched_getaffinity(tid)), ioprio, slack)


def collect_settings_seized(target: Target, tids: list[int]) -> Settings:
    """`target` injects into the leader, `tids` are all threads (leader first)."""
    pid = target.pid
    values = {}
    for name in PRCTL_SETTINGS:
        value = _get_prctl(target, name)
        if value is not None:
            values[name] = value
    registrations = target.call(NR.membarrier, MEMBARRIER_CMD_GET_REGISTRATIONS, 0, check=False)
    slots = target.call(NR.prctl, Pr.PR_FUTEX_HASH, PR_FUTEX_HASH_GET_SLOTS, check=False)
    immutable = target.call(NR.prctl, Pr.PR_FUTEX_HASH, PR_FUTEX_HASH_GET_IMMUTABLE, check=False)
    policy, nodes = _get_mempolicy(target)
    return Settings(
        mempolicy=policy, mempolicy_nodes=nodes.rstrip(b"\0") if policy else b"",
        threads=[collect_thread(pid, tid) for tid in tids], prctl=values,
        oom_score_adj=_read_int(f"/proc/{pid}/oom_score_adj"),
        coredump_filter=_read_int(f"/proc/{pid}/coredump_filter", 16),
        autogroup_nice=_autogroup_nice(pid),
        membarrier=0 if _failed(registrations) else registrations,
        futex_slots=0 if _failed(slots) else slots, futex_immutable=0 if _failed(immutable) else immutable)


def _autogroup_nice(pid: int) -> int:
    """The nice value of the process's autogroup: "/autogroup-N nice V"; the
    kernel prints nothing for the default group, whose nice is 0 for good."""
    with open(f"/proc/{pid}/autogroup") as f:
        text = f.read()
    return int(text.rsplit("nice", 1)[1]) if "nice" in text else 0


def restore_autogroup(pid: int, s: Settings, leader_in_tree: bool) -> None:
    """A session leader's autogroup is its own (made by its setsid): its nice
    written back. Another process shares its leader's: one in the tree sets
    it; one outside (the restorer's session, for a root that led none) must
    already have it, else the restore fails by name (writing it would change
    the caller's own session)."""
    if s.autogroup_nice is None or _autogroup_nice(pid) == s.autogroup_nice:
        return
    if os.getsid(pid) == pid:
        _write(f"/proc/{pid}/autogroup", str(s.autogroup_nice), f"pid {pid}: autogroup nice")
    elif not leader_in_tree:
        raise RestoreError(f"pid {pid}: its session's autogroup had nice {s.autogroup_nice}; the session "
                         f"it is restored into (the restorer's, {os.getsid(pid)}) has {_autogroup_nice(pid)}", pid)


def _write(path: str, text: str, what: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError as err:
        raise OSError(err.errno, f"{what}: write {text} to {path}: {err.strerror}") from err


def restore_thread(pid: int, t: ThreadSettings) -> None:
    """From outside: the restorer may set another task's scheduling."""
    attr = sched_attr(size=ctypes.sizeof(sched_attr))
    for name, value in t.sched.items():
        setattr(attr, name, value)
    attr.sched_flags &= ~SCHED_FLAG_KEEP
    if attr.sched_util_min == 0 and attr.sched_util_max in (0, 1024):
        attr.sched_flags &= ~SCHED_FLAG_UTIL_CLAMP
    try:
        syscall(NR.sched_setattr, t.tid, ctypes.byref(attr), 0)
    except OSError as err:
        raise OSError(err.errno, f"thread {t.tid}: scheduling policy {attr.sched_policy} priority "
                                 f"{attr.sched_priority} nice {attr.sched_nice}: {err.strerror}") from err
    try:
        os.sched_setaffinity(t.tid, t.affinity)
    except OSError as err:
        raise OSError(err.errno, f"thread {t.tid}: CPU affinity {t.affinity}: {err.strerror} "
                                 "(a CPU this machine does not have?)") from err
    try:
        syscall(NR.ioprio_set, IOPRIO_WHO_PROCESS, t.tid, t.ioprio)
    except OSError as err:
        raise OSError(err.errno, f"thread {t.tid}: I/O priority {t.ioprio:#x}: {err.strerror}") from err
    _write(f"/proc/{t.tid}/timerslack_ns", str(t.timerslack_ns), f"thread {t.tid}: timer slack")


def restore_settings_seized(target: Target, s: Settings) -> None:
    """Into the rebuilt leader (its threads made), before anything runs.
    dumpable last of the prctl values: a credential change resets it."""
    pid = target.pid
    now = _get_prctls(target, [name for name in s.prctl if name != "dumpable"])
    for name, value in s.prctl.items():
        if name != "dumpable" and now[name] != value:
            _set_prctl(target, name, value)
    for bit in MEMBARRIER_REGISTER:
        if s.membarrier & bit:
            target.call(NR.membarrier, bit, 0)
    if s.futex_slots:
        now = target.call(NR.prctl, Pr.PR_FUTEX_HASH, PR_FUTEX_HASH_GET_SLOTS, check=False)
        if now != s.futex_slots or s.futex_immutable:
            target.call(NR.prctl, Pr.PR_FUTEX_HASH, PR_FUTEX_HASH_SET_SLOTS, s.futex_slots, s.futex_immutable)
    if s.mempolicy:
        size = MEMPOLICY_MAXNODE // 8
        target.write_scratch(s.mempolicy_nodes[:size].ljust(size, b"\0"))
        target.call(NR.set_mempolicy, s.mempolicy, target.scratch, MEMPOLICY_MAXNODE)
    if _read_int(f"/proc/{pid}/oom_score_adj") != s.oom_score_adj:
        _write(f"/proc/{pid}/oom_score_adj", str(s.oom_score_adj), f"pid {pid}: oom_score_adj")
    _write(f"/proc/{pid}/coredump_filter", f"{s.coredump_filter:#x}", f"pid {pid}: coredump_filter")
    for t in s.threads:
        restore_thread(pid, t)


def restore_dumpable_seized(target: Target, s: Settings) -> None:
    if "dumpable" in s.prctl and _get_prctl(target, "dumpable") != s.prctl["dumpable"]:
        _set_prctl(target, "dumpable", s.prctl["dumpable"])


# The task-state protocol (objects/__init__.py TASK_STATE)

def collect_seized(target: Target, tids: list[int], ckpt) -> None:
    ckpt.settings = [collect_settings_seized(target, tids)]


def restore_seized(target: Target, ckpt, tree_pids: set[int]) -> None:
    for s in ckpt.settings:
        restore_autogroup(target.pid, s, os.getsid(target.pid) in tree_pids)
        restore_settings_seized(target, s)
        restore_dumpable_seized(target, s)  # after the credentials, whose change resets it
