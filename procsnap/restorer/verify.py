"""verify: everything a restore needs, checked without touching a process.

`verify_image` lists every problem it finds, not just the first: the image
itself (open_image: checksums, records, page runs, consistency), the files
it needs (every mapped file and the executable still there with the size
and mtime they had at dump; files of fds still there), the policy (who may
restore what, below) and the kernel features the restore uses.

Policy (the threat model, see README): a restore runs with the restoring
user's credentials and opens every file with them, so it never reaches a
file that user could not open. Two things could still grant more than the
image's owner had, and are refused unless asked for explicitly:
  - an image dumped from a process of other credentials (uid/gid) than the
    restoring user's: with allow_other_owner, root may restore it (its
    credentials are restored, objects/creds.py). Not asked for: a process
    below a tree root that has root's own credentials, when root restores
    (nginx's workers, which its master made nobody): the root could give
    any uid, so restoring theirs gives nothing the image's owner lacked;
  - a set-uid or set-gid executable or mapped file: the restored process
    would show it as its exe without having been exec'd through it
    (allow_setuid).
"""

from __future__ import annotations

import os
import stat

from .. import model, nsworker, objects
from ..errors import ImageCorrupt, RestoreError
from ..image.reader import Image, open_image
from ..objects.cgroups import cgroup_problems
from ..objects.file import changed_since_dump


def _file_problems(ckpt: model.Checkpoint, allow_setuid: bool, inherited=frozenset()) -> list[str]:
    """inherited: paths the caller gives as open files (restore --inherit-fd): not opened, if only fds hold them."""
    problems = []
    mapped = {v.file_id for v in ckpt.vmas if v.kind in (model.VmaKind.FILE_PRIVATE, model.VmaKind.FILE_SHARED)}
    mapped.add(ckpt.mm.exe_file_id)
    for ref in ckpt.files:
        if ref.path in inherited and ref.id not in mapped:
            continue
        try:
            st = os.stat(nsworker.in_root(ref.path))
        except OSError as err:
            problems.append(f"file {ref.path}: {err.strerror}")
            continue
        if ref.id in mapped:
            why = changed_since_dump(ref, st)
            if why:
                problems.append(f"mapped file {ref.path}: {why}")
            if st.st_mode & (stat.S_ISUID | stat.S_ISGID) and not allow_setuid:
                problems.append(f"{ref.path} is set-uid/set-gid; restore with --allow-setuid to allow it")
    return problems


def _owner_problems(task: model.Task, allow_other_owner: bool, tree_root: model.Task | None = None) -> list[str]:
    if not task.uids:
        return []
    mine_u, mine_g = list(os.getresuid()), list(os.getresgid())
    if task.uids[:3] == mine_u and task.gids[:3] == mine_g:
        return []
    if tree_root is not None and mine_u == [0, 0, 0] and not _owner_problems(tree_root, False):
        return []  # made by a root tree root, restored by root (see the policy above)
    owner = f"uid {task.uids[1]} gid {task.gids[1]}"
    if not allow_other_owner:
        return [f"the image is of a process of {owner}; restoring as uid {mine_u[1]} gid {mine_g[1]} would change "
                f"its credentials (--allow-other-owner, root only)"]
    if mine_u[1] != 0:
        return [f"the image is of a process of {owner}; only root may restore another owner's image"]
    return []


def image_problems(image: Image, allow_other_owner: bool = False, allow_setuid: bool = False,
                   tree_root: model.Task | None = None, inherited=frozenset()) -> list[str]:
    """tree_root: the task of the tree's root, when `image` is of a process below it."""
    ckpt = image.checkpoint
    root = [] if ckpt.task.root == "/" or os.path.isdir(ckpt.task.root) else \
        [f"its root directory (chroot) {ckpt.task.root} is gone"]
    return (_owner_problems(ckpt.task, allow_other_owner, tree_root) + _file_problems(ckpt, allow_setuid, inherited) + root
            + cgroup_problems(ckpt.cgroups))


def verify_image(directory: str, allow_other_owner: bool = False, allow_setuid: bool = False,
                 key: bytes | None = None, home: str | None = None, verify_parents: bool = True) -> list[str]:
    """Every problem that would stop a restore of `directory` (and of every
    process of its tree); [] if none. home, verify_parents: see open_tree."""
    from .tree import open_tree

    try:
        image = open_image(directory, key=key)
        tree = open_tree(image, home=home, verify_parents=verify_parents)
    except ImageCorrupt as err:
        return [str(err)]
    problems = []
    for proc, img in tree:
        if img is not None:
            found = image_problems(img, allow_other_owner, allow_setuid,
                                   image.checkpoint.task if proc.ppid else None)
            problems += [f"pid {proc.pid}: {p}" for p in found] if proc.ppid else found
    problems += objects.verify(image.checkpoint)
    from ..kernel.probes import run_checks

    problems += [f"kernel: {r.name} missing: {r.detail}" for r in run_checks() if not r.ok]
    return problems


def check_restorable(image: Image, allow_other_owner: bool, allow_setuid: bool,
                     tree_root: model.Task | None = None, inherited=frozenset()) -> None:
    problems = image_problems(image, allow_other_owner, allow_setuid, tree_root, inherited)
    if problems:
        raise RestoreError(f"{image.directory}: cannot restore: " + "; ".join(problems), image.checkpoint.task.pid)
