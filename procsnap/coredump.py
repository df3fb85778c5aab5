"""An ELF core file of one process of an image (`procsnap core DIR -o FILE`),
for `gdb EXE FILE`: every thread's registers and FPU/SIMD state, the
memory the image stores, and the file mappings by name, laid out as the
kernel's fs/binfmt_elf.c lays out a core (see elfcore.py).

What each kind of VMA becomes (the kernel's default coredump_filter does
the same, except that it also dumps the clean pages of a file mapping a
process has written to, which the image does not hold):

    anon, shared-anon        one PT_LOAD of the whole VMA; its stored pages,
                             the rest zero (holes in the file); none stored:
                             p_filesz 0 (reads as zero)
    shared-mem, sysv-shm     likewise, from the object's stored extents
    file-private             a PT_LOAD per stored run (the written pages)
                             and per gap between them, with p_filesz 0: gdb
                             reads those from the file NT_FILE names
    file-shared              p_filesz 0: the file holds its contents
    vdso                     not stored in the image: this kernel's own, when
                             it has the size of the one dumped (restore moves
                             this kernel's vdso in its place too); else p_filesz 0
    vvar, vvar-vclock        p_filesz 0, as the kernel does (VM_PFNMAP)
    MADV_DONTDUMP            p_filesz 0, as the kernel does
"""

from __future__ import annotations

import ctypes
from . import records as dataclasses  # the dataclasses API, cheap to import
import os

from . import elfcore as E
from . import model
from .errors import ProcsnapError, Unsupported
from .image.pagedata import StoredRun, TreePages
from .image.reader import Image
from .kernel import proc
from .kernel.arch.x86_64 import PAGE_SIZE, signed, user_regs_struct
from .views import Tree, host_state, load


WRITE_STEP = 16 << 20  # bytes written, then dropped from our RSS, at a time


@dataclasses.dataclass
class CoreStats:
    path: str
    pid: int
    threads: int
    segments: int
    memory_bytes: int  # bytes of memory written into the core (holes not counted)
    # mapped files that differ on this host from the ones dumped: gdb reads their clean pages from them
    changed_files: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Segment:
    vaddr: int
    memsz: int
    flags: E.PF
    dumped: bool  # p_filesz = memsz, else 0
    # (vaddr, data, the StoredRun it is, or None for shared memory and the vdso)
    pieces: list[tuple[int, bytes | memoryview, StoredRun | None]] = dataclasses.field(default_factory=list)


def _flags(v: model.Vma) -> E.PF:
    f = E.PF(0)
    for bit, pf in ((model.Prot.PROT_READ, E.PF.R), (model.Prot.PROT_WRITE, E.PF.W), (model.Prot.PROT_EXEC, E.PF.X)):
        if v.prot & bit:
            f |= pf
    return f


def _shared_pieces(root: Image, v: model.Vma) -> list[tuple[int, bytes]]:
    """The stored extents of the shared memory object behind v, at their addresses."""
    obj = next((s for s in root.checkpoint.shms if s.id == v.shm), None)
    out = []
    for offset, length, blob, xxh3 in obj.extents if obj else ():
        lo, hi = max(offset, v.offset), min(offset + length, v.offset + v.size)
        if lo < hi:
            data = root.read_blob(blob, length, xxh3)
            out.append((v.start + lo - v.offset, data[lo - offset : hi - offset], None))
    return out


def local_vdso() -> bytes:
    """This process's vdso: the running kernel's."""
    m = next((m for m in proc.read_maps(os.getpid()) if m.path == "[vdso]"), None)
    return ctypes.string_at(m.start, m.end - m.start) if m else b""


