"""A container's mount namespace (`unshare --mount --mount-proc`): its mount
table, recorded as what differs from the namespace it was copied from, and
made again on a fresh copy of the restorer's own.

The kernel copies every mount on unshare(CLONE_NEWNS), so a container's
mountinfo is the host's at the time plus what the container changed. The
dump compares the container's table (/proc/1/mountinfo in the worker) with
the host's (nsworker.host_mountinfo) and classes each mount:

    how      what it is                           made again by
    -------  -----------------------------------  -------------------------------
    copied   a copy of a host mount (same point,  the restore's own copy; its per-
             device, root, type)                  mount flags and propagation set
    tmpfs    a tmpfs mounted inside, with its     mount -t tmpfs with its options,
             files (Mount.files)                  filled, then flags, propagation
    bind     a bind mount of a host path          bound again from the same path
                                                  (or --external mnt[NAME]:PATH)
    proc     a procfs of the container's pid ns   mounted by the restore worker,
             (--mount-proc)                       inside the new pid namespace
    (gone)   a host mount the container           unmounted (MNT_DETACH) in the copy
             unmounted: any mount of the copy no
             copied one matches

Refused by name, the tree left running: a mount of another file system
type, a mount made inside hidden under another one (overmounted), a bind
of a mount made inside, a mount under a procfs made inside, a root that is
not the host's (pivot_root, chroot), a made mount whose parent shares a
peer group with the host (it would appear in the host's table too), and in
a tmpfs a hard link, a device node, a fifo or a socket.

Propagation: each mount ends as the container's was (private, shared,
slave, unbindable). A copied mount shared with a host peer group stays a
peer of the host's group (the copy joins it, as the container's did); a
shared mount made inside gets a peer group of its own.

At restore (make_namespace) a forked copy of the restorer unshares a mount
namespace and builds it; the restorer keeps fds of its namespace and root,
looks the tree's files up through that root (nsworker.set_root), and the
single-threaded copy that clones the root enters it first (enter()), so
the tree's processes are made in it, before any of them runs. The procfs
is mounted by the restore worker (mount_proc), the first process of the
new pid namespace.
"""

from __future__ import annotations

from .. import records as dataclasses  # the dataclasses API, cheap to import
import contextlib
import ctypes
import os
import stat

