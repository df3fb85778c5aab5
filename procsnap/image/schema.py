"""The on-disk format, declared once.

An image is a directory:

    procsnap.img   header, then typed records, then END. Written last and
                   renamed into place: its presence marks a complete image.
    pages.img      page data, 4 KiB aligned, runs indexed by PAGE records
                   (address, page count, offset, XXH3-64 of the bytes).
    ghosts.img     contents of files unlinked while open.

procsnap.img layout (little endian):

    header  16 bytes  magic "PSNAPIMG" | u16 major | u16 minor | u32 crc32(first 12)
    record  12 bytes  tag (4 ASCII) | u32 length | u32 crc32(payload)
            payload   JSON object of the record's model fields
    ...
    record  "END "    {"records": N, "pages_size": ..., "ghosts_size": ...}

A record's payload is its model dataclass as JSON: ints as numbers, bytes
as hex strings, enums by value. Fields are only ever appended, with the
minor version that introduced them; readers of an older minor fill
defaults. A different major version is refused.
"""

from __future__ import annotations

from .. import records as dataclasses  # the dataclasses API, cheap to import
import enum
import functools
import struct
import types
import typing

from .. import model
from ..objects import cgroups, creds, file, fown, ghost, inet, locks, pipe, pty, settings, shm, timers, unix
from ..objects import seccomp
from ..objects import tracking
from ..objects import netlock, tcp
from ..objects import namespaces
from ..objects import netns
from . import chunks
from . import vmatable

MAGIC = b"PSNAPIMG"
MAJOR = 1
MINOR = 7  # 1.1: THRD, PROC, PIPE, SHM, SOCK, PREF records; 1.2: Vma.access, SETS, LOCK, CRED,
# SharedMem.seals and late_seals, MapFlag.MAP_DROPPABLE, Ghost.attrs/extents/rdev/link/ino, Pipe.attrs,
#            FOWN, CGRP, Task.root; 1.3: Vma.lock, Vma.guards, Task.mlockall,
#            FdKind.PATH (O_PATH fds), FdKind.GHOST_DIR and Task.cwd_removed (removed directories),
#            Vma.ghost (private mappings of unlinked files), a 4th element of an epoll watch (the fd
#            holding the file of a watched fd that was closed),
#            SECC (seccomp mode and filters of each thread), FdEntry.marks (inotify watches, fanotify marks),
#            Socket.connected/name/linked/attrs/backlog/waiting/icons/senders/options/filter (unix sockets
#            bound, listening, unconnected), INET records (objects/inet.py),
#            PTY, FdKind pty-master/pty-slave/dev-tty,
#            XFRM (pages.img in compressed/encrypted chunks, chunks.py); an encrypted
#            inventory is CRYP then SEAL, the records sealed inside it (sealing.py);
#            PREF sources "parent:REL", pages of a parent image (dump --prev-images-dir, series.py),
#            Task/Thread.wait_left_ns, Task.stopped_by, ITMR, PTMR
# 1.4: TRAK (a pre-dump image: its dirty tracking, objects/tracking.py),
#      TCPC (live TCP connections, objects/tcp.py), NLCK (--tcp-established/--tcp-close and
#      the network lock of the dump, objects/netlock.py); InetSocket.state/peer of a live connection;
#      Socket.rights (SCM_RIGHTS in flight: [pid, fd] of a tree process holding each file)
# 1.5: NSPC (the namespaces of a container's init made again: pid, uts, ipc, time; objects/namespaces.py),
#      FLIT (files in flight no process of the tree holds, objects/unixrights.py), named in
#      Socket.rights as [-1, index]
# 1.6: Settings.autogroup_nice (objects/settings.py)
#      Namespaces.mounts (a container's mount namespace: its mount table, classed, with the files of
#      each tmpfs made inside, their data in ghosts.img; objects/mountns.py)
#      NETN (a container's own network namespace: devices, addresses, routes, rules, neighbours,
#      nftables, net sysctls; objects/netns.py), "net" in Namespaces.own
#      Namespaces.msg_queues/sem_sets/segments/mqueues (the objects of a container's IPC namespace,
#      objects/ipcns.py), FdKind.MQUEUE (an fd of a POSIX message queue); Pipe.ino (restore --inherit-fd)
#      Namespaces.cgroup_roots and "cgroup" in Namespaces.own (a container's cgroup namespace)
# 1.7: VMAT (all VMAs of a process in one packed record, image/vmatable.py) instead of a VMA record each;
#      images of 1.6 and before (VMA records) are still read
HEADER = struct.Struct("<8sHHI")
RECORD = struct.Struct("<4sII")

