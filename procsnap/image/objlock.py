"""One dump (or gc) at a time under an s3:// prefix: PREFIX/LOCK.

A local image directory is locked with flock (staging.py); object storage
has no locks, so the lock is an object holding its owner:

    PREFIX/LOCK     "TOKEN HOST PID STARTTIME UNIXTIME\\n"   (TOKEN: 16 random bytes, hex)

Taking it: GET it; if it is there and its owner may still run, the prefix
is busy (ImageWriteError naming the owner). Otherwise PUT our own, with
If-None-Match: * (If-Match the stale one's ETag when taking one over), then
wait SETTLE_S and read it back: another token means another dump took it
at the same moment, and we back off. A server that honours the condition
refuses the second PUT itself and the lock is exact (AWS S3 documents
412, or 409 for two at once; not tried here). One that ignores it (s3rver 3.7.1 does: a second conditional PUT
succeeds) leaves a window: two dumps that both GET no lock, and whose PUTs
are more than SETTLE_S apart, each read back their own token. The first
PUT's owner reads back after SETTLE_S, so the second dump must have spent
longer than that between its GET and its PUT (one request) to slip through.

A lock whose owner ran on this host and is gone (no such pid, or another
process now has it: its start time differs) is stale and taken over; one
from another host is not, the message says how to remove it. Released
(deleted) only while it still holds our token.
"""

from __future__ import annotations

import contextlib
import os
import time

from ..errors import ImageWriteError
from . import objstore

LOCK = "LOCK"
SETTLE_S = 0.5


def _starttime(pid: int) -> str:
    """Field 22 of /proc/PID/stat: with the pid, names one process for good."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rpartition(")")[2].split()[19]


def _hostname() -> str:
    """gethostname(2) as socket.gethostname returns it (the UTS nodename), without importing
    socket (~6 ms) into every dump: this module comes with image/objseries.py."""
    return os.uname().nodename


def _owner() -> str:
    me = os.getpid()
    return f"{_hostname()} {me} {_starttime(me)}"


def _get(url: str) -> tuple[str, str] | None:
    """(text, ETag) of the lock object, None if there is none."""
    bucket, key = objstore.split(url)
    try:
        with objstore._errors(url, "GET", ImageWriteError):
            r = objstore.client().get_object(Bucket=bucket, Key=key)
            return r["Body"].read().decode(errors="replace"), r.get("ETag", "")
    except objstore.ImageCorrupt:  # _errors' "missing"
        return None


def _stale(text: str) -> bool:
    """Its owner ran here and is gone."""
    fields = text.split()
    if len(fields) != 5 or fields[1] != _hostname() or not fields[2].isdigit():
        return False
    try:
        return _starttime(int(fields[2])) != fields[3]
    except (OSError, ValueError):
        return True


def _busy(url: str, text: str) -> ImageWriteError:
    fields = text.split()
    if len(fields) == 5 and fields[4].isdigit():
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(int(fields[4])))
        who = f"pid {fields[2]} on {fields[1]}, since {since}"
    else:
        who = f"owner {text.strip()[:80]!r}"
    return ImageWriteError(f"{url}: another dump into it is in progress ({who}); "
                           f"if none is running, delete {url}/{LOCK}")


@contextlib.contextmanager
def locked(url: str):
    """Hold PREFIX/LOCK of s3://BUCKET/PREFIX for the block, or ImageWriteError."""
    lock_url = f"{url.rstrip('/')}/{LOCK}"
    bucket, key = objstore.split(lock_url)
    token = os.urandom(16).hex()
    mine = f"{token} {_owner()} {int(time.time())}\n"
    found = _get(lock_url)
    if found is not None and not _stale(found[0]):
        raise _busy(url, found[0])
    condition = {"IfNoneMatch": "*"} if found is None else {"IfMatch": found[1]}
    try:
        with objstore._errors(lock_url, "PUT", ImageWriteError):
            objstore.client().put_object(Bucket=bucket, Key=key, Body=mine.encode(), **condition)
    except ImageWriteError as err:
        code = getattr(err.__cause__, "response", {}).get("Error", {}).get("Code")
        if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
            raise _busy(url, (_get(lock_url) or ("?", ""))[0]) from err
        raise
    time.sleep(SETTLE_S)
    now = _get(lock_url)
    if now is None or now[0] != mine:
        raise _busy(url, now[0] if now else "?")
    try:
        yield
    finally:
        with contextlib.suppress(Exception):  # an unreleased lock is stale (same host) or named in the error
            now = _get(lock_url)
            if now is not None and now[0] == mine:
                objstore.client().delete_object(Bucket=bucket, Key=key)
