"""Unlinked files: files whose name was removed while they were open.

    what at dump                   stored                    made again (beside the old path if taken)
    regular file, no link left     its data extents (holes   created, truncated to its size, extents
                                   stay holes), attrs        written, owner/mode/times set
    device node, no link left      rdev, attrs               mknod (only the stateless devices of
                                                             device.DEVICES; others are refused)
    regular file, linked elsewhere that other link (found   linked again from that link: the same inode
                                   by searching), its inode

Each is stored once for the whole tree, in the root's image, however many
processes and descriptions hold it (two processes that opened it apart
share it again). Restore makes the file and opens every description of it
by its name, which is removed once every process's fds are open, before
any runs (end_prepare): each shows as "PATH (deleted)" as at dump. (Not
through /proc/self/fd/N: a description opened with O_NOFOLLOW, as
mkstemp's are, cannot be opened again through a link.) An unlinked FIFO
is a pipe's (objects/pipe.py).
"""

from __future__ import annotations

import contextlib
from .. import records as dataclasses  # the dataclasses API, cheap to import
import os
import stat

from .. import model
from ..errors import RestoreError, Unsupported
from . import protocol
from .device import DEVICES
from .protocol import FileAttrs, OpenFd, Restoring

DELETED = " (deleted)"
O_NOATIME = 0o1000000
SEARCH_BUDGET = 200_000  # directory entries looked at for another link of a file, at most


@dataclasses.dataclass
class Ghost:
    """A file unlinked while open. Images before this one (1.2 without
    `extents`) hold a regular file's whole contents at `offset`, `size`."""

    id: int
    path: str
    mode: int  # st_mode, with the file type
    size: int
    offset: int
    xxh3: int  # XXH3-64 of the contents
    attrs: FileAttrs | None = None  # 1.2: owner, mode, times
    # 1.2: [offset in the file, length, offset in ghosts.img, XXH3-64] per data extent; None: see above
    extents: list[list[int]] | None = None
    rdev: int = 0  # 1.2: a device node's device number
    link: str = ""  # 1.2: another link of the file, by which it is opened again (nothing stored)
    ino: int = 0  # 1.2: with `link`: the file's inode number, to know it again


class Collect(protocol.Collect):
    def __init__(self):
        self.ghosts: dict[tuple[int, int], Ghost] = {}  # by (st_dev, st_ino), for the whole tree
        self.sources: dict[int, str] = {}  # Ghost id -> a /proc path to read it through

    def collect_fd(self, fd: OpenFd) -> model.FdEntry | None:
        st = fd.st
        if not fd.link.endswith(DELETED) or not (stat.S_ISREG(st.st_mode) or stat.S_ISCHR(st.st_mode)
                                                 or stat.S_ISBLK(st.st_mode)):
            return None
        path = fd.link[: -len(DELETED)]
        key = (st.st_dev, st.st_ino)
        if key not in self.ghosts:
            ghost = Ghost(len(self.ghosts), path, st.st_mode, st.st_size, 0, 0, FileAttrs.of(st), [])
            if st.st_nlink:
                if not stat.S_ISREG(st.st_mode):
                    raise Unsupported(f"{fd.where}: device node {fd.link} still has another link; not supported",
                                      fd.pid)
                ghost.link, ghost.ino, ghost.attrs = _find_link(path, st, fd), st.st_ino, None
            elif not stat.S_ISREG(st.st_mode):
                dev = (os.major(st.st_rdev), os.minor(st.st_rdev))
                if not stat.S_ISCHR(st.st_mode) or dev not in DEVICES:
                    kind = "character" if stat.S_ISCHR(st.st_mode) else "block"
                    raise Unsupported(f"{fd.where}: {fd.link} is an unlinked {kind} device node ({dev[0]}:{dev[1]}); "
                                      f"only nodes of {', '.join(DEVICES.values())} are supported", fd.pid)
                ghost.rdev, ghost.size = st.st_rdev, 0
            self.ghosts[key] = ghost
            self.sources[ghost.id] = fd.path
        return model.FdEntry(fd.fd, model.FdKind.GHOST, fd.flags, fd.pos, path, self.ghosts[key].id)

    def collect_vma(self, pid: int, m, prot: model.Prot, flags: model.MapFlag) -> model.Vma | None:
        """A private mapping of a regular file unlinked while mapped (a
        library replaced by an upgrade): its file is a Ghost like an open
        one's, read through map_files; its written pages are copied as for
        any private file mapping. (A shared one is objects/shm.py's.)"""
        if m.shared or not m.deleted or not m.path.startswith("/") or m.inode == 0:
            return None
        where = f"/proc/{pid}/map_files/{m.start:x}-{m.end:x}"
        try:
            st = os.stat(where)
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode) or st.st_nlink:
            return None  # refused by the dumper, by name
        key = (st.st_dev, st.st_ino)
        if key not in self.ghosts:
            self.ghosts[key] = Ghost(len(self.ghosts), m.path[: -len(DELETED)], st.st_mode, st.st_size, 0, 0,
                                     FileAttrs.of(st), [])
            self.sources[self.ghosts[key].id] = where
        link = os.lstat(where).st_mode  # the open file's f_mode, as for any file mapping
        access = {0o600: os.O_RDWR, 0o200: os.O_WRONLY}.get(link & 0o600, os.O_RDONLY)
        return model.Vma(m.start, m.end, model.VmaKind.FILE_PRIVATE, prot, flags, m.offset, -1, m.path,
                         access=access, ghost=self.ghosts[key].id)

    def write_tree(self, writer, root: model.Checkpoint) -> None:
        """The data extents of each regular file without a link, read
        through a task's fd without touching its atime, into the root's image."""
        for ghost in self.ghosts.values():
            if stat.S_ISREG(ghost.mode) and not ghost.link:
                fd = os.open(self.sources[ghost.id], os.O_RDONLY | O_NOATIME | os.O_CLOEXEC)
                try:
                    ghost.size = os.fstat(fd).st_size
                    ghost.extents = protocol.write_extents(fd, ghost.size, writer)
                finally:
                    os.close(fd)
        root.ghosts = sorted(self.ghosts.values(), key=lambda g: g.id)


