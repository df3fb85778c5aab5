"""The objects of a container's IPC namespace (every one of them is the
container's), read by the dump's worker, which has entered that namespace,
and made again in the new one by the restorer's thread before any process
of the tree exists (namespaces.enter_ipc).

    object                      stored                                made again
    ------                      ------                                ----------
    SysV message queue          id, key, mode, owner, creator,        at its id (msg_next_id), then
                                qbytes, messages (type, bytes, in     IPC_SET, messages sent in order
                                order: msgrcv MSG_COPY)
    SysV semaphore set          id, key, mode, owner, creator,        at its id (sem_next_id), IPC_SET,
                                values (GETALL)                       SETALL
    SysV segment no process     id, key, size, mode, owner, creator,  at its id (shm_next_id), filled
    attaches                    contents (ghosts.img)
    (one a process attaches:    objects/shm.py)
    POSIX message queue         name, mode, owner, maxmsg, msgsize,   mq_open(O_CREAT) with its attributes,
                                messages with priorities              fchown/fchmod, messages sent
    mq fd of a process          FdKind.MQUEUE: the queue's name,      mq_open of the queue made above
                                its flags (O_NONBLOCK)

A POSIX queue's messages can be read only by receiving them: the worker
receives them all and sends them back, in the order it got them (highest
priority first, oldest first, so each priority keeps its order), before it
goes on; on every failure in between too (try/finally; a fault stage,
mid-mqueue-copy, tests it). The tree is frozen meanwhile: its tasks are out
of their mq_* waits (restarted at the thaw), so none takes or adds a message.

Refused, by name, with the tree left running:
  - a queue with an mq_notify registration (NOTIFY_PID in its file): sending
    its messages back would fire it, and a restored one could not name its
    process's sigevent;
  - an mq fd of a queue since unlinked, or of a namespace not the container's;
  - a process with a SysV semaphore undo list (semop SEM_UNDO): the kernel
    shows no adjustment it holds (no semctl reads semadj), so it cannot be
    made again; kcmp(KCMP_SYSVSEM) against the worker, which has none, finds
    the list (two tasks without one compare equal).
Objects made by another user are made again by a child of the restorer
that takes the creator's uid and gid (cuid, cgid are the creator's effective
ids at creation; nothing sets them after).
"""

from __future__ import annotations

from .. import records as dataclasses  # the dataclasses API, cheap to import
import contextlib
import os
import stat

from .. import model
from ..errors import RestoreError, Unsupported
from . import protocol
from .protocol import OpenFd, Restoring

MQ_NOTIFY = "NOTIFY_PID:"
SEMVMX = 32767  # include/uapi/linux/sem.h: the largest semaphore value


@dataclasses.dataclass
class IpcMessage:
    """A message of a queue: its mtype (SysV) or priority (POSIX), and its bytes."""

    type: int
    data: bytes


@dataclasses.dataclass
class SysvIds:
    """What every SysV object has: id, key, mode, owner and creator (struct ipc64_perm)."""

    id: int
    key: int
    mode: int
    uid: int = 0
    gid: int = 0
    cuid: int = 0
    cgid: int = 0


@dataclasses.dataclass
class MsgQueue(SysvIds):
    qbytes: int = 0
    messages: list[IpcMessage] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class SemSet(SysvIds):
    values: list[int] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Segment(SysvIds):
    """A SysV segment no process of the tree attaches."""

    size: int = 0
    extents: list[list[int]] = dataclasses.field(default_factory=list)  # protocol.write_extents'


@dataclasses.dataclass
class PosixQueue:
    name: str  # "/NAME", as mq_open takes it
    mode: int
    uid: int
    gid: int
    maxmsg: int
    msgsize: int
    messages: list[IpcMessage] = dataclasses.field(default_factory=list)


def _ids(row: dict[str, int], ident: str) -> dict[str, int]:
    return {"id": row[ident], "key": row["key"], "mode": row["perms"] & 0o777, "uid": row["uid"],
            "gid": row["gid"], "cuid": row["cuid"], "cgid": row["cgid"]}


