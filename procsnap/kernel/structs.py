"""Kernel structs passed through memory to injected syscalls."""

from __future__ import annotations

import ctypes
import enum
import struct

# struct sigaction as the kernel takes it (include/linux/signal_types.h,
# x86_64 with SA_RESTORER): handler, flags, restorer, mask.
KSIGACTION = struct.Struct("<QQQQ")
# stack_t (include/uapi/asm-generic/signal.h): ss_sp, ss_flags, pad, ss_size.
STACK_T = struct.Struct("<QiiQ")
SS_ONSTACK = 1
SS_DISABLE = 2
SIGSET_SIZE = 8
NSIG = 64  # signals 1..64
ROBUST_LIST_HEAD_SIZE = 24  # struct robust_list_head (include/uapi/linux/futex.h)
TIMESPEC = struct.Struct("<qq")  # struct __kernel_timespec (include/uapi/linux/time_types.h)
# A wait's time left that the dump could not read (dumper/waits.py, restorer/waits.py): here, not in
# dumper/, so that the restorer does not import the dumper's package (a dozen modules) for it
WAIT_LEFT_UNKNOWN = -1


class prctl_mm_map(ctypes.Structure):
    """struct prctl_mm_map (include/uapi/linux/prctl.h), 104 bytes."""

    _fields_ = [(name, ctypes.c_uint64) for name in (
        "start_code", "end_code", "start_data", "end_data", "start_brk", "brk", "start_stack",
        "arg_start", "arg_end", "env_start", "env_end", "auxv")] + [
        ("auxv_size", ctypes.c_uint32), ("exe_fd", ctypes.c_uint32)]


class clone_args(ctypes.Structure):
    """struct clone_args (include/uapi/linux/sched.h), 88 bytes."""

    _fields_ = [(name, ctypes.c_uint64) for name in (
        "flags", "pidfd", "child_tid", "parent_tid", "exit_signal", "stack", "stack_size", "tls",
        "set_tid", "set_tid_size", "cgroup")]


class Prctl(enum.IntEnum):
    """prctl options (include/uapi/linux/prctl.h)."""

    PR_GET_PDEATHSIG = 2
    PR_SET_NAME = 15
    PR_SET_MM = 35
    PR_SET_CHILD_SUBREAPER = 36
    PR_GET_TID_ADDRESS = 40
    PR_SET_MM_MAP = 14  # sub-option of PR_SET_MM
    PR_SET_MM_MAP_SIZE = 15


RSEQ_FLAG_UNREGISTER = 1
MREMAP_MAYMOVE = 1
MREMAP_FIXED = 2
