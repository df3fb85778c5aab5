"""Encoded page data: pages.img as independent chunks (dump --compress,
--encrypt KEYFILE).

The page runs keep their offsets in the *logical* page space, the one a
plain pages.img has on disk; a chunk table (the XFRM record) says where
each piece of it is stored:

    logical page space   | chunk 0 | chunk 1 | chunk 2 | ...   (at most CHUNK_SIZE each,
                           \\        |         \\               each within one submit)
    pages.img             [c0 zstd][c2 raw, 4 KiB aligned][c1 zstd]...   (in the order written)

A chunk is compressed (zstd) only where that saves more than a page;
otherwise it is stored raw, 4 KiB aligned, so that restore maps it from the
file like a plain image's pages (not when encrypted: then every chunk is
sealed, see sealing.py). Each chunk carries the XXH3-64 of its decoded
bytes: the reader decodes and checks every chunk (on HASH_THREADS threads)
before a restore, into the page source the restore then fills from
(`ChunkedPageSource.load`), so each chunk is fetched and decoded once; the
fill drops a chunk once every page that refers to it has been written.
When the decoded chunks would take more than half of MemAvailable, the
reader checks them one at a time and drops them, and the restore decodes
each again when it is first needed (on the fill threads, so on both cores).
"""

from __future__ import annotations

import bisect
import ctypes
from .. import records as dataclasses  # the dataclasses API, cheap to import
import enum
import mmap
import os
import struct
import threading

from .. import model, workers
from ..errors import ImageCorrupt, ImageError, Unsupported
from ..kernel import mapping
from .checksum import data_hash
from .sealing import Sealer, chunk_ad

PAGE_SIZE = 4096
CHUNK_SIZE = 1 << 20
ZSTD_LEVEL = 1  # 3 (zstd's default) compresses a python3 heap 5% better at half the speed
# One chunk of the table: logical offset, file offset, xxh3 of the decoded bytes, length, stored length, method.
CHUNK = struct.Struct("<QQQIII")


class Method(enum.IntEnum):
    RAW = 0
    ZSTD = 1


@dataclasses.dataclass
class PageCodec:
    """How pages.img is encoded (the XFRM record; none in a plain image)."""

    compress: str = ""  # "zstd" or ""
    cipher: str = ""  # sealing.CIPHER or ""
    stored_size: int = 0  # bytes of pages.img on disk
    chunks: bytes = b""  # CHUNK each, in logical order, tiling the logical page space


@dataclasses.dataclass
class Chunk:
    offset: int
    file_offset: int
    xxh3: int
    length: int
    stored: int
    method: int


def unpack_chunks(codec: PageCodec) -> list[Chunk]:
    if len(codec.chunks) % CHUNK.size:
        raise ImageCorrupt(f"XFRM: {len(codec.chunks)} bytes is not a whole number of {CHUNK.size}-byte chunks")
    return [Chunk(*fields) for fields in CHUNK.iter_unpack(codec.chunks)]


def _zstd():
    try:
        import zstandard
    except ImportError as err:
        raise ImageError("compressed images need the zstandard package: pip install 'procsnap[compress]'") from err
    return zstandard


def check_codec(codec: PageCodec, pages_size: int, sealer: Sealer | None, path: str) -> list[str]:
    """The chunk table against the logical space and pages.img; every problem."""
    problems = []
    if codec.compress not in ("", "zstd"):
        problems.append(f"{path}: compression {codec.compress!r} unknown")
    if bool(codec.cipher) != (sealer is not None):
        problems.append(f"{path}: cipher {codec.cipher!r} does not match the inventory's")
    try:
        chunks = unpack_chunks(codec)
    except ImageCorrupt as err:
        return problems + [str(err)]
    at = 0
    for i, c in enumerate(chunks):
        where = f"{path}: chunk {i} (logical {c.offset})"
        if c.offset != at or c.length <= 0 or c.length % PAGE_SIZE:
            problems.append(f"{where}: expected at logical offset {at}, a whole number of pages")
        if c.method not in tuple(Method) or (c.method == Method.ZSTD and codec.compress != "zstd"):
            problems.append(f"{where}: method {c.method} unknown here")
        if c.file_offset + c.stored > codec.stored_size:
            problems.append(f"{where}: stored at {c.file_offset}+{c.stored}, beyond {codec.stored_size} bytes")
        if c.method == Method.RAW and sealer is None and (c.stored != c.length or c.file_offset % PAGE_SIZE):
            problems.append(f"{where}: a raw chunk of {c.stored} bytes at {c.file_offset}, "
                            f"expected {c.length} bytes 4 KiB aligned")
        at = c.offset + c.length
    if at != pages_size:
        problems.append(f"{path}: chunks cover {at} bytes of {pages_size}")
    return problems


