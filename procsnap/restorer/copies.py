"""restore --copies N: one image restored N times at once, each copy in
namespaces of its own (objects/namespaces.py), so that their pids, all the
image's, never meet. A copy is a restore like any other; all N are made,
or none is left: a copy that fails kills and reaps the ones made before.
"""

from __future__ import annotations

import contextlib
import os
import signal

from ..errors import RestoreError
from ..image.reader import open_image


def restore_copies(images_dir: str, copies: int, **options) -> list[int]:
    """`copies` restores of `images_dir` (options: restore()'s); the host pid of each copy's root."""
    from . import restore

    if copies < 1:
        raise RestoreError(f"{images_dir}: --copies {copies}: at least one copy")
    if copies > 1 and not open_image(images_dir, key=options.get("key")).checkpoint.namespaces:
        raise RestoreError(f"{images_dir}: --copies {copies}: its tree is not the init of a pid namespace of its "
                           "own, so its pids can be taken only once (dump a container's init for copies)")
    pids: list[int] = []
    try:
        for _ in range(copies):
            pids.append(restore(images_dir, **options))
    except BaseException:
        for pid in pids:  # the init of its namespace: the whole copy goes with it
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        raise
    return pids
