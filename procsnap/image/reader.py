"""Reading an image: every byte is checked before anything uses it.

`open_image` parses the inventory, checks the header, every record's
checksum and schema, the END record, the data files' sizes, every page
run's checksum and the consistency of the records with each other. Any
problem raises ImageCorrupt (or ImageVersionError) naming the file, the
offset, what was expected and what was found; semantic problems are all
listed, not just the first.
"""

from __future__ import annotations

import binascii
import bisect
from .. import records as dataclasses  # the dataclasses API, cheap to import
import functools
import mmap
import json
import os
import threading
import zlib

from .. import model, objects, workers
from ..errors import ImageCorrupt, ImageError, ImageVersionError, plural
from ..kernel import mapping
from ..kernel.arch.x86_64 import PAGE_SIZE, TASK_SIZE
from ..objects.protocol import bad_path
from . import objstore, schema, staging
from .checksum import data_hash, data_hash_in_steps
from .chunks import ChunkedPageSource, PageCodec, check_codec, verify_chunks
from .sealing import TAG_BYTES, Sealer, blob_ad
from .series import bad_source, is_parent_source

MAX_FD = 1 << 20
MAX_SIGNAL = 64
HASH_THREADS = 2
HASH_THREADED_MIN = 16 << 20  # bytes of pages below which one thread hashes them all
PROGRESS_STEP = 16 << 20  # bytes checked between two progress reports
MAX_AUXV = 2 * 8 * 26  # sizeof(mm->saved_auxv) on x86_64: AT_VECTOR_SIZE longs


@dataclasses.dataclass
class Image:
    directory: str
    major: int
    minor: int
    checkpoint: model.Checkpoint
    pages_size: int  # the logical page space (that of a plain pages.img)
    ghosts_size: int
    key: bytes | None = None  # --encrypt: the key file's, for the tree's other images
    sealer: Sealer | None = None  # this image's AEAD, if encrypted
    codec: PageCodec | None = None  # pages.img in chunks (chunks.py), if compressed or encrypted
    parents: dict = dataclasses.field(default_factory=dict)  # the root's: parent images by PREF source (series.py)
    loaded: object | None = None  # the ChunkedPageSource its check decoded the chunks into, for open_pages

    @property
    def pages_path(self) -> str:
        return os.path.join(self.directory, schema.PAGES)

    @property
    def ghosts_path(self) -> str:
        return os.path.join(self.directory, schema.GHOSTS)

    def read_ghost(self, ghost) -> bytes:
        """The contents of an objects.ghost.Ghost."""
        return self.read_blob(ghost.offset, ghost.size, ghost.xxh3)

    @property
    def remote(self) -> bool:
        return objstore.is_url(self.directory)

    def open_ghosts(self):
        return objstore.RangeFile(self.ghosts_path) if self.remote else open(self.ghosts_path, "rb")

    def read_blob(self, offset: int, size: int, xxh3: int) -> bytes:
        """Bytes of ghosts.img (ghost files, shared memory extents), checked."""
        with self.open_ghosts() as f:
            data = self.load_blob(f, offset, size)
        if len(data) != size or data_hash(data) != xxh3:
            raise ImageCorrupt(f"{self.ghosts_path}: {size} bytes at offset {offset} changed since validation")
        return data

    def load_blob(self, f, offset: int, size: int) -> bytes:
        """`size` bytes stored at `offset` of the open ghosts.img, unsealed if encrypted."""
        f.seek(offset)
        if self.sealer is None:
            return f.read(size)
        return self.sealer.open(b"GHST", offset, f.read(size + TAG_BYTES), blob_ad(offset, size),
                                f"{self.ghosts_path}: {size} bytes at offset {offset}")