INVENTORY = "procsnap.img"
PAGES = "pages.img"
GHOSTS = "ghosts.img"
# The biggest record procsnap writes is a Task (a few KiB); anything far
# beyond that is a corrupt length, not a record.
# A record's length is checked against the file too; this bound only keeps
# a corrupt length from asking for absurd amounts of memory.
MAX_RECORD = 1 << 30
# One page run in the PMAP record: vaddr, npages, offset, xxh3 (u64 each).
PAGE_RUN = struct.Struct("<QQQQ")
# One run of pages stored by another image (PREF): vaddr, npages, source index, offset.
PAGE_REF = struct.Struct("<QQQQ")

# tag -> (model class, the Checkpoint field it fills, one or many)
RECORDS: dict[bytes, tuple[type, str, bool]] = {
    b"TASK": (model.Task, "task", False),
    b"MM  ": (model.Mm, "mm", False),
    b"VMA ": (model.Vma, "vmas", True),
    b"PMAP": (model.PageMap, "pages", False),
    b"SACT": (model.SigAction, "sigactions", True),
    b"SPND": (model.PendingSignal, "pending", True),
    b"FILE": (file.FileRef, "files", True),
    b"FD  ": (model.FdEntry, "fds", True),
    b"GHST": (ghost.Ghost, "ghosts", True),
    b"THRD": (model.Thread, "threads", True),
    b"PROC": (model.Proc, "procs", True),
    b"PIPE": (pipe.Pipe, "pipes", True),
    b"SHM ": (shm.SharedMem, "shms", True),
    b"SOCK": (unix.Socket, "sockets", True),
    b"PREF": (model.PageRefs, "page_refs", True),
    b"SETS": (settings.Settings, "settings", True),
    b"LOCK": (locks.FileLock, "locks", True),
    b"CRED": (creds.Creds, "creds", True),
    b"FOWN": (fown.FdOwner, "owners", True),
    b"CGRP": (cgroups.Cgroup, "cgroups", True),
    b"SECC": (seccomp.Seccomp, "seccomp", True),
    b"INET": (inet.InetSocket, "inet_sockets", True),
    b"PTY ": (pty.Pty, "ptys", True),
    b"XFRM": (chunks.PageCodec, "codec", True),
    b"ITMR": (timers.ITimer, "itimers", True),
    b"PTMR": (timers.PosixTimer, "posix_timers", True),
    b"TRAK": (tracking.Tracking, "tracking", True),
    b"TCPC": (tcp.TcpConnection, "tcp_connections", True),
    b"NLCK": (netlock.NetLock, "net_lock", True),
    b"NSPC": (namespaces.Namespaces, "namespaces", True),
    b"FLIT": (model.FdEntry, "in_flight", True),
    b"NETN": (netns.NetNamespace, "net_namespaces", True),
    b"VMAT": (vmatable.VmaTable, "vmas", False),
}
END = b"END "
CRYP = b"CRYP"  # in the clear, first: an encrypted image's cipher, salt and key check
SEAL = b"SEAL"  # then the sealed records (sealing.py)


# The PMAP record's JSON, which is all one hex string: written and read by
# slices (writer.py, reader.py) rather than through json, which would hold
# the whole record several times over (32 MiB of hex at 4 GiB of half-zero
# memory).
PMAP_PREFIX = b'{"runs":"'
PMAP_SUFFIX = b'"}'


class Unhexed(typing.NamedTuple):
    """A hex string of a record that the reader decoded itself."""

    data: bytes


class PageRuns:
    """The PageRuns of an image, held packed as the PMAP record stores them
    (PAGE_RUN, 32 bytes each): a dump of half-zero memory has a run per
    page, 131,072 per GiB, which as objects cost ~160 bytes each (the
    bulk of procsnap's own memory at 4 GiB). A sequence of model.PageRun
    made on access; appended to by a page sink, whose writer threads fill
    in each run's hash once its bytes are hashed."""

    __slots__ = ("data",)

    def __init__(self, data: bytes | bytearray = b""):
        self.data = data  # bytes as read (not copied), a bytearray once appended to

    def append(self, vaddr: int, npages: int, offset: int, xxh3: int = 0) -> int:
        """Adds a run; returns its index."""
        if not isinstance(self.data, bytearray):
            self.data = bytearray(self.data)
        self.data += PAGE_RUN.pack(vaddr, npages, offset, xxh3)
        return len(self.data) // PAGE_RUN.size - 1

    def set_hash(self, index: int, xxh3: int) -> None:
        if not isinstance(self.data, bytearray):
            self.data = bytearray(self.data)
        struct.pack_into("<Q", self.data, index * PAGE_RUN.size + 24, xxh3)

    def __len__(self) -> int:
        return len(self.data) // PAGE_RUN.size

    def __iter__(self):
        for fields in PAGE_RUN.iter_unpack(self.data):
            yield model.PageRun(*fields)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError("page run index out of range")
        return model.PageRun(*PAGE_RUN.unpack_from(self.data, index * PAGE_RUN.size))

    def __eq__(self, other):
        return list(self) == list(other) if isinstance(other, (PageRuns, list)) else NotImplemented

    def __repr__(self) -> str:
        return f"PageRuns({len(self)} runs)"


