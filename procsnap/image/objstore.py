"""Images in object storage: -D s3://BUCKET/PREFIX (pip install 'procsnap[s3]').

The client is boto3's, configured the standard way (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, AWS_PROFILE
and the config files). Under PREFIX:

    PREFIX/CURRENT              the name of the generation that is the image
    PREFIX/gen-TIME-RANDOM/     one image: procsnap.img, pages.img, ghosts.img, proc.PID/...

A dump writes a new generation beside the current one and PUTs CURRENT
last (one object, replaced whole: the commit); only then are the old
generation and any left by a dump that died removed. A dump killed or cut
off from the server before that leaves CURRENT, and so the previous image,
as they were. An image in object storage is always written in chunks
(chunks.py; raw ones when not compressed): pages.img and ghosts.img are
uploaded as they are produced, in PART_SIZE parts on UPLOADERS threads
(multipart upload, no local copy), and a reader checks and a restore
fetches them chunk by chunk with ranged GETs.
"""

from __future__ import annotations

import contextlib
import functools
from .. import log as logging  # the logging API, cheap to import
import os
import threading
import time

from .. import workers
from ..errors import ImageCorrupt, ImageError, ImageWriteError, ProcsnapError

SCHEME = "s3://"
CURRENT = "CURRENT"
GEN_PREFIX = "gen-"
PART_SIZE = 8 << 20  # S3 wants parts of 5 MiB or more, but the last
UPLOADERS = 4
log = logging.getLogger("procsnap.objstore")


def is_url(location: str) -> bool:
    return str(location).startswith(SCHEME)


def split(url: str) -> tuple[str, str]:
    """(bucket, key prefix without a trailing slash) of s3://BUCKET/PREFIX."""
    rest = url[len(SCHEME):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ImageError(f"{url}: expected s3://BUCKET/PREFIX")
    return bucket, key.strip("/")


def _key(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name


@functools.cache
def client():
    try:
        import boto3
        from botocore.config import Config
    except ImportError as err:
        raise ImageError("s3:// images need boto3: pip install 'procsnap[s3]'") from err
    # retries: a server gone away is reported in seconds, not after boto3's default minutes
    return boto3.client("s3", config=Config(retries={"max_attempts": 2, "mode": "standard"},
                                            connect_timeout=5, read_timeout=60,
                                            max_pool_connections=UPLOADERS + 4))


@contextlib.contextmanager
def _errors(url: str, what: str, cls=ImageError):
    """botocore's errors as one line naming the object."""
    try:
        yield
    except ProcsnapError:
        raise
    except Exception as err:  # botocore raises ClientError, EndpointConnectionError, NoCredentialsError ...
        code = getattr(err, "response", {}).get("Error", {}).get("Code")
        if code in ("NoSuchKey", "404", "NotFound"):
            raise ImageCorrupt(f"{url}: missing (not an image, or an incomplete one)") from err
        if code == "NoSuchBucket":
            raise ImageError(f"{url}: no such bucket") from err
        if type(err).__module__.startswith(("botocore", "boto3", "urllib3")):
            raise cls(f"{url}: {what}: {err}") from err
        raise


def read(url: str) -> bytes:
    bucket, key = split(url)
    with _errors(url, "GET"):
        return client().get_object(Bucket=bucket, Key=key)["Body"].read()


def size(url: str) -> int:
    bucket, key = split(url)
    with _errors(url, "HEAD"):
        return client().head_object(Bucket=bucket, Key=key)["ContentLength"]


def read_range(url: str, offset: int, length: int) -> bytes:
    if length == 0:
        return b""
    bucket, key = split(url)
    with _errors(url, f"GET bytes {offset}-{offset + length - 1}"):
        return client().get_object(Bucket=bucket, Key=key, Range=f"bytes={offset}-{offset + length - 1}")["Body"].read()


def put(url: str, data: bytes) -> None:
    bucket, key = split(url)
    with _errors(url, "PUT", ImageWriteError):
        client().put_object(Bucket=bucket, Key=key, Body=data)


def resolve(url: str) -> str:
    """The generation that s3://BUCKET/PREFIX's CURRENT names (a URL)."""
    if any(part.startswith(GEN_PREFIX) for part in split(url)[1].split("/")):
        return url  # in a generation already (a tree's other images, or one given as such)
    name = read(f"{url.rstrip('/')}/{CURRENT}").decode(errors="replace").strip()
    if not name.startswith(GEN_PREFIX) or "/" in name:
        raise ImageCorrupt(f"{url}/{CURRENT}: names {name!r}, not a generation")
    return f"{url.rstrip('/')}/{name}"


class RangeFile:
    """Enough of a read-only file over an object for Image.load_blob."""

    def __init__(self, url: str):
        self.url, self.pos = url, 0

    def seek(self, pos: int) -> None:
        self.pos = pos

    def read(self, n: int) -> bytes:
        data = read_range(self.url, self.pos, n)
        self.pos += len(data)
        return data

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


class Output:
    """An object written by position, uploaded in parts as they fill.

    Writers (the page sink's threads) pwrite pieces that together cover
    [0, size) without gaps, nearly in order; a part is uploaded as soon as
    all its bytes are there, at most UPLOADERS at once (a writer waits for
    a free slot), so memory stays near (UPLOADERS + 2) * PART_SIZE."""

    def __init__(self, url: str):
        self.url = url
        self.bucket, self.key = split(url)
        self.parts: dict[int, bytearray] = {}
        self.filled: dict[int, int] = {}
        self.etags: dict[int, str] = {}
        self.size = 0
        self.lock = threading.Lock()
        self.slots = threading.Semaphore(UPLOADERS)
        self.pool = workers.ThreadPool(UPLOADERS, thread_name_prefix="procsnap-upload")
        self.futures: list[workers.Job] = []
        self.upload_id = None

    def pwrite(self, data, offset: int) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            index, at = divmod(offset + done, PART_SIZE)
            n = min(len(view) - done, PART_SIZE - at)
            with self.lock:
                part = self.parts.setdefault(index, bytearray(PART_SIZE))
            part[at : at + n] = view[done : done + n]
            with self.lock:
                self.filled[index] = self.filled.get(index, 0) + n
                self.size = max(self.size, offset + done + n)
                full = self.filled[index] == PART_SIZE
            if full:
                self._upload(index, bytes(self.parts.pop(index)))
            done += n
        return len(view)

    def write_at_end(self, data) -> None:
        self.pwrite(data, self.size)

    def _upload(self, index: int, data: bytes) -> None:
        self.futures = [f for f in self.futures if not f.done() or f.exception()]
        for f in self.futures:
            if f.done():
                f.result()  # an upload failed: this dump fails now, not at the end
        with self.lock:
            if self.upload_id is None:
                with _errors(self.url, "start multipart upload", ImageWriteError):
                    self.upload_id = client().create_multipart_upload(Bucket=self.bucket, Key=self.key)["UploadId"]
        self.slots.acquire()

        def send() -> None:
            try:
                with _errors(self.url, f"upload part {index + 1}", ImageWriteError):
                    r = client().upload_part(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id,
                                             PartNumber=index + 1, Body=data)
                self.etags[index] = r["ETag"]
            finally:
                self.slots.release()

        self.futures.append(self.pool.submit(send))

    def close(self, size: int | None = None) -> None:
        """Everything written (up to `size`, if given): upload the rest and complete the object."""
        size = self.size if size is None else size
        last = (size - 1) // PART_SIZE if size else -1
        for f in self.futures:
            f.result()
        if self.upload_id is None:  # smaller than a part: one PUT
            data = bytes(self.parts.get(0, b""))[:size]
            put(self.url, data)
        else:
            for index in sorted(self.parts):
                if index <= last:
                    end = size - index * PART_SIZE
                    self._upload(index, bytes(self.parts[index][: min(end, PART_SIZE)]))
            self.parts.clear()
            for f in self.futures:
                f.result()
            missing = [i for i in range(last + 1) if i not in self.etags]
            if missing:
                raise ImageWriteError(f"{self.url}: parts {missing} were never written")
            with _errors(self.url, "complete multipart upload", ImageWriteError):
                client().complete_multipart_upload(
                    Bucket=self.bucket, Key=self.key, UploadId=self.upload_id,
                    MultipartUpload={"Parts": [{"PartNumber": i + 1, "ETag": self.etags[i]} for i in range(last + 1)]})
        self.pool.shutdown()

    def abort(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        if self.upload_id is not None:
            with contextlib.suppress(Exception):
                client().abort_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id)


def page_sink(url: str, compress: bool, sealer):
    """pages.img of an image in object storage: always in chunks (raw ones when not compressed)."""
    from .writer import ChunkedPageSink

    return ChunkedPageSink(url, compress, sealer, Output(url))


def _list(bucket: str, prefix: str) -> list[str]:
    keys = []
    for page in client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys


def _delete(bucket: str, keys: list[str]) -> None:
    for i in range(0, len(keys), 1000):
        client().delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys[i : i + 1000]]})


