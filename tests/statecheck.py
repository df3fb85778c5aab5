"""The state check: everything the kernel shows about a process tree,
captured before the dump and after the restore, and compared.

    capture_tree(pids) -> {pid: {key: value}}     every process of a tree
    state_problems(before, after) -> [str]         what changed, key by key

A key names where the value comes from ("status.CapEff", "stat.policy",
"fdinfo.5.lock", "prctl.child_subreaper", "task.1234.status.CapEff", ...),
so a failure says exactly which piece of state a restore lost. Values are
read from /proc and, where the kernel shows them only to the process
itself, by syscalls injected into the stopped process (prctl PR_GET_*,
membarrier), with procsnap's own injector.

What legitimately differs after a restore is listed once, below, each with
its reason (IGNORED_*). Everything else must be equal: a new kind of state
that procsnap forgets fails every test that holds it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import struct
import subprocess
import sys
import zlib

from procsnap import nsworker
from procsnap.kernel import infect, proc, ptrace
from procsnap.kernel.arch.x86_64 import NR
from procsnap.objects.settings import sched_attr  # struct sched_attr, declared once
from procsnap.objects import seccomp

# --------------------------------------------------------------------------
# What legitimately differs, and why

IGNORED_STATUS = {
    "State": "running or sleeping at the instant read (stopped and zombie are kept, see _state)",
    "FDSize": "capacity of the fd table, grown by the restorer's own descriptors; no program sees it",
    "VmPeak": "peak address-space size, reached while the restorer rebuilt the process",
    "VmHWM": "peak resident memory: accounting",
    "VmRSS": "resident memory: pages not yet touched again are not resident (accounting)",
    "RssAnon": "resident memory: accounting",
    "RssFile": "resident memory: accounting",
    "RssShmem": "resident memory: accounting",
    "VmPTE": "page-table size follows the resident pages: accounting",
    "VmSwap": "swapped-out pages: accounting",
    "VmPin": "pages pinned at the instant read (procsnap's own reads pin them briefly)",
    "SigQ": "signals queued by every process of the user against its limit: a per-user counter",
    "voluntary_ctxt_switches": "accounting",
    "nonvoluntary_ctxt_switches": "accounting",
}
IGNORED_ROOT_STATUS = {
    "PPid": "the root's parent is whoever restores it",
}
# /proc/PID/stat fields that are state, by their proc(5) number (1-based)
STAT_FIELDS = {
    "ppid": 4, "pgrp": 5, "session": 6, "tty_nr": 7, "tpgid": 8, "flags": 9, "priority": 18,
    "nice": 19, "num_threads": 20, "exit_signal": 38, "rt_priority": 40, "policy": 41,
    "start_code": 26, "end_code": 27, "start_stack": 28, "start_data": 45, "end_data": 46,
    "start_brk": 47, "arg_start": 48, "arg_end": 49, "env_start": 50, "env_end": 51,
    "exit_code": 52,  # a zombie's wait status: exited with a code, or killed by a signal
}
# Task flags (include/linux/sched.h) that tell how a process came to be or
# what it did, not what it is:
PF_FORKNOEXEC = 0x40  # "forked but didn't exec": the restored copy is cloned, never exec'd
PF_SUPERPRIV = 0x100  # "used super-user privileges": the restorer's work in it
PF_RANDOMIZE = 0x400000  # ASLR at exec: the layout itself is in maps, compared exactly
IGNORED_PF = PF_FORKNOEXEC | PF_SUPERPRIV | PF_RANDOMIZE
IGNORED_FDINFO = {
    "ino": "the inode of an object made again (pipe, socket, memfd, unlinked file) is new; "
           "which fds share one object is compared through the fd table",
    "eventfd-id": "a per-boot counter naming the eventfd context",
    "it_value": "a timer's time left runs on; its interval and clock are compared",
}
# The inode behind an fd of a file unlinked while open (made again by the
# restore: nothing else holds its state) is compared by its stat, except:
IGNORED_FDSTAT = {
    "st_ino": "a file made again has a new inode",
    "st_dev": "compared through the fd's link and mount",
    "st_ctime": "set by the kernel to the time the inode changed: the restore's own writes",
    "st_blocks": "allocation is the filesystem's; holes are checked by the targets (SEEK_HOLE)",
}
FDSTAT_FIELDS = ("st_mode", "st_uid", "st_gid", "st_size", "st_nlink", "st_rdev", "st_atime_ns", "st_mtime_ns")
DELETED = " (deleted)"
# fdinfo lines whose value holds "dev:ino" of the object they watch or lock
INODE_FIELD = re.compile(r"\b[0-9a-f]{2,}:[0-9a-f]{2,}:\d+\b")
INO_WORD = re.compile(r"\bino:\s*[0-9a-f]+")
SDEV_WORD = re.compile(r"\bsdev:\s*[0-9a-f]+")


# Socket options read for the state check, by level: every option number
# of the level (getsockopt answers the ones a socket has) but these:
IGNORED_SOCKOPTS = {
    (1, 4): "SO_ERROR: reading it clears the pending error",
    (1, 17): "SO_PEERCRED: the peer's pid and ids as of the connection; a restored pair is made by the restorer",
    (1, 31): "SO_PEERSEC: as SO_PEERCRED",
    (1, 59): "SO_PEERGROUPS: as SO_PEERCRED",
    (1, 77): "SO_PEERPIDFD: makes a new pidfd",
    (1, 26): "SO_GET_FILTER: compared as sock.N.filter",
    (1, 49): "SO_INCOMING_CPU: the CPU that last handled a packet",
    (1, 55): "SO_MEMINFO: memory accounting",
    (1, 56): "SO_INCOMING_NAPI_ID: the device queue that last handled a packet",
    (1, 57): "SO_COOKIE: a per-boot counter naming the socket",
    (6, 11): "TCP_INFO: counters and timers (its state is compared as sock.N.tcp_state)",
    (6, 21): "TCP_QUEUE_SEQ: a sequence number (live connections: the TCP_REPAIR issue)",
    (6, 24): "TCP_TIMESTAMP: the clock",
    (6, 26): "TCP_CC_INFO: counters",
    (6, 28): "TCP_SAVED_SYN: reading it frees it",
    (6, 35): "TCP_ZEROCOPY_RECEIVE: receives",
    (263, 6): "PACKET_STATISTICS: reading it resets the counters",
}
SOCKOPT_LEVELS = {1: range(1, 85), 0: range(1, 60), 41: range(1, 80), 6: range(1, 45),
                  17: (*range(1, 3), *range(100, 106)), 136: (10, 11), 255: (1,), 263: range(1, 26),
                  270: range(1, 13)}


# --------------------------------------------------------------------------
# Reading


def _read(path: str, binary: bool = False):
    try:
        with open(path, "rb" if binary else "r") as f:
            return f.read()
    except FileNotFoundError:
        raise
    except OSError as err:
        return f"<{os.strerror(err.errno)}>"


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except FileNotFoundError:
        raise
    except OSError as err:
        return f"<{os.strerror(err.errno)}>"


def _status(path: str, root: bool) -> dict[str, str]:
    out = {}
    for line in _read(path).splitlines():
        key, _, value = line.partition(":")
        if key in IGNORED_STATUS or (root and key in IGNORED_ROOT_STATUS):
            continue
        out[f"status.{key}"] = " ".join(value.split())
    return out


# Waits that swap in a temporary signal mask (rt_sigtimedwait, rt_sigsuspend,
# pselect6, ppoll, epoll_pwait, io_pgetevents, epoll_pwait2; x86_64
# numbers). While a task waits in one, status shows the temporary mask as
# SigBlk (rt_sigtimedwait: without the signals it waits for), and
# PTRACE_GETSIGMASK the one it goes back to (saved_sigmask; real_blocked,
# put back when the interrupt ends the wait): the mask a restored task has
# until it makes the call again (nginx's master in sigsuspend, sigwait).
# That one is compared.
MASK_SWAPPING_WAITS = frozenset((128, 130, 270, 271, 281, 333, 441))


def _sigblk(pid: int, tid: int, shown: str) -> str:
    """status.SigBlk of a thread, the mask it goes back to if it waits in
    a call of MASK_SWAPPING_WAITS (read with it seized, stopped)."""
    try:
        nr = _read(f"/proc/{pid}/task/{tid}/syscall").split()[0]
        if not nr.isdigit() or int(nr) not in MASK_SWAPPING_WAITS:
            return shown
        stopped_by = ptrace.freeze(tid)
    except (OSError, IndexError) as err:
        return f"<cannot freeze: {err}>"
    try:
        return shown if stopped_by else f"{ptrace.get_sigmask(tid):016x}"
    finally:
        ptrace.detach(tid)


def _state(stat_state: str) -> str:
    return "live" if stat_state in "RSD" else stat_state


def _stat(path: str, root: bool) -> dict[str, str]:
    text = _read(path)
    fields = ["", ""] + text.rpartition(")")[2].split()  # fields[n-1] is proc(5) field n
    out = {"stat.state": _state(fields[2])}
    for name, number in STAT_FIELDS.items():
        if root and name == "ppid":
            continue
        value = fields[number - 1]
        if name == "flags":
            value = f"{int(value) & ~IGNORED_PF:#x}"
        out[f"stat.{name}"] = value
    return out


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
SYS_ioprio_get = 252
SYS_sched_getattr = 315
IOPRIO_WHO_PROCESS = 1


def _sched(tid: int) -> dict[str, str]:
    attr = sched_attr()
    out = {}
    if _libc.syscall(SYS_sched_getattr, tid, ctypes.byref(attr), ctypes.sizeof(attr), 0) == 0:
        out["sched_attr"] = " ".join(f"{name}={getattr(attr, name)}" for name, _ in attr._fields_[1:])
    else:
        out["sched_attr"] = f"<{os.strerror(ctypes.get_errno())}>"
    prio = _libc.syscall(SYS_ioprio_get, IOPRIO_WHO_PROCESS, tid)
    out["ioprio"] = str(prio) if prio >= 0 else f"<{os.strerror(ctypes.get_errno())}>"
    try:
        out["affinity"] = ",".join(map(str, sorted(os.sched_getaffinity(tid))))
    except OSError as err:
        out["affinity"] = f"<{os.strerror(err.errno)}>"
    return out


def _mount_points(pid: int) -> dict[str, str]:
    out = {}
    for line in _read(f"/proc/{pid}/mountinfo").splitlines():
        parts = line.split()
        out[parts[0]] = parts[4]
    return out


def _mqueue(pid: int, fd: str) -> bool:
    from procsnap.kernel import ipc

    try:
        return ipc.fs_type(f"/proc/{pid}/fd/{fd}") == ipc.MQUEUE_MAGIC
    except OSError:
        return False


def _fdinfo(pid: int) -> dict[str, str]:
    out = {}
    mounts = _mount_points(pid)
    for name in sorted(os.listdir(f"/proc/{pid}/fdinfo"), key=int):
        try:
            text = _read(f"/proc/{pid}/fdinfo/{name}")
            target = _readlink(f"/proc/{pid}/fd/{name}")
        except FileNotFoundError:
            continue
        if target.endswith(DELETED) and not target.startswith("/memfd:"):  # a memfd's times are its own
            out[f"fdstat.{name}"] = _fd_stat(f"/proc/{pid}/fd/{name}")
        locks = []
        for line in text.splitlines():
            key, _, value = line.partition(":")
            value = value.strip()
            if key in IGNORED_FDINFO:
                continue
            if key == "mnt_id":
                # the mount, by where it is: internal mounts (pipefs, sockfs,
                # anon_inodefs, an IPC namespace's mqueue fs: an mq fd's link is
                # /NAME) are not in mountinfo and keep their kind
                value = mounts.get(value, "internal" if not target.startswith("/") or _mqueue(pid, name)
                                   else f"<mount {value}?>")
            elif key == "lock":
                locks.append(_lock_line(value))
                continue
            elif key == "tfd":  # the watched object's filesystem (pipefs, anon_inodefs ...) stays: its kind
                value = INO_WORD.sub("ino:-", value)
            elif key in ("inotify", "fanotify ino"):
                value = SDEV_WORD.sub("sdev:-", INO_WORD.sub("ino:-", value))
            elif key == "ticks" and "it_interval: (0, 0)" not in text:
                continue  # a periodic timer's expirations go on accumulating while it waits
            # repeated keys (an epoll's tfd lines, inotify's watches): all of
            # them, in a fixed order (the kernel lists them by object address)
            full = f"fdinfo.{name}.{key}"
            out[full] = " | ".join(sorted(out[full].split(" | ") + [value])) if full in out else value
        if locks:
            out[f"fdinfo.{name}.lock"] = " | ".join(sorted(locks))
    return out


def _tty_settings(pid: int) -> dict[str, str]:
    """Each terminal fd's settings, through a copy of the fd (pidfd_getfd:
    opening a master again would make a new pty): termios and window size,
    a master's index, packet mode and lock, a slave's exclusive mode."""
    from procsnap.kernel import tty

    out = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            st = os.stat(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        dev = (os.major(st.st_rdev), os.minor(st.st_rdev)) if st.st_rdev else None
        if dev != tty.PTMX and dev != tty.DEV_TTY and not tty.is_pts(st.st_rdev):
            continue
        try:
            fd = tty.copy_fd(pid, int(name))
        except OSError as err:
            out[f"tty.{name}"] = f"<{os.strerror(err.errno)}>"
            continue
        try:
            values = [f"termios {bytes(tty.get_termios(fd)).hex()}", f"winsize {tty.get_winsize(fd)}"]
            if dev == tty.PTMX:
                values += [f"index {tty.get_ptn(fd)}", f"packet {tty.get_packet(fd)}", f"locked {tty.get_locked(fd)}"]
            elif dev != tty.DEV_TTY:
                values.append(f"exclusive {tty.get_exclusive(fd)}")
            out[f"tty.{name}"] = ", ".join(values)
        except OSError as err:
            out[f"tty.{name}"] = f"<{err}>"
        finally:
            os.close(fd)
    return out


def _fd_stat(path: str) -> str:
    try:
        st = os.stat(path)
    except OSError as err:
        return f"<{os.strerror(err.errno)}>"
    return " ".join(f"{field}={getattr(st, field):o}" if field == "st_mode" else f"{field}={getattr(st, field)}"
                    for field in FDSTAT_FIELDS)


def _lock_line(text: str) -> str:
    """'1: POSIX  ADVISORY  WRITE 1234 08:01:5678 0 EOF' -> the lock without
    its ordinal and the file's inode (the file is named by the fd)."""
    words = text.split()
    if words and words[0].endswith(":"):
        words = words[1:]
    return " ".join("<file>" if INODE_FIELD.fullmatch(w) else w for w in words)


