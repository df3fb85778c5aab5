"""prepare_files: open, in the restorer, every file the new process needs.

Everything that can fail because of the outside world (a library replaced
since the dump, a missing file, no terminal) fails here, before any process
exists. The opened descriptions are handed to the child by clone (it
inherits the restorer's fd table) and moved to their numbers there. Each
kind of object opens its own fds (objects/); what is here is the order.
"""

from __future__ import annotations

from .. import records as dataclasses  # the dataclasses API, cheap to import
import os
import typing

from .. import inheritfd, model, objects
from ..errors import RestoreError
from ..image.reader import Image
from ..objects.file import FileRef, changed_since_dump
from ..objects.protocol import Restoring, TreeFds, open_path


@dataclasses.dataclass
class PreparedFiles:
    """Descriptions open in the restorer, and where they go in the child."""

    fd_sources: dict[int, int]  # target fd -> restorer fd (first of each shared group)
    fd_aliases: dict[int, int]  # target fd -> target fd it shares a description with
    cloexec: set[int]
    map_sources: dict[str, int]  # map_key() -> restorer fd, for mmap
    exe: int  # restorer fd of the executable
    shm_sources: dict[int, int] = dataclasses.field(default_factory=dict)  # SharedMem id -> restorer fd
    # what kinds finish in the child once its fds are at their numbers (an epoll's watches)
    in_child: list[typing.Callable[[], None]] = dataclasses.field(default_factory=list)
    # what kinds do in the new process right after its setsid/setpgid, before it makes its children
    # (a session leader takes its controlling terminal, which they inherit)
    in_session: list[typing.Callable[[], None]] = dataclasses.field(default_factory=list)
    shared: set[int] = dataclasses.field(default_factory=set)  # sources owned by the tree's SharedFiles
    sysv_ids: dict[int, int] = dataclasses.field(default_factory=dict)  # SharedMem id -> shmid, attached by shmat

    def all_sources(self) -> list[int]:
        return sorted(set(self.fd_sources.values()) | set(self.map_sources.values()) | {self.exe}
                      | set(self.shm_sources.values()))

    def close(self) -> None:
        for fd in set(self.all_sources()) - self.shared:
            try:
                os.close(fd)
            except OSError:
                pass


class SharedFiles:
    """What the processes of a tree share, made once in the restorer and
    inherited by all of them: open file descriptions (FdEntry.desc), and
    what each kind shares (pipes, sockets, shared memory)."""

    inherit: dict[str, int] = {}  # restore --inherit-fd: resource -> the caller's fd (inheritfd.py)

    def __init__(self, root_image: Image, **options):
        self.tree_fds = TreeFds()
        self.opened = self.tree_fds.fds
        self.descs: dict[int, int] = {}  # FdEntry.desc -> restorer fd
        self.kinds = objects.preparers(root_image, self.tree_fds, **options)
        self.by_fd_kind = {fd_kind: k for k in self.kinds for fd_kind in k.fd_kinds}
        self.root_image = root_image
        for kind in self.kinds:
            kind.open_other = self.open_in_flight

    def open_in_flight(self, entry: model.FdEntry) -> int:
        """A file in flight (root.in_flight) opened by its kind in the
        restorer, held by the tree's fds until the restore ends."""
        kind = self.by_fd_kind.get(entry.kind)
        if kind is None:
            raise RestoreError(f"file in flight {entry.fd}: kind {entry.kind.value} cannot be restored")
        return self.tree_fds.own(_open_entry(kind, entry, Restoring(self.root_image, False, [])))

    def end_prepare(self) -> None:
        for kind in self.kinds:
            kind.end_prepare()

    def ready(self) -> None:
        for kind in self.kinds:
            kind.ready()

    def finish(self, ok: bool) -> None:
        for kind in self.kinds:
            kind.finish(ok)

    def close(self) -> None:
        self.tree_fds.close_all()