def describe(url: str) -> str | None:
    """'the image of pid 1234 taken ...' if the prefix holds one (None if not)."""
    from .staging import inventory_pid, unreadable

    try:
        gen = resolve(url)
    except ImageCorrupt:
        return None
    pid = inventory_pid(gen)
    return f"{unreadable(gen)} ({gen})" if pid is None else f"the image of pid {pid} ({gen.rsplit('/', 1)[-1]})"


class Staging:
    """The dump's new generation (`path`, a URL); `swap_in` makes it the image."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.bucket, self.prefix = split(self.url)
        with _errors(self.url, "read the current image", ImageWriteError):
            self.replaces = describe(self.url)
        name = f"{GEN_PREFIX}{time.strftime('%Y%m%dT%H%M%S')}-{os.urandom(4).hex()}"
        self.path = f"{self.url}/{name}"
        self.name = name
        self.swapped = False

    def swap_in(self) -> None:
        put(f"{self.url}/{CURRENT}", self.name.encode() + b"\n")  # the commit
        self.swapped = True

    def finish(self) -> None:
        """Remove every generation but the new one and those a live one refers
        to (the old image, and what dumps that died left: objseries.py)."""
        from . import objseries

        with contextlib.suppress(Exception):  # the image is committed: leftovers are removed next time
            objseries.finish(self.url, self.name)

    def abandon(self) -> None:
        if not self.swapped:
            with contextlib.suppress(Exception):
                _delete(self.bucket, _list(self.bucket, _key(self.prefix, self.name) + "/"))


@contextlib.contextmanager
def staged(url: str):
    """staging.staged for s3://: yield a Staging; on an error CURRENT is left
    as it was. One dump at a time under the prefix (objlock.py)."""
    from .objlock import locked

    client()
    with locked(url):
        staging = Staging(url)
        try:
            yield staging
        except BaseException:
            staging.abandon()
            raise
        staging.finish()