def _map_files(pid: int) -> dict[str, str]:
    """The mode of each map_files link: the access mode of the open file
    behind a file mapping (r--s backed read-only cannot be mprotected writable)."""
    out = {}
    try:
        names = os.listdir(f"/proc/{pid}/map_files")
    except OSError as err:
        return {"map_files": f"<{os.strerror(err.errno)}>"}
    for name in names:
        try:
            mode = os.lstat(f"/proc/{pid}/map_files/{name}").st_mode & 0o777
        except FileNotFoundError:
            continue
        out[f"map_files.{name}"] = f"{mode:o}"
    return out


def _memory_locks(pid: int) -> dict[str, str]:
    """Each area's lock and guard flags from smaps ("lo", "lf", "gu"), and
    the pages of its guard regions from pagemap (bit 58)."""
    out = {}
    fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        for m in proc.read_smaps(pid):
            kept = [f for f in m.vmflags if f in ("lo", "lf", "gu")]
            if kept:
                out[f"smaps.{m.start:x}.flags"] = " ".join(kept)
            if "gu" in m.vmflags:
                out[f"pagemap.{m.start:x}.guards"] = str(proc.guard_pages(proc.read_pagemap(fd, m.start, m.end)))
    finally:
        os.close(fd)
    return out


def _def_flags(target) -> str:
    """mm->def_flags (mlockall MCL_FUTURE/MCL_ONFAULT): the lock flags of a
    shared anonymous page mapped by the process, unmapped again."""
    addr = target.call(NR.mmap, 0, 4096, 0, 0x21, -1, 0)  # PROT_NONE, MAP_SHARED | MAP_ANONYMOUS
    try:
        flags = next((m.vmflags for m in proc.read_smaps(target.pid) if m.start == addr), ())
    finally:
        target.call(NR.munmap, addr, 4096)
    return " ".join(f for f in flags if f in ("lo", "lf"))


