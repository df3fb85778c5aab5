"""Where an image that is not a local directory is written: the one place
that tells the backends apart by their location's prefix.

    s3://BUCKET/PREFIX    object storage (objstore.py)
    stream://ID/...       a dump being sent over a stream (stream.py)

A backend module offers `page_sink(path, compress, sealer)`, `Output(path)`
(pwrite, write_at_end, close, abort) and `put(path, data)`, which
ImageWriter uses for pages.img, ghosts.img and procsnap.img.
"""

from __future__ import annotations

from . import objstore

STREAM = "stream://"


def is_stream_url(location: str) -> bool:
    """Where a dump streams its image (stream.py): `-` or tcp://HOST:PORT."""
    return location == "-" or str(location).startswith("tcp://")


def backend(location: str):
    """The module that writes `location`, or None for a local directory."""
    if objstore.is_url(location):
        return objstore
    if str(location).startswith(STREAM):
        from . import stream  # imports writer.py, which imports this module

        return stream
    return None
