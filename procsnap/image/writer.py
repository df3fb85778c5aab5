"""Writing an image: page data streamed to a PageSink, records last.

The inventory (procsnap.img) is removed first and written last, through a
temporary name, fsync and rename: a directory left behind by a crash or a
failed dump has no inventory and is never taken for a complete image.
"""

from __future__ import annotations

import binascii
import json
import os
import threading
import typing
import zlib

from .. import model, workers
from ..kernel.libc import start_writeback
from . import objstore, remote, schema
from .checksum import data_hash
from .chunks import CHUNK_SIZE, Chunk, ChunkEncoder, Method
from .sealing import Sealer, blob_ad

PAGE_SIZE = 4096
IOV_MAX = 1024


class PageSink(typing.Protocol):
    """Where dumped pages go: a local file now, a page server later.

    `submit` takes (vaddr, data) pieces and returns a Future; the buffers
    behind `data` must stay untouched until it is done. `close` waits for
    everything and returns the PageRun index; `abort` drops it all.
    """

    def submit(self, pieces: list[tuple[int, memoryview]]) -> workers.Job: ...

    def close(self) -> schema.PageRuns: ...

    def abort(self) -> None: ...


class FilePageSink:
    """Pages back to back in pages.img; offsets stay 4 KiB aligned.

    Offsets are assigned in submission order; hashing and pwritev run on
    WRITERS threads, so page allocation in the destination (the costly part
    on tmpfs: 1.2 GiB/s from one thread, 2.8 from two, measured here) and
    reading the next chunk from the target overlap. Each write then starts
    its own writeback, so that on a disk the fsync in close() waits for the
    last chunks only, not for the whole image (notes/issue-12-bulk.md).
    """

    WRITERS = 2

    def __init__(self, path: str, local: bool = True):
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600) if local else -1
        self.offset = 0
        self.runs = schema.PageRuns()
        self.pool = workers.ThreadPool(self.WRITERS, thread_name_prefix="procsnap-write")
        self.pending: list[workers.Job] = []

    def submit(self, pieces: list[tuple[int, memoryview]]) -> workers.Job:
        jobs = []
        for vaddr, data in pieces:
            assert len(data) % PAGE_SIZE == 0
            jobs.append((self.runs.append(vaddr, len(data) // PAGE_SIZE, self.offset), self.offset, data))
            self.offset += len(data)
        fut = self.pool.submit(self._write, jobs)
        self.pending = [f for f in self.pending if not f.done()] + [fut]
        return fut

    def _hash(self, jobs) -> None:
        """Each run's hash, filled in (under the GIL: pack_into and the
        main thread's appends never overlap)."""
        for index, _, data in jobs:
            self.runs.set_hash(index, data_hash(data))

    def _write(self, jobs) -> None:
        self._hash(jobs)
        views = [memoryview(data).cast("B") for _, _, data in jobs]
        offset = start = jobs[0][1]
        while views:
            try:
                n = os.pwritev(self.fd, views[:IOV_MAX], offset)
            except OSError as err:
                raise OSError(err.errno, f"write {self.path} at offset {offset}: {err.strerror}") from err
            offset += n
            while n:
                if n >= len(views[0]):
                    n -= len(views[0])
                    views.pop(0)
                else:
                    views[0] = views[0][n:]
                    n = 0
        start_writeback(self.fd, start, offset - start)

    def close(self) -> schema.PageRuns:
        for fut in self.pending:
            fut.result()
        self.pool.shutdown()
        if self.fd >= 0:
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1
        return self.runs

    def abort(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class ChunkedPageSink(FilePageSink):
    """Pages encoded in chunks of at most CHUNK_SIZE of each submit's bytes
    (chunks.py), appended to pages.img in the order they are done."""

    def __init__(self, path: str, compress: bool, sealer: Sealer | None, out: objstore.Output | None = None):
        """out: an object in object storage to upload to instead of the file `path`."""
        self.encoder = ChunkEncoder(compress, sealer)
        self.out = out
        super().__init__(path, local=out is None)
        self.stored = 0
        self.chunks: list[Chunk] = []
        self.lock = threading.Lock()

    def _write(self, jobs) -> None:
        self._hash(jobs)
        start = jobs[0][1]
        whole = memoryview(b"".join(memoryview(data).cast("B") for _, _, data in jobs))  # this submit's bytes
        for at in range(0, len(whole), CHUNK_SIZE):
            self._write_chunk(start + at, whole[at : at + CHUNK_SIZE])

    def _write_chunk(self, offset: int, data: memoryview) -> None:
        method, out = self.encoder.compress(data)
        out = self.encoder.seal(offset, len(data), method, out)
        with self.lock:
            where = self.stored
            if method == Method.RAW and self.encoder.sealer is None and self.out is None:
                where = -(-where // PAGE_SIZE) * PAGE_SIZE  # mapped by restore: page aligned
            self.stored = where + len(out)
            self.chunks.append(Chunk(offset, where, data_hash(data), len(data), len(out), method))
        view = memoryview(out)
        start = where
        while view:
            try:
                n = self.out.pwrite(view, where) if self.out else os.pwrite(self.fd, view, where)
            except OSError as err:
                raise OSError(err.errno, f"write {self.path} at offset {where}: {err.strerror}") from err
            view, where = view[n:], where + n
        if self.out is None:
            start_writeback(self.fd, start, where - start)

    def close(self) -> schema.PageRuns:
        for fut in self.pending:
            fut.result()
        if self.fd >= 0:
            os.ftruncate(self.fd, self.stored)  # a raw chunk's alignment gap may be the last thing written
        if self.out is not None:
            self.out.close(self.stored)
        return super().close()

    def abort(self) -> None:
        super().abort()
        if self.out is not None:
            self.out.abort()

    def codec(self):
        return self.encoder.codec(self.chunks, self.stored)


def _write_all(fd: int, data, path: str) -> None:
    view = memoryview(data).cast("B")
    while view:
        try:
            n = os.write(fd, view)
        except OSError as err:
            raise OSError(err.errno, f"write {path}: {err.strerror}") from err
        view = view[n:]


class ImageWriter:
    """Creates the files of one image in `directory`; `commit` finishes it."""

    # True: the records as format 1.6 wrote them, a VMA record each instead of
    # the VMAT table (kept so that tests can make such an image and read it)
    per_vma = False

    def __init__(self, directory: str, compress: bool = False, key: bytes | None = None):
        """compress: zstd page chunks; key: encrypted with it (chunks.py, sealing.py)."""
        self.dir = directory
        self.inventory = os.path.join(directory, schema.INVENTORY)
        self.store = remote.backend(directory)  # s3:// or a stream being sent (remote.py); None: local
        self.remote = self.store is not None
        if not self.remote:
            try:
                os.unlink(self.inventory)
            except FileNotFoundError:
                pass
        self.sealer = Sealer(key) if key is not None else None
        pages = os.path.join(directory, schema.PAGES)
        if self.remote:
            self.pages = self.store.page_sink(pages, compress, self.sealer)
        elif compress or key is not None:
            self.pages = ChunkedPageSink(pages, compress, self.sealer)
        else:
            self.pages = FilePageSink(pages)
        self.ghost_path = os.path.join(directory, schema.GHOSTS)
        self.ghost_out = self.store.Output(self.ghost_path) if self.remote else None
        self.ghost_fd = -1 if self.remote else \
            os.open(self.ghost_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        self.ghost_offset = 0

    def write_ghost(self, data: bytes) -> tuple[int, int]:
        """Store a ghost file's contents; returns (offset, xxh3)."""
        offset = self.ghost_offset
        stored = data if self.sealer is None else self.sealer.seal(b"GHST", offset, data, blob_ad(offset, len(data)))
        if self.ghost_out is not None:
            self.ghost_out.write_at_end(stored)
        else:
            _write_all(self.ghost_fd, stored, self.ghost_path)
        self.ghost_offset += len(stored)
        return offset, data_hash(data)

    def commit(self, ckpt: model.Checkpoint) -> None:
        """Write the records after the data they index, then make it visible."""
        ckpt.pages = self.pages.close()
        if hasattr(self.pages, "codec"):  # a ChunkedPageSink (or one behind series.DedupSink)
            ckpt.codec = [self.pages.codec()]
        if self.ghost_out is not None:
            self.ghost_out.close()
        else:
            os.fsync(self.ghost_fd)
            os.close(self.ghost_fd)
            self.ghost_fd = -1
        minor = schema.LAST_MINOR_BEFORE_TABLES if self.per_vma else schema.MINOR
        body = bytearray(schema.HEADER.pack(schema.MAGIC, schema.MAJOR, minor, 0))
        crc = zlib.crc32(bytes(body[:12]))
        body[12:16] = crc.to_bytes(4, "little")
        if self.sealer is not None:  # the records go sealed, after the key's parameters (sealing.py)
            clear, body = body + _record(schema.CRYP, self.sealer.header()), bytearray()
        count = 0
        for tag, (_, field, many) in schema.RECORDS.items():
            if tag in (schema.TABLES if self.per_vma else schema.SUPERSEDED):
                continue  # VMA records, or the VMAT table that replaced them
            value = getattr(ckpt, field)
            if field in schema.PACKED:
                value = schema.PACKED[field][0](value)
            elif tag in schema.TABLES:
                value = schema.TABLES[tag][0](value)
            for obj in value if many else [value]:
                if tag == b"PMAP":
                    _append_hex_record(body, tag, obj.runs)
                else:
                    body += _record(tag, schema.encode(obj))
                count += 1
        body += _record(schema.END, {
            "records": count,
            "pages_size": self.pages.offset,
            "ghosts_size": self.ghost_offset,
        })
        if self.sealer is not None:
            sealed = self.sealer.seal(b"INV\0", 0, bytes(body), bytes(clear))
            body = clear + schema.RECORD.pack(schema.SEAL, len(sealed), zlib.crc32(sealed)) + sealed
        if self.remote:
            self.store.put(self.inventory, bytes(body))
            return
        tmp = self.inventory + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            _write_all(fd, body, tmp)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, self.inventory)
        dfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def abort(self) -> None:
        """Remove what this writer created; the directory is left as found."""
        self.pages.abort()
        if self.ghost_out is not None:
            self.ghost_out.abort()
            return  # the generation's objects are removed by objstore.Staging.abandon
        if self.ghost_fd >= 0:
            os.close(self.ghost_fd)
            self.ghost_fd = -1
        for name in (schema.PAGES, schema.GHOSTS, schema.INVENTORY + ".tmp", schema.INVENTORY):
            try:
                os.unlink(os.path.join(self.dir, name))
            except FileNotFoundError:
                pass


def _append_hex_record(body: bytearray, tag: bytes, data: bytes, piece: int = 1 << 20) -> None:
    """A PMAP record, {"runs":"<hex>"}, appended to body a slice at a time
    (what json.dumps would write, without its copies of the whole)."""
    at = len(body)
    body += bytes(schema.RECORD.size)
    body += schema.PMAP_PREFIX
    view = memoryview(data)
    for i in range(0, len(data), piece):
        body += binascii.hexlify(view[i : i + piece])
    body += schema.PMAP_SUFFIX
    start = at + schema.RECORD.size
    payload = memoryview(body)[start:]
    try:
        schema.RECORD.pack_into(body, at, tag, len(payload), zlib.crc32(payload))
    finally:
        payload.release()


def _record(tag: bytes, payload) -> bytes:
    data = json.dumps(payload, separators=(",", ":")).encode()
    return schema.RECORD.pack(tag, len(data), zlib.crc32(data)) + data
