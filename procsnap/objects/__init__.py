"""Every kind of object a process holds, one module each, registered here;
the pipelines reach them only through the functions below (the protocol
is in protocol.py). Adding a kind is adding its module to KINDS (and its
FdKind, if it has fds, to model.FdKind).

Reading an image (show, verify) imports every kind, for its records and
checks; what only a dump or a restore needs of the kernel layer beyond
that (sock_diag, socket, /proc parsers, SysV) a kind imports where it uses
it, to keep the CLI's start-up short."""

from __future__ import annotations

import typing

from .. import model
from . import cgroups, creds, device, epoll, eventfd, file, fown, ghost, locks, pipe, protocol, pty, settings, shm, \
    signalfd, timerfd, tty, unix, inet
from . import fanotify, ghostdir, inotify, memlock, opath, procfd, seccomp
from . import timers
from . import tracking
from . import namespaces
from . import ipcns
from . import netns

if typing.TYPE_CHECKING:
    from ..image.reader import Image

# State of a process that is not an fd or a mapping: each module has
#     collect_seized(target, tids, ckpt)      into its ckpt field, frozen, injecting
#     restore_seized(target, ckpt, tree_pids) into the rebuilt process, threads made
#     check_restore(ckpt)                     (optional) refuse before anything is made
# restored in this order: locks and fd owners through the restorer's
# privileges, then the credentials (which drop them), then the settings
# (dumpable, which a credential change resets, among them); cgroups are
# joined earlier, at the spawn. Memory locks and guards come first, through
# the restorer's CAP_IPC_LOCK. seccomp filters go in before the credentials,
# with the restorer's privileges (tracees run no filter while seized), and so
# do the pidfds and /proc files the process opens again (procfd); the
# interval timers last, so they start counting as late as they can.
TASK_STATE = (memlock, locks, fown, seccomp, procfd, creds, settings, cgroups, timers, tracking)


def collect_task_state_seized(target, tids: list[int], ckpt: model.Checkpoint) -> None:
    for k in TASK_STATE:
        k.collect_seized(target, tids, ckpt)


def check_task_state(ckpt: model.Checkpoint) -> None:
    for k in TASK_STATE:
        if hasattr(k, "check_restore"):
            k.check_restore(ckpt)


def restore_task_state_seized(target, ckpt: model.Checkpoint, tree_pids: set[int]) -> None:
    for k in TASK_STATE:
        k.restore_seized(target, ckpt, tree_pids)


# In the order an fd is offered to them, the first that takes it wins: a
# memfd before regular files, a POSIX message queue (a regular file of
# mqueue) too, an unlinked file before a linked one, a
# terminal before other character devices, /proc/PID files and namespace
# fds before regular files; an O_PATH fd before all, whatever it is of.
KINDS = (opath, shm, ipcns, ghost, ghostdir, procfd, file, pty, tty, device, eventfd, signalfd, timerfd, epoll, unix, pipe,
         inotify, fanotify, memlock, inet, tracking, namespaces, netns)


def collectors(**options) -> list[protocol.Collect]:
    """One fresh dump side of each kind, for one dump of a tree."""
    out = [k.Collect() for k in KINDS if hasattr(k, "Collect")]
    for c in out:
        c.options = options
    return out


def preparers(root: Image, tree_fds: protocol.TreeFds, **options) -> list[protocol.Prepare]:
    """One fresh restore side of each kind, for one restore of a tree."""
    out = [k.Prepare(root, tree_fds) for k in KINDS if hasattr(k, "Prepare")]
    for p in out:
        p.options = options
    return out


def _problems(hook: str, *args) -> list[str]:
    return [p for k in KINDS if hasattr(k, hook) for p in getattr(k, hook)(*args)]


def check_image(ckpt: model.Checkpoint, image: Image) -> list[str]:
    """Every kind's problems with its records in one image."""
    return _problems("check_image", ckpt, image)


def check_tree(ckpt: model.Checkpoint, root: model.Checkpoint) -> list[str]:
    """Every kind's problems with what an image of the tree refers to in the root's."""
    return _problems("check_tree", ckpt, root)


def verify(root: model.Checkpoint) -> list[str]:
    """Every kind's problems with the world a restore would meet here."""
    return _problems("verify", root)


def blobs(ckpt: model.Checkpoint) -> list[tuple[str, int, int, int]]:
    """(what, offset, size, xxh3) of every kind's data in an image's ghosts.img."""
    return [b for k in KINDS if hasattr(k, "blobs") for b in k.blobs(ckpt)]
