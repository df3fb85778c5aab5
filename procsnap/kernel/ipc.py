"""SysV message queues and semaphore sets, POSIX message queues: read and
made again from the IPC namespace of the calling thread (both follow the
thread's namespace: /proc/sysvipc/*, msgget, semget, mq_open).

    object             read without changing it              made again with
    ------             -----------------------------         ---------------
    msg queue          msgctl IPC_STAT (qbytes), msgrcv      msg_next_id, msgget, IPC_SET, msgsnd
                       MSG_COPY|IPC_NOWAIT by index (*)
    semaphore set      semctl GETALL                         sem_next_id, semget, IPC_SET, SETALL
    POSIX queue        mq_getattr; its messages only by      mq_open(O_CREAT, attr), mq_send
                       receiving them (sent back at once)

(*) MSG_COPY exists with CONFIG_CHECKPOINT_RESTORE (ENOSYS without); it
copies the message at that index and leaves the queue, its times and its
last pids as they were. The *_next_id sysctls are that config's too.
"""

from __future__ import annotations

import ctypes
import os

from .arch.x86_64 import NR
from .libc import libc, oserror, syscall

IPC_CREAT, IPC_EXCL, IPC_NOWAIT = 0o1000, 0o2000, 0o4000  # include/uapi/linux/ipc.h
IPC_RMID, IPC_SET, IPC_STAT = 0, 1, 2
MSG_COPY = 0o40000  # include/uapi/linux/msg.h
GETALL, SETALL = 13, 17  # include/uapi/linux/sem.h
MQUEUE_MAGIC = 0x19800202  # include/uapi/linux/magic.h
KCMP_SYSVSEM = 6  # include/uapi/linux/kcmp.h


class ipc64_perm(ctypes.Structure):
    """include/uapi/asm-generic/ipcbuf.h (x86_64: mode is 4 bytes, no __pad1)."""

    _fields_ = [("key", ctypes.c_int32), ("uid", ctypes.c_uint32), ("gid", ctypes.c_uint32),
                ("cuid", ctypes.c_uint32), ("cgid", ctypes.c_uint32), ("mode", ctypes.c_uint32),
                ("seq", ctypes.c_uint16), ("__pad2", ctypes.c_uint16),
                ("__unused1", ctypes.c_ulong), ("__unused2", ctypes.c_ulong)]


class msqid64_ds(ctypes.Structure):
    """include/uapi/asm-generic/msgbuf.h (120 bytes, as glibc's msqid_ds here)."""

    _fields_ = [("msg_perm", ipc64_perm), ("msg_stime", ctypes.c_long), ("msg_rtime", ctypes.c_long),
                ("msg_ctime", ctypes.c_long), ("msg_cbytes", ctypes.c_ulong), ("msg_qnum", ctypes.c_ulong),
                ("msg_qbytes", ctypes.c_ulong), ("msg_lspid", ctypes.c_int32), ("msg_lrpid", ctypes.c_int32),
                ("__unused4", ctypes.c_ulong), ("__unused5", ctypes.c_ulong)]


class semid64_ds(ctypes.Structure):
    """arch/x86/include/uapi/asm/sembuf.h (104 bytes)."""

    _fields_ = [("sem_perm", ipc64_perm), ("sem_otime", ctypes.c_long), ("__unused1", ctypes.c_ulong),
                ("sem_ctime", ctypes.c_long), ("__unused2", ctypes.c_ulong), ("sem_nsems", ctypes.c_ulong),
                ("__unused3", ctypes.c_ulong), ("__unused4", ctypes.c_ulong)]


class mq_attr(ctypes.Structure):
    """include/uapi/linux/mqueue.h."""

    _fields_ = [("mq_flags", ctypes.c_long), ("mq_maxmsg", ctypes.c_long), ("mq_msgsize", ctypes.c_long),
                ("mq_curmsgs", ctypes.c_long), ("__reserved", ctypes.c_long * 4)]


