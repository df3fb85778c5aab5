"""One hierarchy of errors; the CLI turns each into one line and an exit code.

The kernel layer raises OSError (errno + the call that failed). `translate`
is the one place that maps such an OSError to one of these, with the pid.
"""

from __future__ import annotations

import contextlib
import errno


class ProcsnapError(Exception):
    """Base of every error procsnap raises on purpose."""

    exit_code = 1

    def __init__(self, message: str, pid: int | None = None):
        super().__init__(message)
        self.pid = pid


class ProcessGone(ProcsnapError):
    """The process does not exist (any more)."""


class AccessDenied(ProcsnapError):
    """We may not trace or read this process."""


class Unsupported(ProcsnapError):
    """The process uses a resource procsnap does not checkpoint."""


class ImageError(ProcsnapError):
    """Base of the errors about an image directory."""


class ImageCorrupt(ImageError):
    """The image is missing, truncated, or fails a check."""


class ImageVersionError(ImageError):
    """The image was written by an unknown format version."""


class ImageWriteError(ImageError):
    """Writing the image failed (full disk, permissions...)."""


class DumpError(ProcsnapError):
    """A dump step failed for a reason not covered above."""


class RestoreError(ProcsnapError):
    """The restore failed; the image is untouched."""


def plural(n: int, noun: str, many: str | None = None) -> str:
    """'1 process', '2 processes', '0 problems'."""
    if n == 1:
        return f"1 {noun}"
    return f"{n} {many or (noun + 'es' if noun.endswith(('s', 'x', 'sh', 'ch')) else noun + 's')}"


def article(word: str) -> str:
    """'a pipe', 'an anon_inode', 'a unix socket' (a vowel sounded as 'y' or 'w' takes 'a')."""
    low = word.lower()
    vowel = low[:1] in tuple("aeiou") and not low.startswith(("uni", "use", "usu", "eu", "one"))
    return f"{'an' if vowel else 'a'} {word}"


def describe(err: BaseException) -> str:
    """An exception in words for a person: for an OSError the kernel's
    reason and the file it names, never the exception's class or errno
    number ("No such file or directory: /tmp/x", not "FileNotFoundError:
    [Errno 2] ...")."""
    if isinstance(err, OSError):
        names = [str(n) for n in (err.filename, err.filename2) if n is not None]
        reason = err.strerror or (str(err.args[0]) if err.args else "failed")
        return f"{reason}: {' -> '.join(names)}" if names else reason
    return str(err) or "failed"


def translate(err: OSError, pid: int | None, what: str) -> ProcsnapError:
    """Map an OSError raised by the kernel layer into the hierarchy."""
    detail = f"{what}: {err.strerror or err}"
    prefix = f"pid {pid}: " if pid is not None else ""
    if err.errno == errno.ENOENT and err.filename and not str(err.filename).startswith("/proc/"):
        return ProcsnapError(f"{prefix}{detail}: {err.filename}", pid)  # a file, not the process, is missing
    if err.errno in (errno.ESRCH, errno.ENOENT):
        return ProcessGone(f"{prefix}{detail} (no such process)", pid)
    if err.errno in (errno.EPERM, errno.EACCES):
        return AccessDenied(f"{prefix}{detail}", pid)
    if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        return ImageWriteError(f"{prefix}{detail}", pid)
    return ProcsnapError(f"{prefix}{detail}", pid)


@contextlib.contextmanager
def translated(pid: int | None, what: str, cls: type[ProcsnapError] | None = None):
    """Run a block whose OSErrors become procsnap errors naming `what`."""
    try:
        yield
    except ProcsnapError:
        raise
    except OSError as err:
        if cls is not None:
            raise cls(f"pid {pid}: {what}: {err.strerror or err}", pid) from err
        raise translate(err, pid, what) from err