def _namespaces(pid: int) -> dict[str, str]:
    out = {}
    for name in sorted(os.listdir(f"/proc/{pid}/ns")):
        mine = _readlink(f"/proc/self/ns/{name}")
        theirs = _readlink(f"/proc/{pid}/ns/{name}")
        out[f"ns.{name}"] = "same as the host's" if theirs == mine else "its own"
    return out


# What a UTS and an IPC namespace hold that no /proc/PID file shows (read by nsenter, from inside)
OWN_NAMESPACE_FILES = {
    "uts": ["/proc/sys/kernel/hostname", "/proc/sys/kernel/domainname"],
    "ipc": [f"/proc/sys/kernel/{n}" for n in ("shmmax", "shmall", "shmmni", "shm_rmid_forced", "msgmax", "msgmni",
                                              "msgmnb", "sem")] + ["/proc/sys/fs/mqueue", "/proc/sysvipc"],
    "cgroup": ["/proc/self/cgroup"],  # the checker's cgroups, relative to the namespace's root
}


IPCSTATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ipcstate.py")


# Of /proc/sysvipc/*: what an object is, not when it was made or last used, nor by which pid (the
# restorer makes it again; the times and cpid/lpid are the new object's)
SYSVIPC_FIELDS = ("key", "shmid", "msqid", "semid", "perms", "size", "nattch", "cbytes", "qnum", "nsems",
                  "uid", "gid", "cuid", "cgid")


def _sysvipc_ids(text: str) -> str:
    out, names = [], {}
    for line in text.splitlines():
        path, _, rest = line.partition(":")
        if not path.startswith("/proc/sysvipc/"):
            out.append(line)
            continue
        fields = rest.split()
        if path not in names:  # its first line: the header
            names[path] = fields
            continue
        row = dict(zip(names[path], fields))
        out.append(path + ": " + " ".join(f"{k}={row[k]}" for k in SYSVIPC_FIELDS if k in row))
    return "\n".join(out)