def decode_chunk(read, index: int, c: Chunk, sealer: Sealer | None, path: str) -> bytes:
    """The bytes of one chunk, checked against its xxh3; ImageCorrupt if not.
    read(offset, length): bytes of pages.img."""
    data = read(c.file_offset, c.stored)
    where = f"{path}: chunk {index} at offset {c.file_offset}"
    if len(data) != c.stored:
        raise ImageCorrupt(f"{where}: expected {c.stored} bytes, found {len(data)} (truncated)")
    if sealer is not None:  # see ChunkEncoder.seal
        n = c.offset // PAGE_SIZE
        data = sealer.open(b"PAGE", n, data, chunk_ad(n, c.offset, c.length, c.method), where)
    if c.method == Method.ZSTD:
        try:
            data = _zstd().ZstdDecompressor().decompress(data, max_output_size=c.length)
        except _zstd().ZstdError as err:
            raise ImageCorrupt(f"{where}: zstd: {err}") from err
    if len(data) != c.length or data_hash(data) != c.xxh3:
        raise ImageCorrupt(f"{where}: decoded bytes do not match their xxh3 {c.xxh3:#x}")
    return data


def local_reader(fd: int):
    """read(offset, length) of a local file, for decode_chunk."""
    return lambda offset, length: os.pread(fd, length, offset)


def verify_chunks(path: str, codec: PageCodec, sealer: Sealer | None, threads: int, tell=None, read=None) -> list[str]:
    """Decode and check every chunk; one problem per bad chunk.
    tell(nbytes) after each chunk (from any thread); read: see decode_chunk
    (default: the local file `path`)."""
    chunks = unpack_chunks(codec)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC) if read is None else -1
    read = read or local_reader(fd)
    try:
        def check(share: list[int]) -> list[str]:
            bad = []
            for i in share:
                try:
                    decode_chunk(read, i, chunks[i], sealer, path)
                except ImageCorrupt as err:
                    bad.append(str(err))
                if tell:
                    tell(chunks[i].length)
            return bad

        indexes = list(range(len(chunks)))
        with workers.ThreadPool(threads) as pool:
            return [p for bad in pool.map(check, [indexes[i::threads] for i in range(threads)]) for p in bad]
    finally:
        if fd >= 0:
            os.close(fd)


class ChunkEncoder:
    """Turns the logical bytes of a chunk into what pages.img stores."""

    def __init__(self, compress: bool, sealer: Sealer | None):
        self.zstd = compress and _zstd()
        self.sealer = sealer
        self.local = threading.local()  # a ZstdCompressor is not shared between threads

    def compress(self, data: memoryview) -> tuple[int, bytes | memoryview]:
        """(method, bytes): zstd where that saves more than a page, else the data itself."""
        if self.zstd:
            if not hasattr(self.local, "zc"):
                self.local.zc = self.zstd.ZstdCompressor(level=ZSTD_LEVEL)
            packed = self.local.zc.compress(data)
            if len(packed) + PAGE_SIZE < len(data):
                return Method.ZSTD, packed
        return Method.RAW, data

    def seal(self, offset: int, length: int, method: int, out):
        """Sealed under its first page's number: unique in the image, fixed by its place."""
        if self.sealer is None:
            return out
        n = offset // PAGE_SIZE
        return self.sealer.seal(b"PAGE", n, out, chunk_ad(n, offset, length, method))

    def codec(self, chunks: list[Chunk], stored: int) -> PageCodec:
        chunks = sorted(chunks, key=lambda c: c.offset)
        return PageCodec(compress="zstd" if self.zstd else "", cipher=self.sealer and "AES-256-GCM" or "",
                         stored_size=stored,
                         chunks=b"".join(CHUNK.pack(c.offset, c.file_offset, c.xxh3, c.length, c.stored, c.method)
                                         for c in chunks))


