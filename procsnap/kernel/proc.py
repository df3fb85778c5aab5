"""Parsers for /proc/PID files: text in, plain records out.

Each parse_* takes the file's text so the edge cases can be tested on
fixtures; each read_* reads the live file and parses it.
"""

from __future__ import annotations

from .. import records as dataclasses  # the dataclasses API, cheap to import
import os
import re

from .arch.x86_64 import PAGE_SIZE


@dataclasses.dataclass
class MapsEntry:
    """One line of /proc/PID/maps (+ VmFlags from smaps)."""

    start: int
    end: int
    perms: str  # "rwxp" / "r--s"
    offset: int
    dev: str  # "fd:01"
    inode: int
    path: str  # "" for anonymous; "[heap]", "[stack]", "/usr/lib/..."
    vmflags: tuple[str, ...] = ()

    @property
    def shared(self) -> bool:
        return self.perms[3] == "s"

    @property
    def deleted(self) -> bool:
        return self.path.endswith(" (deleted)")


_MAPS_RE = re.compile(
    r"^([0-9a-f]+)-([0-9a-f]+) ([-r][-w][-x][sp]) ([0-9a-f]+) ([0-9a-f]+:[0-9a-f]+) (\d+)\s*(.*)$"
)


# A whole VMA of smaps: its maps line, its fields (upper-case names; none but
# VmFlags starts with V, so they are skipped possessively: half the time of a
# lazy skip that tries VmFlags at each line), its VmFlags. A field of a later
# kernel that starts with V makes it fail, and parse_maps take the line parser.
_SMAPS_RE = re.compile(
    r"^([0-9a-f]+)-([0-9a-f]+) ([-r][-w][-x][sp]) ([0-9a-f]+) ([0-9a-f]+:[0-9a-f]+) (\d+)[^\S\n]*(.*)\n"
    r"(?:[A-UW-Z].*\n)*+VmFlags:(.*)$", re.M)
# a line of maps, in the whole text (its \s* must not run on into the next line)
_MAPS_LINES_RE = re.compile(_MAPS_RE.pattern.replace(r"\s*", r"[^\S\n]*"), re.M)


def parse_maps(text: str) -> list[MapsEntry]:
    """/proc/PID/maps or /proc/PID/smaps (VmFlags lines are attached)."""
    if (out := _parse_whole(text, _SMAPS_RE if "VmFlags:" in text else _MAPS_LINES_RE)) is not None:
        return out
    out: list[MapsEntry] = []
    match = _MAPS_RE.match
    for line in text.splitlines():
        if line[:1].isupper():  # a field of smaps ("Rss:", ...: ~25 a VMA), never a VMA's line (lower-case hex)
            if line.startswith("VmFlags:") and out:
                out[-1].vmflags = tuple(line.split()[1:])
            continue
        m = match(line)
        if m:
            out.append(MapsEntry(int(m[1], 16), int(m[2], 16), m[3], int(m[4], 16), m[5], int(m[6]), m[7]))
        elif line:
            raise ValueError(f"unparsable maps line: {line!r}")
    return out


def _parse_whole(text: str, regex: re.Pattern) -> list[MapsEntry] | None:
    """maps or smaps in one pass of a regex over whole VMAs (a Python loop
    over the ~26 lines of each VMA in smaps cost 20 us a VMA); None unless
    the text is exactly such VMAs one after the other (parse_maps then says
    which line it cannot parse)."""
    out: list[MapsEntry] = []
    at = 0
    flags = regex.groups == 8
    for m in regex.finditer(text):
        if m.start() != at:
            return None
        at = m.end() + 1
        out.append(MapsEntry(int(m[1], 16), int(m[2], 16), m[3], int(m[4], 16), m[5], int(m[6]), m[7],
                             tuple(m[8].split()) if flags else ()))
    return out if at >= len(text) else None


def read_smaps(pid: int) -> list[MapsEntry]:
    with open(f"/proc/{pid}/smaps") as f:
        return parse_maps(f.read())


def read_layout(pid: int) -> list[MapsEntry]:
    """/proc/PID/maps alone, without VmFlags: for who needs only where the
    VMAs are (smaps walks every page of every VMA to count them)."""
    with open(f"/proc/{pid}/maps") as f:
        return parse_maps(f.read())


def read_maps(pid: int, flags_from: list[MapsEntry] | None = None) -> list[MapsEntry]:
    """/proc/PID/maps, with VmFlags taken from an earlier read of smaps if
    the layout is still exactly the same, else from smaps read now.

    smaps walks every page of every VMA to count them (11 ms for 1 GiB
    here); maps does not. A dump reads smaps before freezing the task and
    maps while it is frozen.
    """
    if flags_from is None:
        return read_smaps(pid)
    now = read_layout(pid)
    key = lambda m: (m.start, m.end, m.perms, m.offset, m.dev, m.inode, m.path)  # noqa: E731
    if list(map(key, now)) == list(map(key, flags_from)):
        for m, old in zip(now, flags_from):
            m.vmflags = old.vmflags
        return now
    return read_smaps(pid)


