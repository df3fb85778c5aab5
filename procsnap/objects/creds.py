"""Credentials of every thread: real/effective/saved/fs uids and gids,
supplementary groups, the five capability sets, securebits, no_new_privs;
and the process's loginuid.

Restored by injection into each thread of the rebuilt process (a raw
set*id or capset changes only the calling thread), after everything that
needs the restorer's privileges inside it (clone3 with set_tid, locks) and
before pdeathsig and dumpable, which a credential change resets. Never more
than the restoring user has: capabilities beyond the restorer's own are
refused (RestoreError, by name), and other uids only with
--allow-other-owner (restorer/verify.py), which only root may use.

The order, for a thread whose credentials differ from the restorer's:

    setgroups                          (needs CAP_SETGID)
    PR_CAPBSET_DROP, each dropped cap  (needs CAP_SETPCAP)
    PR_SET_SECUREBITS  saved|KEEP_CAPS so the uid change keeps the
                                       permitted set (effective is cleared)
    setresgid, setresuid, setfsgid, setfsuid
    capset  eff = prm = the restorer's  CAP_SETPCAP effective again
    PR_CAP_AMBIENT_RAISE, each ambient cap
    PR_SET_SECUREBITS  saved            (its locks too)
    capset  the saved eff, prm, inh
    PR_SET_NO_NEW_PRIVS                 if it was set (it cannot be unset)
"""

from __future__ import annotations

from .. import records as dataclasses  # the dataclasses API, cheap to import
import os
import struct
import threading

from ..errors import RestoreError
from ..kernel import infect, proc
from ..kernel.arch.x86_64 import NR
from ..kernel.infect import Target

PR_CAPBSET_DROP = 24
PR_GET_SECUREBITS = 27
PR_SET_SECUREBITS = 28
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
SECBIT_KEEP_CAPS = 1 << 4
SECBITS_UNLOCKED = 1 << 0 | 1 << 2  # NOROOT, NO_SETUID_FIXUP (include/uapi/linux/securebits.h)
# struct __user_cap_header_struct, _LINUX_CAPABILITY_VERSION_3 (include/uapi/linux/capability.h)
CAP_HEADER = struct.Struct("<Ii")
CAP_VERSION_3 = 0x20080522
# two struct __user_cap_data_struct: effective, permitted, inheritable (low, then high 32 bits)
CAP_DATA = struct.Struct("<6I")


@dataclasses.dataclass
class ThreadCreds:
    tid: int
    uids: list[int]  # real, effective, saved, fs
    gids: list[int]
    groups: list[int]
    cap_inh: int
    cap_prm: int
    cap_eff: int
    cap_bnd: int
    cap_amb: int
    no_new_privs: int = 0
    securebits: int = 0  # the leader's, injected at dump; the same for every thread made by it


@dataclasses.dataclass
class Creds:
    """Record CRED (since format 1.2)."""

    threads: list[ThreadCreds]
    loginuid: int = -1  # 4294967295 is "unset"


def read_thread_creds(pid: int, tid: int) -> ThreadCreds:
    status = proc.read_status(f"{pid}/task/{tid}")
    return ThreadCreds(
        tid=tid, uids=[int(x) for x in status["Uid"].split()], gids=[int(x) for x in status["Gid"].split()],
        groups=sorted(int(x) for x in status.get("Groups", "").split()),
        cap_inh=int(status["CapInh"], 16), cap_prm=int(status["CapPrm"], 16), cap_eff=int(status["CapEff"], 16),
        cap_bnd=int(status["CapBnd"], 16), cap_amb=int(status["CapAmb"], 16),
        no_new_privs=int(status.get("NoNewPrivs", "0")))


def collect_creds_seized(target: Target, tids: list[int]) -> Creds:
    bits = target.call(NR.prctl, PR_GET_SECUREBITS)  # prctl
    threads = [dataclasses.replace(read_thread_creds(target.pid, tid), securebits=bits) for tid in tids]
    with open(f"/proc/{target.pid}/loginuid") as f:
        loginuid = int(f.read().strip())
    return Creds(threads, loginuid)


def _same(a: ThreadCreds, b: ThreadCreds) -> bool:
    return dataclasses.replace(a, tid=0) == dataclasses.replace(b, tid=0)


def _caps(value: int) -> list[int]:
    return [bit for bit in range(64) if value >> bit & 1]


