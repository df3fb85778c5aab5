"""A dump writes beside the image already in its directory, never over it,
and swaps in only a complete image; a dump that fails, is killed or runs out
of disk leaves the image that was there.

    DIR/.procsnap-new.XXXX/  a dump being written; incomplete, so the next
                             dump removes it (a reader never looks at it)
    DIR/.procsnap-swap/      complete: the old image is being moved out ...
    DIR/.procsnap-old/       ... into here, kept until the dump succeeds
    DIR/.procsnap-in/        the old image is out: the new one is moving in,
                             its procsnap.img last

The rename of .procsnap-new.XXXX to .procsnap-swap commits the new image:
SIGKILLed from then on, the directory holds the new image, before it the
old one. A dump that fails with an error after the commit (the tree could
not be killed, say) puts the old image back. Whatever is cut short is
finished by the next procsnap that opens DIR (`finish_swap`, idempotent):

    .procsnap-swap           move the old entries out, then rename to -in
    .procsnap-in             move its entries in (procsnap.img last)
    .procsnap-old, DIR has procsnap.img      the swap was done: remove it
    .procsnap-old, DIR has no procsnap.img   a roll-back was cut short:
                                             put the old image back

Only the image's own entries are moved; anything else in DIR is left
alone. A dump holds an exclusive flock on DIR throughout, so two dumps
never share it, and a reader that finds a swap under way waits for it.
"""

from __future__ import annotations

import contextlib
import fcntl
from .. import log as logging  # the logging API, cheap to import
import os
import re
import time

from .. import faults
from ..errors import ImageError, ImageWriteError, ProcsnapError
from . import schema

NEW_PREFIX = ".procsnap-new."
SWAP = ".procsnap-swap"
OLD = ".procsnap-old"
IN = ".procsnap-in"
log = logging.getLogger("procsnap.staging")
_ENTRY = re.compile(r"proc\.\d+")  # a non-root process's image (dumper.tree.IMAGE_DIR)


def is_image_entry(name: str) -> bool:
    return name in (schema.INVENTORY, schema.PAGES, schema.GHOSTS, schema.INVENTORY + ".tmp") \
        or _ENTRY.fullmatch(name) is not None


def _entries(directory: str) -> list[str]:
    """The image entries of `directory`, its inventory (the commit) at the end."""
    names = sorted(n for n in os.listdir(directory) if is_image_entry(n))
    if schema.INVENTORY in names:
        names.remove(schema.INVENTORY)
        names.append(schema.INVENTORY)
    return names


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def finish_swap(directory: str) -> None:
    """Complete a swap or a roll-back cut short, if there is one (see above)."""
    _move_out(directory)
    _move_in(directory)
    old = os.path.join(directory, OLD)
    if os.path.isdir(old):
        if os.path.exists(os.path.join(directory, schema.INVENTORY)):
            _rmtree(old)
        else:
            _roll_back(directory)


def _move_out(directory: str) -> None:
    swap, old, into = (os.path.join(directory, n) for n in (SWAP, OLD, IN))
    if os.path.isdir(swap):
        os.makedirs(old, exist_ok=True)
        for name in reversed(_entries(directory)):  # the old inventory first: the old image is gone
            os.rename(os.path.join(directory, name), os.path.join(old, name))
        _fsync_dir(directory)
        os.rename(swap, into)
        _fsync_dir(directory)


def _move_in(directory: str) -> None:
    into = os.path.join(directory, IN)
    if os.path.isdir(into):
        for name in _entries(into):  # the new inventory last
            os.rename(os.path.join(into, name), os.path.join(directory, name))
        _fsync_dir(directory)
        os.rmdir(into)


def _mkdtemp(directory: str) -> str:
    """tempfile.mkdtemp(prefix=NEW_PREFIX, dir=directory), without importing
    tempfile (and random, hashlib) in every dump."""
    while True:
        path = os.path.join(directory, NEW_PREFIX + os.urandom(6).hex())
        try:
            os.mkdir(path, 0o700)
            return path
        except FileExistsError:
            continue


def _rmtree(path: str, ignore_errors: bool = False) -> None:
    if ignore_errors and not os.path.lexists(path):
        return
    try:
        os.rmdir(path)  # an empty one, as the old image's directory of a first dump is
        return
    except OSError:
        pass
    import shutil  # only when there is something to remove: it imports bz2, lzma and more

    shutil.rmtree(path, ignore_errors=ignore_errors)


def _roll_back(directory: str) -> None:
    """Put the old image (in .procsnap-old) back in place of the new one."""
    trash = _mkdtemp(directory)  # what a dump removes if we die here
    into = os.path.join(directory, IN)
    if os.path.isdir(into):
        os.rename(into, os.path.join(trash, IN))
    for name in reversed(_entries(directory)):  # the new inventory first
        os.rename(os.path.join(directory, name), os.path.join(trash, name))
    _fsync_dir(directory)
    os.rename(os.path.join(directory, OLD), into)
    _move_in(directory)
    _rmtree(trash)


