"""The destination of a streamed dump: `receive` writes the stream into an
image directory; `restore_stream` receives into a directory and restores
from it. The wire format and its guarantees are in image/stream.py.

A restore from a stream holds the image in a directory, never in memory:
-D DIR if the caller gives one (kept afterwards), else a temporary
directory under $TMPDIR (removed once the process runs). The whole image
is received and checked (every frame's xxh3, then open_image's checks of
every record and page run, and verify's of the files it needs here)
before it is acknowledged, so the source is killed only for an image this
host can restore; the restore waits for the sender's word that the source
is gone (DONE) before it starts.
"""

from __future__ import annotations

import logging
import shutil
import tempfile

from .errors import ImageError, ProcsnapError, RestoreError
from .image import schema
from .image.receive import Received, listen, read_header, receive_into
from .image.stream import HEADER, SERIES, StreamError, Tls

log = logging.getLogger("procsnap.streaming")


def _encrypted(directory: str) -> bool:
    with open(f"{directory}/{schema.INVENTORY}", "rb") as f:
        return f.read(schema.HEADER.size + 4)[schema.HEADER.size:] == schema.CRYP


def check_received(directory: str, key: bytes | None = None) -> None:
    """The image in `directory`, whole: open_image (records, every page run's
    checksum) and every image of its tree. Without its key an encrypted
    image is checked by the stream's frame checksums alone (its records and
    pages are authenticated when it is restored)."""
    from .image.reader import open_image
    from .restorer.tree import open_tree

    if key is None and _encrypted(directory):
        log.info("%s: encrypted and no key given: checked by the stream's checksums only", directory)
        return
    open_tree(open_image(directory, key=key))


def receive(url: str, directory: str, tls: Tls | None = None, key: bytes | None = None,
            on_listen=None) -> Received:
    """Receive one streamed image (`-`: stdin; tcp://HOST:PORT or HOST:PORT:
    listen there for one connection) into `directory` (made if missing; an
    image there is replaced only by a complete, valid one)."""
    channel = listen(url, tls, on_listen)
    try:
        return receive_into(channel, directory, lambda d: check_received(d, key))
    finally:
        channel.close()


def restore_stream(url: str, directory: str | None = None, tls: Tls | None = None, on_listen=None,
                   **options) -> int:
    """Receive a streamed image and restore it; returns the root's pid.
    `options` are procsnap.restore's (key, allow_other_owner, ...)."""
    from .restorer import restore
    from .restorer.verify import verify_image

    def check(staged: str) -> None:
        problems = verify_image(staged, allow_other_owner=options.get("allow_other_owner", False),
                                allow_setuid=options.get("allow_setuid", False), key=options.get("key"))
        if problems:
            raise ImageError(f"the image cannot be restored here: {'; '.join(problems)}")

    keep = directory is not None
    if directory is None:
        directory = tempfile.mkdtemp(prefix="procsnap-stream-")
    channel = None
    try:
        channel = listen(url, tls, on_listen)
        header = read_header(channel)
        if len(header) == HEADER.size and HEADER.unpack(header)[4] & SERIES:  # a migration (migration.py)
            from .migration import receive_series

            pid = receive_series(channel, header, directory, keep, **options)
            if not keep:
                shutil.rmtree(directory, ignore_errors=True)
            return pid
        got = receive_into(channel, directory, check, durable=keep, header=header)
    except BaseException:
        if not keep:
            shutil.rmtree(directory, ignore_errors=True)
        raise
    finally:
        if channel is not None:
            channel.close()
    kept = f"; the image is kept in {directory}"
    if got.source not in ("killed", "running"):
        raise StreamError(f"{channel.name}: the sender did not say the source was killed "
                          f"({'its dump failed after the image' if got.source == 'aborted' else 'no DONE'}); "
                          f"not restoring{kept}")
    log.info("%s: %d MiB in %.2f s; the source was %s", channel.name, got.bytes >> 20, got.seconds, got.source)
    try:
        pid = restore(directory, **options)
    except ProcsnapError as err:
        raise RestoreError(f"{err}{kept}", err.pid) from err
    if not keep:
        shutil.rmtree(directory, ignore_errors=True)
    return pid
