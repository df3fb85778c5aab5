"""The layouts of an ELF core file, declared once (include/uapi/linux/elf.h,
include/uapi/linux/elfcore.h; x86_64: the register set is the arch's
user_regs_struct, the FPU note the first 512 bytes of the XSAVE area, the
legacy FXSAVE layout of user_i387_struct).

A core, as the kernel's fs/binfmt_elf.c (elf_core_dump) writes it:

    Elf64_Ehdr             e_type ET_CORE, e_phoff 64, e_phnum = 1 + VMAs
    Elf64_Phdr PT_NOTE     the notes, right after the headers
    Elf64_Phdr PT_LOAD     one per VMA: p_vaddr, p_memsz = its size,
    ...                    p_filesz = the bytes dumped (0: not dumped)
    notes                  per thread: NT_PRSTATUS, NT_PRFPREG, NT_X86_XSTATE;
                           after the first thread's NT_PRSTATUS: NT_PRPSINFO,
                           NT_AUXV, NT_FILE (the file of every file mapping)
    page-aligned data      each PT_LOAD's p_filesz bytes at its p_offset;
                           zero pages may be holes
"""

from __future__ import annotations

import ctypes
import enum
import struct

from .kernel.arch.x86_64 import user_regs_struct

EI_MAGIC = b"\x7fELF"
ELFCLASS64 = 2
ELFDATA2LSB = 1
EV_CURRENT = 1
ELFOSABI_NONE = 0
ET_CORE = 4
EM_X86_64 = 62
PN_XNUM = 0xFFFF  # e_phnum at or above: extended numbering, not written here
ELF_PRARGSZ = 80
NOTE_ALIGN = 4  # ELF64 core notes are 4-byte aligned on Linux


class PT(enum.IntEnum):
    LOAD = 1
    NOTE = 4


class PF(enum.IntFlag):
    X = 1
    W = 2
    R = 4


class NT(enum.IntEnum):
    """Note types (include/uapi/linux/elf.h)."""

    PRSTATUS = 1
    PRFPREG = 2
    PRPSINFO = 3
    AUXV = 6
    FILE = 0x46494C45
    X86_XSTATE = 0x202


# The note's owner name: "CORE" for the SVR4 notes, "LINUX" for the other regsets.
NOTE_NAME = {NT.PRSTATUS: b"CORE", NT.PRFPREG: b"CORE", NT.PRPSINFO: b"CORE", NT.AUXV: b"CORE",
             NT.FILE: b"CORE", NT.X86_XSTATE: b"LINUX"}
FXSAVE_SIZE = 512  # NT_PRFPREG: struct user_i387_struct, the legacy part of the XSAVE area


class Elf64_Ehdr(ctypes.Structure):
    _fields_ = [("e_ident", ctypes.c_ubyte * 16), ("e_type", ctypes.c_uint16), ("e_machine", ctypes.c_uint16),
                ("e_version", ctypes.c_uint32), ("e_entry", ctypes.c_uint64), ("e_phoff", ctypes.c_uint64),
                ("e_shoff", ctypes.c_uint64), ("e_flags", ctypes.c_uint32), ("e_ehsize", ctypes.c_uint16),
                ("e_phentsize", ctypes.c_uint16), ("e_phnum", ctypes.c_uint16), ("e_shentsize", ctypes.c_uint16),
                ("e_shnum", ctypes.c_uint16), ("e_shstrndx", ctypes.c_uint16)]


class Elf64_Phdr(ctypes.Structure):
    _fields_ = [("p_type", ctypes.c_uint32), ("p_flags", ctypes.c_uint32), ("p_offset", ctypes.c_uint64),
                ("p_vaddr", ctypes.c_uint64), ("p_paddr", ctypes.c_uint64), ("p_filesz", ctypes.c_uint64),
                ("p_memsz", ctypes.c_uint64), ("p_align", ctypes.c_uint64)]


class Elf64_Nhdr(ctypes.Structure):
    _fields_ = [("n_namesz", ctypes.c_uint32), ("n_descsz", ctypes.c_uint32), ("n_type", ctypes.c_uint32)]


class elf_siginfo(ctypes.Structure):
    _fields_ = [("si_signo", ctypes.c_int), ("si_code", ctypes.c_int), ("si_errno", ctypes.c_int)]