def pack_page_runs(runs: PageRuns | list[model.PageRun]) -> model.PageMap:
    if isinstance(runs, PageRuns):
        return model.PageMap(bytes(runs.data))
    return model.PageMap(b"".join(PAGE_RUN.pack(r.vaddr, r.npages, r.offset, r.xxh3) for r in runs))


def unpack_page_runs(pmap: model.PageMap) -> PageRuns:
    if len(pmap.runs) % PAGE_RUN.size:
        raise SchemaError(f"PageMap: {len(pmap.runs)} bytes is not a whole number of {PAGE_RUN.size}-byte runs")
    return PageRuns(pmap.runs)


def unpack_page_refs(refs: model.PageRefs) -> list[tuple[int, int, int, int]]:
    """(vaddr, npages, source index, offset) of each run of a PREF record."""
    if len(refs.runs) % PAGE_REF.size:
        raise SchemaError(f"PageRefs: {len(refs.runs)} bytes is not a whole number of {PAGE_REF.size}-byte runs")
    return list(PAGE_REF.iter_unpack(refs.runs))


# Checkpoint fields stored in another shape than the model's: field -> (to record, from record)
PACKED = {"pages": (pack_page_runs, unpack_page_runs)}


def unpack_vma_table(table: vmatable.VmaTable) -> list[model.Vma]:
    try:
        return vmatable.unpack(table)
    except vmatable.TableError as err:
        raise SchemaError(f"VmaTable: {err}") from err


# Records holding a list of another record kind's objects, packed: tag -> (to record, from record);
# such a field's own records (SUPERSEDED) are read in older images, no longer written.
TABLES = {b"VMAT": (vmatable.pack, unpack_vma_table)}
SUPERSEDED = {b"VMA ": b"VMAT"}
LAST_MINOR_BEFORE_TABLES = 6  # what ImageWriter.per_vma writes: the layout of 1.6 (tests)


@functools.cache
def _hints(cls) -> dict[str, typing.Any]:
    return typing.get_type_hints(cls)


@functools.cache
def _fields(cls) -> tuple[dataclasses.Field, ...]:
    return dataclasses.fields(cls)


_PLAIN = (int, str, bool, float, type(None))


@functools.cache
def _plan(cls) -> tuple[tuple[str, bool], ...] | None:
    """A dataclass's fields, each with whether its declared type is plain
    (copied as it is); None for any other type."""
    if not dataclasses.is_dataclass(cls):
        return None
    hints = _hints(cls)
    return tuple((f.name, hints[f.name] in _PLAIN) for f in dataclasses.fields(cls))


def encode(obj) -> typing.Any:
    """A model object as JSON-able data."""
    if type(obj) in _PLAIN:  # most fields: no other test needed
        return obj
    plan = _plan(type(obj))
    if plan is not None:
        return {name: getattr(obj, name) if plain else encode(getattr(obj, name)) for name, plain in plan}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, bytes):
        return obj.hex()
    if isinstance(obj, (list, PageRuns)):
        return [encode(x) for x in obj]
    if isinstance(obj, dict):
        return {k: encode(v) for k, v in obj.items()}
    return obj


class SchemaError(ValueError):
    """A payload that does not fit its declaration."""


def decode(tp, data, where: str):
    """Build a model object of type `tp` from JSON data, checking types."""
    return _decoder(tp)(data, where)


