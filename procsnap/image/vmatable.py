"""The VMAs of a process in one record (VMAT, format 1.7), packed.

Before 1.7 each VMA was a JSON record of its own: reading 10,000 of them
cost a crc32, a json.loads, a decode per field and a model.Vma each
(notes/issue-12-batch.md). The table holds them as one struct array, the
way the PMAP record holds page runs:

    VmaTable.entries  | ENTRY | ENTRY | ...            one per VMA, in the model's order
    VmaTable.strings  | name bytes | name bytes | ...   UTF-8 (surrogatepass), each name once
    VmaTable.guards   | first count | first count | ... GUARD (u64 pairs): Vma.guards, by VMA

    ENTRY  start end offset | file_id shm access ghost | kind prot lock advice | flags
           | name at, length (in strings) | guards first, count (GUARD pairs)

`kind` is an index into KINDS, which is only ever appended to. The record is
JSON like any other ({"entries": hex, ...}), so the tools that rewrite
records (tests/conftest.rewrite_records) still read it.
"""

from __future__ import annotations

import struct

from .. import model
from .. import records as dataclasses

# kernel-side widths: start/end/offset u64 (offset signed: validate() names a
# negative one), ids and access i32, the flag words as the model holds them.
ENTRY = struct.Struct("<QQqiiiiHHHHIIIII")
GUARD = struct.Struct("<QQ")  # Vma.guards: [first page, count]
# VmaKind by its code in ENTRY.kind: append only, never renumber
KINDS = (model.VmaKind.ANON, model.VmaKind.FILE_PRIVATE, model.VmaKind.FILE_SHARED, model.VmaKind.SHARED_ANON,
         model.VmaKind.SHARED_MEM, model.VmaKind.SYSV_SHM, model.VmaKind.VDSO, model.VmaKind.VVAR,
         model.VmaKind.VVAR_VCLOCK)
_CODES = {kind: code for code, kind in enumerate(KINDS)}


@dataclasses.dataclass
class VmaTable:
    """All model.Vma of a process, packed (layout above)."""

    entries: bytes
    strings: bytes = b""
    guards: bytes = b""


class TableError(ValueError):
    """A table whose parts do not fit together (schema.SchemaError wraps it)."""


def pack(vmas: list[model.Vma]) -> VmaTable:
    entries = bytearray()
    strings = bytearray()
    guards = bytearray()
    names: dict[str, tuple[int, int]] = {"": (0, 0)}
    append = entries.extend
    entry = ENTRY.pack
    for v in vmas:
        name = names.get(v.name)
        if name is None:
            data = v.name.encode("utf-8", "surrogatepass")
            name = names[v.name] = (len(strings), len(data))
            strings += data
        first = len(guards) // GUARD.size
        for page, count in v.guards:
            guards += GUARD.pack(page, count)
        append(entry(v.start, v.end, v.offset, v.file_id, v.shm, v.access, v.ghost, _CODES[v.kind], int(v.prot),
                     int(v.lock), int(v.advice), int(v.flags), name[0], name[1], first, len(v.guards)))
    return VmaTable(bytes(entries), bytes(strings), bytes(guards))


def unpack(table: VmaTable) -> list[model.Vma]:
    """The model.Vma of a table; TableError names the first entry that does
    not fit (a name or guard run outside its part, an unknown kind)."""
    if len(table.entries) % ENTRY.size:
        raise TableError(f"entries: {len(table.entries)} bytes is not a whole number of {ENTRY.size}-byte entries")
    if len(table.guards) % GUARD.size:
        raise TableError(f"guards: {len(table.guards)} bytes is not a whole number of {GUARD.size}-byte pairs")
    nguards = len(table.guards) // GUARD.size
    guard_pairs = list(GUARD.iter_unpack(table.guards))
    strings = table.strings
    # flag words seen once are looked up after: no IntFlag arithmetic per VMA
    prots, flags, locks, advices = (model.FlagMembers(table) for table in (model.Prot, model.MapFlag, model.Lock,
                                                                           model.Advice))
    names = {(0, 0): ""}
    vma = model.Vma
    out = []
    for i, (start, end, offset, file_id, shm, access, ghost, kind, prot, lock, advice, flag, at, length, first,
            count) in enumerate(ENTRY.iter_unpack(table.entries)):
        if kind >= len(KINDS):
            raise TableError(f"entry {i} ({start:#x}-{end:#x}): unknown VMA kind code {kind}")
        name = names.get((at, length))
        if name is None:
            if at + length > len(strings):
                raise TableError(f"entry {i} ({start:#x}-{end:#x}): name at {at}+{length} is outside the "
                                 f"{len(strings)} bytes of strings")
            try:
                name = names[at, length] = strings[at : at + length].decode("utf-8", "surrogatepass")
            except UnicodeDecodeError as err:
                raise TableError(f"entry {i} ({start:#x}-{end:#x}): name is not UTF-8: {err}") from err
        if count:
            if first + count > nguards:
                raise TableError(f"entry {i} ({start:#x}-{end:#x}): guards {first}+{count} are outside the "
                                 f"{nguards} pairs")
            guards = [list(pair) for pair in guard_pairs[first : first + count]]
        else:
            guards = []
        out.append(vma(start, end, KINDS[kind], prots[prot], flags[flag], offset, file_id, name, advices[advice],
                       shm, access, locks[lock], guards, ghost))
    return out