@dataclasses.dataclass
class Stat:
    """The fields of /proc/PID/stat that a checkpointer needs."""

    comm: str
    state: str
    ppid: int
    pgrp: int
    session: int
    num_threads: int
    start_code: int
    end_code: int
    start_stack: int
    start_data: int
    end_data: int
    start_brk: int
    arg_start: int
    arg_end: int
    env_start: int
    env_end: int
    exit_code: int  # a zombie's wait status
    exit_signal: int = 17  # sent to the parent when it exits (clone's exit signal)


def parse_stat(text: str) -> Stat:
    # comm may itself contain ") ": split at the last one.
    head, _, rest = text.rpartition(")")
    comm = head.split("(", 1)[1]
    f = rest.split()
    # f[0] is field 3 of proc(5); field n is f[n - 3]
    def field(n: int) -> int:
        return int(f[n - 3])

    return Stat(
        comm=comm, state=f[0], ppid=field(4), pgrp=field(5), session=field(6),
        num_threads=field(20), start_code=field(26), end_code=field(27), start_stack=field(28),
        start_data=field(45), end_data=field(46), start_brk=field(47), arg_start=field(48),
        arg_end=field(49), env_start=field(50), env_end=field(51), exit_code=field(52),
        exit_signal=field(38),
    )


def read_stat(pid: int) -> Stat:
    with open(f"/proc/{pid}/stat") as f:
        return parse_stat(f.read())