from .. import nsworker
from ..errors import RestoreError, Unsupported

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8  # include/uapi/linux/mount.h
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND = 32, 1024, 2048, 4096
MS_REC, MS_UNBINDABLE, MS_PRIVATE, MS_SLAVE, MS_SHARED = 1 << 14, 1 << 17, 1 << 18, 1 << 19, 1 << 20
MS_RELATIME, MS_STRICTATIME = 1 << 21, 1 << 24
MNT_DETACH = 2
OPEN_TREE_CLONE = 1  # include/uapi/linux/mount.h; open_tree(2) is syscall 428 on x86_64
NR_OPEN_TREE = 428
NR_PIVOT_ROOT = 155
AT_FDCWD = -100
O_NOATIME = 0o1000000
MOUNT_FLAGS = {"ro": MS_RDONLY, "nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
               "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME}
PROPAGATION = {"shared": MS_SHARED, "slave": MS_SLAVE, "private": MS_PRIVATE, "unbindable": MS_UNBINDABLE}
EXTENT = 4 << 20  # a tmpfs file's data is stored in pieces of at most this
TMPFS_OPTIONS = ("rw", "ro", "size", "nr_blocks", "nr_inodes", "mode", "uid", "gid", "huge", "mpol", "inode32",
                 "inode64", "noswap", "quota", "usrquota", "grpquota", "usrquota_block_hardlimit",
                 "usrquota_inode_hardlimit", "grpquota_block_hardlimit", "grpquota_inode_hardlimit", "casefold",
                 "strict_encoding")  # what mountinfo shows of a tmpfs (mm/shmem.c), all that is passed again

libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
libc.syscall.restype = ctypes.c_long


@dataclasses.dataclass
class TmpfsFile:
    """One entry of a tmpfs made inside (1.6): `path` relative to its root ("" is the root)."""

    path: str
    kind: str  # "dir", "file", "symlink"
    mode: int
    uid: int
    gid: int
    atime_ns: int
    mtime_ns: int
    size: int = 0
    extents: list[list[int]] = dataclasses.field(default_factory=list)  # [offset, length, ghosts.img offset, xxh3]
    target: str = ""  # a symlink's


@dataclasses.dataclass
class Mount:
    """One line of the container's mountinfo (1.6), and how it is made again."""

    id: int
    parent: int
    dev: str
    root: str
    point: str
    options: str  # per-mount: rw/ro, nosuid, nodev, noexec, atime
    optional: str  # propagation: "shared:N master:M ..." ("" private)
    fstype: str
    source: str
    super_options: str
    how: str = ""  # "copied", "tmpfs", "bind", "proc"
    bind_from: str = ""  # a bind mount's host path
    external: str = ""  # --external mnt[POINT]:NAME at dump: bound from the path the restore names NAME
    files: list[TmpfsFile] = dataclasses.field(default_factory=list)


def _unescape(field: str) -> str:
    """mountinfo's octal escapes (space, tab, newline, backslash)."""
    return field.encode().decode("unicode_escape").encode("latin-1").decode() if "\\" in field else field


def parse_mountinfo(text: str) -> list[Mount]:
    out = []
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        f, r = left.split(), right.split()
        out.append(Mount(int(f[0]), int(f[1]), f[2], _unescape(f[3]), _unescape(f[4]), f[5], " ".join(f[6:]),
                         r[0], _unescape(r[1]) if len(r) > 1 else "", r[2] if len(r) > 2 else ""))
    return out


def _key(m: Mount, dev: bool = True) -> tuple:
    return (m.point, m.dev if dev else m.source, m.root, m.fstype)


def _peer(m: Mount, word: str) -> str | None:
    return next((o.split(":")[1] for o in m.optional.split() if o.startswith(word + ":")), None)


def classify(mounts: list[Mount], origin: list[Mount], external: dict[str, str] | None = None) -> None:
    """Set each mount's `how` (and `bind_from`, `external`); refuse, by name,
    what is not made again. `origin`: the host's table (what the container's
    was copied from); external: --external mnt[POINT]:NAME."""
    external = dict(external or {})
    unclaimed = list(origin)
    by_id = {m.id: m for m in mounts}
    top = [m for m in mounts if m.parent not in by_id] + [m for m in mounts if m.parent in by_id]
    for m in top:  # the root first: whether the container pivoted decides the rest
        pivoted = top[0].how == "root"
        if pivoted and m is not top[0] and any(_key(h)[1:] == _key(m)[1:] for h in origin):
            raise Unsupported(f"mount namespace: {m.fstype} mount at {m.point}: a host mount kept under the "
                              f"container's own root (pivot_root into {top[0].bind_from}); not restored "
                              "(unmount it)")
        match = next((h for h in unclaimed if _key(h) == _key(m)), None)
        if match is not None and m.point not in external:
            unclaimed.remove(match)
            m.how = "copied"
            continue
        where = f"mount namespace: {m.fstype} mount at {m.point}"
        parent = by_id.get(m.parent)
        host = next((h for h in origin if h.dev == m.dev and _under(m.root, h.root)), None)
        if m.point == "/" and parent is None and host is not None:  # pivot_root into a host directory
            m.how, m.bind_from = "root", os.path.join(host.point, os.path.relpath(m.root, host.root))
            continue
        if m.point == "/" or parent is None:
            raise Unsupported(f"{where} (root {m.root}, device {m.dev}) is the container's root and not the host's "
                              "nor a directory of the host's (pivot_root into it); not restored")
        if parent.how == "proc":
            raise Unsupported(f"{where}: under the container's procfs at {parent.point}; not restored")
        if parent.how != "copied" and parent.point == m.point:
            raise Unsupported(f"{where}: overmounts the {parent.fstype} mount made inside at the same point, "
                              "which it hides; overmounted mounts are not restored")
        shared = _peer(parent, "shared")
        if shared is not None and any(_peer(h, "shared") == shared for h in origin):
            raise Unsupported(f"{where}: its parent mount at {parent.point} is shared with the host (peer group "
                              f"{shared}), so the mount is the host's too; not restored")
        if _peer(m, "master") is not None:
            raise Unsupported(f"{where}: a slave of peer group {_peer(m, 'master')}; a mount made inside that "
                              "receives another's mounts is not restored")
        made_tmpfs = any(o.dev == m.dev and o.how == "tmpfs" for o in mounts)
        if m.point in external:
            m.how, m.external = "bind", external.pop(m.point)
        elif m.fstype == "tmpfs" and m.root == "/" and not made_tmpfs:
            m.how = "tmpfs"
        elif m.fstype == "proc":
            m.how = "proc"
        elif host is not None:
            m.how, m.bind_from = "bind", os.path.join(host.point, os.path.relpath(m.root, host.root))
        elif made_tmpfs:
            raise Unsupported(f"{where}: a bind mount of {m.root} of a tmpfs made inside; not restored")
        else:
            raise Unsupported(f"{where} (source {m.source}, device {m.dev}): file system type {m.fstype} "
                              "made inside; only tmpfs, proc and bind mounts of host paths are restored")
    if external:
        raise Unsupported(f"--external mnt[{next(iter(external))}]: no mount made inside is at that point "
                          f"(mounts: {', '.join(m.point for m in mounts if m.how != 'copied') or 'none'})")


def _under(path: str, top: str) -> bool:
    return top == "/" or path == top or path.startswith(top.rstrip("/") + "/")


# --- dump -------------------------------------------------------------------------------------------------

_dump = {"external": {}, "outside": set()}  # in a container's dump worker: its --external mnt[POINT]:NAME,
# and the paths of files the tree holds open on mounts outside its namespace (opened before the unshare)


def dump_setup(external: dict[str, str]) -> None:
    """First thing in a container's dump worker: the tree's paths looked up
    in its own mount namespace, if it has one (through /proc/1/root)."""
    own = os.readlink("/proc/1/ns/mnt") != nsworker.host_namespaces().get("mnt")
    if external and not own:
        raise no_namespace(external, "pid 1 of the container has")
    _dump["external"] = external
    if own:
        nsworker.set_root("/proc/1/root")


def dump_external() -> dict[str, str]:
    return _dump["external"]


def no_namespace(external: dict[str, str], whose: str) -> Unsupported:
    names = ", ".join(f"mnt[{key}]" for key in external)
    return Unsupported(f"{'--external ' + names + ': ' if names else ''}{whose} no mount namespace of its own")


def check_fds(pid: int, entries) -> None:
    """Files of the container's own procfs are the new pid namespace's after
    a restore, not reopened by path: refused by name."""
    if not nsworker.inside() or nsworker.in_root("/") == "/":
        return
    procs = [m for m in read_table() if m.fstype == "proc" and m.dev not in _host_devs()]
    for fd in entries:
        if fd.path.startswith("/") and any(_under(fd.path, m.point) for m in procs):
            raise Unsupported(f"pid {pid}: fd {fd.fd}: {fd.path} is a file of the container's own procfs; "
                              "not restored", pid)


def note_outside(pid: int) -> None:
    """Before the freeze: the files `pid` holds open on mounts that are not
    the container's (opened before its unshare: their mnt_id is not in its
    table) are looked up, at dump and at restore, in the caller's namespace."""
    ids = {m.id for m in read_table()}
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            link = os.readlink(f"/proc/{pid}/fd/{name}")
            with open(f"/proc/{pid}/fdinfo/{name}") as f:
                mnt = next((int(line.split()[1]) for line in f if line.startswith("mnt_id:")), None)
            if link.startswith("/") and mnt is not None and mnt not in ids:
                _dump["outside"].add(link)
    nsworker.set_root("/proc/1/root", _dump["outside"])


def outside() -> list[str]:
    return sorted(_dump["outside"])


def _host_devs() -> set[str]:
    return {m.dev for m in parse_mountinfo(nsworker.host_mountinfo())}


def check_image(mounts: list[Mount], own: bool) -> list[str]:
    problems = [] if own or not mounts else ["namespaces: a mount table without a mount namespace"]
    if own and not mounts:
        problems.append("namespaces: a mount namespace without its mount table")
    for m in mounts:
        if m.how not in ("copied", "tmpfs", "bind", "proc", "root"):
            problems.append(f"mount at {m.point}: unknown kind {m.how!r}")
        if not _plain(m.point):
            problems.append(f"mount at {m.point!r}: not a plain absolute path")
        if m.how in ("bind", "root") and not m.external and not _plain(m.bind_from):
            problems.append(f"mount at {m.point}: bound from {m.bind_from!r}, not a plain absolute path")
        if m.how == "tmpfs" and any(o.split("=")[0] not in TMPFS_OPTIONS for o in m.super_options.split(",")):
            problems.append(f"tmpfs at {m.point}: options {m.super_options!r} beyond {', '.join(TMPFS_OPTIONS)}")
        for f in m.files:
            if f.path.startswith("/") or ".." in f.path.split("/") or f.kind not in ("dir", "file", "symlink"):
                problems.append(f"tmpfs at {m.point}: entry {f.path!r} ({f.kind})")
            if any(len(e) != 4 or min(e) < 0 or e[0] + e[1] > f.size for e in f.extents):
                problems.append(f"tmpfs at {m.point}: entry {f.path!r}: extents {f.extents} beyond its size {f.size}")
    return problems


def _plain(path: str) -> bool:
    return path.startswith("/") and "\0" not in path and ".." not in path.split("/")


def collect_mounts(writer, external: dict[str, str] | None = None) -> list[Mount]:
    """In a container's dump worker: the container's mount table, classed,
    with the files of each tmpfs made inside (their data in ghosts.img)."""
    mounts = read_table()
    classify(mounts, parse_mountinfo(nsworker.host_mountinfo()), external)
    tmpfs = [m for m in mounts if m.how == "tmpfs"]
    for m, fd in zip(tmpfs, _mount_fds([m.point for m in tmpfs])):
        try:
            m.files = _collect_files(m, fd, writer)
        finally:
            os.close(fd)
    return mounts


def read_table() -> list[Mount]:
    with open("/proc/1/mountinfo") as f:
        return parse_mountinfo(f.read())


def _mount_fds(points: list[str]) -> list[int]:
    """A detached copy of each mount (open_tree OPEN_TREE_CLONE, without its
    submounts), made by a fork in the container's mount namespace (open_tree
    clones only mounts of the caller's) and handed back on a socket."""
    if not points:
        return []
    import socket  # here: every dump and restore imports this module (socket costs ~6 ms to import)

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    child = os.fork()
    if child == 0:
        try:
            ours.close()
            nsworker.setns_to(1, "mnt")
            fds = []
            for point in points:
                fd = libc.syscall(NR_OPEN_TREE, AT_FDCWD, point.encode(), OPEN_TREE_CLONE | os.O_CLOEXEC)
                if fd < 0:
                    theirs.sendall(f"E{point}: {os.strerror(ctypes.get_errno())}".encode())
                    os._exit(1)
                fds.append(fd)
            socket.send_fds(theirs, [b"R"], fds)
        finally:
            os._exit(0)
    theirs.close()
    try:
        msg, fds, _, _ = socket.recv_fds(ours, 4096, len(points))
    finally:
        ours.close()
        os.waitpid(child, 0)
    if msg != b"R" or len(fds) != len(points):
        for fd in fds:
            os.close(fd)
        raise Unsupported(f"mount namespace: cannot read the tmpfs at {msg[1:].decode(errors='replace')}")
    return fds


def _collect_files(m: Mount, tree_fd: int, writer) -> list[TmpfsFile]:
    """Every entry of the tmpfs, read without touching its access times;
    what is not restored is refused, named by its path in the container."""
    out: list[TmpfsFile] = []
    top = os.open(".", os.O_RDONLY | os.O_DIRECTORY | O_NOATIME | os.O_CLOEXEC, dir_fd=tree_fd)

    def walk(dir_fd: int, rel: str) -> None:
        for name in sorted(os.listdir(dir_fd)):
            path = f"{rel}/{name}" if rel else name
            where = f"mount namespace: tmpfs at {m.point}: {os.path.join(m.point, path)}"
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            entry = _entry(path, st)
            if stat.S_ISDIR(st.st_mode):
                out.append(entry)
                sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | O_NOATIME | os.O_NOFOLLOW | os.O_CLOEXEC,
                              dir_fd=dir_fd)
                try:
                    walk(sub, path)
                finally:
                    os.close(sub)
            elif stat.S_ISLNK(st.st_mode):  # readlink sets its atime (relatime): its times as it leaves them
                target = os.readlink(name, dir_fd=dir_fd)
                entry = _entry(path, os.stat(name, dir_fd=dir_fd, follow_symlinks=False))
                entry.kind, entry.target = "symlink", target
                out.append(entry)
            elif stat.S_ISREG(st.st_mode):
                if st.st_nlink > 1:
                    raise Unsupported(f"{where}: a file with {st.st_nlink} hard links; hard links are not restored")
                entry.kind, entry.size = "file", st.st_size
                fd = os.open(name, os.O_RDONLY | O_NOATIME | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
                try:
                    entry.extents = _collect_extents(fd, st.st_size, writer)
                finally:
                    os.close(fd)
                out.append(entry)
            else:
                kind = ("a device node" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else
                        "a fifo" if stat.S_ISFIFO(st.st_mode) else "a socket file")
                raise Unsupported(f"{where}: {kind}; not restored")

    try:
        root = _entry("", os.fstat(top))
        out.append(root)
        walk(top, "")
    finally:
        os.close(top)
    return out


def _entry(path: str, st: os.stat_result) -> TmpfsFile:
    return TmpfsFile(path, "dir", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_atime_ns, st.st_mtime_ns)


def _collect_extents(fd: int, size: int, writer) -> list[list[int]]:
    """The file's data where it has some (SEEK_DATA/SEEK_HOLE): holes stay holes."""
    out, pos = [], 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: only a hole from here on
            break
        end = os.lseek(fd, start, os.SEEK_HOLE)
        while start < end:
            data = os.pread(fd, min(EXTENT, end - start), start)
            if not data:
                break
            blob, xxh3 = writer.write_ghost(data)
            out.append([start, len(data), blob, xxh3])
            start += len(data)
        pos = end
    return out


# --- restore ----------------------------------------------------------------------------------------------

def _check(ret: int, what: str) -> None:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None, what: str) -> None:
    enc = lambda s: s.encode() if s is not None else None  # noqa: E731
    _check(libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), what)