def settle_for_reading(directory: str) -> None:
    """A reader's part: finish a swap or roll-back cut short (waiting for a
    dump that is swapping right now). Cheap when there is none: three stats."""
    if not any(os.path.isdir(os.path.join(directory, n)) for n in (SWAP, IN, OLD)):
        return
    try:
        with _locked(directory, wait=True):
            finish_swap(directory)
    except OSError as err:
        raise ImageError(f"{directory}: a dump's swap was cut short and cannot be finished: "
                         f"{err.strerror or err}") from err


@contextlib.contextmanager
def _locked(directory: str, wait: bool):
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError as err:
            raise ImageWriteError(f"{directory}: another dump into it is in progress") from err
        yield
    finally:
        os.close(fd)


def locked(directory: str):
    """Hold the dumps' lock on `directory` for a block, or ImageWriteError (gc's, before it removes an image)."""
    return _locked(directory, wait=False)


def describe_image(directory: str) -> str | None:
    """'the image of pid 1234 taken 2026-12-01 10:00:01' if `directory`
    holds an image (None if not), read from its inventory alone."""
    path = os.path.join(directory, schema.INVENTORY)
    if not os.path.exists(path):
        return None
    taken = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(os.stat(path).st_mtime))
    pid = inventory_pid(directory)
    return f"{unreadable(directory)} written {taken}" if pid is None else f"the image of pid {pid} taken {taken}"


def unreadable(location: str) -> str:
    """'an encrypted image' (its pid is sealed) or 'an unreadable image'."""
    from . import objstore

    path = os.path.join(location, schema.INVENTORY)
    n = schema.HEADER.size + len(schema.CRYP)
    try:
        if objstore.is_url(location):
            head = objstore.read_range(path, 0, n)
        else:
            with open(path, "rb") as f:
                head = f.read(n)
    except (OSError, ImageError):
        head = b""
    return "an encrypted image" if head[schema.HEADER.size:] == schema.CRYP else "an unreadable image"


def inventory_pid(location: str) -> int | None:
    """The pid an image's inventory holds, None if it cannot be read (or is encrypted)."""
    from .reader import read_records

    try:
        _, _, records = read_records(location)
        return next(payload.get("pid") for tag, _, payload in records if tag == b"TASK")
    except (ImageError, StopIteration):
        return None


class Staging:
    """Where one dump writes (`path`); `swap_in` makes it DIR's image."""

    def __init__(self, directory: str):
        self.directory = directory
        self.replaces = describe_image(directory)
        self.path = _mkdtemp(directory)
        self.swapped = False

    def swap_in(self) -> None:
        """Commit the complete image in `path` and move it into place; the
        old one stays in .procsnap-old until `finish`."""
        with _write_errors(self.directory):
            _fsync_dir(self.path)
            os.rename(self.path, os.path.join(self.directory, SWAP))  # the commit
            self.swapped = True
            _fsync_dir(self.directory)
            _move_out(self.directory)
            faults.point("mid-swap")
            _move_in(self.directory)

    def finish(self) -> None:
        """The dump succeeded: drop the old image."""
        with _write_errors(self.directory):
            _rmtree(os.path.join(self.directory, OLD), ignore_errors=True)

    def abandon(self) -> None:
        """The dump failed: the directory as it was."""
        with _write_errors(self.directory):
            if not self.swapped:
                _rmtree(self.path, ignore_errors=True)
                return
            _move_out(self.directory)
            _roll_back(self.directory)


def make_image_dir(directory: str) -> None:
    """Create `directory` (and its parents) if missing, like CRIU's -D."""
    try:
        os.makedirs(directory, exist_ok=True)
    except FileExistsError as err:
        raise ImageWriteError(f"{directory}: not a directory") from err
    except OSError as err:
        raise ImageWriteError(f"{directory}: cannot create it: {err.strerror}") from err
    if not os.path.isdir(directory):
        raise ImageWriteError(f"{directory}: not a directory")


@contextlib.contextmanager
def _write_errors(directory: str):
    try:
        yield
    except OSError as err:
        raise ImageWriteError(f"{directory}: {err.strerror or err}"
                              + (f": {err.filename}" if err.filename else "")) from err


@contextlib.contextmanager
def staged(directory: str):
    """Lock `directory` (made if missing), finish or drop what an earlier
    dump left there, and yield a Staging beside its image. On success the
    old image is dropped; on an error the directory is left as it was."""
    make_image_dir(directory)
    with contextlib.ExitStack() as stack:
        with _write_errors(directory):
            stack.enter_context(_locked(directory, wait=False))
            finish_swap(directory)
            for name in os.listdir(directory):
                if name.startswith(NEW_PREFIX):
                    _rmtree(os.path.join(directory, name), ignore_errors=True)
            staging = Staging(directory)
        try:
            yield staging
        except BaseException:
            try:
                staging.abandon()
            except ProcsnapError as err:  # the dump's own error is the one to report
                log.warning("%s", err)
            raise
        staging.finish()