def _find_link(path: str, st: os.stat_result, fd: OpenFd) -> str:
    """A name of the file (st) other than the removed `path`: searched in
    the directory it was in, then in each enclosing directory in turn up to
    the top of its filesystem, at most SEARCH_BUDGET entries in all."""
    budget = [SEARCH_BUDGET]
    done = None
    here = os.path.dirname(path)
    while True:
        try:
            if os.stat(here).st_dev != st.st_dev:
                break
        except OSError:
            here = os.path.dirname(here)  # removed too: search from its parent
            continue
        found = _search(here, st, done, budget)
        if found:
            return found
        if here == "/" or budget[0] <= 0:
            break
        done, here = here, os.path.dirname(here)
    raise Unsupported(f"{fd.where}: {fd.link} still has {st.st_nlink} other link(s), none found in "
                      f"{SEARCH_BUDGET} entries around it; not supported", fd.pid)


def _search(top: str, st: os.stat_result, skip: str | None, budget: list[int]) -> str | None:
    """A path under `top` (not under `skip`, searched already) of the inode
    of `st`, on its filesystem."""
    dirs = [top]
    while dirs and budget[0] > 0:
        where = dirs.pop()
        try:
            entries = list(os.scandir(where))
        except OSError:
            continue
        budget[0] -= len(entries)
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    if entry.path != skip and entry.stat(follow_symlinks=False).st_dev == st.st_dev:
                        dirs.append(entry.path)
                elif entry.inode() == st.st_ino and protocol.same_file(st, os.stat(entry.path, follow_symlinks=False)):
                    return entry.path
            except OSError:
                continue
    return None


class Prepare(protocol.Prepare):
    fd_kinds = (model.FdKind.GHOST,)
    always_seek = fd_kinds

    def __init__(self, root, tree_fds):
        super().__init__(root, tree_fds)
        self.made: dict[tuple[str, int], str] = {}  # (image directory, Ghost id) -> its name until end_prepare
        self.retime: list[tuple[int, FileAttrs]] = []  # mapped ghosts: mmap() set their atime (file_accessed)

    def open_fd(self, entry: model.FdEntry, proc: Restoring) -> int:
        # an image before 1.2 holds each process's own ghosts; a newer one the tree's, in the root's
        image = proc.image if proc.image.checkpoint.ghosts else self.root
        key = (image.directory, entry.file_id)
        if key not in self.made:
            ghost = next(g for g in image.checkpoint.ghosts if g.id == entry.file_id)  # there: check_tree
            self.made[key] = _recreate(image, ghost)
        return protocol.open_path(self.made[key], protocol.open_flags(entry), f"fd {entry.fd}")

    def prepare_vmas(self, ckpt: model.Checkpoint, prepared) -> None:
        """The file of each mapping of an unlinked file, made again (or the
        one an fd of it made), opened with the mapping's access mode."""
        from ..restorer.files import map_access, vma_map_key  # a restore's

        for v in ckpt.vmas:
            if v.ghost < 0 or vma_map_key(v) in prepared.map_sources:
                continue
            key = (self.root.directory, v.ghost)
            if key not in self.made:
                ghost = next(g for g in self.root.checkpoint.ghosts if g.id == v.ghost)  # there: check_tree
                self.made[key] = _recreate(self.root, ghost)
            fd = protocol.open_path(self.made[key], map_access(v) | os.O_CLOEXEC,
                                    f"VMA {v.start:#x}-{v.end:#x} ({v.name})")
            prepared.map_sources[vma_map_key(v)] = fd
            ghost = next(g for g in self.root.checkpoint.ghosts if g.id == v.ghost)
            if ghost.attrs is not None:
                self.retime.append((self.own(os.dup(fd)), ghost.attrs))

    def ready(self) -> None:
        """The times of mapped ghosts again: mmap() of the file moved its atime."""
        for fd, attrs in self.retime:
            with contextlib.suppress(OSError):
                attrs.apply_times(fd)
            self.tree_fds.close(fd)
        self.retime.clear()

    def end_prepare(self) -> None:
        """Unlinked again, as at dump."""
        for path in self.made.values():
            with contextlib.suppress(OSError):
                os.unlink(path)
        self.made.clear()

    def finish(self, ok: bool) -> None:
        self.end_prepare()


