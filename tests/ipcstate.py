"""What the objects of the IPC namespace this runs in hold, read without
changing anything the state check compares (run by statecheck under
`nsenter --ipc`): every SysV message (msgrcv MSG_COPY: the queue, its
times and last pids stay as they were), every semaphore value (GETALL),
every segment's bytes (a read-only attachment of our own: only its
attach times and last pid move, which the state check leaves out), and
every POSIX message queue's attributes, mode, owner and its file (QSIZE,
the notification; its messages only a receive would show), seen through an
mqueue mount in a mount namespace of this process's own.
Prints one line per object; stdlib and ctypes only."""

import ctypes
import hashlib
import os
import sys
import tempfile

libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
libc.shmdt.argtypes = [ctypes.c_void_p]
libc.msgrcv.restype = ctypes.c_ssize_t
libc.msgrcv.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_long, ctypes.c_int]
libc.semctl.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
libc.mq_open.argtypes = [ctypes.c_char_p, ctypes.c_int]
MSG_COPY, IPC_NOWAIT, GETALL, SHM_RDONLY = 0o40000, 0o4000, 13, 0o10000
CLONE_NEWNS, MS_REC, MS_PRIVATE = 0x20000, 1 << 14, 1 << 18


def rows(name):
    with open(f"/proc/sysvipc/{name}") as f:
        lines = f.read().splitlines()
    return [dict(zip(lines[0].split(), line.split())) for line in lines[1:]]


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def main() -> None:
    out = []
    for r in rows("msg"):
        qid, n = int(r["msqid"]), int(r["qnum"])
        buf = ctypes.create_string_buffer(8 + max(int(r["cbytes"]), 1))
        msgs = []
        for i in range(n):
            got = libc.msgrcv(qid, buf, len(buf) - 8, i, MSG_COPY | IPC_NOWAIT)
            if got < 0:
                msgs.append(f"MSG_COPY errno {ctypes.get_errno()}")
                continue
            msgs.append(f"{ctypes.c_long.from_buffer(buf).value}:{got}:{digest(buf.raw[8:8 + got])}")
        out.append(f"msg {qid}: {' '.join(msgs)}")
    for r in rows("sem"):
        n = int(r["nsems"])
        values = (ctypes.c_ushort * n)()
        libc.semctl(int(r["semid"]), 0, GETALL, ctypes.cast(values, ctypes.c_void_p))
        out.append(f"sem {r['semid']}: values {list(values)}")
    for r in rows("shm"):
        base = libc.shmat(int(r["shmid"]), None, SHM_RDONLY)
        if base in (None, ctypes.c_void_p(-1).value):
            out.append(f"shm {r['shmid']}: shmat errno {ctypes.get_errno()}")
            continue
        try:
            out.append(f"shm {r['shmid']}: bytes {digest(ctypes.string_at(base, int(r['size'])))}")
        finally:
            libc.shmdt(ctypes.c_void_p(base))
    if libc.unshare(CLONE_NEWNS) or libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None):
        out.append(f"mqueue: no mount namespace of our own, errno {ctypes.get_errno()}")
    else:
        where = tempfile.mkdtemp(prefix="ipcstate-")
        try:
            if libc.mount(b"mqueue", where.encode(), b"mqueue", 0, None):
                out.append(f"mqueue: mount errno {ctypes.get_errno()}")
            else:
                for name in sorted(os.listdir(where)):
                    path = os.path.join(where, name)
                    st = os.stat(path)
                    with open(path) as f:
                        info = " ".join(f.read().split())
                    attr = (ctypes.c_long * 8)()
                    fd = libc.mq_open(f"/{name}".encode(), os.O_RDONLY)
                    libc.mq_getattr(fd, attr)
                    os.close(fd)
                    out.append(f"mqueue /{name}: mode {st.st_mode & 0o7777:o} uid {st.st_uid} gid {st.st_gid} "
                               f"maxmsg {attr[1]} msgsize {attr[2]} curmsgs {attr[3]} {info}")
        finally:
            libc.umount2(where.encode(), 2)
            os.rmdir(where)
    sys.stdout.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