def plan_segments(v: model.Vma, runs: list[StoredRun], pages: TreePages, root: Image,
                  vdso: bytes = b"") -> list[Segment]:
    """The PT_LOAD segments of one VMA (see the table above)."""
    flags = _flags(v)
    inside = [r for r in runs if v.start <= r.vaddr < v.end]
    if v.kind == model.VmaKind.VDSO and len(vdso) == v.size:
        return [Segment(v.start, v.size, flags, True, [(v.start, vdso, None)])]
    if v.advice & model.Advice.DONTDUMP or v.kind in model.SPECIAL_KINDS or v.kind == model.VmaKind.FILE_SHARED:
        return [Segment(v.start, v.size, flags, False)]
    if v.kind in (model.VmaKind.SHARED_MEM, model.VmaKind.SYSV_SHM):
        pieces = _shared_pieces(root, v)
        return [Segment(v.start, v.size, flags, bool(pieces), pieces)]
    if v.kind == model.VmaKind.FILE_PRIVATE:
        out, at = [], v.start
        for r in inside:
            if r.vaddr > at:
                out.append(Segment(at, r.vaddr - at, flags, False))
            out.append(Segment(r.vaddr, r.end - r.vaddr, flags, True, [(r.vaddr, pages.data(r), r)]))
            at = r.end
        if at < v.end:
            out.append(Segment(at, v.end - at, flags, False))
        return out
    return [Segment(v.start, v.size, flags, bool(inside), [(r.vaddr, pages.data(r), r) for r in inside])]


def read_memory(addr: int, size: int, runs: list[StoredRun], pages: TreePages) -> bytes:
    """Stored bytes at [addr, addr + size), zero where nothing is stored."""
    out = bytearray(size)
    for r in runs:
        lo, hi = max(addr, r.vaddr), min(addr + size, r.end)
        if lo < hi:
            out[lo - addr : hi - addr] = pages.data(r)[lo - r.vaddr : hi - r.vaddr]
    return bytes(out)


def _sigbits(signos) -> int:
    return sum({1 << (s - 1) for s in signos if 1 <= s <= 64})


def _prstatus(t: model.ThreadState, tid: int, proc: model.Proc, pending: int) -> bytes:
    st = E.elf_prstatus()
    st.pr_sigpend, st.pr_sighold = pending, t.sigmask
    st.pr_pid, st.pr_ppid, st.pr_pgrp, st.pr_sid = tid, proc.ppid, proc.pgid, proc.sid
    regs = user_regs_struct()
    for name, _ in user_regs_struct._fields_:
        setattr(regs, name, t.regs.get(name, 0))
    st.pr_reg = regs
    st.pr_fpvalid = 1
    return bytes(st)


def _prpsinfo(ckpt: model.Checkpoint, proc: model.Proc, args: bytes) -> bytes:
    t = ckpt.task
    ps = E.elf_prpsinfo()
    ps.pr_state, ps.pr_sname = (1, b"S") if signed(t.regs.get("orig_rax", -1)) >= 0 else (0, b"R")
    ps.pr_uid = t.uids[0] if t.uids else 0
    ps.pr_gid = t.gids[0] if t.gids else 0
    ps.pr_pid, ps.pr_ppid, ps.pr_pgrp, ps.pr_sid = t.pid, proc.ppid, proc.pgid, proc.sid
    ps.pr_fname = t.comm.encode()[:15]
    ps.pr_psargs = args.rstrip(b"\0").replace(b"\0", b" ")[: E.ELF_PRARGSZ - 1]
    return bytes(ps)


