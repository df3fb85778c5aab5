"""Shared memory objects: memory that processes of the tree map shared or
hold as an fd, and that exists nowhere else. Stored once, however many
processes map it, from the object itself.

    what                 maps shows              fd        made again as
    shared anonymous     /dev/zero (deleted)     -         map_files of a fresh one
    memfd                /memfd:NAME (deleted)   SHM       memfd_create(NAME)
    tmpfs, unlinked      PATH (deleted)          -         PATH, created and unlinked
    SysV segment         /SYSVKKKKKKKK           -         shmget with its id (shm_next_id)

Mappings are SHARED_MEM or SYSV_SHM VMAs (Vma.shm: the SharedMem id); the
memory stages map them from the fds prepared here.

A memfd comes back with its mode and its seals (F_GET_SEALS), added once its
contents are written. What the kernel allows (6.18, measured):

    seal                 with shared mappings that may write (smaps "mw")
    F_SEAL_WRITE         refused (EBUSY) while any exists, even read-only
                         ones; mappings made after it lose VM_MAYWRITE
    F_SEAL_FUTURE_WRITE  allowed; those mappings keep writing, new writable
                         mappings are refused, new read-only ones lose VM_MAYWRITE
    F_SEAL_EXEC          on a memfd with exec bits, adds WRITE, FUTURE_WRITE,
                         SHRINK and GROW (chmod is refused after it)

So the seals are added before any process maps the object (its mappings come
back without VM_MAYWRITE, as they were), except F_SEAL_FUTURE_WRITE over
mappings that could write (made before it): that one (with F_SEAL_SEAL) is
added once every process of the tree has mapped it, before any runs
(SharedMem.late_seals). Both kinds of mapping of one such memfd: refused.

exec(2) refuses a file open for writing (ETXTBSY) but not the memfd_create fd
itself (it holds no write access), so the first read-write fd of a memfd is
the memfd_create fd, not a reopen, and an executable memfd can still be
fexecve'd. memfd_secret areas are refused: their pages cannot be read from
outside the process.
"""

from __future__ import annotations

import contextlib
from .. import records as dataclasses  # the dataclasses API, cheap to import
import enum
import fcntl
import os
import stat

from .. import model
from ..errors import RestoreError, Unsupported
from ..kernel import mapping
from ..kernel.arch.x86_64 import PAGE_SIZE
from . import protocol
from .protocol import OpenFd, Restoring

SHM_DEST = 0o1000  # a SysV segment IPC_RMID'd while attached
SECRETMEM = "/secretmem (deleted)"  # what maps and fd links show of a memfd_secret


class Seal(enum.IntFlag):
    """F_SEAL_* (include/uapi/linux/fcntl.h)."""

    F_SEAL_SEAL = 0x1
    F_SEAL_SHRINK = 0x2
    F_SEAL_GROW = 0x4
    F_SEAL_WRITE = 0x8
    F_SEAL_FUTURE_WRITE = 0x10
    F_SEAL_EXEC = 0x20


class MemfdFlag(enum.IntFlag):
    """MFD_* (include/uapi/linux/memfd.h)."""

    MFD_CLOEXEC = 0x1
    MFD_ALLOW_SEALING = 0x2
    MFD_NOEXEC_SEAL = 0x8
    MFD_EXEC = 0x10


@dataclasses.dataclass
class SharedMem:
    """A memory object processes of the tree map shared or hold as an fd,
    which exists nowhere else: shared anonymous memory (path ""), a memfd
    (path "/memfd:NAME") or a file on tmpfs unlinked while mapped (its
    path). Stored once, however many processes map it: its data extents
    (the holes stay holes) are in the root's ghosts.img."""

    id: int
    size: int
    path: str = ""
    mode: int = 0o600
    # [offset in the object, length, offset in ghosts.img, XXH3-64], one per extent
    extents: list[list[int]] = dataclasses.field(default_factory=list)
    sysv_id: int = -1  # a SysV segment: its shmid (made again with the same id), key and state
    sysv_key: int = 0
    sysv_removed: bool = False  # IPC_RMID'd, alive while attached
    # 1.2: a memfd's seals, and those of them added only once every process maps it (see above)
    seals: Seal = dataclasses.field(default=Seal(0), metadata={"flags": Seal})
    late_seals: Seal = dataclasses.field(default=Seal(0), metadata={"flags": Seal})


def _maps_dev(dev: int) -> str:
    """st_dev as /proc/PID/maps shows it ("00:01"), so fds and mappings of
    one object get one key."""
    return f"{os.major(dev):02x}:{os.minor(dev):02x}"