def _own_namespaces(pid: int) -> dict[str, str]:
    """The state of the UTS, IPC and time namespaces the root has of its
    own (not the checker's): hostname and domainname, ipc sysctls and
    objects, clock offsets."""
    out = {}
    for kind, files in OWN_NAMESPACE_FILES.items():
        if _readlink(f"/proc/{pid}/ns/{kind}") == _readlink(f"/proc/self/ns/{kind}"):
            continue
        r = subprocess.run(["nsenter", "-t", str(pid), f"--{kind}", "grep", "-rH", "", *files],
                           capture_output=True, text=True)
        out[f"ns.{kind}.state"] = _sysvipc_ids(r.stdout) + r.stderr
        if kind == "ipc":  # what the objects hold: messages, semaphore values, bytes, queue attributes
            r = subprocess.run(["nsenter", "-t", str(pid), "--ipc", sys.executable, IPCSTATE],
                               capture_output=True, text=True)
            out["ns.ipc.objects"] = r.stdout + r.stderr
    if _readlink(f"/proc/{pid}/ns/time") != _readlink("/proc/self/ns/time"):
        out["ns.time.offsets"] = _read(f"/proc/{pid}/timens_offsets")
    if _readlink(f"/proc/{pid}/ns/mnt") != nsworker.host_namespaces().get("mnt"):
        out.update(_own_mounts(pid))
    # the caller's network namespace also in a worker that entered the tree's
    if _readlink(f"/proc/{pid}/ns/net") != nsworker.host_namespaces().get("net"):
        out.update(_own_net(pid))
    return out


# Of `ip -j` output, what the kernel makes up anew for a device made again the same way: the
# peer's ifindex and namespace id (the veth's end outside is the restorer's new one), the
# address lifetimes that count down, and the tentative state of an address in DAD
IGNORED_NET_KEYS = ("link_index", "link_netnsid", "tentative")
IGNORED_NFT_KEYS = ("handle", "metainfo")  # nftables' handles: the kernel's numbering of what a table holds
NET_COMMANDS = {  # ns.net.KEY: the command whose output, normalized, is compared
    "links": ["ip", "-j", "-d", "link", "show"],
    "addrs": ["ip", "-j", "addr", "show"],
    "routes4": ["ip", "-j", "-4", "route", "show", "table", "all"],
    "routes6": ["ip", "-j", "-6", "route", "show", "table", "all"],
    "rules4": ["ip", "-j", "-4", "rule", "show"],
    "rules6": ["ip", "-j", "-6", "rule", "show"],
    "neighbours": ["ip", "-j", "neigh", "show", "nud", "permanent"],
    "nft": ["nft", "-j", "list", "ruleset"],
    "sysctls": ["sh", "-c", "find /proc/sys/net -type f -perm -u+w -exec grep -H '' {} + 2>/dev/null | sort"],
}


def _net_normalized(data, ignored=IGNORED_NET_KEYS):
    import json

    if isinstance(data, dict):
        return {k: ("forever" if v == 4294967295 else "finite") if k.endswith("_life_time") else
                _net_normalized(v, ignored) for k, v in data.items() if k not in ignored}
    if isinstance(data, list):
        items = [_net_normalized(x, ignored) for x in data]
        return sorted(items, key=lambda x: json.dumps(x, sort_keys=True))
    return data


def _own_net(pid: int) -> dict[str, str]:
    """The network namespace the root has of its own, read from inside
    (nsenter --net): devices, addresses, routes of every table, rules,
    permanent neighbours, the nftables ruleset and every writable sysctl."""
    import json

    out = {}
    for key, argv in NET_COMMANDS.items():
        r = subprocess.run(["nsenter", "-t", str(pid), "--net", *argv], capture_output=True, text=True)
        text = r.stdout
        if argv[0] != "sh" and r.returncode == 0:
            ignored = IGNORED_NFT_KEYS if key == "nft" else IGNORED_NET_KEYS
            text = json.dumps(_net_normalized(json.loads(text or "[]"), ignored), sort_keys=True, indent=0)
        out[f"ns.net.{key}"] = text + r.stderr
    return out


def _own_mounts(pid: int) -> dict[str, str]:
    """A mount namespace of the tree's own: its mountinfo with mount ids
    (a mount's parent by its point), peer group numbers and the devices of
    mounts that are not the host's renumbered in order; and the contents
    of each tmpfs that is not the host's (names, kinds, modes, owners,
    sizes, allocated bytes, times, a checksum or a symlink's target), read
    from inside without touching access times."""
    host = nsworker.host_mountinfo() if nsworker.inside() else _read("/proc/self/mountinfo")
    host_devs = {line.split()[2] for line in host.splitlines()}
    mounts = {}
    for line in _read(f"/proc/{pid}/mountinfo").splitlines():
        left, _, right = line.partition(" - ")
        f = left.split()
        mounts[f[0]] = (f[1], f[2], f[3], f[4], f[5], f[6:], right)
    def stacked(mid):  # how many mounts under it are at the same point
        parent = mounts.get(mounts[mid][0])
        return 0 if parent is None or parent[3] != mounts[mid][3] else 1 + stacked(mounts[mid][0])
    order = sorted(mounts, key=lambda mid: (mounts[mid][3], stacked(mid)))
    numbers: dict[str, str] = {}
    def renumber(word):
        return numbers.setdefault(word, f"{word.split(':')[0]}-{len(numbers)}")
    out, tmpfs = {}, {}
    for mid in order:
        parent, dev, root, point, opts, optional, right = mounts[mid]
        fstype = right.split()[0]
        if dev not in host_devs:
            if fstype == "tmpfs" and root == "/":
                tmpfs.setdefault(dev, point)
            dev = renumber(f"dev:{dev}")
        groups = " ".join(renumber(o) if ":" in o else o for o in optional)
        on = mounts[parent][3] if parent in mounts else "-"
        out[f"ns.mnt.mount {point} [{stacked(mid)}]"] = f"on {on} {dev} {root} {opts} {groups or 'private'} - {right}"
    if tmpfs:
        r = subprocess.run(["nsenter", "-t", str(pid), "-m", "python3", "-c", TMPFS_LISTING, *tmpfs.values()],
                           capture_output=True, text=True)
        for line in r.stdout.splitlines():
            key, _, value = line.partition("\t")
            out[f"ns.mnt.tmpfs {key}"] = value
        if r.returncode or r.stderr:
            out["ns.mnt.tmpfs"] = f"exit {r.returncode}: {r.stderr}"
    return out