class kernel_old_timeval(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long)]


class elf_prstatus(ctypes.Structure):
    """struct elf_prstatus (include/linux/elfcore.h: elf_prstatus_common + pr_reg + pr_fpvalid), 336 bytes."""

    _fields_ = [("pr_info", elf_siginfo), ("pr_cursig", ctypes.c_short), ("pr_sigpend", ctypes.c_ulong),
                ("pr_sighold", ctypes.c_ulong), ("pr_pid", ctypes.c_int), ("pr_ppid", ctypes.c_int),
                ("pr_pgrp", ctypes.c_int), ("pr_sid", ctypes.c_int), ("pr_utime", kernel_old_timeval),
                ("pr_stime", kernel_old_timeval), ("pr_cutime", kernel_old_timeval),
                ("pr_cstime", kernel_old_timeval), ("pr_reg", user_regs_struct), ("pr_fpvalid", ctypes.c_int)]


class elf_prpsinfo(ctypes.Structure):
    """struct elf_prpsinfo (include/linux/elfcore.h; x86_64 uid/gid are 32 bits), 136 bytes."""

    _fields_ = [("pr_state", ctypes.c_char), ("pr_sname", ctypes.c_char), ("pr_zomb", ctypes.c_char),
                ("pr_nice", ctypes.c_char), ("pr_flag", ctypes.c_ulong), ("pr_uid", ctypes.c_uint32),
                ("pr_gid", ctypes.c_uint32), ("pr_pid", ctypes.c_int), ("pr_ppid", ctypes.c_int),
                ("pr_pgrp", ctypes.c_int), ("pr_sid", ctypes.c_int), ("pr_fname", ctypes.c_char * 16),
                ("pr_psargs", ctypes.c_char * ELF_PRARGSZ)]


assert ctypes.sizeof(elf_prstatus) == 336 and ctypes.sizeof(elf_prpsinfo) == 136
assert ctypes.sizeof(Elf64_Ehdr) == 64 and ctypes.sizeof(Elf64_Phdr) == 56

# NT_FILE: count, page size, then per mapping (start, end, offset in pages), then the names.
NT_FILE_HEAD = struct.Struct("<QQ")
NT_FILE_ENTRY = struct.Struct("<QQQ")


def _pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % NOTE_ALIGN)


def note(kind: NT, desc: bytes) -> bytes:
    """One note: header, owner name (NUL-terminated), descriptor; each padded to 4."""
    name = NOTE_NAME[kind] + b"\0"
    return bytes(Elf64_Nhdr(len(name), len(desc), kind)) + _pad(name) + _pad(desc)


# The XSAVE area in NT_X86_XSTATE is the kernel's user ABI layout: standard
# format, each component at the offset the CPU reports (CPUID 0xD). AMD CPUs
# without AVX-512 or MPX put PKRU at 2432 (a 2440-byte area, measured here);
# Intel's offsets, which gdb 13 assumes, put it at 2688 (2696 bytes), and
# gdb 13 refuses a smaller note ("Section .reg-xstate in core file too
# small"). gcore writes the Intel layout from such a CPU, and so does this.
XSTATE_XCR0_OFFSET = 464  # xstate_bv of the sw_reserved bytes: the XCR0 of the dumping process
XFEATURE_PKRU = 1 << 9
XFEATURES_AVX512_MPX = 0b11111000  # bits 3-7
AMD_PKRU_SIZE, AMD_PKRU_OFFSET = 2440, 2432
INTEL_PKRU_OFFSET, INTEL_PKRU_SIZE = 2688, 2696
PKRU_LEN = 8


def gdb_xstate(xstate: bytes) -> bytes:
    """The XSAVE area in the layout gdb reads (see above); other layouts unchanged."""
    if len(xstate) != AMD_PKRU_SIZE:
        return xstate
    (xcr0,) = struct.unpack_from("<Q", xstate, XSTATE_XCR0_OFFSET)
    if not xcr0 & XFEATURE_PKRU or xcr0 & XFEATURES_AVX512_MPX:
        return xstate
    out = bytearray(INTEL_PKRU_SIZE)
    out[:AMD_PKRU_OFFSET] = xstate[:AMD_PKRU_OFFSET]
    out[INTEL_PKRU_OFFSET:] = xstate[AMD_PKRU_OFFSET:]
    return bytes(out)