def open_pages(image: Image):
    """The image's pages for a restore: a PageSource, or a ChunkedPageSource
    for an encoded pages.img (with prepare/release around each use)."""
    if image.codec is None:
        return PageSource(image)
    if image.loaded is not None:  # decoded by the check already: handed over once, closed by the caller
        pages, image.loaded = image.loaded, None
        return pages
    read = functools.partial(objstore.read_range, image.pages_path) if image.remote else None
    return ChunkedPageSource(image.pages_path, image.pages_size, image.codec, image.sealer, read)


class PageSource:
    """Pages of an image, mapped read-only; `address(run)` points into them,
    so the kernel copies straight from the page cache into the target."""

    transformed = False

    def __init__(self, image: Image):
        self.fd = os.open(image.pages_path, os.O_RDONLY | os.O_CLOEXEC)
        self.size = image.pages_size
        self.base = mapping.map_file(self.fd, self.size) if self.size else 0

    def address(self, run: model.PageRun) -> int:
        return self.base + run.offset

    def close(self) -> None:
        if self.base:
            mapping.unmap(self.base, self.size)
            self.base = 0
        os.close(self.fd)


def _corrupt(path: str, offset: int, what: str, expected, found) -> ImageCorrupt:
    return ImageCorrupt(f"{path}: {what} at offset {offset}: expected {expected}, found {found}")


def _read_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError as err:
        raise ImageCorrupt(f"{path}: missing (not an image, or an incomplete one)") from err
    except IsADirectoryError as err:
        raise ImageCorrupt(f"{path}: is a directory") from err
    except OSError as err:
        raise ImageCorrupt(f"{path}: cannot read: {err.strerror}") from err


def read_records(directory: str) -> tuple[int, int, list[tuple[bytes, int, dict]]]:
    """Parse procsnap.img into (major, minor, [(tag, offset, payload)])."""
    major, minor, records, _ = read_inventory(directory)
    return major, minor, records


def read_inventory(directory: str, key: bytes | None = None):
    """(major, minor, [(tag, offset, payload)], Sealer or None): an encrypted
    inventory is opened with `key` (offsets are then into its sealed body)."""
    path = os.path.join(directory, schema.INVENTORY)
    if objstore.is_url(directory):
        data = objstore.read(path)
    elif not os.path.isdir(directory):
        raise ImageCorrupt(f"{directory}: " + ("not a directory" if os.path.exists(directory) else "no such directory"))
    else:
        data = _read_file(path)
    if len(data) < schema.HEADER.size:
        raise _corrupt(path, 0, "header", f"{schema.HEADER.size} bytes", f"{len(data)} bytes")
    magic, major, minor, crc = schema.HEADER.unpack_from(data)
    if magic != schema.MAGIC:
        raise _corrupt(path, 0, "magic", schema.MAGIC, magic)
    if zlib.crc32(data[:12]) != crc:
        raise _corrupt(path, 12, "header crc32", hex(zlib.crc32(data[:12])), hex(crc))
    if major != schema.MAJOR:
        raise ImageVersionError(
            f"{path}: format version {major}.{minor}; this procsnap reads version {schema.MAJOR}.x")
    off = schema.HEADER.size
    sealer = None
    if data[off : off + 4] == schema.CRYP:
        (_, start, header), off = _read_record(data, off, path, (schema.CRYP,))
        sealer = Sealer.for_reading(key, header, path)
        (_, start, sealed), off = _read_record(data, off, path, (schema.SEAL,), raw=True)
        if off != len(data):
            raise _corrupt(path, off, "end of file after SEAL record", "nothing", f"{len(data) - off} bytes")
        data = sealer.open(b"INV\0", 0, sealed, data[:start - schema.RECORD.size], f"{path}: SEAL record")
        path, off = f"{path} (sealed body)", 0
    elif key is not None:
        raise ImageError(f"{path}: the image is not encrypted, but a key was given")
    records = []
    while True:
        (tag, start, obj), off = _read_record(data, off, path)
        records.append((tag, start, obj))
        if tag == schema.END:
            break
    if off != len(data):
        raise _corrupt(path, off, "end of file after END record", "nothing", f"{len(data) - off} bytes")
    return major, minor, records, sealer