@functools.cache
def _decoder(tp) -> typing.Callable[[typing.Any, str], typing.Any]:
    """decode for one type, its dispatch done once (a tree's image holds
    tens of thousands of records: a VMA each)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        hints = _hints(tp)
        fields = [(f.name, hints[f.name], f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
                  for f in _fields(tp)]
        subs: list = []

        def of_dataclass(data, where):
            if not isinstance(data, dict):
                raise SchemaError(f"{where}: expected an object, found {type(data).__name__}")
            if not subs:  # built at the first call: a type may refer to itself
                subs.extend((name, _decoder(t), required, t if t in (int, str) else None) for name, t, required in fields)
            kwargs = {}
            for name, sub, required, plain in subs:
                if name in data:
                    value = data[name]
                    # an int or str field holding just that: no call, no path to format
                    kwargs[name] = value if type(value) is plain else sub(value, f"{where}.{name}")
                elif required:
                    raise SchemaError(f"{where}: missing field {name!r}")
            return tp(**kwargs)
        return of_dataclass
    if origin is list:
        (item,) = typing.get_args(tp)

        def of_list(data, where):
            if not isinstance(data, list):
                raise SchemaError(f"{where}: expected a list")
            sub = _decoder(item)
            return [sub(x, f"{where}[{i}]") for i, x in enumerate(data)]
        return of_list
    if origin is dict:
        _, vt = typing.get_args(tp)

        def of_dict(data, where):
            if not isinstance(data, dict):
                raise SchemaError(f"{where}: expected an object")
            sub = _decoder(vt)
            return {str(k): sub(v, f"{where}.{k}") for k, v in data.items()}
        return of_dict
    if origin in (typing.Union, types.UnionType):
        alts = typing.get_args(tp)

        def of_union(data, where):
            for alt in alts:
                try:
                    return _decoder(alt)(data, where)
                except SchemaError:
                    continue
            raise SchemaError(f"{where}: {data!r} fits none of {tp}")
        return of_union
    if tp is type(None):
        def of_none(data, where):
            if data is not None:
                raise SchemaError(f"{where}: expected null")
            return None
        return of_none
    if isinstance(tp, type) and issubclass(tp, enum.Flag):
        members = tp._value2member_map_  # values seen before: no Flag arithmetic again

        def of_flag(data, where):
            if type(data) is int and data in members:
                return members[data]
            if not isinstance(data, int) or isinstance(data, bool) or data < 0:
                raise SchemaError(f"{where}: expected flags (a non-negative integer), found {data!r}")
            return tp(data)
        return of_flag
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        def of_enum(data, where):
            try:
                return tp(data)
            except ValueError as err:
                raise SchemaError(f"{where}: unknown {tp.__name__} {data!r}") from err
        return of_enum
    if tp is bytes:
        def of_bytes(data, where):
            if isinstance(data, Unhexed):  # decoded by the reader already (a PMAP record)
                return data.data
            if not isinstance(data, str):
                raise SchemaError(f"{where}: expected hex bytes")
            try:
                return bytes.fromhex(data)
            except ValueError as err:
                raise SchemaError(f"{where}: bad hex") from err
        return of_bytes
    if tp is bool:
        def of_bool(data, where):
            if not isinstance(data, bool):
                raise SchemaError(f"{where}: expected true/false, found {data!r}")
            return data
        return of_bool
    if tp is int:
        def of_int(data, where):
            if type(data) is not int:  # (a bool is not an integer here)
                raise SchemaError(f"{where}: expected an integer, found {data!r}")
            return data
        return of_int
    if tp is str:
        def of_str(data, where):
            if not isinstance(data, str):
                raise SchemaError(f"{where}: expected a string, found {data!r}")
            return data
        return of_str

    def of_nothing(data, where):
        raise SchemaError(f"{where}: no decoder for {tp}")
    return of_nothing


# Fields shown in hex by `show`: addresses, masks and registers.
HEX_FIELDS = frozenset({
    "start", "end", "vaddr", "offset", "handler", "restorer", "mask", "sigmask",
    "start_code", "end_code", "start_data", "end_data", "start_brk", "brk", "start_stack",
    "arg_start", "arg_end", "env_start", "env_end", "rseq_ptr", "rseq_sig", "robust_list",
    "clear_child_tid", "altstack_sp", "personality", "regs", "xxh3",
})


def describe(obj, hexed: bool = False) -> typing.Any:
    """Like encode, but flags and enums spelled by name (for `show`)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: describe(getattr(obj, f.name), f.name in HEX_FIELDS) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Flag):
        names = [m.name for m in type(obj) if m.value and m in obj]
        rest = obj.value & ~sum(m.value for m in type(obj) if m in obj)
        if rest:
            names.append(hex(rest))
        return "|".join(names) if names else "0"
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, bytes):
        return obj.hex()
    if isinstance(obj, (list, PageRuns)):
        return [describe(x, hexed) for x in obj]
    if isinstance(obj, dict):
        return {k: describe(v, hexed) for k, v in obj.items()}
    if hexed and isinstance(obj, int) and not isinstance(obj, bool):
        return hex(obj)
    return obj
