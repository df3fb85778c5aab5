"""Every x86_64 specific: syscall numbers, register layouts, restart rules.

A second architecture is a second module with the same names.
"""

from __future__ import annotations

import ctypes
import enum
import struct

PAGE_SIZE = 4096
# TASK_SIZE_MAX for 4-level paging: the highest user address + 1.
TASK_SIZE = (1 << 47) - PAGE_SIZE
# The instruction `syscall`: injected calls jump to a copy of these bytes
# that already exists in the target (its vdso), so no text is written.
SYSCALL_INSN = b"\x0f\x05"
SYSCALL_INSN_LEN = len(SYSCALL_INSN)


class NR(enum.IntEnum):
    """Syscall numbers (arch/x86/entry/syscalls/syscall_64.tbl)."""

    read = 0
    write = 1
    close = 3
    poll = 7
    lseek = 8
    mmap = 9
    mprotect = 10
    munmap = 11
    brk = 12
    rt_sigaction = 13
    rt_sigprocmask = 14
    mremap = 25
    madvise = 28
    shmat = 30
    pause = 34
    nanosleep = 35
    getitimer = 36
    setitimer = 38
    getpid = 39
    fcntl = 72
    chdir = 80
    umask = 95
    setpgid = 109
    setsid = 112
    flock = 73
    setgroups = 116
    setresuid = 117
    setresgid = 119
    setfsuid = 122
    setfsgid = 123
    capset = 126
    clone = 56
    wait4 = 61
    kill = 62
    rt_sigtimedwait = 128
    rt_sigqueueinfo = 129
    ioprio_set = 251
    ioprio_get = 252
    sigaltstack = 131
    personality = 135
    mlockall = 151
    prctl = 157
    arch_prctl = 158
    gettid = 186
    futex = 202
    timer_create = 222
    timer_settime = 223
    timer_gettime = 224
    timer_getoverrun = 225
    timer_delete = 226
    set_tid_address = 218
    tgkill = 234
    exit_group = 231
    restart_syscall = 219
    set_mempolicy = 238
    get_mempolicy = 239
    clock_nanosleep = 230
    epoll_wait = 232
    openat = 257
    set_robust_list = 273
    get_robust_list = 274
    timerfd_gettime = 287
    dup3 = 292
    epoll_pwait = 281
    rt_tgsigqueueinfo = 297
    prlimit64 = 302
    process_vm_readv = 310
    process_vm_writev = 311
    kcmp = 312
    sched_setattr = 314
    sched_getattr = 315
    seccomp = 317
    userfaultfd = 323
    membarrier = 324
    mlock2 = 325
    rseq = 334
    pidfd_open = 434
    clone3 = 435
    close_range = 436
    pidfd_getfd = 438


class user_regs_struct(ctypes.Structure):
    """struct user_regs_struct (arch/x86/include/asm/user_64.h), NT_PRSTATUS."""

    _fields_ = [
        (name, ctypes.c_ulonglong)
        for name in (
            "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8",
            "rax", "rcx", "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags",
            "rsp", "ss", "fs_base", "gs_base", "ds", "es", "fs", "gs",
        )
    ]


REGS_SIZE = ctypes.sizeof(user_regs_struct)  # 216
# XSAVE area read with NT_X86_XSTATE: the kernel shortens the iovec to
# its full user xstate size (2432 bytes here; more with AMX), and
# SETREGSET accepts exactly that size.
XSTATE_MAX = 1 << 14
SYSCALL_ARG_REGS = ("rdi", "rsi", "rdx", "r10", "r8", "r9")
EFLAGS_TF = 0x100
EFLAGS_DF = 0x400


class Restart(enum.IntEnum):
    """-rax values of a syscall interrupted by a stop (include/linux/errno.h).

    A task frozen inside a syscall has orig_rax = the syscall number and rax
    = one of these. The kernel would, when the task resumes without running
    a handler, rewind rip by the length of `syscall` and re-execute it
    (ERESTART_RESTARTBLOCK through restart_syscall, whose state lives in the
    kernel and does not survive a restore: it is re-executed from scratch).
    """

    ERESTARTSYS = 512
    ERESTARTNOINTR = 513
    ERESTARTNOHAND = 514
    ERESTART_RESTARTBLOCK = 516


