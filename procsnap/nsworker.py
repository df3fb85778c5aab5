"""A worker inside a process's pid namespace, where that namespace's pids
are the pids: ptrace, kill, waitpid, process_vm_* and /proc all take and
show them. The dump and the rebuild, written for one pid namespace, run in
it unchanged for a tree that lives in its own (a container's init and its
descendants): the image holds the namespace's pids, and so does every
call the worker makes. The caller keeps the host's pids; the one host pid
it needs is the init's (its child at restore).

    caller --os.fork--> helper --setns(CLONE_NEWPID), clone3 set_tid--> worker
    (host pids)         (single-threaded,            (in the namespace, pid chosen;
                         in the caller's pid ns)      own mount ns, a procfs of the
                                                      namespace on /proc)

A procfs shows the pid namespace of the process that mounts it, so the
worker mounts one on /proc in a mount namespace of its own (/ made private
first: nothing of it reaches the host's mount table). Its own pid is taken
with set_tid from the top of the namespace's range, outside `avoid` (the
pids and thread ids the tree has or will be given): the worker never takes
a pid of the tree. Its result, or the exception it raised, comes back
pickled on a pipe. The worker's threads take pids of the namespace as well,
from its last pid on (ns_last_pid): that is put above every pid of the tree
while the worker runs, and back after.

SIGKILL sent from inside a pid namespace to its init, which has no handler
for it, is dropped (kernel/signal.c forces it only from an ancestor
namespace); from_outside_kill() lets the worker ask the helper, which lives
in the caller's namespace, to kill the init by its host pid. The namespace
then dies whole, the worker with it; its result is sent before.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import time
import typing

from .errors import ProcsnapError, RestoreError, describe
from .kernel.libc import libc

CLONE_NEWNS = 0x00020000  # include/uapi/linux/sched.h
CLONE_NEWPID = 0x20000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWTIME = 0x00000080
CLONE_NEWNET = 0x40000000
CLONE_NEWCGROUP = 0x02000000
NS_FLAGS = {"pid": CLONE_NEWPID, "uts": CLONE_NEWUTS, "ipc": CLONE_NEWIPC, "mnt": CLONE_NEWNS, "time": CLONE_NEWTIME,
            "net": CLONE_NEWNET, "cgroup": CLONE_NEWCGROUP}
MS_REC = 1 << 14  # include/uapi/linux/mount.h
MS_PRIVATE = 1 << 18
EEXIST = 17

libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
libc.unshare.argtypes = [ctypes.c_int]
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
libc.umount.argtypes = [ctypes.c_char_p]

_inside: dict[str, typing.Any] = {}  # in a worker: its helper's kill pipe and the host pid of the init


def _check(ret: int, what: str) -> None:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def setns_to(pid: int | str, kind: str) -> None:
    """Enter the namespace `kind` of `pid` (this thread; a pid namespace:
    for the children made from here on)."""
    fd = os.open(f"/proc/{pid}/ns/{kind}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _check(libc.setns(fd, NS_FLAGS[kind.split("_")[0]]), f"setns to {kind} of pid {pid}")
    finally:
        os.close(fd)


def setns_fd(fd: int, kind: str) -> None:
    _check(libc.setns(fd, NS_FLAGS[kind]), f"setns to an {kind} namespace")


def unshare(flags: int) -> None:
    _check(libc.unshare(flags), f"unshare {flags:#x}")


def own_proc() -> None:
    """A mount namespace of this process's own, with a procfs of its pid namespace on /proc."""
    unshare(CLONE_NEWNS)
    _check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "make / private")
    _check(libc.mount(b"proc", b"/proc", b"proc", 0, None), "mount a procfs on /proc")


