"""`procsnap check --feature NAME`: whether this kernel and machine allow
one feature, by CRIU's name for it where CRIU has one (criu check
--feature), else procsnap's own. Each probe makes the real call (on
ourselves, or on a throw-away child) and says what it found; a missing
feature raises OSError with the reason in one line.

    name              CRIU's?   what is probed
    ----              -------   --------------
    mnt_id            yes       fdinfo shows mnt_id
    mem_dirty_track   yes       soft-dirty bits in /proc/PID/pagemap (CONFIG_MEM_SOFT_DIRTY)
    uffd              yes       userfaultfd(2)
    uffd-noncoop      yes       userfaultfd with fork/remap/remove/unmap events (restore --lazy-pages)
    uffd-wp           procsnap  userfaultfd async write-protect + PAGEMAP_SCAN (pre-dump's tracking)
    timens            yes       time namespaces with offsets
    clone3_set_tid    yes       clone3 with set_tid
    pidfd_getfd       procsnap  pidfd_open + pidfd_getfd (CRIU has pidfd_store)
    pidfd_store       yes       pidfd_open
    tcp_repair        procsnap  TCP_REPAIR on a socket (CRIU checks it unnamed, in its default checks)
    nftables          yes       the nft program lists the ruleset (procsnap's network lock)
    memfd             procsnap  memfd_create with sealing
    get_rseq_conf     yes       PTRACE_GET_RSEQ_CONFIGURATION
    kcmp_epoll        yes       kcmp KCMP_EPOLL_TFD
    seccomp_filters   yes       PTRACE_SECCOMP_GET_FILTER
    cgroupns          yes       cgroup namespaces
    ns_pid            yes       NSpid in /proc/PID/status
    ipc_msg_copy      procsnap  msgrcv MSG_COPY (a container's SysV messages, read without removing)
    ipc_next_id       procsnap  kernel.{msg,sem,shm}_next_id (SysV objects made at their ids)
    mqueue            procsnap  an mqueue fs of our IPC namespace (a container's POSIX queues)
    and every check `procsnap check` runs, by its name there (ptrace, process_vm_rw, ...)
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import subprocess
import tempfile
import typing

from .errors import ProcsnapError


class UnknownFeature(ProcsnapError):
    """`check --feature` of a name no probe has: bad input."""

    exit_code = 2


def _mnt_id() -> str:
    fd = os.open("/", os.O_RDONLY | os.O_CLOEXEC)
    try:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            if "mnt_id:" not in f.read():
                raise OSError(0, "/proc/PID/fdinfo shows no mnt_id")
    finally:
        os.close(fd)
    return "fdinfo mnt_id"


def _soft_dirty() -> str:
    from .kernel.uffdwp import has_soft_dirty

    if not has_soft_dirty():
        raise OSError(0, "no soft-dirty bits in /proc/PID/pagemap (CONFIG_MEM_SOFT_DIRTY is off); "
                         "pre-dump tracks with uffd-wp or content hashes instead")
    return "soft-dirty bits"


def _timens() -> str:
    if not os.path.exists("/proc/self/ns/time"):
        raise OSError(0, "no time namespaces (/proc/self/ns/time)")
    pid = os.fork()
    if pid == 0:  # a child unshares one and gives it an offset
        code = 1
        try:
            from . import nsworker

            nsworker.unshare(nsworker.CLONE_NEWTIME)
            with open("/proc/self/timens_offsets", "w") as f:
                f.write("monotonic 1 0\n")
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status):
        raise OSError(0, "unshare(CLONE_NEWTIME) and writing /proc/self/timens_offsets failed")
    return "time namespace with offsets"


def _pidfd_open() -> str:
    from .kernel.arch.x86_64 import NR
    from .kernel.libc import syscall

    os.close(syscall(NR.pidfd_open, os.getpid(), 0))
    return "pidfd_open"


def _tcp_repair() -> str:
    from .objects.tcp import SOL_TCP, TCP_REPAIR

    with socket.socket() as sk:
        sk.setsockopt(SOL_TCP, TCP_REPAIR, 1)
    return "TCP_REPAIR"


def _nftables() -> str:
    from .objects.netlock import _which

    if not _which("nft"):
        raise OSError(0, "no nft program (Debian: apt-get install nftables)")
    r = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True)
    if r.returncode:
        raise OSError(0, f"nft list tables: {r.stderr.strip() or r.returncode}")
    return "nft lists the ruleset"


def _memfd() -> str:
    import fcntl

    fd = os.memfd_create("procsnap-check", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SEAL)
    finally:
        os.close(fd)
    return "memfd_create with sealing"


def _kcmp_epoll() -> str:
    import select
    import struct

    from .kernel.arch.x86_64 import NR
    from .kernel.libc import syscall

    ep = select.epoll()
    r, w = os.pipe()
    try:
        ep.register(r)
        slot = ctypes.create_string_buffer(struct.pack("=III", ep.fileno(), r, 0))
        if syscall(NR.kcmp, os.getpid(), os.getpid(), 7, r, ctypes.addressof(slot)) != 0:  # KCMP_EPOLL_TFD
            raise OSError(0, "kcmp KCMP_EPOLL_TFD does not find a watched fd")
    finally:
        ep.close()
        os.close(r)
        os.close(w)
    return "kcmp KCMP_EPOLL_TFD"


def _seccomp_filters() -> str:
    """A child of ours with an allow-all filter; its filter read back by ptrace."""
    import signal
    import struct

    from .kernel import ptrace
    from .kernel.libc import libc

    insn = ctypes.create_string_buffer(struct.pack("<HBBI", 0x06, 0, 0, 0x7FFF0000))  # BPF_RET SECCOMP_RET_ALLOW
    prog = ctypes.create_string_buffer(struct.pack("<HxxxxxxQ", 1, ctypes.addressof(insn)))  # struct sock_fprog
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
            ok = libc.prctl(22, 2, ctypes.addressof(prog), 0, 0) == 0  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
            os.write(w, b"y" if ok else b"n")
            signal.pause()
        finally:
            os._exit(0)
    os.close(w)
    installed = os.read(r, 1) == b"y"
    os.close(r)
    try:
        if not installed:
            raise OSError(0, "the child could not install a seccomp filter")
        ptrace.freeze(pid)
        try:
            count = ptrace.ptrace(ptrace.Req.SECCOMP_GET_FILTER, pid, 0, 0)
        finally:
            ptrace.detach(pid)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    if count != 1:
        raise OSError(0, f"PTRACE_SECCOMP_GET_FILTER gave {count} instructions for a filter of 1")
    return "PTRACE_SECCOMP_GET_FILTER"


def _ns(kind: str) -> typing.Callable[[], str]:
    def probe() -> str:
        if not os.path.exists(f"/proc/self/ns/{kind}"):
            raise OSError(0, f"no {kind} namespaces (/proc/self/ns/{kind})")
        return f"{kind} namespaces"
    return probe


def _ns_pid() -> str:
    with open("/proc/self/status") as f:
        if "NSpid:" not in f.read():
            raise OSError(0, "/proc/PID/status has no NSpid")
    return "NSpid"


def _in_new_ipc(fn: typing.Callable[[], str]) -> str:
    """fn() in a child of ours in a new IPC (and mount) namespace: it changes nothing of ours."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            from . import nsworker

            nsworker.unshare(nsworker.CLONE_NEWIPC | nsworker.CLONE_NEWNS)
            nsworker.mount(b"none", b"/", b"", nsworker.MS_REC | nsworker.MS_PRIVATE)
            msg = "ok " + fn()
        except OSError as err:
            msg = "no " + (err.strerror or str(err))
        except BaseException as err:  # noqa: BLE001 - said to the parent
            msg = f"no {type(err).__name__}: {err}"
        os.write(w, msg.encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        said = f.read().decode()
    os.waitpid(pid, 0)
    if not said.startswith("ok "):
        raise OSError(0, said[3:] or "the probe's child said nothing")
    return said[3:]


def _msg_copy() -> str:
    from .kernel import ipc

    q = ipc.libc.msgget(0, ipc.IPC_CREAT | 0o600)
    if q < 0:
        raise ipc.oserror("msgget")
    ipc.msg_fill(q, 0o600, 0, 0, 16384, [(3, b"procsnap")])
    if ipc.msg_copy_all(q, 1, 64) != [(3, b"procsnap")] or ipc.msg_stat(q).msg_qnum != 1:
        raise OSError(0, "msgrcv MSG_COPY did not copy the message in place")
    return "msgrcv MSG_COPY"


def _next_ids() -> str:
    from .kernel import ipc

    missing = [p for p in (ipc.MSG_NEXT_ID, ipc.SEM_NEXT_ID, "/proc/sys/kernel/shm_next_id") if not os.path.exists(p)]
    if missing:
        raise OSError(0, f"no {', '.join(missing)} (CONFIG_CHECKPOINT_RESTORE)")
    ipc.next_id(ipc.MSG_NEXT_ID, 4242)
    q = ipc.libc.msgget(0, ipc.IPC_CREAT | 0o600)
    if q != 4242:
        raise OSError(0, f"msg_next_id 4242 gave queue id {q}")
    return "msg_next_id, sem_next_id, shm_next_id"


def _mqueue() -> str:
    from . import nsworker
    from .kernel import ipc

    where = tempfile.mkdtemp(prefix="procsnap-check-")
    try:
        nsworker.mount(b"mqueue", where.encode(), b"mqueue")
        fd = ipc.mq_open("/procsnap-check", os.O_RDWR | os.O_CREAT | os.O_NONBLOCK, 0o600, 2, 16)
        try:
            names = os.listdir(where)
        finally:
            os.close(fd)
        if names != ["procsnap-check"]:
            raise OSError(0, f"the mqueue mount lists {names}, not the queue made")
    finally:
        with contextlib.suppress(OSError):
            nsworker.umount(where.encode())
        os.rmdir(where)
    return "mqueue fs, mq_open"


def _probes():
    """name -> probe; every probe returns what it found or raises OSError."""
    from .kernel import probes

    def of_check(name):
        def probe() -> str:
            result = next(r for r in probes.run_checks() if r.name == name)
            if not result.ok:
                raise OSError(0, result.detail)
            return result.detail
        return probe

    return {
        "mnt_id": _mnt_id,
        "mem_dirty_track": _soft_dirty,
        "uffd": probes.probe_userfaultfd,
        "uffd-noncoop": probes.probe_lazy_pages,
        "uffd-wp": probes.probe_uffd_wp,
        "timens": _timens,
        "clone3_set_tid": probes.probe_clone3_set_tid,
        "pidfd_getfd": lambda: _with_sleeper(probes.probe_pidfd_getfd),
        "pidfd_store": _pidfd_open,
        "tcp_repair": _tcp_repair,
        "nftables": _nftables,
        "memfd": _memfd,
        "get_rseq_conf": lambda: _with_sleeper(probes.probe_rseq),
        "kcmp_epoll": _kcmp_epoll,
        "seccomp_filters": _seccomp_filters,
        "cgroupns": _ns("cgroup"),
        "userns": _ns("user"),
        "ns_pid": _ns_pid,
        "ipc_msg_copy": lambda: _in_new_ipc(_msg_copy),
        "ipc_next_id": lambda: _in_new_ipc(_next_ids),
        "mqueue": lambda: _in_new_ipc(_mqueue),
        **{name: of_check(name) for name in CHECK_NAMES},
    }


CHECK_NAMES = ("ptrace", "process_vm_rw", "prctl_mm_map", "rseq_config", "userfaultfd", "sock_diag",
               "checkpoint_restore_knobs")  # `procsnap check`'s own (kernel/probes.py run_checks)


def _with_sleeper(probe) -> str:
    from .kernel.probes import _sleeper

    with _sleeper() as pid:
        return probe(pid)


def names() -> list[str]:
    return list(_probes())


def check_feature(name: str) -> str:
    """What the probe of `name` found; OSError (its reason) if the feature
    is missing here, UnknownFeature if no probe has that name."""
    probes = _probes()
    if name not in probes:
        raise UnknownFeature(f"check --feature {name!r}: no such feature; `procsnap check --feature list` "
                             "names them")
    return probes[name]()