def signed(value: int) -> int:
    """A register as the kernel's signed long."""
    return value - (1 << 64) if value >= 1 << 63 else value


def unsigned(value: int) -> int:
    return value & ((1 << 64) - 1)


def interrupted_syscall(regs: user_regs_struct) -> int | None:
    """The syscall a stopped task was interrupted in, if it must restart."""
    if signed(regs.orig_rax) < 0:
        return None
    if -signed(regs.rax) in Restart.__members__.values():
        return regs.orig_rax
    return None


# How a libc syscall wrapper loads the number just before `syscall`
# (glibc's: mov $nr,%eax or mov $nr,%rax), the instruction ending where
# `syscall` starts:
#     b8 NN NN NN NN        mov    $nr,%eax
#     48 c7 c0 NN NN NN NN  mov    $nr,%rax
MOV_NR_TO_EAX = b"\xb8"
MOV_NR_TO_RAX = b"\x48\xc7\xc0"


def syscall_number_before(code: bytes) -> int | None:
    """The syscall number a wrapper loaded into rax, from the code that
    ends right before its `syscall` instruction; None if it is not one of
    the two loads above. Needed for a task frozen in restart_syscall: its
    registers still hold the arguments of the interrupted call, but rax was
    replaced by restart_syscall, whose saved state (the restart block) is
    the kernel's and does not survive a restore."""
    if len(code) >= 7 and code[-7:-4] == MOV_NR_TO_RAX:
        return int.from_bytes(code[-4:], "little")
    if len(code) >= 5 and code[-5:-4] == MOV_NR_TO_EAX:
        return int.from_bytes(code[-4:], "little")
    return None


# Waits the kernel ends with EINTR (no restart code) when any stop, a
# ptrace freeze included, interrupts them (signal(7), "interrupted by a stop
# signal"): a freeze makes them be called again, as if it had come just
# before the call (ptrace.freeze).
EINTR_ON_STOP = frozenset((NR.epoll_wait, NR.epoll_pwait, 441))  # 441: epoll_pwait2
EINTR = 4


