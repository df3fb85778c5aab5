"""The protocol between the pipelines and the kinds of objects.

A kind is a module of procsnap/objects that may define:

    Collect                 its dump side, a subclass of Collect below. A
                            dump makes one instance of each kind, so it
                            holds what the processes of the tree share.
    Prepare                 its restore side, a subclass of Prepare below,
                            one instance per restore of a tree.
    check_image(ckpt, image) -> [problem]   its records in one image
    check_tree(ckpt, root)   -> [problem]   what an image refers to in the root's
    verify(root)             -> [problem]   whether the world still fits (paths)
    blobs(ckpt) -> [(what, offset, size, xxh3)]  its data in ghosts.img

Every hook has a default that does nothing, so a kind defines only what it
has. The pipelines call the kinds in their registered order
(objects.KINDS) and never name one.

    dump, per process              dump, per tree        restore
    -----------------              --------------        -------
    collect_vma  a shared mapping  collect_tree          prepare_vmas
    collect_fd   an fd, or None    collect_in_flight     open_fd
    check_fds    all fds found                           end_process
    collect_seized  with the task's help                 end_prepare
    write_process   its own data   write_tree            ready
                                   end_dump              finish
"""

from __future__ import annotations

import contextlib
from .. import records as dataclasses  # the dataclasses API, cheap to import
import os
import typing

from .. import model, nsworker
from ..errors import RestoreError

if typing.TYPE_CHECKING:
    from ..image.reader import Image
    from ..image.writer import ImageWriter
    from ..kernel.infect import Target
    from ..kernel.proc import MapsEntry
    from .file import FileTable


@dataclasses.dataclass(slots=True)
class OpenFd:
    """An fd of a frozen process as the dump found it, offered to each kind
    in turn until one takes it."""

    pid: int
    fd: int
    link: str  # readlink of /proc/PID/fd/FD
    st: os.stat_result  # stat through it: of the object itself
    flags: model.OpenFlag
    pos: int
    files: FileTable  # the process's FileRefs
    shell_job: bool
    in_flight: bool = False  # procsnap's own copy of a file in flight (SCM_RIGHTS), no process's fd

    @property
    def where(self) -> str:
        return f"pid {self.pid}: fd {self.fd}"

    @property
    def path(self) -> str:
        """The fd in /proc, to open the object again through."""
        return f"/proc/{self.pid}/fd/{self.fd}"


class Collect:
    """A kind at dump."""

    options: dict[str, typing.Any] = {}  # the dump's options a kind may heed (ext_unix_sk), set by collectors()

    def collect_vma(self, pid: int, m: MapsEntry, prot: model.Prot, flags: model.MapFlag) -> model.Vma | None:
        """The record of mapping `m` if it maps an object of this kind, else None."""
        return None

    def collect_fd(self, fd: OpenFd) -> model.FdEntry | None:
        """The record of `fd` if it is of this kind, else None."""
        return None

    def check_fds(self, pid: int, entries: list[model.FdEntry]) -> None:
        """Refuse what only all of a process's fds together show."""

    def collect_seized(self, target: Target, entries: list[model.FdEntry]) -> None:
        """What only the frozen task itself can tell (injected syscalls)."""

    def write_process(self, pid: int, writer: ImageWriter, ckpt: model.Checkpoint) -> None:
        """This kind's data and records of one process, into its image."""

    def collect_in_flight(self, root: model.Checkpoint, tree_pids: set[int],
                          offer: typing.Callable[[int], model.FdEntry]) -> None:
        """Once every process is collected, before any collect_tree: files
        the tree passes around that no process holds (SCM_RIGHTS in
        flight), each kept open here and offered to the kinds as an fd of
        procsnap's own (offer(fd) -> its record, from the kind that takes
        it, or Unsupported), into root.in_flight."""

    def collect_tree(self, root: model.Checkpoint, tree_pids: set[int]) -> None:
        """Once every process is collected, still frozen: the tree-wide
        records, into the root's checkpoint."""

    def write_tree(self, writer: ImageWriter, root: model.Checkpoint) -> None:
        """Tree-wide data, into the root's image."""

    def end_dump(self, killed: bool) -> None:
        """The dump is over (killed: it killed the tree; else it failed or
        the tree runs on), the tree still frozen unless killed: let go of
        what was held on the tree's objects (tcp.py's repair mode)."""


@dataclasses.dataclass
class Restoring:
    """What a kind's open_fd sees of the process being prepared."""

    image: Image
    shell_job: bool
    in_child: list[typing.Callable[[], None]]  # run in the new process once its fds are at their numbers


