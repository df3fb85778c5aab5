"""The model: what a checkpoint of one process holds.

Dump fills these records from /proc and ptrace, the image stores them, and
restore builds a process from them; they are the only thing the layers
share. Flag fields name their flag table (metadata "flags"), so `show`
decodes them with the same declaration the dumper used.

    task memory                 image
    -----------                 -----
    Vma  [start, end)  ------>  VMA record (kind, prot, flags, file)
      pages written    ------>  PageRun record (vaddr, npages, offset, crc)
                                   |
                                   v
                                pages.img: 4 KiB aligned page data, runs
                                back to back, offset = PageRun.offset
      clean file pages         not stored: mapped again from the file
      never-touched pages      not stored: mapped again as fresh memory
"""

from __future__ import annotations

from . import records as dataclasses  # the dataclasses API, cheap to import
import enum
import typing

if typing.TYPE_CHECKING:  # the records of kinds of objects are declared with their kinds
    from .objects.file import FileRef
    from .objects.ghost import Ghost
    from .objects.pipe import Pipe
    from .objects.shm import SharedMem
    from .objects.unix import Socket
    from .objects.creds import Creds
    from .objects.locks import FileLock
    from .objects.fown import FdOwner
    from .objects.cgroups import Cgroup
    from .objects.settings import Settings
    from .objects.seccomp import Seccomp
    from .objects.inet import InetSocket
    from .objects.pty import Pty
    from .image.chunks import PageCodec
    from .objects.timers import ITimer, PosixTimer
    from .objects.tracking import Tracking
    from .objects.tcp import TcpConnection
    from .objects.netlock import NetLock
    from .objects.namespaces import Namespaces
    from .objects.netns import NetNamespace


class Prot(enum.IntFlag):
    """PROT_* (include/uapi/asm-generic/mman-common.h)."""

    PROT_READ = 0x1
    PROT_WRITE = 0x2
    PROT_EXEC = 0x4


class MapFlag(enum.IntFlag):
    """MAP_* (include/uapi/linux/mman.h, asm-generic/mman*.h)."""

    MAP_SHARED = 0x01
    MAP_PRIVATE = 0x02
    MAP_DROPPABLE = 0x08  # a mapping type of its own (6.11), instead of MAP_PRIVATE; smaps "dp"
    MAP_FIXED = 0x10
    MAP_ANONYMOUS = 0x20
    MAP_GROWSDOWN = 0x100
    MAP_NORESERVE = 0x4000
    MAP_FIXED_NOREPLACE = 0x100000


class Advice(enum.IntFlag):
    """VMA flags set with madvise(), as smaps shows them (VmFlags)."""

    DONTFORK = 0x1  # "dc", MADV_DONTFORK
    DONTDUMP = 0x2  # "dd", MADV_DONTDUMP
    WIPEONFORK = 0x4  # "wf", MADV_WIPEONFORK
    HUGEPAGE = 0x8  # "hg", MADV_HUGEPAGE
    NOHUGEPAGE = 0x10  # "nh", MADV_NOHUGEPAGE
    MERGEABLE = 0x20  # "mg", MADV_MERGEABLE


class Lock(enum.IntFlag):
    """How a VMA is locked in memory (mlock, mlock2, mlockall), as smaps
    shows it (VmFlags); restored by objects/memlock.py."""

    VM_LOCKED = 0x1  # "lo": mlock(), or mlockall(MCL_CURRENT)
    VM_LOCKONFAULT = 0x2  # "lf": mlock2(MLOCK_ONFAULT), or MCL_ONFAULT: pages locked as they fault in