def _read_record(data: bytes, off: int, path: str, tags=None, raw: bool = False):
    """((tag, payload offset, payload), next offset) of the record at `off`;
    tags: the ones allowed (default: the schema's); raw: payload as bytes."""
    if off + schema.RECORD.size > len(data):
        raise _corrupt(path, off, "record header (truncated image?)", f"{schema.RECORD.size} bytes",
                       f"{len(data) - off} bytes")
    tag, length, crc = schema.RECORD.unpack_from(data, off)
    if (tag not in tags) if tags else (tag != schema.END and tag not in schema.RECORDS):
        raise _corrupt(path, off, "record tag", b"/".join(tags) if tags else "a known tag", tag)
    if length > schema.MAX_RECORD:
        raise _corrupt(path, off + 4, "record length", f"<= {schema.MAX_RECORD}", length)
    start = off + schema.RECORD.size
    if tag == b"PMAP" and not raw:  # one hex string: a slice of data, decoded here (schema.PMAP_PREFIX)
        payload = memoryview(data)[start : start + length]
    else:
        payload = data[start : start + length]
    if len(payload) != length:
        raise _corrupt(path, start, f"{tag.decode(errors='replace')} payload (truncated)", f"{length} bytes",
                       f"{len(payload)} bytes")
    if zlib.crc32(payload) != crc:
        raise _corrupt(path, start, f"{tag.decode(errors='replace')} crc32", hex(crc), hex(zlib.crc32(payload)))
    if raw:
        return (tag, start, payload), start + length
    if isinstance(payload, memoryview):
        if bytes(payload[: len(schema.PMAP_PREFIX)]) == schema.PMAP_PREFIX and \
                bytes(payload[len(payload) - len(schema.PMAP_SUFFIX) :]) == schema.PMAP_SUFFIX:
            try:
                hexed = payload[len(schema.PMAP_PREFIX) : len(payload) - len(schema.PMAP_SUFFIX)]
                return (tag, start, {"runs": schema.Unhexed(binascii.unhexlify(hexed))}), start + length
            except binascii.Error as err:
                raise _corrupt(path, start, "PageMap runs", "hex", str(err)) from err
        payload = bytes(payload)  # some other JSON: decoded as any record
    try:
        obj = json.loads(payload)
    except (ValueError, RecursionError) as err:
        raise _corrupt(path, start, "record payload", "JSON", str(err)) from err
    if not isinstance(obj, dict):
        raise _corrupt(path, start, "record payload", "an object", type(obj).__name__)
    return (tag, start, obj), start + length


