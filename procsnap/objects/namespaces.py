"""Namespaces: a tree whose root is the init of a pid namespace of its own
(a container's, as `unshare --fork --pid` makes it) is dumped with the
namespace's pids and restored into new namespaces; any other namespace
that is not procsnap's is refused at dump, by name.

    namespace  of a pid-namespace init's tree      elsewhere in a tree
    ---------  ---------------------------------   -------------------
    pid        made again (CLONE_NEWPID): the      refused (nested, or a
               root is pid 1, every task at its    process that unshared
               old pid inside; the host pid is     one for its children)
               the kernel's to give, as in CRIU
    uts        hostname and domainname             refused
    ipc        made again with its sysctls         refused
               (kernel.shm*, msg*, sem, fs.mqueue.*) and the SysV segments
               the tree attaches; other SysV objects and POSIX message
               queues in it are refused by name
    time       made again with its clock offsets   refused
    mnt        made again with its mount table     refused
               and its tmpfs files (mountns.py)
    net, user, cgroup                              refused, by name

The dump and the rebuild run in a worker inside the pid namespace
(nsworker.py), so the image and every call see the namespace's pids. The
namespaces the tree shares with procsnap are compared with the caller's
(nsworker.host_namespaces), not the worker's: the worker has a mount
namespace of its own for its procfs.

At restore, the restorer's thread makes the IPC namespace first, with its
sysctls, and stays in it until the restore is over: the SysV segments the
tree attaches are made there, before any process (objects/shm.py). A
single-threaded copy of the restorer then unshares the UTS and time
namespaces, sets the hostname and the clock offsets (a time namespace
takes offsets only before any process is in it), and clones the root with
CLONE_NEWPID and set_tid [1]; the root's children are made from inside,
with set_tid of their namespace pids.
"""

from __future__ import annotations

from .. import records as dataclasses  # the dataclasses API, cheap to import
import functools
import os

from .. import model, nsworker
from ..errors import Unsupported
from . import mountns, protocol

KINDS = ("cgroup", "ipc", "mnt", "net", "pid", "pid_for_children", "time", "time_for_children", "user", "uts")
MADE = ("pid", "pid_for_children", "uts", "ipc", "time", "time_for_children",
        "mnt")  # made again for a container's init
IPC_SYSCTLS = ("kernel/shmmax", "kernel/shmall", "kernel/shmmni", "kernel/shm_rmid_forced", "kernel/msgmax",
               "kernel/msgmni", "kernel/msgmnb", "kernel/sem", "fs/mqueue/msg_max", "fs/mqueue/msgsize_max",
               "fs/mqueue/queues_max", "fs/mqueue/msg_default", "fs/mqueue/msgsize_default")
SYSV = {"shm": "SysV shared memory segment", "msg": "SysV message queue", "sem": "SysV semaphore set"}


@dataclasses.dataclass
class Namespaces:
    """The namespaces of the tree's own, made again around the root (1.5),
    once per tree. A kind not listed in `own` is the host's."""

    own: list[str] = dataclasses.field(default_factory=list)  # of MADE's "pid", "uts", "ipc", "time"
    hostname: str = ""
    domainname: str = ""
    ipc_sysctls: dict[str, str] = dataclasses.field(default_factory=dict)  # IPC_SYSCTLS path -> value
    time_offsets: list[list[int | str]] = dataclasses.field(default_factory=list)  # [clock, seconds, nanoseconds]
    last_pid: int = 0  # the pid namespace's ns_last_pid: its next process is given the first free pid above it
    mounts: list[mountns.Mount] = dataclasses.field(default_factory=list)  # "mnt": its mount table (1.6)
    outside: list[str] = dataclasses.field(default_factory=list)  # "mnt": files open on host mounts (1.6)