assert ctypes.sizeof(msqid64_ds) == 120 and ctypes.sizeof(semid64_ds) == 104 and ctypes.sizeof(ipc64_perm) == 48

libc.msgctl.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
libc.msgrcv.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_long, ctypes.c_int]
libc.msgrcv.restype = ctypes.c_ssize_t
libc.msgsnd.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.msgget.argtypes = [ctypes.c_int, ctypes.c_int]
libc.semget.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
libc.semctl.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
libc.mq_open.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]
libc.mq_getattr.argtypes = [ctypes.c_int, ctypes.c_void_p]
libc.mq_timedreceive.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_void_p]
libc.mq_timedreceive.restype = ctypes.c_ssize_t
libc.mq_send.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint]
libc.statfs.argtypes = [ctypes.c_char_p, ctypes.c_void_p]

MSG_NEXT_ID = "/proc/sys/kernel/msg_next_id"
SEM_NEXT_ID = "/proc/sys/kernel/sem_next_id"


def _check(ret: int, call: str) -> int:
    if ret < 0:
        raise oserror(call)
    return ret


def sysvipc(name: str) -> list[dict[str, int]]:
    """The rows of /proc/sysvipc/NAME (msg, sem, shm) as ints (perms: the mode bits)."""
    with open(f"/proc/sysvipc/{name}") as f:
        lines = f.read().splitlines()
    names = lines[0].split()
    rows = []
    for line in lines[1:]:
        row = {k: int(v, 8) if k == "perms" else int(v) for k, v in zip(names, line.split())}
        rows.append(row)
    return rows


def msg_stat(msqid: int) -> msqid64_ds:
    ds = msqid64_ds()
    _check(libc.msgctl(msqid, IPC_STAT, ctypes.byref(ds)), f"msgctl({msqid}, IPC_STAT)")
    return ds


def msg_copy_all(msqid: int, count: int, maxsize: int) -> list[tuple[int, bytes]]:
    """The `count` messages of a queue, (mtype, bytes) in order, copied
    (MSG_COPY), the queue left as it was."""
    buf = ctypes.create_string_buffer(8 + maxsize)
    out = []
    for index in range(count):
        got = libc.msgrcv(msqid, buf, maxsize, index, MSG_COPY | IPC_NOWAIT)
        _check(got, f"msgrcv({msqid}, MSG_COPY, message {index})")
        out.append((ctypes.c_long.from_buffer(buf).value, buf.raw[8:8 + got]))
    return out


def next_id(path: str, ident: int) -> None:
    """The id the next msgget/semget (MSG_NEXT_ID, SEM_NEXT_ID) of this
    namespace gives; back to -1 by itself once used. Written with
    CAP_CHECKPOINT_RESTORE, before a child of another user makes the object."""
    with open(path, "w") as f:
        f.write(str(ident))


def _set_perm(perm: ipc64_perm, uid: int, gid: int, mode: int) -> None:
    perm.uid, perm.gid, perm.mode = uid, gid, mode & 0o777


def msg_create(msqid: int, key: int, mode: int) -> None:
    """The queue `msqid` (next_id(MSG_NEXT_ID, msqid) first)."""
    got = _check(libc.msgget(key, IPC_CREAT | IPC_EXCL | (mode & 0o777)), f"msgget(key {key:#x})")
    if got != msqid:
        libc.msgctl(got, IPC_RMID, None)
        raise OSError(0, f"SysV message queue made with id {got}, not {msqid}")


def msg_fill(msqid: int, mode: int, uid: int, gid: int, qbytes: int, messages: list[tuple[int, bytes]]) -> None:
    """A queue msg_create made: its owner, mode, qbytes, then its messages in order."""
    ds = msg_stat(msqid)
    _set_perm(ds.msg_perm, uid, gid, mode)
    ds.msg_qbytes = qbytes
    _check(libc.msgctl(msqid, IPC_SET, ctypes.byref(ds)), f"msgctl({msqid}, IPC_SET)")
    for mtype, data in messages:
        buf = ctypes.create_string_buffer(mtype.to_bytes(8, "little", signed=True) + data)
        _check(libc.msgsnd(msqid, buf, len(data), IPC_NOWAIT), f"msgsnd({msqid}, {len(data)} bytes)")