def open_image(directory: str, verify_pages: bool = True, progress=None, key: bytes | None = None) -> Image:
    """Read and validate an image; raises ImageCorrupt/ImageVersionError.
    A dump's swap cut short is finished first (see staging.py).
    progress(done, total): bytes of page data checked so far.
    key: the key file's key (sealing.py); an encrypted image needs it, a plain one must not get one.
    directory: or s3://BUCKET/PREFIX, whose current generation is read (objstore.py)."""
    if objstore.is_url(directory):
        directory = objstore.resolve(directory)
    elif os.path.isdir(directory):
        staging.settle_for_reading(directory)
    path = os.path.join(directory, schema.INVENTORY)
    major, minor, records, sealer = read_inventory(directory, key)
    fields: dict[str, object] = {}
    for _, field, many in schema.RECORDS.values():
        if many:
            fields[field] = []
    end = {}
    tabled: dict[str, bytes] = {}  # field -> the tag its objects came in (schema.TABLES)
    nrecords = len(records)
    records.reverse()  # popped from the end: O(1) each (an image of 10,000 VMAs has as many records)
    while records:  # consumed as decoded: the raw JSON of a big record is freed early
        tag, offset, payload = records.pop()
        if tag == schema.END:
            end = payload
            continue
        cls, field, many = schema.RECORDS[tag]
        try:
            obj = schema.decode(cls, payload, f"{cls.__name__}")
            if field in schema.PACKED:
                obj = schema.PACKED[field][1](obj)
            elif tag in schema.TABLES:
                obj = schema.TABLES[tag][1](obj)
        except schema.SchemaError as err:
            raise ImageCorrupt(f"{path}: {tag.decode()} record at offset {offset}: {err}") from err
        if tag in schema.TABLES:  # a field's objects all in one record (1.7: VMAT)
            if field in tabled:
                raise _corrupt(path, offset, f"{tag.decode()} record", f"the only record of {field}",
                               f"one after {tabled[field].decode()}")
            tabled[field] = tag
            fields[field].extend(obj)
        elif tag in schema.SUPERSEDED:  # before 1.7: a record each
            if tabled.setdefault(field, tag) != tag:
                raise _corrupt(path, offset, f"{tag.decode().rstrip()} record",
                               f"none beside {tabled[field].decode()}", "one")
            if minor > schema.LAST_MINOR_BEFORE_TABLES:
                raise _corrupt(path, offset, f"{tag.decode().rstrip()} record",
                               f"none in a {major}.{minor} image ({schema.SUPERSEDED[tag].decode()} holds them)", "one")
            fields[field].append(obj)
        elif many:
            fields[field].append(obj)
        elif field in fields:
            raise _corrupt(path, offset, f"{tag.decode()} record", "one", "a second one")
        else:
            fields[field] = obj
    for _, field, many in schema.RECORDS.values():
        if field not in fields:
            raise ImageCorrupt(f"{path}: no {field} record")
    if minor > schema.LAST_MINOR_BEFORE_TABLES:  # from 1.7 each table's record is always written
        for tag, (_, field, _) in ((t, schema.RECORDS[t]) for t in schema.TABLES):
            if field not in tabled:
                raise ImageCorrupt(f"{path}: no {tag.decode()} record")
    counts = {k: end.get(k) for k in ("records", "pages_size", "ghosts_size")}
    for name, value in counts.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ImageCorrupt(f"{path}: END record: {name} expected a non-negative integer, found {value!r}")
    if counts["records"] != nrecords - 1:
        raise ImageCorrupt(f"{path}: END record: expected {counts['records']} records, found {nrecords - 1}")
    ckpt = model.Checkpoint(**fields)
    image = Image(directory, major, minor, ckpt, counts["pages_size"], counts["ghosts_size"], key, sealer)
    problems = []
    if len(ckpt.codec) > 1:
        problems.append("more than one XFRM record")
    elif ckpt.codec:
        image.codec = ckpt.codec[0]
        problems += check_codec(image.codec, image.pages_size, sealer, image.pages_path)
    elif sealer is not None:
        problems.append("an encrypted image without an XFRM record (its pages would be in the clear)")
    problems += validate(ckpt, image)
    problems += _check_data_files(image, verify_pages, progress)
    if problems:
        raise ImageCorrupt(f"{directory}: {plural(len(problems), 'problem')}: " + "; ".join(problems))
    return image