def _nt_file(ckpt: model.Checkpoint) -> bytes:
    paths = {f.id: f.path for f in ckpt.files}
    mapped = [v for v in sorted(ckpt.vmas, key=lambda v: v.start)
              if v.kind in (model.VmaKind.FILE_PRIVATE, model.VmaKind.FILE_SHARED) and v.file_id in paths]
    head = E.NT_FILE_HEAD.pack(len(mapped), PAGE_SIZE)
    entries = b"".join(E.NT_FILE_ENTRY.pack(v.start, v.end, v.offset // PAGE_SIZE) for v in mapped)
    return head + entries + b"".join(paths[v.file_id].encode() + b"\0" for v in mapped)


def notes(ckpt: model.Checkpoint, proc: model.Proc, args: bytes) -> bytes:
    """Every thread's notes, the leader first with the process-wide ones after its NT_PRSTATUS."""
    shared = _sigbits(p.signo for p in ckpt.pending if p.shared)
    leader_own = _sigbits(p.signo for p in ckpt.pending if not p.shared)
    threads = [(ckpt.task, ckpt.task.pid, leader_own)]
    threads += [(t, t.tid, _sigbits(int.from_bytes(info[:4], "little") for info in t.pending)) for t in ckpt.threads]
    out = []
    for i, (t, tid, own) in enumerate(threads):
        out.append(E.note(E.NT.PRSTATUS, _prstatus(t, tid, proc, shared | own)))
        if i == 0:
            out.append(E.note(E.NT.PRPSINFO, _prpsinfo(ckpt, proc, args)))
            out.append(E.note(E.NT.AUXV, ckpt.mm.auxv))
            out.append(E.note(E.NT.FILE, _nt_file(ckpt)))
        if len(t.xstate) >= E.FXSAVE_SIZE:
            out.append(E.note(E.NT.PRFPREG, t.xstate[: E.FXSAVE_SIZE]))
            out.append(E.note(E.NT.X86_XSTATE, E.gdb_xstate(t.xstate)))
    return b"".join(out)


def _pick(tree: Tree, pid: int | None) -> tuple[model.Proc, Image]:
    if pid is None:
        return tree[0]
    for p, img in tree:
        if p.pid == pid:
            if img is None:
                raise Unsupported(f"pid {pid} is a zombie in the image: it has no memory or registers", pid)
            return p, img
    raise ProcsnapError(f"pid {pid} is not in the image (it holds {', '.join(str(p.pid) for p, _ in tree)})", pid)


def write_core(directory: str, path: str, pid: int | None = None, key: bytes | None = None) -> CoreStats:
    """Write the core file of process `pid` (the root if None) of the image at `directory`."""
    root, tree = load(directory, key)
    proc, image = _pick(tree, pid)
    ckpt = image.checkpoint
    tmp = f"{path}.part"
    with TreePages(tree) as pages:
        runs = pages.runs(image)
        vdso = local_vdso()
        segments = [s for v in sorted(ckpt.vmas, key=lambda v: v.start) for s in plan_segments(v, runs, pages, root, vdso)]
        if len(segments) + 1 >= E.PN_XNUM:
            raise Unsupported(f"pid {ckpt.task.pid}: {len(segments)} segments; a core of more than "
                              f"{E.PN_XNUM - 2} needs extended numbering, which is not written", ckpt.task.pid)
        mm = ckpt.mm
        body = notes(ckpt, proc, read_memory(mm.arg_start, min(mm.arg_end - mm.arg_start, 4096), runs, pages))
        headers = ctypes.sizeof(E.Elf64_Ehdr) + (1 + len(segments)) * ctypes.sizeof(E.Elf64_Phdr)
        offset = data_start = -(-(headers + len(body)) // PAGE_SIZE) * PAGE_SIZE
        phdrs = [E.Elf64_Phdr(E.PT.NOTE, 0, headers, 0, 0, len(body), 0, E.NOTE_ALIGN)]
        placed = []
        for s in segments:
            filesz = s.memsz if s.dumped else 0
            phdrs.append(E.Elf64_Phdr(E.PT.LOAD, s.flags, offset, s.vaddr, 0, filesz, s.memsz, PAGE_SIZE))
            placed.append((s, offset))
            offset += filesz
        ehdr = E.Elf64_Ehdr()
        ehdr.e_ident[:8] = list(E.EI_MAGIC + bytes([E.ELFCLASS64, E.ELFDATA2LSB, E.EV_CURRENT, E.ELFOSABI_NONE]))
        ehdr.e_type, ehdr.e_machine, ehdr.e_version = E.ET_CORE, E.EM_X86_64, E.EV_CURRENT
        ehdr.e_phoff, ehdr.e_ehsize = ctypes.sizeof(E.Elf64_Ehdr), ctypes.sizeof(E.Elf64_Ehdr)
        ehdr.e_phentsize, ehdr.e_phnum = ctypes.sizeof(E.Elf64_Phdr), len(phdrs)
        written = 0
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)  # memory: private
        try:
            os.pwrite(fd, bytes(ehdr) + b"".join(map(bytes, phdrs)) + body, 0)
            for s, at in placed:
                for vaddr, data, run in s.pieces:
                    for off in range(0, len(data), WRITE_STEP):
                        os.pwrite(fd, data[off : off + WRITE_STEP], at + vaddr - s.vaddr + off)
                        if run is not None:
                            pages.drop(run, off, WRITE_STEP)  # written: out of our RSS
                    written += len(data)
            os.ftruncate(fd, max(offset, data_start))  # zero pages at the end stay holes
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
    os.replace(tmp, path)
    mapped = {v.file_id for v in ckpt.vmas if v.file_id != -1}
    changed = [f"{f.path}: {state}" for f in ckpt.files if f.id in mapped and (state := host_state(f)) != "ok"]
    return CoreStats(path, ckpt.task.pid, 1 + len(ckpt.threads), len(segments), written, changed)