# Run inside the mount namespace: every entry of each tmpfs (not below its submounts), with O_NOATIME
TMPFS_LISTING = r"""
import hashlib, os, stat, sys
NOATIME = 0o1000000
def walk(top, rel, dev):
    fd = os.open(os.path.join(top, rel), os.O_RDONLY | os.O_DIRECTORY | NOATIME)
    try:
        for name in sorted(os.listdir(fd)):
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            atime = st.st_atime_ns
            if stat.S_ISLNK(st.st_mode):  # readlink sets a link's atime (relatime: while atime <= ctime, and a
                atime = "-"               # restored link's ctime is the restore's): the dump's and ours
                target = os.readlink(name, dir_fd=fd)
            path = os.path.join(rel, name)
            what = ""
            if st.st_dev != dev:
                print(f"{top}/{path}\ta mount point"); continue
            if stat.S_ISREG(st.st_mode):
                f = os.open(name, os.O_RDONLY | NOATIME, dir_fd=fd)
                h = hashlib.sha256()
                while chunk := os.read(f, 1 << 20):
                    h.update(chunk)
                os.close(f)
                what = h.hexdigest()[:16]
            elif stat.S_ISLNK(st.st_mode):
                what = "-> " + target
            print(f"{top}/{path}\tmode {st.st_mode:o} uid {st.st_uid} gid {st.st_gid} size {st.st_size} "
                  f"allocated {st.st_blocks * 512} mtime {st.st_mtime_ns} atime {atime} {what}")
            if stat.S_ISDIR(st.st_mode):
                walk(top, path, dev)
    finally:
        os.close(fd)
for top in sys.argv[1:]:
    st = os.stat(top)
    print(f"{top}\tmode {st.st_mode:o} uid {st.st_uid} gid {st.st_gid} mtime {st.st_mtime_ns} atime {st.st_atime_ns}")
    walk(top, "", st.st_dev)
"""


def _autogroup(pid: int) -> str:
    # "/autogroup-123 nice 0": the group is made again by setsid, with a new
    # number; its nice value is state. The kernel prints nothing for the
    # default group (of processes that never called setsid, and of a restored
    # root whose session was outside the tree, when the restorer is in it):
    # its nice is 0 and cannot be changed (sched_group_set_shares refuses the
    # root task group), so "" is nice 0.
    text = _read(f"/proc/{pid}/autogroup")
    if text == "":
        return "0"
    return text.split("nice")[-1].strip() if "nice" in text else text.strip()


# prctl PR_GET_* (include/uapi/linux/prctl.h): (option, arg2 is an out pointer, extra args)
PRCTL_GETS = {
    "pdeathsig": (2, True, ()),
    "dumpable": (3, False, ()),
    "keepcaps": (7, False, ()),
    "tsc": (25, True, ()),
    "securebits": (27, False, ()),
    "timerslack": (30, False, ()),
    "mce_kill": (34, False, ()),
    "child_subreaper": (37, True, ()),
    "no_new_privs": (39, False, ()),
    "thp_disable": (42, False, ()),
    "spec_store_bypass": (52, False, (0,)),
    "spec_indirect_branch": (52, False, (1,)),
    "spec_l1d_flush": (52, False, (2,)),
    "mdwe": (66, False, ()),
    "memory_merge": (68, False, ()),
    "shadow_stack_status": (74, True, ()),
    "futex_hash_slots": (78, False, (2,)),  # PR_FUTEX_HASH, PR_FUTEX_HASH_GET_SLOTS
}
MEMBARRIER_CMD_GET_REGISTRATIONS = 1 << 9
SYS_membarrier = 324
SYS_get_mempolicy = 239
F_GETSIG, F_GETOWN_EX = 11, 16  # fcntl (include/uapi/asm-generic/fcntl.h)
SYS_kcmp = 312
KCMP_FILES, KCMP_FS = 2, 3


def _injected(pid: int) -> dict[str, str]:
    """What only the process itself can ask the kernel: injected, then put back."""
    out = {}
    try:
        stopped_by = ptrace.freeze(pid)
    except OSError as err:
        return {"prctl": f"<cannot freeze: {err}>"}
    try:
        if stopped_by:
            return {"prctl": f"<in a group-stop by signal {stopped_by}>"}
        with infect.infected(pid, proc.read_maps(pid)) as target:
            for name, (option, out_ptr, extra) in PRCTL_GETS.items():
                if out_ptr:
                    target.write_scratch(bytes(8))
                    ret = target.call(NR.prctl, option, target.scratch, check=False)
                    value = struct.unpack("<q", target.read_scratch(8))[0] if ret == 0 else ret
                else:
                    value = target.call(NR.prctl, option, *extra, check=False)
                out[f"prctl.{name}"] = str(value) if not -4096 < value < 0 else f"<{os.strerror(-value)}>"
            target.write_scratch(bytes(8 + 128))
            ret = target.call(SYS_get_mempolicy, target.scratch, target.scratch + 8, 1024, 0, 0, check=False)
            data = target.read_scratch(8 + 128)
            out["mempolicy"] = (f"mode {struct.unpack_from('<i', data)[0]} nodes {data[8:].rstrip(bytes(1)).hex()}"
                                if ret == 0 else f"<{os.strerror(-ret)}>")
            regs = target.call(SYS_membarrier, MEMBARRIER_CMD_GET_REGISTRATIONS, 0, check=False)
            out["membarrier"] = str(regs) if not -4096 < regs < 0 else f"<{os.strerror(-regs)}>"
            out.update(_itimers(target))
            out.update(_fd_owners(target))
            out["mm.def_flags"] = _def_flags(target)
    finally:
        ptrace.detach(pid)
    return out


def _itimers(target) -> dict[str, str]:
    """Each interval timer: armed or not, and its interval (its time left runs on)."""
    out = {}
    for which, name in enumerate(("REAL", "VIRTUAL", "PROF")):
        target.call(NR.getitimer, which, target.scratch)
        isec, iusec, vsec, vusec = struct.unpack("<4q", target.read_scratch(32))
        out[f"itimer.{name}"] = f"armed, interval {isec * 1_000_000 + iusec} us" if vsec or vusec else "disarmed"
    return out


def _fd_owners(target) -> dict[str, str]:
    """Each fd's signal-driven I/O owner (type and pid) and signal, where set."""
    out = {}
    for name in os.listdir(f"/proc/{target.pid}/fd"):
        target.write_scratch(bytes(8))
        ret = target.call(NR.fcntl, int(name), F_GETOWN_EX, target.scratch, check=False)
        owner = struct.unpack("<ii", target.read_scratch(8)) if ret == 0 else (f"<{os.strerror(-ret)}>", "")
        sig = target.call(NR.fcntl, int(name), F_GETSIG, check=False)
        if owner[1] or sig:
            out[f"fdinfo.{name}.owner"] = f"type {owner[0]} pid {owner[1]} signal {sig}"
    return out