def sem_values(semid: int, nsems: int) -> list[int]:
    values = (ctypes.c_ushort * nsems)()
    _check(libc.semctl(semid, 0, GETALL, ctypes.cast(values, ctypes.c_void_p)), f"semctl({semid}, GETALL)")
    return list(values)


def sem_create(semid: int, key: int, mode: int, nsems: int) -> None:
    """The set `semid` of `nsems` semaphores (next_id(SEM_NEXT_ID, semid) first)."""
    got = _check(libc.semget(key, nsems, IPC_CREAT | IPC_EXCL | (mode & 0o777)), f"semget(key {key:#x})")
    if got != semid:
        libc.semctl(got, 0, IPC_RMID, None)
        raise OSError(0, f"SysV semaphore set made with id {got}, not {semid}")


def sem_fill(semid: int, mode: int, uid: int, gid: int, values: list[int]) -> None:
    """A set sem_create made: its owner, mode and values."""
    ds = semid64_ds()
    _check(libc.semctl(semid, 0, IPC_STAT, ctypes.byref(ds)), f"semctl({semid}, IPC_STAT)")
    _set_perm(ds.sem_perm, uid, gid, mode)
    _check(libc.semctl(semid, 0, IPC_SET, ctypes.byref(ds)), f"semctl({semid}, IPC_SET)")
    arr = (ctypes.c_ushort * len(values))(*values)
    _check(libc.semctl(semid, 0, SETALL, ctypes.cast(arr, ctypes.c_void_p)), f"semctl({semid}, SETALL)")


def undo_list_shared(pid: int, other: int) -> bool:
    """Whether two tasks have the same SysV semaphore undo list (kcmp
    KCMP_SYSVSEM; two tasks without one compare equal: both NULL)."""
    return syscall(NR.kcmp, pid, other, KCMP_SYSVSEM, 0, 0) == 0


def fs_type(path: str) -> int:
    """statfs(path).f_type."""
    buf = ctypes.create_string_buffer(120)  # struct statfs (its first field, f_type, is a long)
    _check(libc.statfs(path.encode(), buf), f"statfs({path})")
    return ctypes.c_long.from_buffer(buf).value


def mq_open(name: str, flags: int, mode: int = 0o600, maxmsg: int = 0, msgsize: int = 0) -> int:
    attr = mq_attr(0, maxmsg, msgsize, 0) if flags & os.O_CREAT else None
    return _check(libc.mq_open(name.encode(), flags, mode, ctypes.byref(attr) if attr else None), f"mq_open({name})")


def mq_getattr(fd: int) -> mq_attr:
    attr = mq_attr()
    _check(libc.mq_getattr(fd, ctypes.byref(attr)), "mq_getattr")
    return attr


def mq_receive_all(fd: int, msgsize: int) -> list[tuple[int, bytes]]:
    """Every message of the queue (opened O_NONBLOCK), (priority, bytes),
    in the order the queue gives them: highest priority first, oldest first."""
    buf = ctypes.create_string_buffer(msgsize)
    prio = ctypes.c_uint()
    out = []
    while True:
        got = libc.mq_timedreceive(fd, buf, msgsize, ctypes.byref(prio), None)
        if got < 0:
            if ctypes.get_errno() == 11:  # EAGAIN: empty
                return out
            raise oserror("mq_receive")
        out.append((prio.value, buf.raw[:got]))


def mq_send_all(fd: int, messages: list[tuple[int, bytes]]) -> None:
    for prio, data in messages:
        _check(libc.mq_send(fd, data, len(data), prio), f"mq_send({len(data)} bytes, priority {prio})")