def _check_data_files(image: Image, verify_pages: bool, progress=None) -> list[str]:
    problems = []
    stored = image.codec.stored_size if image.codec else image.pages_size
    for path, size in ((image.pages_path, stored), (image.ghosts_path, image.ghosts_size)):
        try:
            found = objstore.size(path) if image.remote else os.stat(path).st_size
        except OSError as err:
            problems.append(f"{path}: {err.strerror}")
            continue
        except ImageCorrupt as err:
            problems.append(str(err))
            continue
        if found != size:
            problems.append(f"{path}: size expected {size}, found {found}")
    if problems or not verify_pages:
        return problems
    ckpt = image.checkpoint
    if image.codec is not None:
        problems += _check_chunks(image, progress)
    elif image.pages_size:
        with open(image.pages_path, "rb") as f, mmap.mmap(f.fileno(), image.pages_size, access=mmap.ACCESS_READ) as m:
            view = memoryview(m)
            checked = [0]
            total = sum(npages for _, npages, _, _ in schema.PAGE_RUN.iter_unpack(_packed(ckpt.pages))) * PAGE_SIZE
            lock = threading.Lock()
            try:
                def tell(nbytes: int) -> None:
                    with lock:
                        checked[0] += nbytes
                        progress(checked[0], total)

                def check(share: range) -> list[str]:
                    runs = (ckpt.pages[i] for i in share)  # made one at a time (schema.PageRuns)
                    bad = []
                    untold = 0  # small runs are told of together
                    for run in runs:
                        data = view[run.offset : run.offset + run.npages * PAGE_SIZE]
                        if progress and len(data) >= PROGRESS_STEP:
                            found = data_hash_in_steps(data, PROGRESS_STEP, tell)
                        else:
                            found = data_hash(data)
                            untold += len(data)
                            if progress and untold >= PROGRESS_STEP:
                                tell(untold)
                                untold = 0
                        data.release()
                        if run.offset + run.npages * PAGE_SIZE <= image.pages_size:
                            m.madvise(mmap.MADV_DONTNEED, run.offset, run.npages * PAGE_SIZE)  # bound our RSS
                        if found != run.xxh3:
                            bad.append(f"{image.pages_path}: page run {run.vaddr:#x} at offset {run.offset}: "
                                       f"xxh3 expected {run.xxh3:#x}, found {found:#x}")
                    if progress and untold:
                        tell(untold)
                    return bad

                # xxhash releases the GIL: both cores hash, each its share of the runs.
                if total < HASH_THREADED_MIN:  # a small image (a tree's process): threads cost more than they save
                    problems += check(range(len(ckpt.pages)))
                else:
                    shares = [range(i, len(ckpt.pages), HASH_THREADS) for i in range(HASH_THREADS)]
                    with workers.ThreadPool(HASH_THREADS) as pool:
                        for bad in pool.map(check, shares):
                            problems += bad
            finally:
                view.release()
    with image.open_ghosts() as f:
        for what, offset, size, xxh3 in objects.blobs(ckpt):
            try:
                data = image.load_blob(f, offset, size)
            except ImageCorrupt as err:
                problems.append(f"{what}: {err}")
                continue
            if data_hash(data) != xxh3:
                problems.append(f"{image.ghosts_path}: {what} at offset {offset}: "
                                f"xxh3 expected {xxh3:#x}, found {data_hash(data):#x}")
    return problems


def _check_chunks(image: Image, progress=None) -> list[str]:
    """Every chunk of an encoded pages.img decoded and checked (chunks.py)."""
    total = image.pages_size
    checked = [0, 0]  # bytes, bytes not yet told
    lock = threading.Lock()

    def tell(nbytes: int) -> None:
        with lock:
            checked[0] += nbytes
            checked[1] += nbytes
            if checked[1] >= PROGRESS_STEP or checked[0] == total:
                checked[1] = 0
                progress(checked[0], total)

    read = functools.partial(objstore.read_range, image.pages_path) if image.remote else None
    pages = ChunkedPageSource(image.pages_path, image.pages_size, image.codec, image.sealer, read)
    if pages.decoded_bytes() > _mem_available() // 2:  # checked one chunk at a time; the restore decodes again
        pages.close()
        return verify_chunks(image.pages_path, image.codec, image.sealer, HASH_THREADS, tell if progress else None,
                             read)
    problems = pages.load(HASH_THREADS, tell if progress else None)
    if problems:
        pages.close()
    else:
        image.loaded = pages
    return problems


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _packed(runs) -> bytes:
    """The packed bytes (schema.PAGE_RUN each) of a process's page runs."""
    if not isinstance(runs, schema.PageRuns):
        runs = schema.pack_page_runs(runs)
    return runs.runs if isinstance(runs, model.PageMap) else runs.data