def _seccomp_filters(pid: int, tid: int) -> str:
    """The programs and flags of a thread's filters, oldest first (the
    status lines only count them): read with the thread seized, stopped."""
    try:
        if seccomp.thread_mode(pid, tid) != seccomp.SECCOMP_MODE_FILTER:
            return "none"
        stopped_by = ptrace.freeze(tid)
    except OSError as err:
        return f"<cannot freeze: {err}>"
    try:
        if stopped_by:
            return f"<in a group-stop by signal {stopped_by}>"
        chain = seccomp.read_chain(pid, tid)
        return " ".join(f"{len(insns) // seccomp.SOCK_FILTER_SIZE}:{zlib.crc32(insns):08x}:{flags}"
                        for insns, flags in chain)
    finally:
        ptrace.detach(tid)


def _sharing(pids: list[int]) -> dict[int, dict[str, str]]:
    """Which earlier process of the tree (if any) each one shares its fd
    table and its fs struct (root, cwd, umask) with: kcmp."""
    out: dict[int, dict[str, str]] = {pid: {} for pid in pids}
    for key, kind in (("shares.files", KCMP_FILES), ("shares.fs", KCMP_FS)):
        for i, pid in enumerate(pids):
            same = "own"
            for other in pids[:i]:
                if _libc.syscall(SYS_kcmp, other, pid, kind, 0, 0) == 0:
                    same = f"pid {other}'s"
                    break
            out[pid][key] = same
    return out


def capture(pid: int, root: bool = False, inject: bool = True) -> dict[str, str]:
    """Everything the kernel shows about one process (and each of its threads)."""
    base = f"/proc/{pid}"
    state: dict[str, str] = {}
    state.update(_stat(f"{base}/stat", root))
    if state["stat.state"] == "Z":
        return {k: v for k, v in state.items() if k in ("stat.state", "stat.exit_signal", "stat.pgrp",
                                                        "stat.session", "stat.ppid", "stat.exit_code")}
    state.update(_status(f"{base}/status", root))
    state["status.SigBlk"] = _sigblk(pid, pid, state["status.SigBlk"])
    for name in ("oom_score_adj", "timerslack_ns", "personality", "loginuid", "sessionid", "cgroup",
                 "coredump_filter", "comm", "limits", "attr/current", "setgroups", "uid_map", "gid_map",
                 "timers"):
        state[name] = _read(f"{base}/{name}").strip()
    for name in ("auxv", "environ", "cmdline"):
        state[name] = _read(f"{base}/{name}", binary=True)
    for name in ("root", "cwd", "exe"):
        state[name] = _readlink(f"{base}/{name}")
    state["autogroup"] = _autogroup(pid)
    state.update(_sched(pid))
    state.update(_namespaces(pid))
    state.update(_fdinfo(pid))
    state.update(_tty_settings(pid))
    state.update(_map_files(pid))
    state.update(_memory_locks(pid))
    for tid in sorted(int(t) for t in os.listdir(f"{base}/task")):
        if tid == pid:
            continue
        where = f"{base}/task/{tid}"
        try:
            thread = {**_status(f"{where}/status", root), **_stat(f"{where}/stat", root), **_sched(tid),
                      "comm": _read(f"{where}/comm").strip()}
            thread["status.SigBlk"] = _sigblk(pid, tid, thread["status.SigBlk"])
        except FileNotFoundError:
            continue
        state.update({f"task.{tid}.{k}": v for k, v in thread.items()})
        if inject:
            state[f"task.{tid}.seccomp_filters"] = _seccomp_filters(pid, tid)
    if inject and state["stat.state"] != "T":
        state.update(_injected(pid))
    if inject:
        state["seccomp_filters"] = _seccomp_filters(pid, pid)
    return state


def _locks(pids: set[int]) -> dict[str, str]:
    """/proc/locks entries held or awaited by processes of the tree; the
    file named by one of the tree's fds that opens it (else by the path of
    its inode's first fd seen)."""
    inodes = {}
    for pid in pids:
        try:
            names = os.listdir(f"/proc/{pid}/fd")
        except FileNotFoundError:
            continue
        for name in names:
            try:
                st = os.stat(f"/proc/{pid}/fd/{name}")
                inodes.setdefault((os.major(st.st_dev), os.minor(st.st_dev), st.st_ino),
                                  os.readlink(f"/proc/{pid}/fd/{name}"))
            except OSError:
                continue
    out = []
    for line in _read("/proc/locks").splitlines():
        words = line.split()[1:]
        blocked = words[0] == "->"
        if blocked:
            words = words[1:]
        # kind, ADVISORY/MANDATORY, READ/WRITE, pid, maj:min:ino, start, end
        if len(words) < 7 or not words[3].lstrip("-").isdigit():
            continue
        owner = int(words[3])
        dev = words[4].split(":")
        key = (int(dev[0], 16), int(dev[1], 16), int(dev[2]))
        if owner not in pids and key not in inodes:
            continue
        if owner not in pids and owner != -1:
            continue
        path = inodes.get(key, "<a file no fd of the tree opens>")
        out.append(" ".join(["->" * blocked, *words[:4], path, *words[5:]]).strip())
    return {"locks": "\n".join(sorted(out))}


def capture_tree(pids: list[int], inject: bool = True) -> dict[int, dict[str, str]]:
    """capture() of every process; the first is the root. Global state
    that belongs to the tree (its file locks) goes under the root."""
    out = {}
    for i, pid in enumerate(pids):
        try:
            out[pid] = capture(pid, root=i == 0, inject=inject)
        except FileNotFoundError:
            out[pid] = {"gone": "exited while read"}
    if pids:
        out[pids[0]].update(_locks(set(pids)))
        if out[pids[0]].get("stat.state") not in ("Z", None):
            out[pids[0]].update(_own_namespaces(pids[0]))
    live = [p for p in pids if out[p].get("stat.state") not in ("Z", None)]  # a zombie has neither
    for pid, shares in _sharing(live).items():
        out[pid].update(shares)
    for pid, socks in _sockets(live).items():
        out[pid].update(socks)
    return out


