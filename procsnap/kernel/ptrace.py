"""ptrace requests used by a checkpointer: seize, interrupt, regsets,
signal mask and queue, rseq configuration, and syscall injection.

Injection never writes code into the target: it points rip at a `syscall`
instruction already mapped in the target (one in its vdso) and runs it to
its syscall-exit stop (PTRACE_SYSCALL: an entry stop, then an exit stop).
To put the task's own registers back, the task is then moved into an
interrupt trap (PTRACE_INTERRUPT + PTRACE_CONT, which also ends syscall
tracing). That stop is inside signal delivery, so whenever the task leaves
it - resumed by us, detached, or released because procsnap was killed -
the kernel applies its own syscall-restart rule to the registers, exactly
as if it had never stopped.

Why syscall stops and not a single step: the single-step trap is a real
SIGTRAP, forced on the task (force_sig_fault). With SIGTRAP blocked, as
every signal is while a call runs, forcing it resets the task's SIGTRAP
handler to SIG_DFL and unblocks it; and it merges with a SIGTRAP the task
has pending, which the trap stop then dequeues: the task's handler and its
pending SIGTRAP were both lost. Syscall stops (SIGTRAP | 0x80 with
PTRACE_O_TRACESYSGOOD, which every seize here sets) queue no signal.
"""

from __future__ import annotations

import ctypes
import enum
import functools
import os
import signal

from . import timerlist
from .arch import x86_64 as arch
from .libc import libc, oserror


class Req(enum.IntEnum):
    """ptrace requests (include/uapi/linux/ptrace.h)."""

    PEEKDATA = 2
    CONT = 7
    SINGLESTEP = 9
    DETACH = 17
    SYSCALL = 24
    SETOPTIONS = 0x4200
    GETEVENTMSG = 0x4201
    GETSIGINFO = 0x4202
    GETREGSET = 0x4204
    SETREGSET = 0x4205
    SEIZE = 0x4206
    INTERRUPT = 0x4207
    PEEKSIGINFO = 0x4209
    GETSIGMASK = 0x420A
    SETSIGMASK = 0x420B
    SECCOMP_GET_FILTER = 0x420C
    SECCOMP_GET_METADATA = 0x420D
    GET_RSEQ_CONFIGURATION = 0x420F


class NT(enum.IntEnum):
    """Regset note types (include/uapi/linux/elf.h)."""

    PRSTATUS = 1
    X86_XSTATE = 0x202


PTRACE_EVENT_FORK = 1
PTRACE_EVENT_CLONE = 3
PTRACE_EVENT_STOP = 128
PTRACE_O_TRACESYSGOOD = 0x1
SYSCALL_STOP = signal.SIGTRAP | 0x80  # a syscall-entry or -exit stop, with PTRACE_O_TRACESYSGOOD
PTRACE_O_TRACEFORK = 0x2
PTRACE_O_TRACECLONE = 0x8
PTRACE_O_EXITKILL = 0x100000
PTRACE_O_SUSPEND_SECCOMP = 0x200000  # needs CAP_SYS_ADMIN and a tracer without seccomp
CAP_SYS_ADMIN = 21
PTRACE_PEEKSIGINFO_SHARED = 1
WALL = 0x40000000
SIGINFO_SIZE = 128


class iovec(ctypes.Structure):
    """struct iovec (include/uapi/linux/uio.h)."""

    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class ptrace_peeksiginfo_args(ctypes.Structure):
    """struct ptrace_peeksiginfo_args (include/uapi/linux/ptrace.h)."""

    _fields_ = [("off", ctypes.c_uint64), ("flags", ctypes.c_uint32), ("nr", ctypes.c_int32)]


