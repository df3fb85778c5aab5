"""clone3 with set_tid from Python, safe also with other threads running.

The new process is a copy of this one that goes on running Python: it
returns from the clone3 call into the interpreter. A raw clone3 runs none
of the fork handlers os.fork runs, and that is only safe when this process
has no other thread:
- the first bytecode after the call checks the eval breaker; if another
  thread has asked for the GIL meanwhile (gil_drop_request), the child drops
  it and waits for that thread to take it: a thread the child does not have,
  so it waits forever (seen: restore() beside a reaper thread);
- a libc lock (malloc's arena) another thread holds at that instant stays
  held in the child.
With other threads, the clone is therefore made by a single-threaded copy
of this process, made by os.fork (which resets the interpreter and libc
locks in the copy), with CLONE_PARENT: the new process is this process's
child all the same. The copy reports the pid on a pipe and exits.
"""

from __future__ import annotations

import ctypes
import os
import signal
import typing

from .arch.x86_64 import NR
from .libc import pylibc
from .structs import clone_args

CLONE_PARENT = 0x00008000  # include/uapi/linux/sched.h


def other_threads() -> bool:
    """Whether this process has a thread besides the calling one."""
    return len(os.listdir("/proc/self/task")) > 1


def _clone3(pid: int, child: typing.Callable[[], int], flags: int) -> tuple[int, int]:
    tid = (ctypes.c_int * 1)(pid)
    # With CLONE_PARENT the exit signal is the caller's own (clone3 refuses
    # one given: EINVAL); the forked copy's is SIGCHLD.
    exit_signal = 0 if flags & CLONE_PARENT else signal.SIGCHLD
    args = clone_args(flags=flags, exit_signal=exit_signal, set_tid=ctypes.addressof(tid), set_tid_size=1)
    # As os.fork does around fork(): the import lock and the at-fork hooks.
    # pylibc keeps the GIL across clone3.
    ctypes.pythonapi.PyOS_BeforeFork()
    got = pylibc.syscall(NR.clone3, ctypes.byref(args), ctypes.sizeof(args))
    err = ctypes.get_errno() if got < 0 else 0
    if got == 0:
        ctypes.pythonapi.PyOS_AfterFork_Child()
        code = 1
        try:
            code = child()
        finally:
            os._exit(code)
    ctypes.pythonapi.PyOS_AfterFork_Parent()
    return got, err


def clone_with_pid(pid: int, child: typing.Callable[[], int], flags: int = 0,
                   before: typing.Callable[[], None] | None = None) -> tuple[int, int]:
    """A child of this process with pid `pid`, running child() and exiting
    with its result (it never returns there). Returns (pid, 0), or (-1,
    errno) when clone3 failed (EEXIST: the pid is taken). flags: clone3's
    too (CLONE_NEWPID: `pid` is the child's in its new pid namespace, and
    the one returned the kernel's in ours); before(): run in the forked
    copy just before the clone (namespaces unshared for the child there
    leave this process's alone; an exception in it is the clone's error)."""
    if not other_threads() and not flags and before is None:
        return _clone3(pid, child, 0)
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        helper = os.fork()
    except BaseException:
        os.close(r)
        os.close(w)
        raise
    if helper == 0:  # the single-threaded copy
        try:
            os.close(r)
            try:
                if before is not None:
                    before()
            except OSError as e:
                got, err = -1, e.errno or 22
            else:
                got, err = _clone3(pid, lambda: (os.close(w), child())[1], CLONE_PARENT | flags)
            os.write(w, f"{got} {err}\n".encode())
        finally:
            os._exit(0)
    os.close(w)
    try:
        msg = b""
        while not msg.endswith(b"\n") and (chunk := os.read(r, 64)):
            msg += chunk
    finally:
        os.close(r)
        try:
            os.waitpid(helper, 0)
        except ChildProcessError:
            pass  # reaped by a caller's thread that waits for any child
    if not msg:
        raise OSError(0, f"clone3 set_tid {pid}: the forked helper {helper} exited without a word")
    got, err = (int(x) for x in msg.split())
    return got, err