def parse_status(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def read_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return parse_status(f.read())


RLIM_INFINITY = (1 << 64) - 1


def parse_limits(text: str) -> list[tuple[int, int]]:
    """/proc/PID/limits: (soft, hard) per resource, in RLIMIT_* order.

    Read from here rather than with prlimit(): prlimit on another user's
    process needs CAP_SYS_RESOURCE, which root lacks on this machine.
    """
    out = []
    for line in text.splitlines()[1:]:
        fields = line[26:].split()
        if len(fields) < 2:
            continue
        out.append(tuple(RLIM_INFINITY if v == "unlimited" else int(v) for v in fields[:2]))
    return out


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@dataclasses.dataclass
class FdInfo:
    pos: int
    flags: int
    mnt_id: int


def parse_fdinfo(text: str) -> FdInfo:
    fields = parse_status(text)
    return FdInfo(pos=int(fields["pos"]), flags=int(fields["flags"], 8), mnt_id=int(fields.get("mnt_id", "0")))


@dataclasses.dataclass
class LockLine:
    """One `lock:` line of an fdinfo (fs/locks.c lock_get_status): a lock
    taken through this open file description (by this process, for POSIX)."""

    kind: str  # FLOCK, POSIX, OFDLCK, LEASE, DELEG ...
    mode: str  # ADVISORY, MANDATORY; for a lease ACTIVE, BREAKING ...
    access: str  # READ, WRITE, UNLCK
    pid: int
    start: int
    end: int  # -1: to the end of the file (EOF)


def parse_fd_locks(text: str) -> list[LockLine]:
    """'lock:\t1: POSIX  ADVISORY  WRITE 1234 fe:00:5678 0 EOF' lines."""
    out = []
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key != "lock":
            continue
        words = value.split()[1:]  # without the ordinal "1:"
        if words and words[0] == "->":
            words = words[1:]
        kind, mode, access, pid, _inode, start, end = words[:7]
        out.append(LockLine(kind, mode, access, int(pid), int(start), -1 if end == "EOF" else int(end)))
    return out


def parse_anon_fdinfo(text: str) -> tuple[dict[str, int], list[list[int]]]:
    """The state of an eventfd, signalfd, timerfd or epoll from its fdinfo
    (fs/eventfd.c, fs/signalfd.c, fs/timerfd.c, fs/eventpoll.c show_fdinfo)
    as (params, epoll watches [fd, events, data])."""
    params: dict[str, int] = {}
    watches: list[list[int]] = []
    for line in text.splitlines():
        key, _, value = line.partition(":")
        value = value.strip()
        if key == "eventfd-count":
            params["count"] = int(value, 16)
        elif key == "eventfd-semaphore":
            params["semaphore"] = int(value)
        elif key == "sigmask":
            params["mask"] = int(value, 16)
        elif key == "clockid":
            params["clockid"] = int(value)
        elif key == "ticks":
            params["ticks"] = int(value)
        elif key == "settime flags":
            params["settime_flags"] = int(value, 8)
        elif key in ("it_value", "it_interval"):
            sec, nsec = (int(x) for x in value.strip("()").split(","))
            params["value_ns" if key == "it_value" else "interval_ns"] = sec * 1_000_000_000 + nsec
        elif key == "tfd":
            f = line.split()
            watches.append([int(f[1]), int(f[f.index("events:") + 1], 16), int(f[f.index("data:") + 1], 16)])
    return params, watches


def read_fdinfo(pid: int, fd: int) -> FdInfo:
    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
        return parse_fdinfo(f.read())


def list_fds(pid: int) -> list[int]:
    return sorted(int(n) for n in os.listdir(f"/proc/{pid}/fd"))


def list_tids(pid: int) -> list[int]:
    """The process's threads, the leader first."""
    return sorted((int(n) for n in os.listdir(f"/proc/{pid}/task")), key=lambda t: (t != pid, t))



# pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst), seen in the
# top byte of each little-endian 64-bit entry: 63 present, 62 swapped,
# 61 file-page or shared-anon.
PM_TOP_PRESENT = 0x80
PM_TOP_SWAPPED = 0x40
PM_TOP_FILE = 0x20
# 58: a guard region's page (MADV_GUARD_INSTALL, 6.15+): a PTE marker that
# also shows as swapped (0x44 in the top byte here); there is nothing to read.
PM_TOP_GUARD = 0x04

# One byte per page -> b"1" (store it) or b"0" (leave it), for str.translate.
_PRIVATE_TABLE = bytes(
    0x31 if (b & (PM_TOP_PRESENT | PM_TOP_SWAPPED)) and not b & (PM_TOP_FILE | PM_TOP_GUARD) else 0x30
    for b in range(256)
)
_SHARED_TABLE = bytes(0x31 if b & (PM_TOP_PRESENT | PM_TOP_SWAPPED) and not b & PM_TOP_GUARD else 0x30
                      for b in range(256))
_GUARD_TABLE = bytes(0x31 if b & PM_TOP_GUARD else 0x30 for b in range(256))
_RUN_RE = re.compile(b"1+")


def classify_pages(pagemap: bytes, shared_anon: bool) -> list[tuple[int, int]]:
    """Runs (first page index, page count) of pages that must be copied.

    Private mappings: pages present or swapped that are not file pages, i.e.
    anonymous and copy-on-write copies; clean file pages and never-touched
    pages stay out. Shared anonymous mappings: every page present or swapped.
    The work is done by bytes slicing, translate and a regex in C.
    """
    top = pagemap[7::8]
    marks = top.translate(_SHARED_TABLE if shared_anon else _PRIVATE_TABLE)
    return [(m.start(), m.end() - m.start()) for m in _RUN_RE.finditer(marks)]


def guard_pages(pagemap: bytes) -> list[tuple[int, int]]:
    """Runs (first page index, page count) of guard-region pages."""
    marks = pagemap[7::8].translate(_GUARD_TABLE)
    return [(m.start(), m.end() - m.start()) for m in _RUN_RE.finditer(marks)]


# Pages mapped by more than one process (present, not PM_MMAP_EXCLUSIVE, not
# a file page): after a fork, the ones still shared copy-on-write.
PM_TOP_EXCLUSIVE = 0x01  # bit 56
_COW_TABLE = bytes(0x31 if b & PM_TOP_PRESENT and not b & (PM_TOP_EXCLUSIVE | PM_TOP_FILE) else 0x30
                   for b in range(256))
PFN_MASK = (1 << 55) - 1


def shared_frames(pagemap: bytes) -> list[tuple[int, int]]:
    """(page index, page frame number) of every present anonymous page
    that is mapped more than once (root sees frame numbers)."""
    marks = pagemap[7::8].translate(_COW_TABLE)
    out = []
    for m in _RUN_RE.finditer(marks):
        entries = memoryview(pagemap)[m.start() * 8 : m.end() * 8].cast("Q")
        out += [(m.start() + i, e & PFN_MASK) for i, e in enumerate(entries)]
    return out


def sysv_shm(shmid: int) -> dict[str, int] | None:
    """A SysV shared memory segment from /proc/sysvipc/shm: key, perms (mode
    with SHM_DEST 01000), size; None if there is none with that id."""
    with open("/proc/sysvipc/shm") as f:
        lines = f.read().splitlines()
    names = lines[0].split()
    for line in lines[1:]:
        fields = dict(zip(names, line.split()))
        if int(fields["shmid"]) == shmid:
            return {"key": int(fields["key"]), "perms": int(fields["perms"], 8), "size": int(fields["size"]),
                    "nattch": int(fields["nattch"])}
    return None


def read_pagemap(fd: int, start: int, end: int) -> bytes:
    """Raw pagemap entries for [start, end) from an open /proc/PID/pagemap."""
    want = (end - start) // PAGE_SIZE * 8
    off = start // PAGE_SIZE * 8
    chunks = []
    while want > 0:
        chunk = os.pread(fd, want, off)
        if not chunk:
            raise OSError(5, f"pagemap: short read at offset {off}")
        chunks.append(chunk)
        want -= len(chunk)
        off += len(chunk)
    return b"".join(chunks)