def _link(pid: int | str, kind: str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/{kind}")
    except FileNotFoundError:
        return None  # a kind this kernel does not have


def foreign_namespaces(pid: int) -> list[str]:
    """The namespaces of `pid` that are not procsnap's, as 'kind:[inode]'."""
    host = nsworker.host_namespaces()
    return [theirs for kind in KINDS if (theirs := _link(pid, kind)) is not None and theirs != host.get(kind)]


def pid_namespace_init(pid: int) -> bool:
    """Whether `pid` is the init of a pid namespace one level below ours,
    a tree procsnap dumps from inside that namespace. A process deeper
    down, or not the init of its namespace, is refused by name."""
    theirs = _link(pid, "pid")
    if theirs is None or theirs == _link("self", "pid"):
        return False  # gone (the dump says so, by name), or in ours
    try:
        levels, mine = nsworker.ns_pids(pid), nsworker.ns_pids("self")
    except FileNotFoundError:
        return False
    if levels[-1] != 1:
        raise Unsupported(f"pid {pid}: is pid {levels[-1]} of pid namespace {_link(pid, 'pid')}, not its init; "
                          "a tree in a pid namespace is dumped from its init (a container's root)", pid)
    if len(levels) != len(mine) + 1:
        raise Unsupported(f"pid {pid}: the init of pid namespace {_link(pid, 'pid')}, nested "
                          f"{len(levels) - len(mine)} levels below procsnap's (NSpid {' '.join(map(str, levels))}); "
                          "nested pid namespaces are not restored", pid)
    return True


def check_namespaces(pid: int) -> None:
    """Inside a container's worker the namespaces of MADE are allowed when
    they are the root's (pid 1's); everything else not procsnap's is refused."""
    container = nsworker.inside()
    foreign = []
    for kind in KINDS:
        theirs = _link(pid, kind)
        if theirs is None or theirs == nsworker.host_namespaces().get(kind):
            continue
        if container and kind in MADE and theirs == _link(1, kind.replace("_for_children", "")):
            continue
        foreign.append(theirs)
    if container and _link(1, "mnt") != nsworker.host_namespaces().get("mnt"):
        if pid == 1:  # refused by name before the freeze
            mountns.classify(mountns.read_table(), mountns.parse_mountinfo(nsworker.host_mountinfo()),
                             mountns.dump_external())
        mountns.note_outside(pid)
    if foreign:
        why = ("network, user and cgroup namespaces are not restored, nor nested pid namespaces, nor "
               "namespaces of a process that is not the root" if container else
               "only the UTS, IPC and time namespaces of a pid namespace's init are restored, with its pid "
               "namespace (dump the init of the container)")
        raise Unsupported(f"pid {pid}: lives in namespaces other than procsnap's: {', '.join(foreign)}; {why}, "
                          "so the tree is refused", pid)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def _check_ipc_objects(attached: set[int]) -> None:
    """The objects of the tree's IPC namespace (this worker has entered
    it): SysV segments the tree has attached (`attached`, objects/shm.py)
    are made again in the new one; any other SysV object and every POSIX
    message queue is refused by name."""
    link = _link("self", "ipc")
    for name, what in SYSV.items():
        lines = [line.split() for line in _read(f"/proc/sysvipc/{name}").splitlines()[1:]]
        left = [(key, ident) for key, ident, *_ in lines if not (name == "shm" and int(ident) in attached)]
        if left:
            key, ident = left[0]
            raise Unsupported(f"ipc namespace {link}: {what} id {ident} key {int(key):#x} (of {len(left)}); "
                              "only SysV segments a process of the tree attaches are restored")
    import tempfile

    where = tempfile.mkdtemp(prefix="procsnap-mqueue-")
    try:
        nsworker.mount(b"mqueue", where.encode(), b"mqueue")
        try:
            queues = sorted(os.listdir(where))
        finally:
            nsworker.umount(where.encode())
    finally:
        os.rmdir(where)
    if queues:
        raise Unsupported(f"ipc namespace {link}: POSIX message queue /{queues[0]} (of {len(queues)}); "
                          "message queues are not restored")


def collect_namespaces(root: model.Checkpoint, writer=None) -> Namespaces | None:
    """Inside a container's worker (which has entered the root's UTS and
    IPC namespaces): what the root's own namespaces hold."""
    host = nsworker.host_namespaces()
    ns = Namespaces(last_pid=nsworker.saved_last_pid())
    for kind in ("pid", "uts", "ipc", "time", "mnt"):
        if _link(1, kind) != host.get(kind):
            ns.own.append(kind)
    if "uts" in ns.own:
        ns.hostname, ns.domainname = os.uname().nodename, _read("/proc/sys/kernel/domainname")
    if "ipc" in ns.own:
        _check_ipc_objects({m.sysv_id for m in root.shms if m.sysv_id >= 0})
        ns.ipc_sysctls = {name: _read(f"/proc/sys/{name}") for name in IPC_SYSCTLS
                          if os.path.exists(f"/proc/sys/{name}")}
    if "mnt" in ns.own:
        ns.mounts = mountns.collect_mounts(writer, mountns.dump_external())
        ns.outside = mountns.outside()
    if "time" in ns.own:
        ns.time_offsets = [[clock, int(sec), int(nsec)] for clock, sec, nsec in
                           (line.split() for line in _read("/proc/1/timens_offsets").splitlines())]
    return ns if ns.own else None


class Collect(protocol.Collect):
    def write_tree(self, writer, root: model.Checkpoint) -> None:
        """Once the other kinds have written theirs: root.shms, the SysV segments the tree attaches."""
        if nsworker.inside() and root.task.pid == 1:
            ns = collect_namespaces(root, writer)
            root.namespaces = [ns] if ns else []

    def check_fds(self, pid: int, entries: list[model.FdEntry]) -> None:
        mountns.check_fds(pid, entries)


def check_image(ckpt: model.Checkpoint, image) -> list[str]:
    problems = []
    for ns in ckpt.namespaces:
        if "pid" not in ns.own or set(ns.own) - {"pid", "uts", "ipc", "time", "mnt"}:
            problems.append(f"namespaces {ns.own}: only pid, uts, ipc and time, with pid, are made again (and mnt)")
        problems += mountns.check_image(ns.mounts, "mnt" in ns.own)
        if ckpt.task.pid != 1:
            problems.append(f"namespaces: the root is pid {ckpt.task.pid}, not its pid namespace's init")
        if any(name not in IPC_SYSCTLS for name in ns.ipc_sysctls):
            problems.append(f"namespaces: ipc sysctls {sorted(ns.ipc_sysctls)} beyond {IPC_SYSCTLS}")
        if any(len(o) != 3 or o[0] not in ("monotonic", "boottime") for o in ns.time_offsets):
            problems.append(f"namespaces: time offsets {ns.time_offsets}")
    return problems


def make_namespaces(ns: Namespaces, mounts: mountns.MadeNamespace | None = None) -> None:
    """In the single-threaded copy of the restorer that clones the root
    (kernel/clone.py): its UTS, IPC and time namespaces, unshared and set,
    for the root to be cloned into (the time namespace is its children's);
    into its mount namespace last, made already (there, /proc may be no
    procfs yet: the restore worker mounts the container's)."""
    flags = sum(nsworker.NS_FLAGS[kind] for kind in ("uts", "time") if kind in ns.own)
    if flags:
        nsworker.unshare(flags)
    if "uts" in ns.own:
        _write("/proc/sys/kernel/hostname", ns.hostname)
        _write("/proc/sys/kernel/domainname", ns.domainname)
    if ns.time_offsets:
        _write("/proc/self/timens_offsets", "".join(f"{c} {s} {n}\n" for c, s, n in ns.time_offsets))
    if mounts is not None:
        mounts.enter()


def enter_ipc(ckpt: model.Checkpoint, stack) -> None:
    """The restorer's thread in a new IPC namespace with the saved sysctls
    for the whole restore, if the image has one: the SysV segments are made
    in it (objects/shm.py), the root is cloned into it, the kinds' finish
    removes what it must there; back in its own as `stack` closes."""
    if not ckpt.namespaces or "ipc" not in ckpt.namespaces[0].own:
        return
    own = os.open("/proc/thread-self/ns/ipc", os.O_RDONLY | os.O_CLOEXEC)
    stack.callback(_back_to, own, "ipc")
    nsworker.unshare(nsworker.CLONE_NEWIPC)
    for name, value in ckpt.namespaces[0].ipc_sysctls.items():
        _write(f"/proc/sys/{name}", value)


def _back_to(fd: int, kind: str) -> None:
    try:
        nsworker.setns_fd(fd, kind)
    finally:
        os.close(fd)


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def prepare_root(node, ckpt: model.Checkpoint, mounts: mountns.MadeNamespace | None = None) -> bool:
    """The root's spawn.Node made the init of new namespaces, if the image
    says so (and of the mount namespace `mounts`, made already); returns
    whether it does."""
    if not ckpt.namespaces:
        return False
    node.clone_flags = nsworker.CLONE_NEWPID
    node.before_clone = functools.partial(make_namespaces, ckpt.namespaces[0], mounts)
    return True


def make_mounts(ckpt: model.Checkpoint, image, external: dict[str, str],
                root: str | None = None) -> mountns.MadeNamespace | None:
    """The mount namespace of a container's image, made (mountns.py), or None."""
    if not ckpt.namespaces or "mnt" not in ckpt.namespaces[0].own:
        if external:
            raise mountns.no_namespace(external, "the image's tree has")
        if root:
            raise mountns.no_namespace({}, f"--root {root}: the image's tree has")
        return None
    return mountns.make_namespace(ckpt.namespaces[0].mounts, image, external, ckpt.namespaces[0].outside, root)


def tree_ids(tree) -> set[int]:
    """Every pid and thread id of the tree (restorer.tree.open_tree's list)."""
    ids = set()
    for p, image in tree:
        ids.add(p.pid)
        if image is not None:
            ids.update(th.tid for th in image.checkpoint.threads)
    return ids