class TreeFds:
    """Fds the restorer holds for the whole tree (what its processes share),
    closed once the restore is over, not with any one process's files."""

    def __init__(self):
        self.fds: set[int] = set()

    def own(self, fd: int) -> int:
        self.fds.add(fd)
        return fd

    def close(self, fd: int) -> None:
        self.fds.discard(fd)
        os.close(fd)

    def close_all(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()


class Prepare:
    """A kind at restore: its fds opened in the restorer, inherited by the
    new processes."""

    fd_kinds: tuple[model.FdKind, ...] = ()  # the FD records it opens
    options: dict[str, typing.Any] = {}  # the restore's options a kind may heed (ext_unix_sk), set by preparers()
    always_seek: tuple[model.FdKind, ...] = ()  # these get their position back even when it is 0
    # an FdEntry of any kind opened in the restorer, held until the restore ends (a file in
    # flight, root.in_flight), set by restorer.files.SharedFiles
    open_other: typing.Callable[[model.FdEntry], int] | None = None

    def __init__(self, root: Image, tree_fds: TreeFds):
        self.root = root
        self.tree_fds = tree_fds
        self.own = tree_fds.own

    def prepare_vmas(self, ckpt: model.Checkpoint, prepared) -> None:
        """The objects this kind's mappings need (restorer.files.PreparedFiles)."""

    def prepare_process(self, ckpt: model.Checkpoint) -> None:
        """Before a process's fds are opened: what its task needs (a removed cwd's placeholder)."""

    def open_fd(self, entry: model.FdEntry, proc: Restoring) -> int:
        """A restorer fd of the object `entry` (of one of fd_kinds) names."""
        raise NotImplementedError

    def end_process(self) -> None:
        """Every fd of a process is open (or one failed)."""

    def end_prepare(self) -> None:
        """Every fd of every process of the tree is open; none runs yet."""

    def ready(self) -> None:
        """Every process of the tree is rebuilt (its memory mapped); none runs yet."""

    def finish(self, ok: bool) -> None:
        """The restore of the tree is over; ok: it succeeded."""


class AnonCollect(Collect):
    """An fd of an anonymous inode (its link: `link`), whose state is what
    its fdinfo shows (FdEntry.params, and an epoll's watches)."""

    link = ""
    fd_kind: model.FdKind

    def collect_fd(self, fd: OpenFd) -> model.FdEntry | None:
        if fd.link != self.link:
            return None
        from ..kernel import proc  # a dump's (see objects/__init__)

        with open(f"/proc/{fd.pid}/fdinfo/{fd.fd}") as f:
            params, watches = proc.parse_anon_fdinfo(f.read())
        return model.FdEntry(fd.fd, self.fd_kind, fd.flags, 0, fd.link, params=params, watches=watches)


class AnonPrepare(Prepare):
    """Made again in the restorer from its parameters, by `make`."""

    def make(self, entry: model.FdEntry) -> int:
        raise NotImplementedError

    def open_fd(self, entry: model.FdEntry, proc: Restoring) -> int:
        try:
            return self.own(self.make(entry))
        except OSError as err:
            raise RestoreError(f"fd {entry.fd}: cannot make the {entry.kind.value}: {err.strerror}") from err


def nonblock(entry: model.FdEntry) -> bool:
    return bool(entry.flags & os.O_NONBLOCK)


# Flags that only matter at open time, or that fcntl/dup decide.
_OPEN_MASK = ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_CLOEXEC | os.O_NOCTTY)


def open_flags(entry: model.FdEntry) -> int:
    """The flags to open an fd's object again with (close-on-exec in the
    restorer; the child decides)."""
    return (entry.flags & _OPEN_MASK) | os.O_CLOEXEC


def open_path(path: str, flags: int, what: str) -> int:
    try:
        return os.open(nsworker.in_root(path), flags)  # a container's own mounts: in its namespace
    except OSError as err:
        raise RestoreError(f"{what}: cannot open {path}: {err.strerror}") from err


def bad_path(path: str) -> bool:
    """Not a plain absolute path (an image must never name a relative one)."""
    return not path.startswith("/") or "\0" in path or any(p == ".." for p in path.split("/"))


def bad_fd_paths(ckpt: model.Checkpoint, kinds: tuple[model.FdKind, ...]) -> list[str]:
    """Problems of the fds of `kinds`, which are reopened by FdEntry.path."""
    return [f"fd {fd.fd}: path {fd.path!r} is not a plain absolute path" for fd in ckpt.fds
            if fd.kind in kinds and bad_path(fd.path)]


