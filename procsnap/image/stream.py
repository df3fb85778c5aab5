"""An image as a stream: `dump --stream URL` sends the files of a directory
image as they are written, and the destination (`receive`, `restore
--stream`) writes them into a staged directory, validates the whole image
and only then answers; nothing is stored on the sending side.

URL: `-` (stdout for a dump, stdin for a receiver) or `tcp://HOST:PORT`
(the destination listens, the source connects, as CRIU's page server);
TLS when --tls-cert/--tls-key/--tls-ca are given (Tls below).

Wire format (little endian). The sender starts with

    header  20 bytes  magic "PSSTREAM" | u16 stream version | u16 image major |
                      u16 image minor | u16 flags (0) | u32 crc32(first 16)

then frames, each

    frame   32 bytes  tag (4 ASCII) | u32 file | u64 offset | u32 length |
                      u64 xxh3(payload) | u32 crc32(first 28)
            payload   `length` bytes, at most MAX_FRAME

    FILE  file = a new index; payload: the file's path in the image (proc.PID/pages.img)
    DATA  file's bytes at `offset` (pages go out in the order they are read)
    SIZE  the file is complete: `offset` is its size, every byte of it sent once
    END   payload JSON {"files", "frames", "bytes"}: the image is complete
    ABRT  payload: why the sender gave up (its dump failed: the source runs on)
    DONE  after END was answered: payload JSON {"source": "killed" | "running"}

The receiver answers END, on a connection (not on a pipe), with one frame:

    ACK_  payload JSON {"image": DIR}: every check passed, the image is in place
    FAIL  payload: why not (the image was not kept)

A migration (migration.py; header flag SERIES) sends several images on one
connection, each from its own header to its DONE: the pre-copy passes, then
the final image, which the destination answers twice more:

    RDY_  the tree is restored and held, not yet running; the sender kills
          the source and says so (DONE {"source": "killed"})
    RUN_  payload JSON {"pid": ROOT}: released, it runs on the destination

A dump without -R kills the source only after ACK_ (on a pipe, which has
no way back, once END has been written), so a stream cut anywhere leaves
the source running; the receiver keeps nothing of a stream without END.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import socket
import ssl
import struct
import threading
import zlib

from ..errors import ImageCorrupt, ImageError, ImageVersionError, describe
from . import remote, schema
from .checksum import data_hash
from .writer import ChunkedPageSink, FilePageSink

MAGIC = b"PSSTREAM"
VERSION = 1
HEADER = struct.Struct("<8sHHHHI")
FRAME = struct.Struct("<4sIQIQI")
MAX_FRAME = 8 << 20
PREFIX = remote.STREAM  # the staging path of a dump being sent: stream://ID/proc.PID/pages.img
FILE, DATA, SIZE, END, ABRT, DONE, ACK, FAIL = (b"FILE", b"DATA", b"SIZE", b"END ", b"ABRT", b"DONE", b"ACK_",
                                                b"FAIL")
READY, RUNNING = b"RDY_", b"RUN_"  # a migration's final image (migration.py)
TAGS = (FILE, DATA, SIZE, END, ABRT, DONE, ACK, FAIL, READY, RUNNING)
SERIES = 1  # header flag: a migration, images one after another on this connection
log = logging.getLogger("procsnap.stream")


class StreamError(ImageError):
    """A stream broke off, was refused by the other side, or could not be opened."""


def is_path(location: str) -> bool:
    """A path inside a dump being sent (see PREFIX)."""
    return str(location).startswith(PREFIX)


def address(url: str) -> tuple[str, int]:
    """(host, port) of tcp://HOST:PORT or HOST:PORT ([::1]:PORT for IPv6)."""
    rest = url[len("tcp://"):] if url.startswith("tcp://") else url
    host, sep, port = rest.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise StreamError(f"{url}: expected tcp://HOST:PORT")
    return host, int(port)