class ChunkedPageSource:
    """The logical page space of an encoded image at `base`: raw chunks
    mapped from pages.img, the others decoded into anonymous memory when
    first asked for (`prepare`) and dropped once every byte expected of
    them has been released (`release`)."""

    transformed = True

    def __init__(self, path: str, size: int, codec: PageCodec, sealer: Sealer | None, read=None):
        """read: see decode_chunk (default: the local file `path`, whose raw chunks are mapped)."""
        self.path, self.size, self.sealer = path, size, sealer
        self.chunks = unpack_chunks(codec)
        self.starts = [c.offset for c in self.chunks]
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC) if read is None else -1
        self.read = read or local_reader(self.fd)
        self.area = mmap.mmap(-1, max(size, PAGE_SIZE), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mapping.MAP_NORESERVE)
        self._anchor = ctypes.c_char.from_buffer(self.area)
        self.base = ctypes.addressof(self._anchor)
        self.mapped = [c.method == Method.RAW and sealer is None and self.fd >= 0 for c in self.chunks]
        for c, raw in zip(self.chunks, self.mapped):
            if raw:
                mapping.map_file_fixed(self.base + c.offset, self.fd, c.length, c.file_offset)
        self.decoded = list(self.mapped)
        self.users = [0] * len(self.chunks)
        self.expected = [0] * len(self.chunks)
        self.locks = [threading.Lock() for _ in self.chunks]
        self.lock = threading.Lock()

    def address(self, run: model.PageRun) -> int:
        return self.base + run.offset

    def decoded_bytes(self) -> int:
        """What `load` keeps in memory: the chunks that are not mapped from the file."""
        return sum(c.length for c, raw in zip(self.chunks, self.mapped) if not raw)

    def load(self, threads: int, tell=None) -> list[str]:
        """Decode and check every chunk into the area (the mapped ones are
        hashed where they are), once: `prepare` then has nothing to do.
        One problem per bad chunk; tell(nbytes) after each (from any thread)."""
        def check(share: list[int]) -> list[str]:
            bad = []
            for i in share:
                c = self.chunks[i]
                try:
                    if self.mapped[i]:
                        view = memoryview(self.area)[c.offset : c.offset + c.length]
                        try:
                            if data_hash(view) != c.xxh3:
                                raise ImageCorrupt(f"{self.path}: chunk {i} at offset {c.file_offset}: "
                                                   f"bytes do not match their xxh3 {c.xxh3:#x}")
                        finally:
                            view.release()
                    else:
                        self.area[c.offset : c.offset + c.length] = decode_chunk(self.read, i, c, self.sealer,
                                                                               self.path)
                        self.decoded[i] = True
                except ImageCorrupt as err:
                    bad.append(str(err))
                if tell:
                    tell(c.length)
            return bad

        indexes = list(range(len(self.chunks)))
        with workers.ThreadPool(threads) as pool:
            return [p for bad in pool.map(check, [indexes[i::threads] for i in range(threads)]) for p in bad]

    def _span(self, offset: int, length: int) -> range:
        first = bisect.bisect_right(self.starts, offset) - 1
        last = bisect.bisect_right(self.starts, offset + length - 1) - 1
        return range(max(first, 0), last + 1)

    def expect(self, offset: int, length: int) -> None:
        """Some process will write [offset, offset+length) of the logical space."""
        for i in self._span(offset, length):
            c = self.chunks[i]
            self.expected[i] += min(offset + length, c.offset + c.length) - max(offset, c.offset)

    def prepare(self, segments) -> None:
        """Make the chunks under (local address, remote, length) segments readable."""
        for loc, _, length in segments:
            for i in self._span(loc - self.base, length):
                with self.lock:
                    self.users[i] += 1
                if not self.decoded[i]:
                    with self.locks[i]:
                        if not self.decoded[i]:
                            c = self.chunks[i]
                            self.area[c.offset : c.offset + c.length] = decode_chunk(self.read, i, c, self.sealer,
                                                                                   self.path)
                            self.decoded[i] = True

    def release(self, segments) -> None:
        """Those segments are written: drop the chunks nobody needs any more."""
        for loc, _, length in segments:
            offset = loc - self.base
            for i in self._span(offset, length):
                c = self.chunks[i]
                with self.lock:  # a prepare of this chunk counts itself a user before it looks at `decoded`
                    self.users[i] -= 1
                    self.expected[i] -= min(offset + length, c.offset + c.length) - max(offset, c.offset)
                    if self.users[i] == 0 and self.expected[i] <= 0:
                        self.decoded[i] = self.mapped[i]
                        mapping.drop(self.base + c.offset, c.length)

    def close(self) -> None:
        if self.area is not None:
            del self._anchor
            self.area.close()  # the raw chunks' file mappings go with it
            self.area = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def require_compress() -> None:
    """--compress at dump: the library is here, or a clear error before the dump starts."""
    try:
        import zstandard  # noqa: F401
    except ImportError as err:
        raise Unsupported("--compress needs the zstandard package: pip install 'procsnap[compress]'") from err