def collect_ipc_objects(ns, writer, attached: set[int], tree_tids: list[int]) -> None:
    """Into `ns` (namespaces.Namespaces), in the worker inside the tree's
    IPC namespace: its SysV objects (but the segments in `attached`, which
    objects/shm.py stores) and its POSIX message queues."""
    from ..kernel import ipc

    link = os.readlink("/proc/thread-self/ns/ipc")
    where = f"ipc namespace {link}"
    if not os.path.exists(ipc.MSG_NEXT_ID):
        raise Unsupported(f"{where}: holds SysV objects, and this kernel has no {ipc.MSG_NEXT_ID} "
                          "(CONFIG_CHECKPOINT_RESTORE) to make them again at their ids")
    for row in ipc.sysvipc("msg"):
        ds = ipc.msg_stat(row["msqid"])
        try:
            messages = ipc.msg_copy_all(row["msqid"], row["qnum"], max(row["cbytes"], 1))
        except OSError as err:
            raise Unsupported(f"{where}: SysV message queue id {row['msqid']} key {row['key']:#x}: cannot copy its "
                              f"messages: {err.strerror} (msgrcv MSG_COPY needs CONFIG_CHECKPOINT_RESTORE)") from err
        ns.msg_queues.append(MsgQueue(**_ids(row, "msqid"), qbytes=ds.msg_qbytes,
                                      messages=[IpcMessage(t, d) for t, d in messages]))
    sems = ipc.sysvipc("sem")
    for row in sems:
        ns.sem_sets.append(SemSet(**_ids(row, "semid"), values=ipc.sem_values(row["semid"], row["nsems"])))
    if sems:
        _check_no_undo(tree_tids, where)
    for row in ipc.sysvipc("shm"):
        if row["shmid"] not in attached:
            ns.segments.append(_collect_segment(row, writer, where))
    ns.mqueues = _collect_mqueues(where)


def _check_no_undo(tids: list[int], where: str) -> None:
    from ..kernel import ipc

    for tid in tids:
        if not ipc.undo_list_shared(tid, os.getpid()):
            raise Unsupported(f"pid {tid}: holds a SysV semaphore undo list (semop SEM_UNDO) in {where}; not "
                              "supported: the kernel shows no adjustment it holds, so none can be made again", tid)


def _collect_segment(row: dict[str, int], writer, where: str) -> Segment:
    """Its contents, through an attachment of the worker's own (read-only)."""
    from ..kernel import sysv

    if row["perms"] & 0o1000:  # SHM_DEST with no attachment: gone already
        raise Unsupported(f"{where}: SysV shared memory segment id {row['shmid']} is being destroyed")
    with sysv.attached(row["shmid"], readonly=True) as (base, size):
        fd = os.open(f"/proc/self/map_files/{base:x}-{base + size:x}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            extents = protocol.write_extents(fd, row["size"], writer)
        finally:
            os.close(fd)
    return Segment(**_ids(row, "shmid"), size=row["size"], extents=extents)


@contextlib.contextmanager
def mqueue_mount():
    """The directory of an mqueue fs of this thread's IPC namespace, mounted
    in the worker's own mount namespace for as long as the block runs."""
    import tempfile

    from .. import nsworker

    path = tempfile.mkdtemp(prefix="procsnap-mqueue-")
    try:
        nsworker.mount(b"mqueue", path.encode(), b"mqueue")
        try:
            yield path
        finally:
            nsworker.umount(path.encode())
    finally:
        os.rmdir(path)


def _collect_mqueues(where: str) -> list[PosixQueue]:
    from .. import faults
    from ..kernel import ipc

    out = []
    with mqueue_mount() as path:
        for name in sorted(os.listdir(path)):
            what = f"{where}: POSIX message queue /{name}"
            with open(os.path.join(path, name)) as f:
                info = f.read()
            notify = int(info.split(MQ_NOTIFY)[1].split()[0])
            if notify:
                raise Unsupported(f"{what}: pid {notify} (of the namespace) is registered for its notification "
                                  "(mq_notify); not supported")
            st = os.stat(os.path.join(path, name))
            fd = ipc.mq_open(f"/{name}", os.O_RDWR | os.O_NONBLOCK)
            try:
                attr = ipc.mq_getattr(fd)
                messages = ipc.mq_receive_all(fd, attr.mq_msgsize)
                try:  # put back at once, whatever happens
                    faults.point("mid-mqueue-copy")
                finally:
                    ipc.mq_send_all(fd, messages)
            finally:
                os.close(fd)
            out.append(PosixQueue(f"/{name}", st.st_mode & 0o777, st.st_uid, st.st_gid, attr.mq_maxmsg,
                                  attr.mq_msgsize, [IpcMessage(p, d) for p, d in messages]))
    return out


# -- restore ----------------------------------------------------------------

def _write(name: str, value: str) -> None:
    with open(f"/proc/sys/{name}", "w") as f:
        f.write(value)


def _as_creator(cuid: int, cgid: int, make) -> None:
    """make() with the effective ids the object's creator had (cuid, cgid
    come from them at creation): in a child of ours for another user, so
    that the restorer's own credentials never change."""
    if not cuid and not cgid:
        make()
        return
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setegid(cgid)
            os.seteuid(cuid)
            make()
            code = 0
        except BaseException:  # noqa: BLE001 - said by the exit status
            pass
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status):
        raise OSError(0, f"creating it as uid {cuid} gid {cgid} failed")