def check_creds(creds: list[Creds], pid: int) -> None:
    """Refused before anything is made: capabilities the restorer lacks."""
    mine = read_thread_creds(os.getpid(), threading.get_native_id())
    for c in creds:
        for t in c.threads:
            for name in ("cap_prm", "cap_eff", "cap_inh", "cap_bnd", "cap_amb"):
                extra = getattr(t, name) & ~(mine.cap_bnd if name == "cap_bnd" else mine.cap_prm)
                if extra:
                    raise RestoreError(f"pid {pid}: thread {t.tid} had capabilities {_caps(extra)} in its "
                                       f"{name[4:]} set, which the restorer does not have; a restore never "
                                       "gives more than the restoring user has", pid)


def restore_thread_creds_seized(target: Target, saved: ThreadCreds) -> None:
    """Into thread `target` (its scratch area shared with the leader)."""
    now = read_thread_creds(target.pid, saved.tid)
    now.securebits = target.call(NR.prctl, PR_GET_SECUREBITS)
    if _same(now, saved):
        return
    if saved.groups != now.groups:
        target.write_scratch(struct.pack(f"<{len(saved.groups)}I", *saved.groups) if saved.groups else b"\0")
        target.call(NR.setgroups, len(saved.groups), target.scratch)
    for cap in _caps(now.cap_bnd & ~saved.cap_bnd):
        target.call(NR.prctl, PR_CAPBSET_DROP, cap)
    # while switching: NOROOT and NO_SETUID_FIXUP as saved, KEEP_CAPS, no locks
    target.call(NR.prctl, PR_SET_SECUREBITS, (saved.securebits & SECBITS_UNLOCKED) | SECBIT_KEEP_CAPS)
    target.call(NR.setresgid, *saved.gids[:3])
    target.call(NR.setresuid, *saved.uids[:3])
    target.call(NR.setfsgid, saved.gids[3])
    target.call(NR.setfsuid, saved.uids[3])
    _capset(target, now.cap_prm, now.cap_prm, saved.cap_inh | now.cap_inh)
    for cap in _caps(saved.cap_amb):  # before the securebits, which may forbid raising
        target.call(NR.prctl, PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap)
    target.call(NR.prctl, PR_SET_SECUREBITS, saved.securebits)
    _capset(target, saved.cap_eff, saved.cap_prm, saved.cap_inh)
    if saved.no_new_privs:
        target.call(NR.prctl, PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    after = read_thread_creds(target.pid, saved.tid)
    after.securebits = target.call(NR.prctl, PR_GET_SECUREBITS)
    if not _same(after, saved):
        raise RestoreError(f"pid {target.pid}: thread {saved.tid}: credentials expected {saved} found {after}",
                           target.pid)


def _capset(target: Target, eff: int, prm: int, inh: int) -> None:
    lo, hi = 0xFFFFFFFF, 32
    data = CAP_DATA.pack(eff & lo, prm & lo, inh & lo, eff >> hi, prm >> hi, inh >> hi)
    target.write_scratch(CAP_HEADER.pack(CAP_VERSION_3, 0) + data)
    target.call(NR.capset, target.scratch, target.scratch + CAP_HEADER.size)


def restore_loginuid(pid: int, creds: Creds) -> None:
    with open(f"/proc/{pid}/loginuid") as f:
        if int(f.read().strip()) == creds.loginuid:
            return
    try:
        with open(f"/proc/{pid}/loginuid", "w") as f:
            f.write(str(creds.loginuid))
    except OSError as err:
        raise RestoreError(f"pid {pid}: loginuid {creds.loginuid}: {err.strerror} (the kernel lets it be set "
                           "once, by a process with CAP_AUDIT_CONTROL)", pid) from err


def restore_creds_seized(target: Target, creds: Creds) -> None:
    """Every thread's credentials (threads made, stopped), then loginuid."""
    restore_loginuid(target.pid, creds)
    for saved in creds.threads:
        if saved.tid == target.pid:
            restore_thread_creds_seized(target, saved)
            continue
        with infect.infected(saved.tid, [], scratch_area=False, put_back=False, gadget=target.call.gadget) as t:
            restore_thread_creds_seized(Target(target.pid, t.call, target.scratch), saved)


# The task-state protocol (objects/__init__.py TASK_STATE)

def collect_seized(target: Target, tids: list[int], ckpt) -> None:
    ckpt.creds = [collect_creds_seized(target, tids)]


def check_restore(ckpt) -> None:
    check_creds(ckpt.creds, ckpt.task.pid)


def restore_seized(target: Target, ckpt, tree_pids: set[int]) -> None:
    for creds in ckpt.creds:
        restore_creds_seized(target, creds)