class Collect(protocol.Collect):
    def __init__(self):
        self.shms: dict[object, SharedMem] = {}  # by (device, inode), or ("sysv", shmid)
        self.sources: dict[int, str] = {}  # SharedMem id -> a /proc path to open it by
        self.maywrite: dict[int, set[bool]] = {}  # memfd SharedMem id -> whether its mappings may write

    def _shm(self, key, path: str, source: str) -> SharedMem:
        if key not in self.shms:
            self.shms[key] = SharedMem(len(self.shms), 0, path)
            self.sources[self.shms[key].id] = source
        return self.shms[key]

    def collect_vma(self, pid: int, m, prot: model.Prot, flags: model.MapFlag) -> model.Vma | None:
        if not m.shared:
            return None
        from ..kernel import proc  # a dump's (see objects/__init__)

        where = f"pid {pid}: VMA {m.start:#x}-{m.end:#x}"
        source = f"/proc/{pid}/map_files/{m.start:x}-{m.end:x}"
        if m.path.startswith("/SYSV"):
            seg = proc.sysv_shm(m.inode)  # a segment's inode number is its shmid
            if seg is None:
                raise Unsupported(f"{where} maps SysV segment {m.inode}, which /proc/sysvipc/shm does not list", pid)
            if m.offset or m.end - m.start != -(-seg["size"] // PAGE_SIZE) * PAGE_SIZE:
                raise Unsupported(f"{where} maps part of SysV segment {m.inode}; only whole attachments are "
                                  "supported", pid)
            obj = self._shm(("sysv", m.inode), "", source)
            # the key it was made with is in its name (/proc/sysvipc/shm says 0 once it is removed)
            obj.sysv_id, obj.sysv_key, obj.sysv_removed = m.inode, int(m.path[5:13], 16), bool(seg["perms"] & SHM_DEST)
            return model.Vma(m.start, m.end, model.VmaKind.SYSV_SHM, prot, flags, 0, -1, m.path, shm=obj.id)
        if m.path.startswith(("/dev/zero", "/memfd:")) or m.deleted:
            path = "" if m.path.startswith("/dev/zero") else m.path.removesuffix(" (deleted)")
            obj = self._shm((m.dev, m.inode), path, source)
            self.maywrite.setdefault(obj.id, set()).add("mw" in m.vmflags)
            return model.Vma(m.start, m.end, model.VmaKind.SHARED_MEM, prot, flags, m.offset, -1, m.path, shm=obj.id)
        return None

    def collect_fd(self, fd: OpenFd) -> model.FdEntry | None:
        if fd.link == SECRETMEM:
            raise Unsupported(f"{fd.where} is a memfd_secret ({fd.link}); not supported: its pages cannot be "
                              "read from outside the process", fd.pid)
        if not (stat.S_ISREG(fd.st.st_mode) and fd.link.startswith("/memfd:")):
            return None
        obj = self._shm((_maps_dev(fd.st.st_dev), fd.st.st_ino), fd.link.removesuffix(" (deleted)"), fd.path)
        return model.FdEntry(fd.fd, model.FdKind.SHM, fd.flags, fd.pos, fd.link, obj.id)

    def collect_tree(self, root: model.Checkpoint, tree_pids: set[int]) -> None:
        """A memfd's seals; the mappings of one sealed F_SEAL_FUTURE_WRITE
        must all have been made before the seal, or all after it."""
        for obj in self.shms.values():
            if not obj.path.startswith("/memfd:"):
                continue
            fd = os.open(self.sources[obj.id], os.O_RDONLY | os.O_CLOEXEC)
            try:
                obj.seals = Seal(fcntl.fcntl(fd, fcntl.F_GET_SEALS))
            finally:
                os.close(fd)
            if not obj.seals & Seal.F_SEAL_FUTURE_WRITE or obj.seals & Seal.F_SEAL_WRITE:
                continue
            maywrite = self.maywrite.get(obj.id, set())
            if maywrite == {True, False}:
                raise Unsupported(f"memfd {obj.path} (shared memory {obj.id}): sealed F_SEAL_FUTURE_WRITE with "
                                  "shared mappings that may write (made before the seal) and ones that may not "
                                  "(made after it, or read-only); not supported: the kernel makes the first "
                                  "only before the seal, the second only after it")
            if True in maywrite:
                obj.late_seals = obj.seals & (Seal.F_SEAL_FUTURE_WRITE | Seal.F_SEAL_SEAL)

    def write_tree(self, writer, root: model.Checkpoint) -> None:
        """Each object's data extents (SEEK_DATA/SEEK_HOLE on the object
        itself, opened through /proc: pages no process touched are not
        read) into the root's ghosts.img."""
        from ..kernel import proc

        for obj in self.shms.values():
            fd = os.open(self.sources[obj.id], os.O_RDONLY | os.O_CLOEXEC)
            try:
                st = os.fstat(fd)
                obj.size = st.st_size
                if obj.sysv_id < 0:
                    obj.mode = st.st_mode & 0o7777
                else:
                    obj.mode = (proc.sysv_shm(obj.sysv_id) or {"perms": 0o600})["perms"] & 0o777
                obj.extents = protocol.write_extents(fd, obj.size, writer)
            finally:
                os.close(fd)
        root.shms = sorted(self.shms.values(), key=lambda m: m.id)


class Prepare(protocol.Prepare):
    fd_kinds = (model.FdKind.SHM,)
    always_seek = fd_kinds

    def __init__(self, root, tree_fds):
        super().__init__(root, tree_fds)
        self.shms = {m.id: m for m in root.checkpoint.shms}
        self.fds: dict[int, int] = {}  # SharedMem id -> restorer fd
        self.sysv_done: set[int] = set()
        self.sysv_made: set[int] = set()
        self.handed: set[int] = set()  # SharedMem ids whose memfd_create fd went to a process's fd

    def prepare_vmas(self, ckpt: model.Checkpoint, prepared) -> None:
        for shm_id in sorted({v.shm for v in ckpt.vmas if v.kind == model.VmaKind.SHARED_MEM}):
            prepared.shm_sources[shm_id] = self.object(shm_id)
        for shm_id in sorted({v.shm for v in ckpt.vmas if v.kind == model.VmaKind.SYSV_SHM}):
            prepared.sysv_ids[shm_id] = self.sysv(shm_id)

    def open_fd(self, entry: model.FdEntry, proc: Restoring) -> int:
        """A description of its own, as memfd_create made: the first read-write
        one is the memfd_create fd itself (exec refuses a reopened one)."""
        fd = self.object(entry.file_id)
        if entry.file_id not in self.handed and entry.flags & os.O_ACCMODE == os.O_RDWR:
            self.handed.add(entry.file_id)
            try:
                fcntl.fcntl(fd, fcntl.F_SETFL, protocol.open_flags(entry) & ~os.O_CLOEXEC)
            except OSError as err:
                raise RestoreError(f"fd {entry.fd}: cannot set its flags {entry.flags!r}: {err.strerror}") from err
            return fd
        return self.own(protocol.open_path(f"/proc/self/fd/{fd}", protocol.open_flags(entry), f"fd {entry.fd}"))

    def object(self, shm_id: int) -> int:
        """An fd of the object, made as it was: shared anonymous memory
        (taken from /proc/self/map_files, so that it shows as /dev/zero
        (deleted)), a memfd of the same name, or the file at its old path,
        unlinked again once open; then filled with its extents."""
        if shm_id not in self.fds:
            obj = self.shms[shm_id]
            what = f"shared memory {obj.path or '(anonymous)'}"
            try:
                if not obj.path:
                    base = mapping.map_shared_anon(obj.size)
                    try:
                        fd = self.own(os.open(f"/proc/self/map_files/{base:x}-{base + obj.size:x}",
                                              os.O_RDWR | os.O_CLOEXEC))
                    finally:
                        mapping.unmap(base, obj.size)
                elif obj.path.startswith("/memfd:"):
                    fd = self.own(_memfd_create(obj, what))
                    os.ftruncate(fd, obj.size)
                else:
                    path = protocol.create_beside(obj.path, obj.mode, what)
                    try:
                        fd = self.own(os.open(path, os.O_RDWR | os.O_CLOEXEC))
                    finally:
                        os.unlink(path)
                    os.ftruncate(fd, obj.size)
                protocol.fill_extents(fd, obj.extents, self.root)
                if obj.path.startswith("/memfd:"):
                    os.fchmod(fd, obj.mode)
                    _add_seals(fd, obj.seals & ~obj.late_seals, what)
            except OSError as err:
                raise RestoreError(f"{what}: cannot recreate it: {err.strerror}") from err
            self.fds[shm_id] = fd
        return self.fds[shm_id]

    def sysv(self, shm_id: int) -> int:
        """The SysV segment with its saved id (made again if it is gone),
        filled with its contents; returns its shmid."""
        from ..kernel import sysv  # a restore's (see objects/__init__)

        obj = self.shms[shm_id]
        if shm_id not in self.sysv_done:
            try:
                if sysv.ensure(obj.sysv_id, obj.sysv_key, obj.size, obj.mode, private_if_taken=obj.sysv_removed):
                    self.sysv_made.add(obj.sysv_id)
                sysv.write(obj.sysv_id, [(pos, self.root.read_blob(blob, length, xxh3))
                                         for pos, length, blob, xxh3 in obj.extents])
            except OSError as err:
                raise RestoreError(f"SysV shared memory segment {obj.sysv_id}: {err.strerror or err}") from err
            self.sysv_done.add(shm_id)
        return obj.sysv_id

    def ready(self) -> None:
        """Every process maps its memfds: the seals that had to wait for that."""
        for shm_id, fd in self.fds.items():
            obj = self.shms[shm_id]
            _add_seals(fd, obj.late_seals, f"shared memory {obj.path}")

    def finish(self, ok: bool) -> None:
        """Segments made here that had been removed at dump are removed again
        once attached (they live while attached); after a failure, every
        segment made here goes. One that was there already is left alone."""
        from ..kernel import sysv

        removed = {m.sysv_id for m in self.shms.values() if m.sysv_removed}
        for shmid in self.sysv_made:
            if not ok or shmid in removed:
                with contextlib.suppress(OSError):
                    sysv.remove(shmid)


def _memfd_create(obj: SharedMem, what: str) -> int:
    """A memfd of the object's name that can take any mode and seals: made
    executable (mode 0777, no seals), narrowed by fchmod and F_ADD_SEALS.
    Before 6.3 there is no MFD_EXEC (EINVAL); with vm.memfd_noexec = 2 it
    is refused (EACCES), and only a memfd sealed non-executable can be made."""
    name = obj.path[len("/memfd:"):]
    base = MemfdFlag.MFD_CLOEXEC | MemfdFlag.MFD_ALLOW_SEALING
    try:
        return os.memfd_create(name, base | MemfdFlag.MFD_EXEC)
    except OSError as err:
        if err.errno == 22:  # EINVAL: a kernel before MFD_EXEC, whose memfds are all executable
            return os.memfd_create(name, base)
        if err.errno != 13 or obj.mode & 0o111 or not obj.seals & Seal.F_SEAL_EXEC:
            raise RestoreError(f"{what}: cannot make it again with mode {obj.mode:o} and seals {obj.seals!r}: "
                               f"memfd_create(MFD_EXEC): {err.strerror} (see vm.memfd_noexec)") from err
        return os.memfd_create(name, base | MemfdFlag.MFD_NOEXEC_SEAL)


def _add_seals(fd: int, seals: Seal, what: str) -> None:
    if not seals:
        return
    try:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, int(seals))
    except OSError as err:
        raise RestoreError(f"{what}: cannot add its seals {seals!r}: {err.strerror}") from err