def make_ipc_objects(ns, image) -> None:
    """In the new IPC namespace (this thread's), before any process of the
    tree is made: every object of `ns`. Limits the saved sysctls would
    refuse (a queue's qbytes above msgmnb, a message above msgmax, a POSIX
    queue above fs.mqueue's maxima: set when they were higher) are raised
    while the objects are made; the caller writes the saved sysctls again after."""
    from ..kernel import ipc, sysv

    for q in ns.msg_queues:
        try:
            _write("kernel/msgmnb", str(max(q.qbytes, 1)))
            _write("kernel/msgmax", str(max([len(m.data) for m in q.messages] + [1])))
            ipc.next_id(ipc.MSG_NEXT_ID, q.id)
            _as_creator(q.cuid, q.cgid, lambda q=q: ipc.msg_create(q.id, q.key, q.mode))
            ipc.msg_fill(q.id, q.mode, q.uid, q.gid, q.qbytes, [(m.type, m.data) for m in q.messages])
        except OSError as err:
            raise RestoreError(f"SysV message queue id {q.id} key {q.key:#x}: cannot make it again: "
                               f"{err.strerror or err}") from err
    for s in ns.sem_sets:
        try:
            ipc.next_id(ipc.SEM_NEXT_ID, s.id)
            _as_creator(s.cuid, s.cgid, lambda s=s: ipc.sem_create(s.id, s.key, s.mode, len(s.values)))
            ipc.sem_fill(s.id, s.mode, s.uid, s.gid, s.values)
        except OSError as err:
            raise RestoreError(f"SysV semaphore set id {s.id} key {s.key:#x}: cannot make it again: "
                               f"{err.strerror or err}") from err
    for g in ns.segments:
        try:
            sysv.next_id(g.id)
            _as_creator(g.cuid, g.cgid, lambda g=g: sysv.create(g.id, g.key, g.size, g.mode))
            sysv.set_owner(g.id, g.uid, g.gid, g.mode)
            sysv.write(g.id, [(pos, image.read_blob(blob, length, xxh3)) for pos, length, blob, xxh3 in g.extents])
        except OSError as err:
            raise RestoreError(f"SysV shared memory segment id {g.id} key {g.key:#x}: cannot make it again: "
                               f"{err.strerror or err}") from err
    for q in ns.mqueues:
        try:
            _write("fs/mqueue/msg_max", str(max(q.maxmsg, int(ns.ipc_sysctls.get("fs/mqueue/msg_max", 1)))))
            _write("fs/mqueue/msgsize_max", str(max(q.msgsize, int(ns.ipc_sysctls.get("fs/mqueue/msgsize_max", 1)))))
            fd = ipc.mq_open(q.name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NONBLOCK, 0o600, q.maxmsg, q.msgsize)
            try:
                os.fchown(fd, q.uid, q.gid)
                os.fchmod(fd, q.mode)
                ipc.mq_send_all(fd, [(m.type, m.data) for m in q.messages])
            finally:
                os.close(fd)
        except OSError as err:
            raise RestoreError(f"POSIX message queue {q.name}: cannot make it again: {err.strerror or err}") from err


# -- mq fds -----------------------------------------------------------------