class ptrace_rseq_configuration(ctypes.Structure):
    """struct ptrace_rseq_configuration (include/uapi/linux/ptrace.h)."""

    _fields_ = [
        ("rseq_abi_pointer", ctypes.c_uint64),
        ("rseq_abi_size", ctypes.c_uint32),
        ("signature", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    ]


def ptrace(req: Req, pid: int, addr=0, data=0) -> int:
    ctypes.set_errno(0)
    ret = libc.ptrace(req, pid, addr, data)
    if ret == -1 and ctypes.get_errno() != 0:
        raise oserror(f"ptrace({req.name}, {pid})")
    return ret


@functools.cache
def suspend_seccomp() -> int:
    """PTRACE_O_SUSPEND_SECCOMP if this process may set it, else 0. Every
    tracee seized with it runs no seccomp filter (nor strict mode) while it
    is traced: injected syscalls are never refused or killed by its filter."""
    with open("/proc/self/status") as f:
        status = dict(line.split(":", 1) for line in f if ":" in line)
    cap_sys_admin = int(status["CapEff"], 16) >> CAP_SYS_ADMIN & 1
    return PTRACE_O_SUSPEND_SECCOMP if cap_sys_admin and status["Seccomp"].strip() == "0" else 0


def seize(pid: int, options: int = 0) -> None:
    ptrace(Req.SEIZE, pid, 0, options)


def set_options(pid: int, options: int) -> None:
    ptrace(Req.SETOPTIONS, pid, 0, options)


def get_event_msg(pid: int) -> int:
    msg = ctypes.c_ulong()
    ptrace(Req.GETEVENTMSG, pid, 0, ctypes.addressof(msg))
    return msg.value


def interrupt(pid: int) -> None:
    ptrace(Req.INTERRUPT, pid)


def detach(pid: int, sig: int = 0) -> None:
    ptrace(Req.DETACH, pid, 0, sig)


def cont(pid: int, sig: int = 0) -> None:
    ptrace(Req.CONT, pid, 0, sig)


def wait_stop(pid: int) -> int:
    """waitpid for a traced task; raises if it exited instead of stopping."""
    while True:
        try:
            _, status = os.waitpid(pid, WALL)
        except InterruptedError:
            continue
        except ChildProcessError as err:
            raise OSError(err.errno, f"waitpid({pid}): {err.strerror}") from err
        if os.WIFSTOPPED(status):
            return status
        if os.WIFEXITED(status) or os.WIFSIGNALED(status):
            raise ProcessLookupError(3, f"waitpid({pid}): process exited (status {status:#x})")


def is_event_stop(status: int) -> bool:
    """A PTRACE_EVENT_STOP: an interrupt trap (SIGTRAP), or a group-stop
    (the stopping signal) of a task that was stopped when seized."""
    return (status >> 16) == PTRACE_EVENT_STOP


def is_syscall_stop(status: int) -> bool:
    return os.WSTOPSIG(status) == SYSCALL_STOP and not status >> 16


def is_self_stop(status: int) -> bool:
    """The signal-delivery stop of a SIGSTOP the task sent itself."""
    return os.WSTOPSIG(status) == signal.SIGSTOP and not status >> 16


def freeze(pid: int, max_signals: int = 64, options: int = 0) -> int:
    """freeze_timed without the time left."""
    return freeze_timed(pid, max_signals, options)[0]


def freeze_timed(pid: int, max_signals: int = 64, options: int = 0) -> tuple[int, int]:
    """Seize and stop a task; signals already on their way are delivered first.

    A signal-delivery stop that comes before the interrupt trap is passed
    on (the task runs its handler setup, as if the signal had arrived just
    before the freeze) and the interrupt trap follows. Returns the signal
    that had stopped the task (SIGSTOP, SIGTSTP ...) if it was in a
    group-stop (state T), else 0; and the ns the wait the freeze
    interrupted had left, where only the kernel keeps it (timerlist), else
    -1.

    A wait the kernel ends with EINTR when stopped (epoll_wait) is made to
    be called again, with that time left as its timeout
    (arch.reenter_eintr_wait): the program would see EINTR from a freeze it
    knows nothing of. One a real stop signal ended is left as the kernel
    leaves it.
    """
    sleeping = timerlist.probe(pid)
    seize(pid, PTRACE_O_TRACESYSGOOD | options | suspend_seccomp())
    interrupt(pid)
    for _ in range(max_signals):
        status = wait_stop(pid)
        if is_event_stop(status):
            sig = os.WSTOPSIG(status)
            if sig != signal.SIGTRAP:
                # A group-stop, re-reported to us at the seize; the interrupt
                # is still pending, and only from its trap can the task be
                # made to run a syscall (else PTRACE_SYSCALL re-traps at once).
                # The group stays stopped: its parent is told nothing.
                cont(pid)
                status = wait_stop(pid)
                if not is_event_stop(status):
                    raise OSError(0, f"pid {pid}: stop {status:#x} after its group-stop, expected the interrupt")
                return sig, timerlist.UNKNOWN
            left = timerlist.left_ns(sleeping)
            regs = get_regs(pid)
            if arch.reenter_eintr_wait(regs, left):
                set_regs(pid, regs)
            return 0, left
        cont(pid, os.WSTOPSIG(status))
    raise OSError(0, f"pid {pid}: did not stop after {max_signals} signals")


def get_regs(pid: int) -> arch.user_regs_struct:
    regs = arch.user_regs_struct()
    iov = iovec(ctypes.addressof(regs), ctypes.sizeof(regs))
    ptrace(Req.GETREGSET, pid, NT.PRSTATUS, ctypes.addressof(iov))
    return regs


def set_regs(pid: int, regs: arch.user_regs_struct) -> None:
    iov = iovec(ctypes.addressof(regs), ctypes.sizeof(regs))
    ptrace(Req.SETREGSET, pid, NT.PRSTATUS, ctypes.addressof(iov))


def get_xstate(pid: int) -> bytes:
    buf = ctypes.create_string_buffer(arch.XSTATE_MAX)
    iov = iovec(ctypes.addressof(buf), arch.XSTATE_MAX)
    ptrace(Req.GETREGSET, pid, NT.X86_XSTATE, ctypes.addressof(iov))
    return buf.raw[: iov.iov_len]


def set_xstate(pid: int, data: bytes) -> None:
    buf = ctypes.create_string_buffer(data, len(data))
    iov = iovec(ctypes.addressof(buf), len(data))
    ptrace(Req.SETREGSET, pid, NT.X86_XSTATE, ctypes.addressof(iov))


def get_sigmask(pid: int) -> int:
    mask = ctypes.c_uint64()
    ptrace(Req.GETSIGMASK, pid, 8, ctypes.addressof(mask))
    return mask.value


def set_sigmask(pid: int, mask: int) -> None:
    value = ctypes.c_uint64(mask)
    ptrace(Req.SETSIGMASK, pid, 8, ctypes.addressof(value))


def get_rseq_config(pid: int) -> ptrace_rseq_configuration:
    conf = ptrace_rseq_configuration()
    ptrace(Req.GET_RSEQ_CONFIGURATION, pid, ctypes.sizeof(conf), ctypes.addressof(conf))
    return conf


def peek_siginfo(pid: int, shared: bool) -> list[bytes]:
    """Every queued siginfo (128 bytes each) of one queue, without dequeuing."""
    out: list[bytes] = []
    batch = 32
    buf = ctypes.create_string_buffer(SIGINFO_SIZE * batch)
    while True:
        args = ptrace_peeksiginfo_args(len(out), PTRACE_PEEKSIGINFO_SHARED if shared else 0, batch)
        n = ptrace(Req.PEEKSIGINFO, pid, ctypes.addressof(args), ctypes.addressof(buf))
        out.extend(buf.raw[i * SIGINFO_SIZE : (i + 1) * SIGINFO_SIZE] for i in range(n))
        if n < batch:
            return out


ALL_SIGNALS_BLOCKED = (1 << 64) - 1


class Injector:
    """Runs syscalls inside a stopped task (seized by `freeze`).

    `gadget` is the address of a `syscall` instruction in the task. While a
    call runs, every signal is blocked, so none is dequeued under us (and
    the injection itself sends none: see the module docstring). With
    `put_back`, the task's own registers and signal mask are set again
    after every call, from an interrupt trap (see the module docstring): if
    procsnap dies between two calls, even by SIGKILL, the kernel releases a
    task that is exactly as it was. Without it (a task being rebuilt) the
    task stays in its syscall-exit stop between calls.
    """

    def __init__(self, pid: int, gadget: int, regs: arch.user_regs_struct, mask: int, put_back: bool = True):
        self.pid = pid
        self.gadget = gadget
        self.base = arch.user_regs_struct.from_buffer_copy(regs)
        self.mask = mask
        self.put_back = put_back
        self.blocked = False
        self.clones: list[int] = []  # pids of tasks created by injected clones and forks

    def _resume_until(self, req: Req, want, while_running=None) -> int:
        ptrace(req, self.pid)
        if while_running is not None:
            try:
                while_running()
            except BaseException:
                self._wait_for(req, want)  # stopped again, so that the error's clean-up can inject
                raise
        return self._wait_for(req, want)

    def _wait_for(self, req: Req, want) -> int:
        while True:
            status = wait_stop(self.pid)
            if (status >> 16) in (PTRACE_EVENT_CLONE, PTRACE_EVENT_FORK):  # PTRACE_O_TRACECLONE/TRACEFORK
                self.clones.append(get_event_msg(self.pid))
                ptrace(req, self.pid)
                continue
            if want(status):
                return status
            raise OSError(0, f"pid {self.pid}: unexpected stop {status:#x} during an injected syscall")

    def _enter(self, nr: int, args) -> None:
        """Into the syscall-entry stop of call `nr`."""
        regs = arch.prepare_injection(self.base, self.gadget, nr, args)
        if not self.blocked:
            set_sigmask(self.pid, ALL_SIGNALS_BLOCKED)
            self.blocked = True
        set_regs(self.pid, regs)
        self._resume_until(Req.SYSCALL, is_syscall_stop)

    def __call__(self, nr: int, *args: int, check: bool = True) -> int:
        self._enter(nr, args)
        self._resume_until(Req.SYSCALL, is_syscall_stop)  # exit
        ret = arch.syscall_result(get_regs(self.pid))
        if self.put_back:
            self.restore()
        if check and -4096 < ret < 0:
            name = arch.NR(nr).name if nr in arch.NR.__members__.values() else str(nr)
            raise OSError(-ret, f"injected {name}{tuple(args)}: {os.strerror(-ret)}")
        return ret

    def run_code(self, regs: arch.user_regs_struct, while_running=None) -> arch.user_regs_struct:
        """Let the task run its own code from `regs` (PTRACE_CONT) until it
        stops itself with SIGSTOP (arch.BATCH_STUB's end); its registers
        then. The task stays in that signal-delivery stop: the next resume
        (a call, restore, detach), with no signal, discards the SIGSTOP.
        while_running(): called once the task runs (tests kill procsnap there)."""
        if not self.blocked:
            set_sigmask(self.pid, ALL_SIGNALS_BLOCKED)
            self.blocked = True
        set_regs(self.pid, regs)
        self._resume_until(Req.CONT, is_self_stop, while_running)
        return get_regs(self.pid)

    def call_interrupted(self, nr: int, *args: int) -> int:
        """Syscall `nr` made as if a signal had come the moment it began: an
        interrupt is made pending at its entry stop, so a call that would
        block returns at once what it returns to a signal, its restart code
        (and the kernel has set the task's restart block, as for a real
        signal), and a call with nothing to wait for returns its result.
        The syscall-exit stop takes the place of the interrupt trap (any
        ptrace stop clears a pending one); the task stays in it with its own
        registers (self.base) again, so that no restart rule applies to the
        call's when it leaves."""
        self._enter(nr, args)
        interrupt(self.pid)
        self._resume_until(Req.SYSCALL, is_syscall_stop)  # exit, at once
        ret = arch.syscall_result(get_regs(self.pid))
        set_regs(self.pid, self.base)
        return ret

    def restore(self) -> None:
        """The task's own registers and signal mask, as before any call,
        set in an interrupt trap (nothing to do if no call ran since)."""
        if not self.blocked:
            return
        interrupt(self.pid)
        self._resume_until(Req.CONT, is_event_stop)
        set_regs(self.pid, self.base)
        set_sigmask(self.pid, self.mask)
        self.blocked = False