def _recreate(image, ghost: Ghost) -> str:
    """The file made again beside its old path; returns its name."""
    what = f"unlinked file {ghost.path}"
    if ghost.link:
        _check_link(ghost, what)
        return protocol.make_beside(ghost.path, lambda name: os.link(ghost.link, name), what)
    if stat.S_ISREG(ghost.mode):
        make = protocol.new_file(0o600 if ghost.attrs else ghost.mode)
    else:
        def make(name: str) -> None:
            os.mknod(name, stat.S_IFCHR | 0o600, ghost.rdev)
    path = protocol.make_beside(ghost.path, make, what)
    try:
        if stat.S_ISREG(ghost.mode):
            _fill(path, image, ghost)
        if ghost.attrs is not None:
            ghost.attrs.apply(path)
    except OSError as err:
        os.unlink(path)
        raise RestoreError(f"{what}: cannot make it again at {path}: {err.strerror}") from err
    return path


def _fill(path: str, image, ghost: Ghost) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        if ghost.extents is None:
            data = memoryview(image.read_ghost(ghost))
            while data:
                data = data[os.write(fd, data):]
        else:
            os.ftruncate(fd, ghost.size)
            protocol.fill_extents(fd, ghost.extents, image)
    finally:
        os.close(fd)


def _check_link(ghost: Ghost, what: str) -> None:
    problem = _link_problem(ghost)
    if problem:
        raise RestoreError(f"{what}: {problem}")


def _link_problem(ghost: Ghost) -> str | None:
    try:
        st = os.stat(ghost.link, follow_symlinks=False)
    except OSError as err:
        return f"its other link {ghost.link}: {err.strerror}"
    if not stat.S_ISREG(st.st_mode) or st.st_ino != ghost.ino:
        return f"its other link {ghost.link} names another file now (inode {st.st_ino}, expected {ghost.ino})"
    return None


def check_image(ckpt: model.Checkpoint, image) -> list[str]:
    p = []
    for g in ckpt.ghosts:
        if protocol.bad_path(g.path) or (g.link and protocol.bad_path(g.link)):
            p.append(f"ghost {g.id}: path {g.path!r} or link {g.link!r} is not a plain absolute path")
        if not (stat.S_ISREG(g.mode) or (stat.S_ISCHR(g.mode) and g.rdev >= 0)):
            p.append(f"ghost {g.id}: mode {g.mode:#o} is neither a regular file nor a character device")
        if g.extents is None:
            if g.size < 0 or g.offset < 0 or g.offset + g.size > image.ghosts_size:
                p.append(f"ghost {g.id}: outside ghosts.img")
        elif not 0 <= g.size < 1 << 62 or protocol.bad_extents(g.extents, g.size, image):
            p.append(f"ghost {g.id}: size {g.size}, or an extent outside the file or ghosts.img")
    return p


def check_tree(ckpt: model.Checkpoint, root: model.Checkpoint) -> list[str]:
    ids = {g.id for g in (ckpt.ghosts or root.ghosts)}
    return [f"fd {fd.fd}: refers to unknown ghost {fd.file_id}" for fd in ckpt.fds
            if fd.kind == model.FdKind.GHOST and fd.file_id not in ids] + \
        [f"VMA {v.start:#x}-{v.end:#x}: refers to unknown ghost {v.ghost}" for v in ckpt.vmas
         if v.ghost >= 0 and (v.ghost not in {g.id for g in root.ghosts} or v.kind != model.VmaKind.FILE_PRIVATE)]


def verify(root: model.Checkpoint) -> list[str]:
    return [f"unlinked file {g.path}: {problem}" for g in root.ghosts if g.link
            for problem in [_link_problem(g)] if problem]


def blobs(ckpt: model.Checkpoint) -> list[tuple[str, int, int, int]]:
    out = []
    for g in ckpt.ghosts:
        if g.extents is None:
            out.append((f"ghost {g.id}", g.offset, g.size, g.xxh3))
        else:
            out += [(f"ghost {g.id} extent at {pos}", blob, length, xxh3) for pos, length, blob, xxh3 in g.extents]
    return out