class FlagMembers(dict):
    """value -> member of a flag table, each made once at its first sight:
    building 10,000 VMAs with IntFlag arithmetic cost more than the rest."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def __missing__(self, value: int):
        member = self[value] = self.table(value)
        return member


# Advice bit -> (smaps VmFlags mnemonic, madvise advice number)
ADVICE_TABLE = {
    Advice.DONTFORK: ("dc", 10),
    Advice.DONTDUMP: ("dd", 16),
    Advice.WIPEONFORK: ("wf", 18),
    Advice.HUGEPAGE: ("hg", 14),
    Advice.NOHUGEPAGE: ("nh", 15),
    Advice.MERGEABLE: ("mg", 12),
}


class VmaKind(enum.Enum):
    """What a VMA is, which decides how restore recreates it."""

    ANON = "anon"  # private anonymous: heap, stack, mmap'd memory; pages copied
    FILE_PRIVATE = "file-private"  # mapped from the file again; written pages copied
    FILE_SHARED = "file-shared"  # mapped from the file again; nothing copied
    SHARED_ANON = "shared-anon"  # MAP_SHARED|MAP_ANONYMOUS, pages copied (format 1.0 images)
    SHARED_MEM = "shared-mem"  # a shared mapping of a SharedMem object (shm: its id); contents there
    SYSV_SHM = "sysv-shm"  # a SysV shared memory segment, attached whole (shm: its SharedMem)
    VDSO = "vdso"  # kernel-provided: moved to the saved address, not copied
    VVAR = "vvar"
    VVAR_VCLOCK = "vvar-vclock"


SPECIAL_KINDS = (VmaKind.VDSO, VmaKind.VVAR, VmaKind.VVAR_VCLOCK)
# their names in /proc/PID/maps
SPECIAL_NAMES = {"[vdso]": VmaKind.VDSO, "[vvar]": VmaKind.VVAR, "[vvar_vclock]": VmaKind.VVAR_VCLOCK}
COPIED_KINDS = (VmaKind.ANON, VmaKind.FILE_PRIVATE, VmaKind.SHARED_ANON)  # pages in pages.img


class OpenFlag(enum.IntFlag):
    """O_* as reported in fdinfo (include/uapi/asm-generic/fcntl.h)."""

    O_WRONLY = 0o1
    O_RDWR = 0o2
    O_CREAT = 0o100
    O_EXCL = 0o200
    O_NOCTTY = 0o400
    O_TRUNC = 0o1000
    O_APPEND = 0o2000
    O_NONBLOCK = 0o4000
    O_DSYNC = 0o10000
    O_FASYNC = 0o20000
    O_DIRECT = 0o40000
    O_LARGEFILE = 0o100000
    O_DIRECTORY = 0o200000
    O_NOFOLLOW = 0o400000
    O_NOATIME = 0o1000000
    O_CLOEXEC = 0o2000000
    O_PATH = 0o10000000


class SaFlag(enum.IntFlag):
    """SA_* (include/uapi/asm-generic/signal-defs.h, x86 SA_RESTORER)."""

    SA_NOCLDSTOP = 0x1
    SA_NOCLDWAIT = 0x2
    SA_SIGINFO = 0x4
    SA_UNSUPPORTED = 0x400
    SA_EXPOSE_TAGBITS = 0x800
    SA_RESTORER = 0x04000000
    SA_ONSTACK = 0x08000000
    SA_RESTART = 0x10000000
    SA_NODEFER = 0x40000000
    SA_RESETHAND = 0x80000000


class FdKind(enum.Enum):
    """What an fd is: the kind of object (objects/) that collects and opens it."""

    REG = "regular"  # a file reopened by path at its position
    DIR = "directory"
    GHOST = "ghost"  # unlinked while open: contents are in the image
    DEVICE = "device"  # /dev/null, /dev/zero, /dev/urandom ...: reopened by path
    TTY = "tty"  # a terminal: reattached to the restoring terminal (--shell-job)
    PIPE = "pipe"  # one end of a pipe or named FIFO (file_id: Pipe.id)
    SHM = "shared-memory"  # a memfd (file_id: SharedMem.id)
    EVENTFD = "eventfd"  # params: count, semaphore
    SIGNALFD = "signalfd"  # params: mask
    TIMERFD = "timerfd"  # params: clockid, ticks, value_ns, interval_ns (time left when dumped)
    EPOLL = "epoll"  # watches: [fd, events, data] as registered
    UNIX = "unix-socket"  # one end of a connected unix socket pair of the tree (file_id: Socket.id)
    GHOST_DIR = "removed-directory"  # of a directory removed while open: a placeholder, removed again (1.3)
    PATH = "path"  # an O_PATH fd (of a file, directory, symlink, device...): reopened by path (1.3)
    INOTIFY = "inotify"  # marks: objects.inotify.WATCH each, by wd
    PIDFD = "pidfd"  # params: pid (of the tree), or dead: 1 (its process is gone)
    PROC_FILE = "proc-file"  # /proc/PID/... of a process of the tree (path; params: pid)
    NAMESPACE = "namespace"  # /proc/self/ns/NAME of a host namespace (path)
    FANOTIFY = "fanotify"  # params: flags, event_flags; marks: objects.fanotify.MARK each
    INET = "inet-socket"  # a TCP, UDP, raw, packet or netlink socket, not a live connection (InetSocket.id)
    PTY_MASTER = "pty-master"  # /dev/ptmx of a pty of the tree (file_id: Pty.index)
    PTY_SLAVE = "pty-slave"  # /dev/pts/N whose master is in the tree (file_id: Pty.index)
    DEV_TTY = "dev-tty"  # /dev/tty: reopened once the process has its controlling terminal
    MQUEUE = "mqueue"  # a POSIX message queue of a container's IPC namespace (path: its name; 1.6)


def _flags(table):
    return dataclasses.field(default=table(0), metadata={"flags": table})


@dataclasses.dataclass
class Vma:
    start: int
    end: int
    kind: VmaKind
    prot: Prot = _flags(Prot)
    flags: MapFlag = _flags(MapFlag)
    offset: int = 0  # file offset in bytes
    file_id: int = -1  # FileRef.id, or -1
    name: str = ""  # [heap], [stack], the path: for people reading `show`
    advice: Advice = _flags(Advice)
    shm: int = -1  # SHARED_MEM: SharedMem.id of the object (offset: where in it)
    # a file mapping: the access mode (O_RDONLY/O_WRONLY/O_RDWR) of the open
    # file behind it, as its map_files link shows; -1 in images before 1.2
    access: int = -1
    lock: Lock = _flags(Lock)  # 1.3
    guards: list[list[int]] = dataclasses.field(default_factory=list)  # 1.3: [first page, count] of guard regions
    ghost: int = -1  # 1.3: FILE_PRIVATE of a file unlinked while mapped: its Ghost.id (file_id is -1)

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclasses.dataclass(slots=True)  # hundreds of thousands of them in sparse images
class PageRun:
    """Pages [vaddr, vaddr + npages * 4096) are at `offset` in pages.img."""

    vaddr: int
    npages: int
    offset: int
    xxh3: int  # XXH3-64 of the run's bytes


@dataclasses.dataclass
class PageMap:
    """All PageRuns of an image in one record, packed: a dump of sparse or
    half-zero memory has hundreds of thousands of runs, too many for one
    JSON record each. Layout: schema.PAGE_RUN per run."""

    runs: bytes


@dataclasses.dataclass
class PageRefs:
    """Pages stored by another process of the tree, which shared them
    copy-on-write with this one when dumped: runs packed as schema.PAGE_REF
    (vaddr, npages, index into sources, offset in that image's pages.img)."""

    sources: list[str]  # image directories, relative to the root's ("" for the root's)
    runs: bytes


@dataclasses.dataclass
class Mm:
    """The mm fields restored together with PR_SET_MM_MAP."""

    start_code: int
    end_code: int
    start_data: int
    end_data: int
    start_brk: int
    brk: int
    start_stack: int
    arg_start: int
    arg_end: int
    env_start: int
    env_end: int
    auxv: bytes
    exe_file_id: int


@dataclasses.dataclass
class SigAction:
    signo: int
    handler: int
    flags: SaFlag = _flags(SaFlag)
    restorer: int = 0
    mask: int = 0


@dataclasses.dataclass
class PendingSignal:
    shared: bool  # process-wide queue (kill) or the thread's own (tgkill)
    signo: int
    siginfo: bytes  # the kernel's 128-byte siginfo


@dataclasses.dataclass
class Rlimit:
    resource: int
    soft: int
    hard: int


@dataclasses.dataclass
class ThreadState:
    """What each thread has of its own: CPU and per-thread signal state."""

    comm: str
    regs: dict[str, int]
    xstate: bytes
    sigmask: int
    rseq_ptr: int
    rseq_len: int
    rseq_sig: int
    robust_list: int
    robust_list_len: int
    clear_child_tid: int
    altstack_sp: int
    altstack_flags: int
    altstack_size: int


@dataclasses.dataclass
class Task(ThreadState):
    """The process: its leader thread's state, and its identity."""

    pid: int
    personality: int
    umask: int
    cwd: str
    session_leader: bool
    group_leader: bool
    rlimits: list[Rlimit]
    uids: list[int] = dataclasses.field(default_factory=list)  # real, effective, saved, fs
    gids: list[int] = dataclasses.field(default_factory=list)
    pdeathsig: int = 0
    root: str = "/"  # chroot, as the dumper's root shows it (since format 1.2)
    cwd_removed: dict[str, int] = dataclasses.field(default_factory=dict)  # 1.3: attrs of a removed cwd
    mlockall: int = 0  # 1.3: MCL_FUTURE | MCL_ONFAULT, as mm->def_flags shows them (objects/memlock.py)
    # ns its interrupted wait had left at the freeze, -1: none or unknown (dumper/waits.py; since 1.3)
    wait_left_ns: int = -1
    stopped_by: int = 0  # the signal that had stopped it (group-stop, state T), restored stopped (since 1.3)


@dataclasses.dataclass
class Thread(ThreadState):
    """A thread other than the leader (the leader's state is in Task)."""

    tid: int
    pending: list[bytes] = dataclasses.field(default_factory=list)  # siginfos queued to this thread
    wait_left_ns: int = -1  # as Task.wait_left_ns (since 1.3)


@dataclasses.dataclass
class FdEntry:
    fd: int
    kind: FdKind
    flags: OpenFlag = _flags(OpenFlag)  # fdinfo flags, O_CLOEXEC included
    pos: int = 0
    path: str = ""
    file_id: int = -1  # FileRef for REG/DIR; ghost id for GHOST
    shares_with: int = -1  # lowest fd sharing the same open file description
    desc: int = -1  # open file description shared with other processes of the tree: its tree-wide id
    params: dict[str, int] = dataclasses.field(default_factory=dict)  # of an anonymous-inode kind
    watches: list[list[int]] = dataclasses.field(default_factory=list)  # EPOLL: [fd, events, data]
    marks: list[list[int]] = dataclasses.field(default_factory=list)  # INOTIFY: inotify.WATCH each (since 1.3)


@dataclasses.dataclass
class Proc:
    """One process of the dumped tree (records of the root's image)."""

    pid: int
    ppid: int  # 0 for the root: its parent is whoever restores it
    pgid: int
    sid: int
    zombie: bool = False
    exit_status: int = 0  # a zombie's wait status (as waitpid reports it)
    dir: str = ""  # its image, relative to the root's; "" for the root itself and zombies


@dataclasses.dataclass
class Checkpoint:
    """Everything one image holds about one process."""

    task: Task
    mm: Mm
    vmas: list[Vma]
    pages: list[PageRun]
    sigactions: list[SigAction]
    pending: list[PendingSignal]
    files: list[FileRef]
    fds: list[FdEntry]
    ghosts: list[Ghost]
    threads: list[Thread] = dataclasses.field(default_factory=list)  # since format 1.1
    # The root's image only: the whole tree and what its processes share.
    procs: list[Proc] = dataclasses.field(default_factory=list)
    pipes: list[Pipe] = dataclasses.field(default_factory=list)
    shms: list[SharedMem] = dataclasses.field(default_factory=list)
    sockets: list[Socket] = dataclasses.field(default_factory=list)
    page_refs: list[PageRefs] = dataclasses.field(default_factory=list)  # none or one
    settings: list[Settings] = dataclasses.field(default_factory=list)  # one, since format 1.2
    locks: list[FileLock] = dataclasses.field(default_factory=list)  # since format 1.2
    creds: list[Creds] = dataclasses.field(default_factory=list)  # one, since format 1.2
    owners: list[FdOwner] = dataclasses.field(default_factory=list)  # since format 1.2
    cgroups: list[Cgroup] = dataclasses.field(default_factory=list)  # since format 1.2
    seccomp: list[Seccomp] = dataclasses.field(default_factory=list)  # none or one, since format 1.3
    inet_sockets: list[InetSocket] = dataclasses.field(default_factory=list)  # since format 1.3
    ptys: list[Pty] = dataclasses.field(default_factory=list)  # the root's, since format 1.3
    codec: list[PageCodec] = dataclasses.field(default_factory=list)  # none or one, since format 1.3
    itimers: list[ITimer] = dataclasses.field(default_factory=list)  # armed ones, since format 1.3
    posix_timers: list[PosixTimer] = dataclasses.field(default_factory=list)  # since format 1.3
    tracking: list[Tracking] = dataclasses.field(default_factory=list)  # a pre-dump's (one), since format 1.4
    tcp_connections: list[TcpConnection] = dataclasses.field(default_factory=list)  # the root's, since format 1.4
    net_lock: list[NetLock] = dataclasses.field(default_factory=list)  # the root's, none or one, since format 1.4
    namespaces: list[Namespaces] = dataclasses.field(default_factory=list)  # the root's, none or one, since 1.5
    # the root's: files in flight (SCM_RIGHTS) no process of the tree holds, as their kinds
    # describe them (FdEntry.fd: the index Socket.rights names them by), since format 1.5
    in_flight: list[FdEntry] = dataclasses.field(default_factory=list)
    net_namespaces: list[NetNamespace] = dataclasses.field(default_factory=list)  # the root's, none or one, since 1.6