class Collect(protocol.Collect):
    def collect_fd(self, fd: OpenFd) -> model.FdEntry | None:
        if not stat.S_ISREG(fd.st.st_mode) or not fd.link.startswith("/") or "/" in fd.link[1:]:
            return None
        from ..kernel import ipc  # a dump's (see objects/__init__)

        try:
            if ipc.fs_type(fd.path) != ipc.MQUEUE_MAGIC:
                return None
        except OSError:
            return None
        from .. import nsworker

        what = f"{fd.where} is POSIX message queue {fd.link}"
        if not nsworker.inside() or os.readlink(f"/proc/{fd.pid}/ns/ipc") != os.readlink("/proc/1/ns/ipc"):
            raise Unsupported(f"{what}; not supported: message queues are restored in a container's own IPC "
                              "namespace only", fd.pid)
        try:
            mine = ipc.mq_open(fd.link, os.O_RDONLY)
        except OSError:
            mine = -1
        try:
            if mine < 0 or not protocol.same_file(fd.st, os.fstat(mine)):
                raise Unsupported(f"{what}, unlinked since or not of its IPC namespace; not supported", fd.pid)
        finally:
            if mine >= 0:
                os.close(mine)
        return model.FdEntry(fd.fd, model.FdKind.MQUEUE, fd.flags, 0, fd.link)


class Prepare(protocol.Prepare):
    fd_kinds = (model.FdKind.MQUEUE,)

    def open_fd(self, entry: model.FdEntry, proc: Restoring) -> int:
        """The queue namespaces.enter_ipc made in this thread's new IPC namespace."""
        from ..kernel import ipc

        try:
            return self.own(ipc.mq_open(entry.path, entry.flags & (os.O_ACCMODE | os.O_NONBLOCK)))
        except OSError as err:
            raise RestoreError(f"fd {entry.fd}: cannot open POSIX message queue {entry.path}: {err.strerror}") from err


def _bad_name(name: str) -> bool:
    return not name.startswith("/") or "/" in name[1:] or "\0" in name or len(name) < 2 or len(name) > 256


def check_image(ckpt: model.Checkpoint, image) -> list[str]:
    problems = [f"fd {e.fd}: bad POSIX message queue name {e.path!r}" for e in ckpt.fds
                if e.kind == model.FdKind.MQUEUE and _bad_name(e.path)]
    for ns in ckpt.namespaces:
        objs = [*ns.msg_queues, *ns.sem_sets, *ns.segments]
        for o in objs:
            if not 0 <= o.id < 1 << 31 or not -(1 << 31) <= o.key < 1 << 31 or not 0 <= o.mode <= 0o777:
                problems.append(f"SysV object id {o.id} key {o.key}: bad id, key or mode {o.mode:o}")
        for kind in (ns.msg_queues, ns.sem_sets, ns.segments):
            if len({o.id for o in kind}) != len(kind):
                problems.append(f"SysV objects {[o.id for o in kind]}: an id twice")
        for s in ns.sem_sets:
            if not s.values or any(not 0 <= v <= SEMVMX for v in s.values):
                problems.append(f"SysV semaphore set id {s.id}: bad values {s.values[:8]}")
        for g in ns.segments:
            if not 0 < g.size < 1 << 46 or protocol.bad_extents(g.extents, g.size, image):
                problems.append(f"SysV shared memory segment id {g.id}: bad size {g.size} or an extent outside it")
        for q in ns.msg_queues:
            if sum(len(m.data) for m in q.messages) > q.qbytes or any(m.type < 1 for m in q.messages):
                problems.append(f"SysV message queue id {q.id}: messages beyond qbytes {q.qbytes} or of type < 1")
        for q in ns.mqueues:
            if _bad_name(q.name) or not 0 <= q.mode <= 0o777 or len(q.messages) > q.maxmsg \
                    or any(len(m.data) > q.msgsize or not 0 <= m.type < 1 << 15 for m in q.messages):
                problems.append(f"POSIX message queue {q.name!r}: bad name, mode or messages")
    return problems


def blobs(ckpt: model.Checkpoint) -> list[tuple[str, int, int, int]]:
    return [(f"SysV shared memory segment {g.id} extent at {pos}", blob, length, xxh3)
            for ns in ckpt.namespaces for g in ns.segments for pos, length, blob, xxh3 in g.extents]