def _socket_fds(pids: list[int]) -> dict[int, list[tuple[int, int]]]:
    """{pid: [(fd, socket inode)]} of every socket fd of the tree."""
    def links(pid):
        try:
            names = os.listdir(f"/proc/{pid}/fd")
        except FileNotFoundError:
            return
        for name in names:
            with contextlib.suppress(OSError):
                yield int(name), os.readlink(f"/proc/{pid}/fd/{name}")

    return {pid: [(fd, int(link[8:-1])) for fd, link in links(pid) if link.startswith("socket:[")] for pid in pids}


def _sockets(pids: list[int]) -> dict[int, dict[str, str]]:
    """Each socket fd of the tree: its kind, addresses, peer (which fd of
    the tree, for a unix socket), queue, every option and filter, through a
    copy of the fd (pidfd_getfd); unix sockets also as sock_diag shows them."""
    import socket

    from procsnap.kernel import sockdiag
    from procsnap.kernel.libc import copy_fd
    from procsnap.objects.sockopt import read_filter

    fds = _socket_fds(pids)
    where = {ino: f"pid {pid} fd {fd}" for pid, items in fds.items() for fd, ino in items}
    unix = sockdiag.unix_sockets()
    out: dict[int, dict[str, str]] = {pid: {} for pid in pids}
    for pid, items in fds.items():
        for fd, ino in items:
            key = f"sock.{fd}"
            try:
                local = copy_fd(pid, fd)
            except OSError as err:
                out[pid][key] = f"<{os.strerror(err.errno)}>"
                continue
            with socket.socket(fileno=local) as sk:
                out[pid].update(_socket(sk, key))
                try:
                    out[pid][f"{key}.filter"] = read_filter(sk).hex()
                except OSError as err:
                    out[pid][f"{key}.filter"] = f"<{os.strerror(err.errno)}>"
            d = unix.get(ino)
            if d is not None:
                name = d.name.split(b"\0", 1)[0] if d.name[:1] not in (b"", b"\0") else d.name
                # wqueue: a listener's backlog; of other sockets, the truesize of what they
                # sent that is not read yet (accounting: a datagram from an unnamed sender
                # is sent again from another unnamed socket), not compared
                out[pid][f"{key}.unix"] = (
                    f"state {d.state} peer {where.get(d.peer, 'outside the tree' if d.peer else 'none')} "
                    f"rqueue {d.rqueue} backlog {d.wqueue if d.state == 10 else '-'} shutdown {d.shutdown} "
                    f"waiting {[where.get(i, 'outside the tree') for i in d.icons]}")
                if d.rqueue and d.state != 10:
                    out[pid][f"{key}.in_flight"] = _in_flight(pid, fd, pids)
                if d.rqueue and d.type == socket.SOCK_STREAM and d.state != 10:
                    sender = next(((p, n) for p, items in fds.items() for n, i in items if i == d.peer), None)
                    out[pid][f"{key}.stream_pieces"] = _stream_pieces(pid, fd, sender)
                if name[:1] == b"/":
                    try:
                        st = os.lstat(name)
                        linked = d.vfs is not None and st.st_ino == d.vfs[0]
                        out[pid][f"{key}.file"] = (f"{'its own' if linked else 'another'} file, mode {st.st_mode:o} "
                                                   f"owner {st.st_uid}:{st.st_gid}")
                    except FileNotFoundError:
                        out[pid][f"{key}.file"] = "unlinked"
    return out