def check_image(ckpt: model.Checkpoint, image) -> list[str]:
    p = []
    for m in ckpt.shms:
        if not 0 <= m.size < 1 << 46 or (not m.path and m.sysv_id < 0 and m.size % PAGE_SIZE) \
                or (m.path and protocol.bad_path(m.path)) or not -1 <= m.sysv_id < 1 << 31:
            p.append(f"shared memory {m.id}: bad size {m.size} or path {m.path!r}")
        if (m.seals | m.late_seals) & ~Seal(sum(Seal)) or m.late_seals & ~m.seals:
            p.append(f"shared memory {m.id}: bad seals {m.seals.value:#x}, late {m.late_seals.value:#x}")
        if protocol.bad_extents(m.extents, m.size, image):
            p.append(f"shared memory {m.id}: an extent outside the object or ghosts.img")
    return p + [f"VMA {v.start:#x}-{v.end:#x}: shared memory without an object" for v in ckpt.vmas
                if v.kind in (model.VmaKind.SHARED_MEM, model.VmaKind.SYSV_SHM) and v.shm < 0]


def check_tree(ckpt: model.Checkpoint, root: model.Checkpoint) -> list[str]:
    shms = {m.id for m in root.shms}
    sysv_ids = {m.id for m in root.shms if m.sysv_id >= 0}
    problems = [f"fd {e.fd}: unknown shared memory {e.file_id}" for e in ckpt.fds
                if e.kind == model.FdKind.SHM and e.file_id not in shms]
    problems += [f"VMA {v.start:#x}: unknown shared memory {v.shm}" for v in ckpt.vmas
                 if v.kind in (model.VmaKind.SHARED_MEM, model.VmaKind.SYSV_SHM) and v.shm not in shms]
    return problems + [f"VMA {v.start:#x}: shared memory {v.shm} is not a SysV segment" for v in ckpt.vmas
                       if v.kind == model.VmaKind.SYSV_SHM and v.shm not in sysv_ids]


def blobs(ckpt: model.Checkpoint) -> list[tuple[str, int, int, int]]:
    return [(f"shared memory {m.id} extent at {pos}", blob, length, xxh3)
            for m in ckpt.shms for pos, length, blob, xxh3 in m.extents]