def _by_offset(runs):
    """(vaddr, npages, offset, xxh3) of each run in pages.img order: as they
    are, when the dump wrote them so (it does; sorting them as objects would
    cost 80 MiB at 4 GiB of half-zero memory). Tuples of the packed runs,
    made as they are used: no model.PageRun each."""
    data = _packed(runs)
    each = schema.PAGE_RUN.iter_unpack
    if all(a[2] <= b[2] for a, b in zip(each(data), each(memoryview(data)[schema.PAGE_RUN.size:]))):
        return each(data)
    return sorted(each(data), key=lambda r: r[2])


def validate(ckpt: model.Checkpoint, image: Image) -> list[str]:
    """Consistency of the records with each other; every problem, listed."""
    p: list[str] = objects.check_image(ckpt, image)
    file_ids = {f.id for f in ckpt.files}
    prev_end = 0
    vmas = sorted(ckpt.vmas, key=lambda v: v.start)
    file_kinds = (model.VmaKind.FILE_PRIVATE, model.VmaKind.FILE_SHARED)
    for v in vmas:  # (the message of a VMA made only when it has a problem: 10,000 VMAs are usual)
        if v.start % PAGE_SIZE or v.end % PAGE_SIZE or not v.start < v.end:
            p.append(f"VMA {v.start:#x}-{v.end:#x}: not a page-aligned, non-empty range")
        if v.end > TASK_SIZE + PAGE_SIZE or v.start < PAGE_SIZE:
            p.append(f"VMA {v.start:#x}-{v.end:#x}: outside user space")
        if v.start < prev_end:
            p.append(f"VMA {v.start:#x}-{v.end:#x}: overlaps the previous VMA (ends {prev_end:#x})")
        if v.end > prev_end:
            prev_end = v.end
        if v.kind in file_kinds and v.file_id not in file_ids \
                and v.ghost < 0:  # an unlinked file's is its Ghost (objects/ghost.py)
            p.append(f"VMA {v.start:#x}-{v.end:#x}: refers to unknown file {v.file_id}")
        if v.offset < 0 or v.offset % PAGE_SIZE:
            p.append(f"VMA {v.start:#x}-{v.end:#x}: bad file offset {v.offset}")
    starts = [v.start for v in vmas]
    pages_end = 0
    for vaddr, npages, offset, _ in _by_offset(ckpt.pages):
        if npages <= 0 or offset < 0 or offset % PAGE_SIZE or vaddr % PAGE_SIZE:
            p.append(f"page run {vaddr:#x}+{npages}: bad count, offset or alignment")
            continue
        if offset < pages_end:
            p.append(f"page run {vaddr:#x}+{npages}: overlaps another run in pages.img")
        pages_end = offset + npages * PAGE_SIZE
        if pages_end > image.pages_size:
            p.append(f"page run {vaddr:#x}+{npages}: ends at {pages_end}, beyond pages.img "
                     f"({image.pages_size} bytes)")
        i = bisect.bisect_right(starts, vaddr) - 1
        if i < 0 or vaddr + npages * PAGE_SIZE > vmas[i].end or vmas[i].kind not in model.COPIED_KINDS:
            p.append(f"page run {vaddr:#x}+{npages}: not inside one VMA whose pages are stored")
    for refs in ckpt.page_refs:
        try:
            ref_runs = schema.unpack_page_refs(refs)
        except schema.SchemaError as err:
            p.append(str(err))
            continue
        for src in refs.sources:
            if is_parent_source(src):
                if bad_source(src):
                    p.append(f"page refs: parent source {src!r} is not a relative path")
            elif src and not (src.startswith("proc.") and src[5:].isdigit()):
                p.append(f"page refs: source {src!r} is not an image of the tree")
        for vaddr, npages, src, offset in ref_runs:
            where = f"page ref {vaddr:#x}+{npages}"
            i = bisect.bisect_right(starts, vaddr) - 1
            if npages <= 0 or vaddr % PAGE_SIZE or offset % PAGE_SIZE or src >= len(refs.sources):
                p.append(f"{where}: bad count, alignment or source")
            elif i < 0 or vaddr + npages * PAGE_SIZE > vmas[i].end or vmas[i].kind not in model.COPIED_KINDS:
                p.append(f"{where}: not inside one VMA whose pages are stored")
    if len(ckpt.page_refs) > 1:
        p.append("more than one PREF record")
    mm = ckpt.mm
    for name in ("start_code", "end_code", "start_data", "end_data", "start_brk", "brk", "start_stack",
                 "arg_start", "arg_end", "env_start", "env_end"):
        if not PAGE_SIZE <= getattr(mm, name) < TASK_SIZE:
            p.append(f"mm: {name} {getattr(mm, name):#x} outside user space")
    for lo, hi in (("start_code", "end_code"), ("start_data", "end_data"), ("start_brk", "brk"),
                   ("arg_start", "arg_end"), ("env_start", "env_end")):
        if getattr(mm, lo) > getattr(mm, hi):
            p.append(f"mm: {lo} {getattr(mm, lo):#x} is above {hi} {getattr(mm, hi):#x}")
    if len(mm.auxv) % 16 or len(mm.auxv) > MAX_AUXV:
        p.append(f"mm: auxv of {len(mm.auxv)} bytes (expected pairs of 8-byte words, at most {MAX_AUXV})")
    exe_id = ckpt.mm.exe_file_id
    if exe_id not in file_ids:
        p.append(f"mm: exe refers to unknown file {exe_id}")
    for fd in ckpt.fds:
        if not 0 <= fd.fd < MAX_FD:
            p.append(f"fd {fd.fd}: number out of range")
        if fd.pos < 0:
            p.append(f"fd {fd.fd}: negative position")
    fdnums = [fd.fd for fd in ckpt.fds]
    if len(set(fdnums)) != len(fdnums):
        p.append("fd numbers are not unique")
    firsts = {fd.fd for fd in ckpt.fds if fd.shares_with == -1}
    for fd in ckpt.fds:  # an alias names another fd of this image, never one of the restorer's
        if fd.shares_with != -1 and (fd.shares_with not in firsts or fd.shares_with == fd.fd):
            p.append(f"fd {fd.fd}: shares a description with fd {fd.shares_with}, which is not a first fd here")
    for lock in ckpt.locks:
        if lock.fd not in firsts or lock.kind not in ("FLOCK", "POSIX", "OFDLCK") or lock.start < 0 \
                or not (lock.end == -1 or lock.start <= lock.end < 1 << 63):
            p.append(f"lock {lock}: not a lock of a first fd of this image")
    for sa in ckpt.sigactions:
        if not 1 <= sa.signo <= MAX_SIGNAL:
            p.append(f"sigaction: signal {sa.signo} out of range")
    for ps in ckpt.pending:
        if not 1 <= ps.signo <= MAX_SIGNAL or len(ps.siginfo) != 128:
            p.append(f"pending signal {ps.signo}: bad signal or siginfo size")
    t = ckpt.task
    if not 0 < t.pid < (1 << 22):
        p.append(f"task: pid {t.pid} out of range")
    if len(t.xstate) > 1 << 16:
        p.append("task: xstate too large")
    if bad_path(t.cwd):
        p.append(f"task: cwd {t.cwd!r} is not a plain absolute path")
    if bad_path(t.root):
        p.append(f"task: root {t.root!r} is not a plain absolute path")
    tids = [t.pid] + [th.tid for th in ckpt.threads]
    if len(set(tids)) != len(tids):
        p.append("thread ids are not unique")
    for th in ckpt.threads:
        if not 0 < th.tid < (1 << 22):
            p.append(f"thread {th.tid}: tid out of range")
        if len(th.xstate) > 1 << 16:
            p.append(f"thread {th.tid}: xstate too large")
        if any(len(info) != 128 for info in th.pending):
            p.append(f"thread {th.tid}: pending siginfo of a size other than 128")
    return p