def _stream_pieces(pid: int, fd: int, sender: tuple[int, int] | None) -> str:
    """The queue of a unix stream socket with files in flight as its peeks
    cut it (each piece ends with an skb carrying files), the number of
    files of each, and what its skbs cost their sender (its SIOCOUTQ: more
    skbs cost more, so a piece glued to bytes sent before it shows).
    Peeked only when SO_PEEK_OFF is off (-1), and put back."""
    import fcntl
    import socket

    from procsnap.kernel.libc import copy_fd

    pieces = []
    with socket.socket(fileno=copy_fd(pid, fd)) as sk:
        if sk.getsockopt(socket.SOL_SOCKET, 42) != -1:  # SO_PEEK_OFF
            return "<SO_PEEK_OFF set: not peeked>"
        sk.setsockopt(socket.SOL_SOCKET, 42, 0)
        try:
            while len(pieces) < 1000:
                try:
                    data, anc, _, _ = sk.recvmsg(1 << 24, socket.CMSG_SPACE(4 * 253),
                                                 socket.MSG_PEEK | socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
                got = [int.from_bytes(x[i:i + 4], "little") for level, kind, x in anc
                       if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS for i in range(0, len(x) // 4 * 4, 4)]
                for g in got:
                    os.close(g)
                if not data:
                    break
                pieces.append((len(data), len(got)))
        finally:
            sk.setsockopt(socket.SOL_SOCKET, 42, -1)
    if not any(n for _, n in pieces):
        return "no files in flight"
    outq = "?"
    if sender is not None:
        with socket.socket(fileno=copy_fd(*sender)) as sk:
            outq = int.from_bytes(fcntl.ioctl(sk.fileno(), 0x5411, bytes(4)), "little")  # SIOCOUTQ
    return f"pieces {pieces}, sender's SIOCOUTQ {outq}"


def _in_flight(pid: int, fd: int, pids: list[int]) -> str:
    """The files in flight (SCM_RIGHTS) of the first message queued to a
    unix socket, each as the lowest fd of the tree holding the same open
    file description (kcmp), else its kind. Peeked only when SO_PEEK_OFF is
    off (-1): a peek then moves nothing."""
    import socket

    from procsnap.dumper.tree import same_description
    from procsnap.kernel.libc import copy_fd

    with socket.socket(fileno=copy_fd(pid, fd)) as sk:
        if sk.getsockopt(socket.SOL_SOCKET, 42) != -1:  # SO_PEEK_OFF
            return "<SO_PEEK_OFF set: not peeked>"
        try:
            _, anc, _, _ = sk.recvmsg(1, socket.CMSG_SPACE(4 * 253), socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except OSError as err:
            return f"<{os.strerror(err.errno)}>"
    got = [int.from_bytes(data[i:i + 4], "little") for level, kind, data in anc
           if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS for i in range(0, len(data) // 4 * 4, 4)]
    holders = []
    try:
        for g in got:
            st = os.fstat(g)
            with open(f"/proc/self/fdinfo/{g}") as info:
                pos = info.readline().split()[1]
            link = os.readlink(f"/proc/self/fd/{g}")
            name = link if link.startswith("/") else link.split(":", 1)[0]  # a pipe's, a socket's inode is new
            holder = f"a file of mode {st.st_mode:o} ({name}, at {pos}) no process of the tree holds"
            for p in sorted(pids):
                for n in sorted(int(x) for x in os.listdir(f"/proc/{p}/fd")):
                    with contextlib.suppress(OSError):
                        o = os.stat(f"/proc/{p}/fd/{n}")
                        if (o.st_dev, o.st_ino) == (st.st_dev, st.st_ino) and same_description(os.getpid(), g, p, n):
                            holder = f"pid {p} fd {n}"
                            break
                else:
                    continue
                break
            holders.append(holder)
    finally:
        for g in got:
            os.close(g)
    return str(holders)


def _socket(sk, key: str) -> dict[str, str]:
    import socket

    out = {}
    family = sk.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN)
    for what, call in (("name", _libc.getsockname), ("peername", _libc.getpeername)):
        buf = ctypes.create_string_buffer(128)
        length = ctypes.c_uint(128)
        if call(sk.fileno(), buf, ctypes.byref(length)) == 0:
            out[f"{key}.{what}"] = buf.raw[: length.value].hex()
        else:
            out[f"{key}.{what}"] = f"<{os.strerror(ctypes.get_errno())}>"
    levels = [1]
    if family in (socket.AF_INET, socket.AF_INET6):
        levels += [0, 41, 6, 17, 136, 255]
    elif family == socket.AF_PACKET:
        levels.append(263)
    elif family == socket.AF_NETLINK:
        levels.append(270)
    for level in levels:
        for opt in SOCKOPT_LEVELS[level]:
            if (level, opt) in IGNORED_SOCKOPTS:
                continue
            # a zeroed buffer: some options read a request from it (IPV6_FLOWLABEL_MGR),
            # and socket.getsockopt's is not zeroed
            buf = ctypes.create_string_buffer(256)
            length = ctypes.c_uint(256)
            if _libc.getsockopt(sk.fileno(), level, opt, buf, ctypes.byref(length)) == 0:
                value = buf.raw[: length.value].hex()
            else:
                errno = ctypes.get_errno()
                if errno == 92:  # ENOPROTOOPT: not an option of this socket
                    continue
                value = f"<{os.strerror(errno)}>"
            out[f"{key}.opt.{level}.{opt}"] = value
    try:
        info = sk.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
        # struct tcp_info (linux/tcp.h): u8 state ...; u32 unacked at 24, sacked at 28
        # (a listener: its accept queue and its backlog)
        state = info[0]
        out[f"{key}.tcp_state"] = f"{state}" + (f" accept queue {struct.unpack_from('<II', info, 24)}"
                                                 if state == 10 else "")
        if state not in (7, 10):  # a live connection (TCP_REPAIR, objects/tcp.py)
            _connection(sk, key, info, out)
    except OSError:
        pass
    try:
        out[f"{key}.inq"] = str(struct.unpack("<i", fcntl_ioctl(sk.fileno(), 0x541B))[0])  # FIONREAD
    except OSError as err:
        out[f"{key}.inq"] = f"<{os.strerror(err.errno)}>"
    return out


# Of a live connection, options that are the connection's moving state, not
# a setting: compared through what decides them instead (tcp_opts).
CONNECTION_STATE_SOCKOPTS = {
    (0, 33): "IP_MULTICAST_TTL of an accepted socket: the TTL of its SYN (not settable on TCP)",
    (41, 18): "IPV6_MULTICAST_HOPS of an accepted socket: the hop limit of its SYN",
    (41, 17): "IPV6_MULTICAST_IF of an accepted socket: the interface its SYN came in on",
    (6, 2): "TCP_MAXSEG: the MSS in use (mss_cache); the negotiated clamp is restored, compared as tcp_opts",
    (6, 12): "TCP_QUICKACK: whether delayed ACKs are on right now (pingpong), which traffic flips",
    (6, 10): "TCP_WINDOW_CLAMP: follows the receive buffer's autotuning",
}


def _connection(sk, key: str, info: bytes, out: dict[str, str]) -> None:
    """What TCP_REPAIR restores of a live connection and the peer could
    tell: the options negotiated at the handshake (tcpi_options, both
    window scales), the queues' sizes (SIOCOUTQ, SIOCOUTQNSD beside
    FIONREAD's inq: comparable only for a connection at rest, which tests
    with traffic set aside)."""
    for level, opt in CONNECTION_STATE_SOCKOPTS:
        out.pop(f"{key}.opt.{level}.{opt}", None)
    # a buffer size that is not locked (SO_BUF_LOCK: 1 send, 2 receive) is the autotuning's
    locks = sk.getsockopt(1, 72)
    for bit, opt in ((1, 7), (2, 8)):
        if not locks & bit:
            out.pop(f"{key}.opt.1.{opt}", None)
    out[f"{key}.tcp_opts"] = f"options {info[5]:#x} wscale {info[6]:#x}"
    for name, request in (("outq", 0x5411), ("unsent", 0x894B)):  # SIOCOUTQ, SIOCOUTQNSD
        try:
            out[f"{key}.{name}"] = str(struct.unpack("<i", fcntl_ioctl(sk.fileno(), request))[0])
        except OSError as err:
            out[f"{key}.{name}"] = f"<{os.strerror(err.errno)}>"


def fcntl_ioctl(fd: int, request: int) -> bytes:
    import fcntl

    return fcntl.ioctl(fd, request, bytes(4))


def state_problems(before: dict[int, dict[str, str]], after: dict[int, dict[str, str]]) -> list[str]:
    problems = []
    for pid in sorted(set(before) | set(after)):
        b, a = before.get(pid), after.get(pid)
        if b is None or a is None:
            problems.append(f"pid {pid}: {'new' if b is None else 'missing'} after the restore")
            continue
        for key in sorted(set(b) | set(a)):
            if b.get(key) != a.get(key):
                problems.append(f"pid {pid}: {key}: expected {_show(b.get(key))} found {_show(a.get(key))}")
    return problems


def _show(value) -> str:
    if value is None:
        return "<absent>"
    text = repr(value) if isinstance(value, bytes) else value
    return text if len(text) < 300 else text[:300] + "..."
