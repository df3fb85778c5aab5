"""SysV shared memory segments made again with their ids (shm_next_id,
which kernels with CONFIG_CHECKPOINT_RESTORE offer for exactly this)."""

from __future__ import annotations

import contextlib
import ctypes

from . import proc
from .arch.x86_64 import PAGE_SIZE
from .libc import libc, oserror

libc.shmat.restype = ctypes.c_void_p
libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
libc.shmdt.argtypes = [ctypes.c_void_p]
IPC_CREAT, IPC_EXCL, IPC_RMID, IPC_PRIVATE = 0o1000, 0o2000, 0, 0
SHM_RDONLY, SHM_EXEC = 0o10000, 0o100000
IPC_SET, IPC_STAT = 1, 2
SHMID64_DS_SIZE = 112  # include/uapi/asm-generic/shmbuf.h on x86_64
NEXT_ID = "/proc/sys/kernel/shm_next_id"


def ensure(shmid: int, key: int, size: int, mode: int, private_if_taken: bool = False) -> bool:
    """The segment `shmid` of `size` bytes, made if missing; True if made.
    private_if_taken: a removed segment's key may have been reused since;
    then it is made without a key (its name in maps shows key 0)."""
    seg = proc.sysv_shm(shmid)
    if seg is not None:  # still there since the dump: used only if it is the same and nobody uses it
        if seg["size"] != size or seg["key"] != key or seg["perms"] & 0o1000:
            raise OSError(0, f"SysV segment {shmid} exists as another segment (key {seg['key']:#x}, "
                             f"{seg['size']} bytes; the image has key {key:#x}, {size} bytes)")
        if seg["nattch"]:
            raise OSError(0, f"SysV segment {shmid} is attached by {seg['nattch']} process(es) already")
        return False
    next_id(shmid)
    create(shmid, key, size, mode, private_if_taken)
    return True


def next_id(shmid: int) -> None:
    with open(NEXT_ID, "w") as f:  # used by the next shmget, then back to -1 by itself
        f.write(str(shmid))


def create(shmid: int, key: int, size: int, mode: int, private_if_taken: bool = False) -> None:
    """The segment `shmid` (next_id(shmid) first, with CAP_CHECKPOINT_RESTORE)."""
    got = libc.shmget(key, size, IPC_CREAT | IPC_EXCL | (mode & 0o777))
    if got < 0 and ctypes.get_errno() == 17 and private_if_taken:  # EEXIST
        got = libc.shmget(IPC_PRIVATE, size, IPC_CREAT | (mode & 0o777))
    if got < 0:
        raise oserror(f"shmget(key {key:#x}, {size})")
    if got != shmid:
        remove(got)
        raise OSError(0, f"SysV segment made with id {got}, not {shmid}")


def write(shmid: int, pieces: list[tuple[int, bytes]]) -> None:
    """Write (offset, data) pieces into the segment through an attachment of ours."""
    base = libc.shmat(shmid, None, 0)
    if base in (None, ctypes.c_void_p(-1).value):
        raise oserror(f"shmat({shmid})")
    try:
        for offset, data in pieces:
            ctypes.memmove(base + offset, data, len(data))
    finally:
        libc.shmdt(ctypes.c_void_p(base))


@contextlib.contextmanager
def attached(shmid: int, readonly: bool = False):
    """(address, size) of an attachment of ours for the block."""
    seg = proc.sysv_shm(shmid)
    if seg is None:
        raise OSError(2, f"SysV segment {shmid} is gone")
    base = libc.shmat(shmid, None, SHM_RDONLY if readonly else 0)
    if base in (None, ctypes.c_void_p(-1).value):
        raise oserror(f"shmat({shmid})")
    try:
        yield base, -(-seg["size"] // PAGE_SIZE) * PAGE_SIZE
    finally:
        libc.shmdt(ctypes.c_void_p(base))


def set_owner(shmid: int, uid: int, gid: int, mode: int) -> None:
    """IPC_SET of the segment's owner and mode (struct shmid64_ds begins with its ipc64_perm)."""
    from .ipc import ipc64_perm

    buf = ctypes.create_string_buffer(SHMID64_DS_SIZE)
    if libc.shmctl(shmid, IPC_STAT, buf) < 0:
        raise oserror(f"shmctl({shmid}, IPC_STAT)")
    perm = ipc64_perm.from_buffer(buf)
    perm.uid, perm.gid, perm.mode = uid, gid, mode & 0o777
    if libc.shmctl(shmid, IPC_SET, buf) < 0:
        raise oserror(f"shmctl({shmid}, IPC_SET)")


def remove(shmid: int) -> None:
    if libc.shmctl(shmid, IPC_RMID, None) < 0:
        raise oserror(f"shmctl({shmid}, IPC_RMID)")
