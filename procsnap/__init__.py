"""procsnap: checkpoint and restore of live Linux processes.

    procsnap.dump(pid, images_dir, leave_running=False) -> DumpStats
    procsnap.restore(images_dir) -> pid
    procsnap.open_image(images_dir) -> Image

`progress`, where taken, is called as progress(phase, done, total) in bytes.

Errors are procsnap.errors.ProcsnapError and its subclasses. Submodules are
imported on first use, to keep the CLI's start-up short.
"""

from __future__ import annotations

from . import errors
from .errors import (AccessDenied, ImageCorrupt, ImageVersionError, ProcessGone, ProcsnapError, RestoreError,
                     Unsupported)

__version__ = "0.1.0"


def dump(pid: int, images_dir: str, leave_running: bool = False, shell_job: bool = False, progress=None,
         ext_unix_sk: bool = False, compress: bool = False, key: bytes | None = None,
         prev_images_dir: str | None = None, tls=None, tcp_established: bool = False, tcp_close: bool = False,
         net_lock: str = "", external: dict | None = None):
    """Checkpoint `pid` into `images_dir` (made if missing; an image there is
    replaced only by a complete one); kill it unless leave_running.
    compress: zstd page chunks; key: 32 bytes, the image encrypted with it.
    images_dir `-` or tcp://HOST:PORT: streamed there (tls: image.stream.Tls).
    tcp_established: live TCP connections too, locked by net_lock
    ("nftables", "iptables", "skip"); tcp_close: to be restored closed.
    external: externals.parse() of CRIU's --external specs."""
    from .dumper import dump as _dump
    from .gcpause import paused

    with paused():
        return _dump(pid, images_dir, leave_running=leave_running, shell_job=shell_job, progress=progress,
                     ext_unix_sk=ext_unix_sk, compress=compress, key=key, prev_images_dir=prev_images_dir,
                     tls=tls, tcp_established=tcp_established, tcp_close=tcp_close, net_lock=net_lock,
                     external=external)


def restore(images_dir: str, detach: bool = True, shell_job: bool = False, progress=None,
            allow_other_owner: bool = False, allow_setuid: bool = False, ext_unix_sk: bool = False,
            key: bytes | None = None, tcp_established: bool = False, tcp_close: bool = False,
            skip_net_lock: bool = False, lazy_pages: bool = False, lazy_log: str | None = None,
            lazy_server=None, external: dict | None = None, root: str | None = None,
            inherit_fd: dict[str, int] | None = None) -> int:
    """Restore the process in `images_dir` as a child of the caller; its pid.
    lazy_pages: see restorer.restore; external: externals.parse() of CRIU's
    --external specs; root: a container's root directory (CRIU's --root);
    inherit_fd: RESOURCE -> an fd of ours (inheritfd.py)."""
    from .gcpause import paused
    from .restorer import restore as _restore

    with paused():
        return _restore(images_dir, detach=detach, shell_job=shell_job, progress=progress,
                        allow_other_owner=allow_other_owner, allow_setuid=allow_setuid, ext_unix_sk=ext_unix_sk,
                        key=key, tcp_established=tcp_established, tcp_close=tcp_close,
                        skip_net_lock=skip_net_lock, lazy_pages=lazy_pages, lazy_log=lazy_log,
                        lazy_server=lazy_server, external=external, root=root, inherit_fd=inherit_fd)


def restore_copies(images_dir: str, copies: int, **options) -> list[int]:
    """`copies` independent restores of a container's image (each in new
    namespaces: restore()'s options); the pid of each copy's root."""
    from .restorer.copies import restore_copies as _copies

    return _copies(images_dir, copies, **options)


def verify(images_dir: str, allow_other_owner: bool = False, allow_setuid: bool = False,
           key: bytes | None = None) -> list[str]:
    """Every problem that would stop a restore of `images_dir` ([] if none)."""
    from .restorer.verify import verify_image

    return verify_image(images_dir, allow_other_owner=allow_other_owner, allow_setuid=allow_setuid, key=key)


def open_image(images_dir: str, key: bytes | None = None):
    """Read and fully validate an image (an encrypted one with its key)."""
    from .image.reader import open_image as _open

    return _open(images_dir, key=key)


__all__ = ["dump", "restore", "open_image", "verify", "errors", "ProcsnapError", "ProcessGone", "AccessDenied",
           "Unsupported", "ImageCorrupt", "ImageVersionError", "RestoreError"]