def prepare_files(image: Image, shell_job: bool, shared: SharedFiles) -> PreparedFiles:
    ckpt = image.checkpoint
    prepared = PreparedFiles({}, {}, set(), {}, -1)
    prepared.shared = shared.opened  # the same set: what the tree shares is closed by SharedFiles only
    try:
        _prepare_maps(ckpt, {f.id: f for f in ckpt.files}, prepared)
        for kind in shared.kinds:
            kind.prepare_vmas(ckpt, prepared)
            kind.prepare_process(ckpt)
        _prepare_fds(image, prepared, shell_job, shared)
    except BaseException:
        prepared.close()
        raise
    return prepared


def map_access(vma: model.Vma) -> int:
    """The access mode to open a file mapping's file with: the one it had
    (an r--s mapping of a file opened read-write can be mprotect'ed writable
    later), or for images before 1.2 the least its protection needs."""
    if vma.access >= 0:
        return vma.access
    writable_shared = vma.kind == model.VmaKind.FILE_SHARED and vma.prot & model.Prot.PROT_WRITE
    return os.O_RDWR if writable_shared else os.O_RDONLY


def map_key(file_id: int, access: int) -> str:
    """Names one open of a mapped file: one per file and access mode."""
    return f"{file_id}.{access}"


def vma_map_key(vma: model.Vma) -> str:
    """The open a file VMA is mapped from: of its FileRef, or of the Ghost
    of a file unlinked while mapped (objects/ghost.py)."""
    return f"ghost{vma.ghost}.{map_access(vma)}" if vma.ghost >= 0 else map_key(vma.file_id, map_access(vma))


def _prepare_maps(ckpt: model.Checkpoint, refs: dict[int, FileRef], prepared: PreparedFiles) -> None:
    needed = {(v.file_id, map_access(v)) for v in ckpt.vmas
              if v.kind in (model.VmaKind.FILE_PRIVATE, model.VmaKind.FILE_SHARED) and v.ghost < 0}
    needed.add((ckpt.mm.exe_file_id, os.O_RDONLY))
    for fid, access in sorted(needed):
        ref = refs[fid]
        fd = open_path(ref.path, access | os.O_CLOEXEC, "mapped file")
        prepared.map_sources[map_key(fid, access)] = fd
        why = changed_since_dump(ref, os.fstat(fd))
        if why:
            raise RestoreError(f"mapped file {ref.path}: {why}; it cannot be mapped again safely")
    prepared.exe = prepared.map_sources[map_key(ckpt.mm.exe_file_id, os.O_RDONLY)]


def _prepare_fds(image: Image, prepared: PreparedFiles, shell_job: bool, shared: SharedFiles) -> None:
    proc = Restoring(image, shell_job, prepared.in_child)
    try:
        for entry in image.checkpoint.fds:
            if entry.flags & model.OpenFlag.O_CLOEXEC:
                prepared.cloexec.add(entry.fd)
            if entry.shares_with >= 0:
                prepared.fd_aliases[entry.fd] = entry.shares_with
                continue
            if entry.desc >= 0 and entry.desc in shared.descs:  # opened for another process of the tree
                prepared.fd_sources[entry.fd] = shared.descs[entry.desc]
                continue
            fd = inheritfd.open_inherited(entry, shared.inherit, shared.root_image.checkpoint.pipes)
            if fd is None:  # (else the caller's, restore --inherit-fd)
                kind = shared.by_fd_kind.get(entry.kind)
                if kind is None:
                    raise RestoreError(f"fd {entry.fd}: kind {entry.kind.value} cannot be restored")
                fd = _open_entry(kind, entry, proc)
            prepared.fd_sources[entry.fd] = fd
            if entry.desc >= 0:
                shared.descs[entry.desc] = shared.tree_fds.own(fd)
    finally:
        for kind in shared.kinds:
            kind.end_process()


def _open_entry(kind, entry: model.FdEntry, proc: Restoring) -> int:
    """The restorer fd of `entry`, opened by its kind, at its position."""
    fd = kind.open_fd(entry, proc)
    if entry.kind in kind.always_seek or entry.pos:
        try:
            os.lseek(fd, entry.pos, os.SEEK_SET)
        except OSError as err:
            if fd not in kind.tree_fds.fds:
                os.close(fd)
            raise RestoreError(f"fd {entry.fd}: cannot seek to {entry.pos}: {err.strerror}") from err
    return fd