def ns_pids(pid: int | str) -> list[int]:
    """NSpid of `pid` (as the reader's /proc shows it): its pid in each pid
    namespace from the reader's down to its own."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("NSpid:"):
                return [int(x) for x in line.split()[1:]]
    return []


def inside() -> bool:
    """Whether this process is a worker run_inside made."""
    return bool(_inside)


def from_outside_kill(result: typing.Any) -> typing.NoReturn:
    """In a worker: send `result` as the worker's, then have the helper
    SIGKILL the namespace's init (and so every process of the namespace,
    this one too). Never returns."""
    _send(_inside["result"], ("ok", result))
    os.write(_inside["kill"], b"K")
    while True:
        signal.pause()


def _send(fd: int, msg) -> None:
    import pickle  # here: only a container's dump or restore sends (pickle costs ~4 ms to import)

    try:
        data = pickle.dumps(msg)
    except Exception:  # noqa: BLE001 - an exception that does not pickle: its words
        data = pickle.dumps(("err", RestoreError(describe(msg[1]) if msg[0] == "err" else "unpicklable result")))
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


LAST_PID = "/proc/sys/kernel/ns_last_pid"  # of the reader's pid namespace


def _last_pid() -> int:
    with open(LAST_PID) as f:
        return int(f.read())


def _set_last_pid(pid: int) -> None:
    with open(LAST_PID, "w") as f:
        f.write(str(pid))


def host_net_fd() -> int:
    """In a worker: an fd of the caller's network namespace (the worker may have entered another)."""
    return _inside["host_net"]


def saved_last_pid() -> int:
    """In a worker: its namespace's last pid as the worker found it."""
    return _inside["last_pid"]


def _free_pid(avoid: set[int]) -> typing.Iterator[int]:
    with open("/proc/sys/kernel/pid_max") as f:
        top = int(f.read()) - 1
    for pid in range(top, 300, -1):
        if pid not in avoid:
            yield pid


def run_inside(host_pid: int, fn: typing.Callable[[], typing.Any], avoid: typing.Iterable[int] = (),
               enter: typing.Iterable[str] = (), last_pid: int | None = None,
               setup: typing.Callable[[], None] | None = None) -> typing.Any:
    """fn() in a worker inside the pid namespace of `host_pid` (and its
    namespaces `enter`: "uts", "ipc", "net"); returns its result or raises its
    exception (see the module docstring). The namespace's last pid
    (ns_last_pid, where its next pid is sought) is put above `avoid` while
    the worker runs, and then back, or to `last_pid`. setup(): run first
    in the worker, once its /proc is mounted (objects/mountns.py)."""
    from .kernel.clone import _clone3

    avoid = set(avoid)
    host_ns = host_namespaces()
    with open("/proc/self/mountinfo") as f:
        host_mounts = f.read()
    result_r, result_w = os.pipe2(os.O_CLOEXEC)
    kill_r, kill_w = os.pipe2(os.O_CLOEXEC)
    host_net = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)  # held by the worker
    try:
        helper = os.fork()
    except BaseException:
        os.close(host_net)
        raise
    if helper == 0:
        code = 0
        try:
            os.close(result_r)
            setns_to(host_pid, "pid")
            for kind in enter:
                setns_to(host_pid, kind)

            def worker() -> int:
                os.close(kill_r)
                _inside.update(result=result_w, kill=kill_w, host_pid=host_pid, host_ns=host_ns,
                               host_mounts=host_mounts, host_net=host_net)
                try:
                    own_proc()
                    if setup is not None:
                        setup()
                    # the worker's threads take pids of the namespace too: above the tree's
                    _inside["last_pid"] = _last_pid()
                    _set_last_pid(max([_inside["last_pid"], *avoid]))
                    try:
                        msg = ("ok", fn())
                    finally:
                        _set_last_pid(_inside["last_pid"] if last_pid is None else last_pid)
                except BaseException as err:  # noqa: BLE001 - sent to the caller
                    msg = ("err", err)
                _send(result_w, msg)
                return 0

            for pid in _free_pid(avoid):
                got, err = _clone3(pid, worker, 0)
                if err != EEXIST:
                    break
            if got < 0:
                raise OSError(err, f"clone3 of a worker in the pid namespace of {host_pid}: {os.strerror(err)}")
            os.close(kill_w)
            os.close(result_w)
            killed = os.read(kill_r, 1) == b"K"
            if killed:
                os.kill(host_pid, signal.SIGKILL)
            os.waitpid(got, 0)
            while killed and _alive(host_pid):  # dead (a zombie for its parent) before the caller goes on
                time.sleep(0.001)
        except BaseException as err:  # noqa: BLE001 - sent to the caller
            with contextlib.suppress(BaseException):
                _send(result_w, ("err", err))
            code = 1
        finally:
            os._exit(code)
    os.close(host_net)
    os.close(result_w)
    os.close(kill_r)
    os.close(kill_w)
    what, value = _result(result_r, helper, RestoreError(f"the worker in the pid namespace of pid {host_pid} "
                                                         "died without a word", host_pid))
    if what == "err":
        if isinstance(value, (ProcsnapError, OSError, KeyboardInterrupt)):
            raise value
        raise RestoreError(f"in the pid namespace of pid {host_pid}: {describe(value)}", host_pid) from value
    return value