def _mount_flags(m: Mount) -> int:
    flags = sum(MOUNT_FLAGS.get(o, 0) for o in m.options.split(","))
    return flags if flags & (MS_NOATIME | MS_RELATIME) else flags | MS_STRICTATIME


def _propagation(m: Mount) -> list[int]:
    """The mount calls that give a mount `m`'s propagation (from any state)."""
    words = {o.split(":")[0] for o in m.optional.split()}
    if "unbindable" in words:
        return [MS_UNBINDABLE]
    if "master" in words:
        return [MS_SLAVE] + ([MS_SHARED] if "shared" in words else [])
    return [MS_SHARED] if "shared" in words else [MS_PRIVATE]


class MadeNamespace:
    """The restore's mount namespace, held by fds: `ns` (for setns) and
    `root` (an O_PATH fd of its root, through which files are looked up)."""

    def __init__(self, ns: int, root: int, mounts: list[Mount]):
        self.ns, self.root, self.mounts = ns, root, mounts

    def close(self) -> None:
        nsworker.set_root("")
        for fd in (self.ns, self.root):
            with contextlib.suppress(OSError):
                os.close(fd)

    def enter(self) -> None:
        """In the single-threaded copy that clones the root: into the namespace
        (its root and cwd become the namespace's)."""
        nsworker.setns_fd(self.ns, "mnt")

    def mount_proc(self) -> None:
        """In the restore worker, the first process of the new pid namespace:
        the container's procfs, mounted in the made namespace, then back."""
        procs = [m for m in self.mounts if m.how == "proc"]
        if not procs:
            return
        own = os.open("/proc/thread-self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        cwd = os.open(".", os.O_PATH | os.O_CLOEXEC)  # setns moves it to the namespace's root
        try:
            nsworker.setns_fd(self.ns, "mnt")
            try:
                for m in procs:
                    with _named(m):
                        _mount("proc", m.point, "proc", _mount_flags(m) & ~MS_STRICTATIME,
                               _data(m.super_options) or None, f"mount a procfs on {m.point}")
                        for flag in _propagation(m):
                            _mount(None, m.point, None, flag, None, f"set the propagation of {m.point}")
            finally:
                nsworker.setns_fd(own, "mnt")
                os.fchdir(cwd)
        finally:
            os.close(own)
            os.close(cwd)


@contextlib.contextmanager
def _named(m: Mount):
    try:
        yield
    except OSError as err:
        raise RestoreError(f"mount namespace: {m.how} mount at {m.point}: {err.strerror or err}") from err


def _data(super_options: str) -> str:
    return ",".join(o for o in super_options.split(",") if o not in ("rw", "ro"))


def make_namespace(mounts: list[Mount], image, external: dict[str, str] | None = None,
                   outside: list[str] = (), root: str | None = None) -> MadeNamespace:
    """A new mount namespace with the container's table (but its procfs,
    see MadeNamespace.mount_proc), made by a forked copy of this process;
    files are looked up in it from here on (nsworker.set_root), but those
    in `outside`, which the tree had open on the host's mounts."""
    external = external or {}
    pivoted = next((m for m in mounts if m.how == "root"), None)
    if pivoted is not None and not root:
        raise RestoreError(f"mount namespace: the container's root was the host directory {pivoted.bind_from} "
                           "(pivot_root into it): give it again with --root DIR")
    if root and pivoted is None:
        raise RestoreError(f"--root {root}: the container's root was the host's, not a directory of its own")
    if root and not os.path.isdir(root):
        raise RestoreError(f"--root {root}: no such directory")
    for m in mounts:
        if m.external and m.external not in external:
            raise RestoreError(f"mount namespace: the bind mount at {m.point} was dumped as external "
                               f"{m.external!r}: give its path with --external mnt[{m.external}]:PATH")
    r, w = os.pipe2(os.O_CLOEXEC)
    go_r, go_w = os.pipe2(os.O_CLOEXEC)
    child = os.fork()
    if child == 0:
        code = 0
        try:
            os.close(r)
            os.close(go_w)
            _build(mounts, image, external, root)
            os.write(w, b"R")
            os.read(go_r, 1)
        except BaseException as err:  # noqa: BLE001 - reported to the restorer
            with contextlib.suppress(BaseException):
                os.write(w, f"E{err}".encode()[:4000])
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    os.close(go_r)
    try:
        msg = os.read(r, 4096)
        if msg != b"R":
            raise RestoreError(msg[1:].decode(errors="replace") if msg else
                               "mount namespace: the process making it died without a word")
        ns = os.open(f"/proc/{child}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        root = os.open(f"/proc/{child}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    finally:
        os.close(r)
        os.close(go_w)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(child, 0)
    nsworker.set_root(f"/proc/self/fd/{root}", outside)
    return MadeNamespace(ns, root, mounts)


def _build(mounts: list[Mount], image, external: dict[str, str], root: str | None) -> None:
    """In the forked copy: unshare, then make the copy the container's table
    (on `root`, bound on itself, with every mount made under it, and then
    pivoted into, if the container had pivoted)."""
    nsworker.unshare(nsworker.CLONE_NEWNS)
    with open("/proc/self/mountinfo") as f:
        here = parse_mountinfo(f.read())
    unclaimed, copies = list(here), []
    for m in mounts:
        if m.how != "copied":
            continue
        match = next((h for h in unclaimed if _key(h, dev=False) == _key(m, dev=False)), None)
        if match is None:
            raise RestoreError(f"mount namespace: the {m.fstype} mount at {m.point} (root {m.root}) the container "
                               "had from the host is not in the restorer's mount namespace")
        unclaimed.remove(match)
        copies.append((m, match))
    if root:  # nothing of the host's table stays: none of it is reached
        _mount(None, "/", None, MS_REC | MS_PRIVATE, None, "make / private")
    # the propagation of the copies first: nothing made below may reach the host's table
    for m, copy in copies:
        if _propagation(m) != _propagation(copy):
            with _named(m):
                for flag in _propagation(m):
                    _mount(None, m.point, None, flag, None, f"set the propagation of {m.point}")
    sources = {}  # bind sources, looked up before anything is mounted over them
    for m in mounts:
        if m.how == "bind":
            path = external[m.external] if m.external else m.bind_from
            try:
                sources[m.id] = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError as err:
                raise RestoreError(f"mount namespace: the bind mount at {m.point}: its source {path} is missing: "
                                   f"{err.strerror}") from err
    for h in reversed(unclaimed if not root else ()):  # unmounted inside: children (listed later) first
        with contextlib.suppress(OSError):  # gone with its parent already
            _check(libc.umount2(h.point.encode(), MNT_DETACH), f"umount {h.point}")
    base = os.path.realpath(root).rstrip("/") if root else ""
    with image.open_ghosts() as blobs:
        for m in sorted(mounts, key=lambda m: m.how != "root"):  # the root first: the rest is made under it
            at = base + m.point if m.point != "/" else base or "/"
            with _named(m):
                if m.how == "root":
                    _mount(root, at, None, MS_BIND, None, f"bind {root} on itself")
                elif m.how == "tmpfs":
                    _mount(m.source or "tmpfs", at, "tmpfs", 0, _data(m.super_options) or None, "mount a tmpfs")
                    _fill(m, at, image, blobs)
                    if "ro" in m.super_options.split(","):
                        _mount(None, at, None, MS_REMOUNT | MS_RDONLY, _data(m.super_options) or None,
                               "remount read-only")
                elif m.how == "bind":
                    _mount(f"/proc/self/fd/{sources[m.id]}", at, None, MS_BIND, None, "bind mount")
                else:
                    continue
                _mount(None, at, None, MS_REMOUNT | MS_BIND | _mount_flags(m), None, "set the mount flags")
                for flag in _propagation(m):
                    _mount(None, at, None, flag, None, f"set the propagation of {m.point}")
    for m, copy in copies:  # flags changed inside on copies (a ro remount)
        if _mount_flags(m) != _mount_flags(copy):
            with _named(m):
                _mount(None, m.point, None, MS_REMOUNT | MS_BIND | _mount_flags(m), None, "set the mount flags")
    for fd in sources.values():
        os.close(fd)
    if root:
        _pivot_into(base)


def _pivot_into(root: str) -> None:
    """`root` (a mount) made this namespace's root; the old one unmounted
    (pivot_root(".", ".") stacks the old root on the new one)."""
    os.chdir(root)
    _check(libc.syscall(NR_PIVOT_ROOT, b".", b"."), f"pivot_root into {root}")
    _check(libc.umount2(b".", MNT_DETACH), "unmount the old root")
    os.chdir("/")


def _fill(m: Mount, at: str, image, blobs) -> None:
    """The tmpfs's files, from the image; each directory's times once its entries are in."""
    from ..image.checksum import data_hash

    dirs = []
    for e in m.files:
        path = os.path.join(at, e.path) if e.path else at
        if e.kind == "dir":
            if e.path:
                os.mkdir(path, 0o700)
            dirs.append((path, e))
            continue
        if e.kind == "symlink":
            os.symlink(e.target, path)
        else:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                for offset, length, blob, xxh3 in e.extents:
                    data = image.load_blob(blobs, blob, length)
                    if len(data) != length or data_hash(data) != xxh3:
                        raise RestoreError(f"{image.ghosts_path}: {length} bytes at offset {blob} changed since "
                                           "validation")
                    os.pwrite(fd, data, offset)
                os.ftruncate(fd, e.size)
            finally:
                os.close(fd)
        _attrs(path, e)
    for path, e in reversed(dirs):
        _attrs(path, e)


def _attrs(path: str, e: TmpfsFile) -> None:
    os.chown(path, e.uid, e.gid, follow_symlinks=False)
    if e.kind != "symlink":
        os.chmod(path, e.mode)
    os.utime(path, ns=(e.atime_ns, e.mtime_ns), follow_symlinks=False)
