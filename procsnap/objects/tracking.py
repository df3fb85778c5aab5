"""The record a pre-dump image carries (TRAK): how the pages written since
it are found at the next pass, and where that tracking lives in the
target (dumper/predump.py does the tracking).

A pre-dump image is a parent, never a thing to restore: its pages were
copied while the process ran (each pass copies what changed since the
last, the final `dump --prev-images-dir` makes the whole consistent), so a
restore of one is refused here, before anything is made.
"""

from __future__ import annotations

from .. import records as dataclasses  # the dataclasses API, cheap to import

from .. import model
from ..errors import RestoreError

UFFD_WP = "uffd-wp"  # userfaultfd async write-protection + PAGEMAP_SCAN (kernel/uffdwp.py)
HASHES = "hashes"  # no tracking in the target: pages compared by content (image/series.py)


@dataclasses.dataclass
class Tracking:
    """One pass of a pre-dump of process `pid`."""

    method: str  # UFFD_WP or HASHES
    pid: int
    start_time: int  # of the process (/proc/PID/stat field 22): not another process with its pid
    passes: int  # 1 for the first pre-dump, parent's + 1 after
    uffd: int = -1  # UFFD_WP: the target's fd of the userfaultfd procsnap made in it
    uffd_ino: int = 0  # its inode (each userfaultfd has its own)
    ranges: list[list[int]] = dataclasses.field(default_factory=list)  # [start, end] registered and protected
    copied: int = 0  # pages this pass read from the process
    referred: int = 0  # pages this pass referred to in its parents


def collect_seized(target, tids: list[int], ckpt: model.Checkpoint) -> None:
    """Filled by the pre-dump itself, not by a dump."""


def restore_seized(target, ckpt: model.Checkpoint, tree_pids: set[int]) -> None:
    """Nothing: a pre-dump image is refused before (check_restore)."""


def _problem(t: Tracking) -> str:
    return (f"pid {t.pid}: the image is a pre-dump (pass {t.passes}, its pages copied while the process ran); "
            "restore the final image made with procsnap dump --prev-images-dir")


def check_restore(ckpt: model.Checkpoint) -> None:
    for t in ckpt.tracking:
        raise RestoreError(_problem(t), t.pid)


def verify(root: model.Checkpoint) -> list[str]:
    """What `procsnap verify` says of a pre-dump image (a kind's hook)."""
    return [_problem(t) for t in root.tracking]