def reenter_eintr_wait(regs: user_regs_struct, left_ns: int = -1) -> bool:
    """Registers of a task whose EINTR_ON_STOP wait a stop has just ended
    made to call it again, with `left_ns` (if >= 0) as a timeout in ms that
    was positive (r10: epoll_wait's and epoll_pwait's, seen by no code but
    their wrapper); False (unchanged) for any other state."""
    if regs.orig_rax not in EINTR_ON_STOP or signed(regs.rax) != -EINTR:
        return False
    timeout = regs.r10 & 0xFFFFFFFF
    if left_ns >= 0 and regs.orig_rax != 441 and 0 < timeout < 1 << 31:
        regs.r10 = max(1, -(-left_ns // 1_000_000))
    regs.rax = regs.orig_rax
    regs.rip -= SYSCALL_INSN_LEN
    regs.orig_rax = unsigned(-1)
    return True


def rewind_to_syscall(regs: user_regs_struct, *, reexecute_restartblock: bool) -> None:
    """Apply the kernel's syscall-restart rule to saved registers.

    Used where the kernel itself will not do it: when a task is resumed from
    registers we set (restore), or from a stop that is not in signal
    delivery. orig_rax becomes -1 so the kernel does not apply it twice.
    """
    nr = interrupted_syscall(regs)
    if nr is not None:
        if -signed(regs.rax) == Restart.ERESTART_RESTARTBLOCK and not reexecute_restartblock:
            regs.rax = NR.restart_syscall
        else:
            regs.rax = nr
        regs.rip -= SYSCALL_INSN_LEN
    regs.orig_rax = unsigned(-1)


def prepare_injection(regs: user_regs_struct, gadget: int, nr: int, args) -> user_regs_struct:
    """Registers that make the task execute syscall `nr` at `gadget`."""
    new = user_regs_struct.from_buffer_copy(regs)
    new.rip = gadget
    new.rax = nr
    new.orig_rax = unsigned(-1)  # no restart processing on the way out
    new.eflags &= ~(EFLAGS_TF | EFLAGS_DF)
    # Unused argument registers are zeroed too: calls like prctl(PR_SET_MM)
    # refuse (EINVAL) a stray value in an argument they do not take.
    padded = list(args) + [0] * (len(SYSCALL_ARG_REGS) - len(args))
    for name, value in zip(SYSCALL_ARG_REGS, padded):
        setattr(new, name, unsigned(value))
    return new


def syscall_result(regs: user_regs_struct) -> int:
    return signed(regs.rax)


# A batch of syscalls run by the task itself, one ptrace round trip for all
# of them (infect.Target.batch). The tracer writes a table of records into
# the task's batch area, points rip at BATCH_STUB (in the same area) and
# lets it run with PTRACE_CONT:
#
#     record (64 bytes):  nr | arg0 .. arg5 | result      (8 x u64)
#     rbx  the next record       r12  the end of the table
#     r13  tgid  r14  tid  r15  SIGSTOP: the tgkill that ends the batch
#
# The stub runs each record, stores rax into its result, and stops at the
# end of the table or at the first result in [-4095, -1] (rbx then points
# at that record). It ends with tgkill(tgid, tid, SIGSTOP): traced, the
# task stops in that signal's delivery and the tracer takes over (and
# discards it); if the tracer has died meanwhile, the task (seized with
# PTRACE_O_EXITKILL, as every task a batch runs in is) has its SIGKILL,
# and SIGSTOP stops it at worst: it never runs on into anything. Not int3:
# its SIGTRAP is forced (force_sig), resetting a blocked SIGTRAP's handler,
# and untraced it kills with a core dump.
BATCH_STUB = bytes.fromhex(
    "4c39e3"        # 00 loop: cmp    %r12,%rbx
    "732f"          # 03       jae    done                 table done
    "488b03"        # 05       mov    (%rbx),%rax          nr
    "488b7b08"      # 08       mov    0x8(%rbx),%rdi
    "488b7310"      # 0c       mov    0x10(%rbx),%rsi
    "488b5318"      # 10       mov    0x18(%rbx),%rdx
    "4c8b5320"      # 14       mov    0x20(%rbx),%r10
    "4c8b4328"      # 18       mov    0x28(%rbx),%r8
    "4c8b4b30"      # 1c       mov    0x30(%rbx),%r9
    "0f05"          # 20       syscall
    "48894338"      # 22       mov    %rax,0x38(%rbx)      result
    "483d01f0ffff"  # 26       cmp    $-4095,%rax
    "7306"          # 2c       jae    done                 failed: rbx at its record
    "4883c340"      # 2e       add    $0x40,%rbx
    "ebcc"          # 32       jmp    loop
    "b8ea000000"    # 34 done: mov    $234,%eax            tgkill
    "4c89ef"        # 39       mov    %r13,%rdi
    "4c89f6"        # 3c       mov    %r14,%rsi
    "4c89fa"        # 3f       mov    %r15,%rdx
    "0f05"          # 42       syscall
    "ebee"          # 44       jmp    done                 (never again, traced)
)
BATCH_RECORD = struct.Struct("<8Q")
SIGSTOP = 19


def prepare_batch(regs: user_regs_struct, stub: int, table: int, count: int, tgid: int, tid: int) -> user_regs_struct:
    """Registers that make the task run `count` records at `table` with the stub at `stub`."""
    new = user_regs_struct.from_buffer_copy(regs)
    new.rip = stub
    new.rbx, new.r12 = table, table + count * BATCH_RECORD.size
    new.r13, new.r14, new.r15 = tgid, tid, SIGSTOP
    new.orig_rax = unsigned(-1)
    new.eflags &= ~(EFLAGS_TF | EFLAGS_DF)
    return new


def batch_done(regs: user_regs_struct, table: int) -> int:
    """How many records of the table a stopped batch ran before its stop
    (the failed one not counted)."""
    return (regs.rbx - table) // BATCH_RECORD.size