@dataclasses.dataclass(frozen=True)
class Tls:
    """--tls-cert, --tls-key, --tls-ca (PEM files). The listening side needs
    cert and key; with ca it also requires the connecting side's certificate
    signed by that CA (mutual authentication). The connecting side checks
    the listener's certificate against ca (the system's CAs without it) and
    its host name, and presents its own cert if given."""

    cert: str | None = None
    key: str | None = None
    ca: str | None = None

    def context(self, server: bool) -> ssl.SSLContext:
        try:
            if server:
                if not self.cert:
                    raise StreamError("--tls-cert (and --tls-key) are needed on the listening side")
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                if self.ca:
                    ctx.verify_mode = ssl.CERT_REQUIRED
            else:
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            if self.cert:
                ctx.load_cert_chain(self.cert, self.key)
            if self.ca:
                ctx.load_verify_locations(self.ca)
            elif not server:
                ctx.load_default_certs()
        except (ssl.SSLError, OSError) as err:
            raise StreamError(f"TLS: cannot load {self.cert or ''} {self.key or ''} {self.ca or ''}: "
                              f"{describe(err)}".replace("  ", " ")) from err
        return ctx


class Channel:
    """Both ends' transport: a socket (TLS or not) or a pipe's fd. `duplex`:
    the receiver can answer (a socket); a pipe carries the stream one way."""

    def __init__(self, name: str, sock: socket.socket | None = None, fd: int = -1):
        self.name, self.sock, self.fd = name, sock, fd
        self.duplex = sock is not None
        self.received = 0  # bytes read from the channel, for messages
        self.lock = threading.Lock()

    def send(self, *parts) -> None:
        with self.lock:
            for part in parts:
                view = memoryview(part).cast("B")
                if self.sock is not None:
                    self.sock.sendall(view)
                    continue
                while view:
                    view = view[os.write(self.fd, view):]

    def recv_into(self, view: memoryview) -> int:
        """Fill `view`; returns how much came before the end of the stream."""
        got = 0
        while got < len(view):
            n = self.sock.recv_into(view[got:]) if self.sock is not None else os.readv(self.fd, [view[got:]])
            if n == 0:
                break
            got += n
        self.received += got
        return got

    def close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
            self.sock = None


def connect(url: str, tls: Tls | None) -> Channel:
    """The sending side's channel: stdout for `-`, else a connection to the destination."""
    if url == "-":
        return Channel("stdout", fd=1)
    host, port = address(url)
    try:
        sock = socket.create_connection((host, port), timeout=30)
        sock.settimeout(None)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if tls is not None:
            sock = tls.context(server=False).wrap_socket(sock, server_hostname=host)
    except ssl.SSLError as err:
        raise StreamError(f"{url}: TLS handshake failed: {err.reason or err}") from err
    except OSError as err:
        raise StreamError(f"{url}: cannot connect: {describe(err)}") from err
    return Channel(url, sock)


def encode_header(flags: int = 0) -> bytes:
    head = HEADER.pack(MAGIC, VERSION, schema.MAJOR, schema.MINOR, flags, 0)
    return head[:16] + zlib.crc32(head[:16]).to_bytes(4, "little")


def check_header(data: bytes, name: str) -> int:
    """The header's flags (SERIES), once it is checked."""
    if len(data) < HEADER.size:
        raise StreamError(f"{name}: the stream ended after {len(data)} bytes, before its {HEADER.size}-byte header")
    magic, version, major, minor, flags, crc = HEADER.unpack(data)
    if magic != MAGIC:
        raise ImageCorrupt(f"{name}: not a procsnap stream: magic expected {MAGIC!r}, found {magic!r}")
    if zlib.crc32(data[:16]) != crc:
        raise ImageCorrupt(f"{name}: stream header crc32 expected {zlib.crc32(data[:16]):#x}, found {crc:#x}")
    if version != VERSION:
        raise ImageVersionError(f"{name}: stream version {version}; this procsnap reads stream version {VERSION}")
    if major != schema.MAJOR:
        raise ImageVersionError(f"{name}: an image of format version {major}.{minor}; "
                                f"this procsnap reads version {schema.MAJOR}.x")
    return flags


def frame_header(tag: bytes, file: int, offset: int, payload) -> bytes:
    head = FRAME.pack(tag, file, offset, len(payload), data_hash(payload) if len(payload) else 0, 0)
    return head[:28] + zlib.crc32(head[:28]).to_bytes(4, "little")


def send_frame(channel: Channel, tag: bytes, file: int = 0, offset: int = 0, payload=b"") -> None:
    channel.send(frame_header(tag, file, offset, payload), payload)