def same_file(a: os.stat_result, b: os.stat_result | None) -> bool:
    if b is None:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def make_beside(path: str, make: typing.Callable[[str], None], what: str) -> str:
    """Make a file at `path` (or at a name beside it, if taken) with
    `make(name)`, which must fail with FileExistsError on a taken name;
    returns the name."""
    for n in range(100):
        candidate = path if n == 0 else f"{path}.procsnap-ghost.{n}"
        try:
            make(candidate)
        except FileExistsError:
            continue
        except OSError as err:
            raise RestoreError(f"{what}: cannot recreate {path}: {err.strerror}") from err
        return candidate
    raise RestoreError(f"{what}: no free name beside {path}")


def new_file(mode: int) -> typing.Callable[[str], None]:
    """A `make` for make_beside: an empty regular file, created exclusively."""
    def make(name: str) -> None:
        os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode & 0o7777))
    return make


def create_beside(path: str, mode: int, what: str) -> str:
    """Create `path` (or a name beside it, if taken) exclusively; returns it."""
    return make_beside(path, new_file(mode), what)


def open_unlinked(path: str, make: typing.Callable[[str], None], fill: typing.Callable[[str], None],
                  flags: int, what: str) -> int:
    """A file made again beside `path` (make_beside), filled by fill(name),
    opened with `flags` and unlinked again at once: an fd of a file unlinked
    while open, as /proc shows one ("PATH (deleted)")."""
    name = make_beside(path, make, what)
    try:
        fill(name)
        return os.open(name, flags | os.O_CLOEXEC)
    except OSError as err:
        raise RestoreError(f"{what}: cannot make it again at {name}: {err.strerror}") from err
    finally:
        with contextlib.suppress(OSError):
            os.unlink(name)


@dataclasses.dataclass
class FileAttrs:
    """What the inode of a file made again keeps of the original (1.2):
    owner, permission bits and times. Its ctime and inode number are the
    kernel's to give, never ours."""

    mode: int  # st_mode & 0o7777
    uid: int
    gid: int
    atime_ns: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileAttrs:
        return cls(st.st_mode & 0o7777, st.st_uid, st.st_gid, st.st_atime_ns, st.st_mtime_ns)

    def apply(self, path: str) -> None:
        """Owner, then mode (chown clears set-uid and set-gid), then times."""
        os.chown(path, self.uid, self.gid)
        os.chmod(path, self.mode)
        self.apply_times(path)

    def apply_times(self, where: str | int) -> None:
        """The times alone, again, after writes that moved them (a path or an fd)."""
        os.utime(where, ns=(self.atime_ns, self.mtime_ns))


# Extents of sparse objects: [offset in the object, length, offset in ghosts.img, XXH3-64] each.
SEEK_DATA, SEEK_HOLE = 3, 4
EXTENT_CHUNK = 64 << 20
ENXIO = 6


def write_extents(fd: int, size: int, writer: ImageWriter) -> list[list[int]]:
    """The data extents of the object at `fd` (SEEK_DATA/SEEK_HOLE: holes
    are not read, nor stored) into ghosts.img."""
    extents = []
    off = 0
    while off < size:
        try:
            start = os.lseek(fd, off, SEEK_DATA)
        except OSError as err:
            if err.errno == ENXIO:  # no data after off
                break
            raise
        end = min(os.lseek(fd, start, SEEK_HOLE), size)
        for pos in range(start, end, EXTENT_CHUNK):
            data = os.pread(fd, min(EXTENT_CHUNK, end - pos), pos)
            blob, xxh3 = writer.write_ghost(data)
            extents.append([pos, len(data), blob, xxh3])
        off = end
    return extents


def fill_extents(fd: int, extents: list[list[int]], image: Image) -> None:
    """Write the extents back into the object at `fd` (already at its size:
    what lies between them stays a hole)."""
    for pos, length, blob, xxh3 in extents:
        data = image.read_blob(blob, length, xxh3)
        view = memoryview(data)
        while view:
            view = view[os.pwrite(fd, view, pos + len(data) - len(view)):]


def bad_extents(extents: list[list[int]], size: int, image: Image) -> bool:
    """Some extent is not four non-negative ints inside the object and ghosts.img."""
    return any(len(ext) != 4 or any(not isinstance(x, int) or x < 0 for x in ext)
               or ext[0] + ext[1] > size or ext[2] + ext[1] > image.ghosts_size for ext in extents)
