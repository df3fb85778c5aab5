"""The receiving side of a stream (stream.py): its files are written into a
staged directory (staging.py) as they arrive; at END the whole image is
validated by the caller's check and only then swapped in and acknowledged.
A stream that breaks off, is corrupt or fails the check leaves the
directory as it was (the staging directory is removed; one left by a
receiver that was killed is removed by the next procsnap that writes
there) and, on a connection, the sender hears FAIL or nothing: either way
it does not kill the source.

Memory: one frame buffer (stream.MAX_FRAME); the pages go to the
directory's files (its page cache) as they come.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import socket
import ssl
import time

from .. import faults
from ..errors import ImageCorrupt, ImageError, ImageWriteError, ProcsnapError, describe
from . import schema, staging
from .stream import (ABRT, ACK, DATA, DONE, END, FAIL, FILE, SIZE, Channel, FrameReader, StreamError, Tls, address,
                     check_header, json_payload, read_json, send_frame)
from .stream import HEADER

MAX_FILES = 3 * 4096  # three files for each process of a tree
MAX_FILE_SIZE = 1 << 44
IMAGE_FILE = re.compile(r"(proc\.[1-9][0-9]{0,6}/)?(procsnap\.img|pages\.img|ghosts\.img)")
log = logging.getLogger("procsnap.receive")


@dataclasses.dataclass
class Received:
    directory: str
    bytes: int = 0  # of file data
    frames: int = 0
    seconds: float = 0.0  # from the first byte to the acknowledgement
    source: str | None = None  # the sender's DONE: "killed" or "running"; "aborted" (ABRT after END); None: unknown


def listen(url: str, tls: Tls | None = None, on_listen=None) -> Channel:
    """The receiving side's channel: stdin for `-`, else the first connection
    to tcp://HOST:PORT (or HOST:PORT); on_listen((host, port)) once bound
    (port 0 picks a free one)."""
    if url == "-":
        return Channel("stdin", fd=0)
    host, port = address(url)
    ctx = tls.context(server=True) if tls is not None else None
    try:
        server = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as err:
        raise StreamError(f"{url}: cannot listen: {describe(err)}") from err
    with server:
        bound = server.getsockname()[:2]
        if on_listen:
            on_listen(bound)
        log.info("listening on %s:%d", *bound)
        conn, peer = server.accept()
    name = f"tcp://{peer[0]}:{peer[1]}"
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if ctx is not None:
        try:
            conn = ctx.wrap_socket(conn, server_side=True)
        except (ssl.SSLError, OSError) as err:
            conn.close()
            raise StreamError(f"{name}: TLS handshake failed: {getattr(err, 'reason', None) or describe(err)}") from err
    log.info("connection from %s", name)
    return Channel(name, conn)


class _Files:
    """The image's files being written in `root` (a staging directory)."""

    def __init__(self, root: str, durable: bool):
        self.root, self.durable = root, durable
        self.paths: list[str] = []
        self.fds: list[int] = []
        self.written: list[int] = []
        self.bytes = 0

    def open(self, index: int, name: str, where: str) -> None:
        if index != len(self.paths) or len(self.paths) >= MAX_FILES:
            raise ImageCorrupt(f"{where}: FILE index expected {len(self.paths)} (at most {MAX_FILES}), found {index}")
        if not IMAGE_FILE.fullmatch(name) or name in self.paths:
            raise ImageCorrupt(f"{where}: FILE {name!r}: not a file of an image, or sent twice")
        path = os.path.join(self.root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.fds.append(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
        self.paths.append(name)
        self.written.append(0)

    def _fd(self, index: int, where: str) -> int:
        if index >= len(self.fds) or self.fds[index] < 0:
            raise ImageCorrupt(f"{where}: file {index} is not open")
        return self.fds[index]

    def write(self, index: int, offset: int, data: memoryview, where: str) -> None:
        fd = self._fd(index, where)
        if offset + len(data) > MAX_FILE_SIZE:
            raise ImageCorrupt(f"{where}: DATA at offset {offset} of {self.paths[index]}: beyond {MAX_FILE_SIZE} bytes")
        while data:
            n = os.pwrite(fd, data, offset)
            data, offset = data[n:], offset + n
            self.written[index] += n
            self.bytes += n

    def close(self, index: int, size: int, where: str) -> None:
        fd = self._fd(index, where)
        found = os.fstat(fd).st_size
        if self.written[index] != size or found != size:
            raise ImageCorrupt(f"{where}: {self.paths[index]}: SIZE says {size} bytes, "
                               f"{self.written[index]} were sent ({found} in the file)")
        if self.durable:
            os.fsync(fd)
        os.close(fd)
        self.fds[index] = -1

    def close_all(self) -> None:
        for i, fd in enumerate(self.fds):
            if fd >= 0:
                os.close(fd)
                self.fds[i] = -1

    def finish(self, end: dict, frames: int, where: str) -> None:
        expected = {"files": len(self.paths), "frames": frames, "bytes": self.bytes}
        if any(end.get(k) != v for k, v in expected.items()):
            raise ImageCorrupt(f"{where}: END expected {expected}, found {end}")
        still = [self.paths[i] for i, fd in enumerate(self.fds) if fd >= 0]
        if still:
            raise ImageCorrupt(f"{where}: END before the SIZE of {', '.join(still)}")
        if schema.INVENTORY not in self.paths:
            raise ImageCorrupt(f"{where}: END without {schema.INVENTORY}")


def read_header(channel: Channel) -> bytes:
    """The stream's header, as it came (check_header says what is wrong with it)."""
    head = memoryview(bytearray(HEADER.size))
    got = channel.recv_into(head)
    return bytes(head[:got])


def receive_into(channel: Channel, directory: str, validate, durable: bool = True, header: bytes | None = None,
                 wait_done: bool = True) -> Received:
    """Write the stream on `channel` into `directory` as its image (staged:
    swapped in once validate(staging path) has passed, then acknowledged);
    then wait for the sender's DONE (unless not wait_done: the caller
    reads what comes next). validate raises an ImageError (or any
    ProcsnapError) to refuse the image. durable: fsync every file.
    header: the stream's header if the caller has read it (read_header)."""
    received = Received(directory)
    reader = FrameReader(channel)
    started = None
    with staging.staged(directory) as stage:
        files = _Files(stage.path, durable)
        try:
            head = read_header(channel) if header is None else header
            started = time.monotonic()
            check_header(head, channel.name)
            while True:
                tag, index, offset, payload = reader.read()
                where = reader.where()
                if tag == FILE:
                    files.open(index, bytes(payload).decode(errors="replace"), where)
                elif tag == DATA:
                    files.write(index, offset, payload, where)
                    faults.point("mid-receive")
                elif tag == SIZE:
                    files.close(index, offset, where)
                elif tag == ABRT:
                    raise StreamError(f"{channel.name}: the sender gave up: {bytes(payload).decode(errors='replace')}")
                elif tag == END:
                    files.finish(read_json(payload, where), reader.count - 1, where)
                    break
                else:
                    raise ImageCorrupt(f"{where}: {tag.decode()} frame before END")
            validate(stage.path)
        except ProcsnapError as err:
            files.close_all()
            _refuse(channel, str(err))
            raise
        except OSError as err:
            files.close_all()
            _refuse(channel, f"{directory}: {describe(err)}")
            raise ImageWriteError(f"{directory}: writing the received image: {describe(err)}") from err
        faults.point("before-ack")
        stage.swap_in()
        if channel.duplex:
            try:
                send_frame(channel, ACK, 0, 0, json_payload({"image": os.path.abspath(directory)}))
            except OSError as err:  # the sender will not kill the source: neither is the image kept
                raise StreamError(f"{channel.name}: cannot acknowledge the image: {describe(err)}") from err
    received.bytes, received.frames = files.bytes, reader.count
    received.seconds = time.monotonic() - (started or time.monotonic())
    if wait_done:
        received.source = _wait_done(reader)
    return received


def wait_done(channel: Channel) -> str | None:
    """The sender's DONE after an image (receive_into without wait_done)."""
    return _wait_done(FrameReader(channel))


def _refuse(channel: Channel, why: str) -> None:
    if channel.duplex:
        try:
            send_frame(channel, FAIL, 0, 0, why.encode())
        except OSError:
            pass


def _wait_done(reader: FrameReader) -> str | None:
    """What the sender did with the source once the image was acknowledged."""
    try:
        tag, _, _, payload = reader.read((DONE, ABRT), before="before DONE")
    except (ImageError, OSError) as err:
        log.info("%s: no word from the sender after the image: %s", reader.channel.name, err)
        return None
    if tag == ABRT:
        log.warning("%s: the sender failed after the image: %s", reader.channel.name,
                    bytes(payload).decode(errors="replace"))
        return "aborted"
    source = read_json(payload, reader.where()).get("source")
    return source if source in ("killed", "running") else None