def json_payload(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


class FrameReader:
    """Frames from a channel, every one checked (header crc32, tag, length,
    payload xxh3); the payload is a view of a buffer reused by the next."""

    def __init__(self, channel: Channel):
        self.channel = channel
        self.buffer = memoryview(bytearray(MAX_FRAME))
        self.head = memoryview(bytearray(FRAME.size))
        self.count = 0

    def where(self) -> str:
        return f"{self.channel.name}: frame {self.count} at byte {self.channel.received}"

    def read(self, allowed=TAGS, before="before the image was complete (no END)") -> tuple[bytes, int, int, memoryview]:
        got = self.channel.recv_into(self.head)
        self.count += 1
        if got < FRAME.size:
            raise StreamError(f"{self.where()}: the stream ended " + (before if got == 0 else "inside a frame header"))
        tag, file, offset, length, xxh3, crc = FRAME.unpack(self.head)
        if zlib.crc32(self.head[:28]) != crc:
            raise ImageCorrupt(f"{self.where()}: frame header crc32 expected {crc:#x}, "
                               f"found {zlib.crc32(self.head[:28]):#x}")
        if tag not in allowed:
            raise ImageCorrupt(f"{self.where()}: frame tag expected {b'/'.join(allowed).decode()}, found {tag!r}")
        if length > MAX_FRAME:
            raise ImageCorrupt(f"{self.where()}: frame length expected <= {MAX_FRAME}, found {length}")
        payload = self.buffer[:length]
        if self.channel.recv_into(payload) < length:
            raise StreamError(f"{self.where()}: the stream ended inside a {tag.decode().strip()} frame")
        found = data_hash(payload) if length else 0
        if found != xxh3:
            raise ImageCorrupt(f"{self.where()}: {tag.decode().strip()} payload xxh3 expected {xxh3:#x}, "
                               f"found {found:#x}")
        return tag, file, offset, payload


def read_json(payload: memoryview, where: str) -> dict:
    try:
        obj = json.loads(bytes(payload))
    except ValueError as err:
        raise ImageCorrupt(f"{where}: payload expected JSON: {err}") from err
    if not isinstance(obj, dict):
        raise ImageCorrupt(f"{where}: payload expected a JSON object")
    return obj


# --------------------------------------------------------------------------
# The sending side: a dump's staging (dumper: remote.staged) and the files
# ImageWriter writes (remote.backend: page_sink, Output, put).

_SENDERS: dict[str, "Sender"] = {}


class Sender:
    """One dump's stream: files by index, frames under the channel's lock."""

    def __init__(self, channel: Channel):
        self.channel = channel
        self.id = f"{os.getpid()}.{id(self):x}"
        self.files: dict[str, int] = {}
        self.lock = threading.Lock()
        self.opening = threading.Lock()  # FILE frames go out in index order
        self.frames = 0
        self.bytes = 0

    def _send(self, tag: bytes, file: int = 0, offset: int = 0, payload=b"") -> None:
        try:
            send_frame(self.channel, tag, file, offset, payload)
        except OSError as err:
            raise StreamError(f"{self.channel.name}: the stream broke off after {self.bytes} bytes of data: "
                              f"{describe(err)}") from err
        with self.lock:
            self.frames += 1
            if tag == DATA:
                self.bytes += len(payload)

    def file(self, path: str) -> int:
        rel = path[len(PREFIX):].partition("/")[2]
        with self.opening:
            if rel not in self.files:
                self._send(FILE, len(self.files), 0, rel.encode())
                self.files[rel] = len(self.files)
            return self.files[rel]

    def data(self, file: int, offset: int, data) -> None:
        view = memoryview(data).cast("B")
        for at in range(0, len(view), MAX_FRAME):
            self._send(DATA, file, offset + at, view[at : at + MAX_FRAME])

    def size(self, file: int, size: int) -> None:
        self._send(SIZE, file, size)

    def end(self) -> None:
        """The image is complete: END, then (on a connection) the receiver's answer."""
        self._send(END, 0, 0, json_payload({"files": len(self.files), "frames": self.frames, "bytes": self.bytes}))
        if not self.channel.duplex:
            return
        reader = FrameReader(self.channel)
        try:
            tag, _, _, payload = reader.read((ACK, FAIL))
        except OSError as err:
            raise StreamError(f"{self.channel.name}: no answer to the end of the stream: {describe(err)}") from err
        except StreamError as err:
            raise StreamError(f"{self.channel.name}: the receiver did not acknowledge the stream "
                              f"(it ended before an answer)") from err
        if tag == FAIL:
            raise StreamError(f"{self.channel.name}: the receiver refused the image: "
                              f"{bytes(payload).decode(errors='replace')}")
        log.info("%s: acknowledged: %s", self.channel.name, bytes(payload).decode(errors="replace"))

    def finish(self, source: str) -> None:
        with contextlib.suppress(StreamError):  # the image is acknowledged: this is a courtesy
            self._send(DONE, 0, 0, json_payload({"source": source}))

    def abort(self, why: str) -> None:
        with contextlib.suppress(StreamError):
            self._send(ABRT, 0, 0, why.encode())


def sender(path: str) -> Sender:
    return _SENDERS[path[len(PREFIX):].partition("/")[0]]


class Output:
    """A file of the image being sent, written by position (ghosts.img, or
    pages.img in chunks); every byte goes out as it is written."""

    def __init__(self, path: str):
        self.sender = sender(path)
        self.file = self.sender.file(path)
        self.size = 0
        self.lock = threading.Lock()

    def pwrite(self, data, offset: int) -> int:
        n = len(memoryview(data).cast("B"))
        self.sender.data(self.file, offset, data)
        with self.lock:
            self.size = max(self.size, offset + n)
        return n

    def write_at_end(self, data) -> None:
        self.pwrite(data, self.size)

    def close(self, size: int | None = None) -> None:
        self.sender.size(self.file, self.size if size is None else size)

    def abort(self) -> None:
        pass  # the whole stream is aborted by its staging


def put(path: str, data: bytes) -> None:
    out = Output(path)
    out.pwrite(data, 0)
    out.close()


def page_sink(path: str, compress: bool, sealer):
    """pages.img as a directory image has it: plain, or in chunks when compressed or encrypted."""
    if compress or sealer is not None:
        return ChunkedPageSink(path, compress, sealer, Output(path))
    return StreamPageSink(path)


class StreamPageSink(FilePageSink):
    """A plain pages.img, each submitted run sent as DATA at its offset (the
    run's xxh3 is computed as for a file; the frame carries its own)."""

    def __init__(self, path: str):
        super().__init__(path, local=False)
        self.out = Output(path)

    def _write(self, jobs) -> None:
        for _, offset, data in jobs:
            self.out.pwrite(data, offset)
        self._hash(jobs)

    def close(self):
        runs = super().close()
        self.out.close(self.offset)
        return runs


class SendStaging:
    """What dump() writes into (`path`); `swap_in` is the end of the stream
    and waits for the receiver's acknowledgement (and then for after_ack)."""

    replaces = None

    def __init__(self, stream: Sender, after_ack=None):
        self.stream = stream
        self.path = PREFIX + stream.id
        self.after_ack = after_ack

    def swap_in(self) -> None:
        self.stream.end()
        if self.after_ack is not None:
            self.after_ack()


@contextlib.contextmanager
def staged(url: str, tls: Tls | None = None, leave_running: bool = False, channel: Channel | None = None,
           flags: int = 0, after_ack=None):
    """A dump into a stream: yields a SendStaging. On an error the receiver
    is told (ABRT) and keeps nothing; after success it hears whether the
    source was killed or runs on (DONE). channel: one already open (a
    migration's, which stays open), else a connection to `url`."""
    own = channel is None
    channel = connect(url, tls) if own else channel
    stream = Sender(channel)
    _SENDERS[stream.id] = stream
    try:
        try:
            channel.send(encode_header(flags))
        except OSError as err:
            raise StreamError(f"{url}: cannot write the stream: {describe(err)}") from err
        staging = SendStaging(stream, after_ack)
        try:
            yield staging
        except BaseException as err:
            if not isinstance(err, StreamError):
                stream.abort(describe(err) if isinstance(err, OSError) else str(err) or type(err).__name__)
            raise
        stream.finish("running" if leave_running else "killed")
    finally:
        del _SENDERS[stream.id]
        if own:
            channel.close()