def _result(fd: int, child: int, silent: Exception) -> tuple[str, typing.Any]:
    """What `child` sent on `fd` (_send), once it is reaped; `silent` raised if nothing."""
    data = b""
    try:
        while chunk := os.read(fd, 1 << 16):
            data += chunk
    finally:
        os.close(fd)
        _reap(child)
    if not data:
        raise silent
    import pickle

    return pickle.loads(data)


def run_forked(fn: typing.Callable[[], typing.Any]) -> typing.Any:
    """fn() in a forked child (for what this process must not do itself, such
    as unsharing a namespace to look at a new one); its result or its exception."""
    r, w = os.pipe2(os.O_CLOEXEC)
    child = os.fork()
    if child == 0:
        try:
            os.close(r)
            try:
                msg = ("ok", fn())
            except BaseException as err:  # noqa: BLE001 - sent to the caller
                msg = ("err", err)
            _send(w, msg)
        finally:
            os._exit(0)
    os.close(w)
    what, value = _result(r, child, RestoreError("a forked helper died without a word"))
    if what == "err":
        raise value
    return value


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def _reap(pid: int) -> None:
    while True:
        try:
            os.waitpid(pid, 0)
            return
        except ChildProcessError:
            return  # reaped by a caller's thread that waits for any child
        except InterruptedError:
            time.sleep(0)


def host_namespaces() -> dict[str, str]:
    """kind -> 'kind:[inode]' of the caller's namespaces: in a worker, those
    of the process that made it (the worker's own mount and pid namespaces
    are not the host's)."""
    if _inside:
        return _inside["host_ns"]
    out = {}
    for kind in os.listdir("/proc/self/ns"):
        with contextlib.suppress(OSError):
            out[kind] = os.readlink(f"/proc/self/ns/{kind}")
    return out


def host_mountinfo() -> str:
    """In a worker: the mount table of the process that made it (the
    namespace a container's was copied from)."""
    return _inside["host_mounts"]


_root = {"prefix": "", "outside": frozenset()}  # where the tree's paths are looked up (objects/mountns.py)


def set_root(prefix: str, outside: typing.Iterable[str] = ()) -> None:
    """Look the tree's paths up under `prefix` from now on ("" for /), but
    those in `outside`: a container's own mount namespace, through
    /proc/1/root in the dump's worker, through an fd of the made
    namespace's root at restore."""
    _root["prefix"], _root["outside"] = prefix, frozenset(outside)


def in_root(path: str) -> str:
    """`path` of the tree (absolute, as its /proc links show it) where this
    process can open it."""
    if _root["prefix"] and path.startswith("/") and path not in _root["outside"]:
        return _root["prefix"] + path
    return path


def mount(source: bytes, target: bytes, fstype: bytes, flags: int = 0) -> None:
    _check(libc.mount(source, target, fstype, flags, None), f"mount {fstype.decode()} on {target.decode()}")


def umount(target: bytes) -> None:
    _check(libc.umount(target), f"umount {target.decode()}")
