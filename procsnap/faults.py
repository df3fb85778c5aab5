"""Fault injection, for tests: PROCSNAP_FAULT=<stage> makes procsnap fail
at that stage as if a call there had failed; PROCSNAP_FAULT=<stage>:kill
makes it SIGKILL itself there instead (nothing can be cleaned up then);
PROCSNAP_FAULT=<stage>:stop makes it SIGSTOP itself there, for a test to
act (kill the object store, say) before it goes on.

The stages, in the order a dump or a restore passes them:
"""

from __future__ import annotations

import os
import signal

from .errors import ProcsnapError

DUMP_STAGES = ("after-freeze", "mid-collect", "mid-page-write", "before-commit", "mid-swap", "before-thaw")
RESTORE_STAGES = ("after-spawn", "mid-batch", "mid-memory-load", "before-registers", "before-detach")
FORK_STAGES = ("after-fork",)  # a restore of a tree with a process made by a fork (restorer/forkbuild.py)
RECEIVE_STAGES = ("mid-receive", "before-ack")  # the destination of a stream (image/receive.py)
# a pre-dump pass (dumper/predump.py; it passes mid-page-write and before-commit too), and a final
# dump of a pre-dumped process once its tracking is taken down
PREDUMP_STAGES = ("predump-after-freeze", "predump-after-uffd", "predump-after-rearm", "predump-after-thaw",
                  "final-after-untrack")
# a tree's dump, while another process's image is committed by the commit thread (dumper/__init__.py)
TREE_DUMP_STAGES = ("mid-commit",)
# with live TCP connections (objects/netlock.py): after the first is locked; before the restore unlocks
TCP_DUMP_STAGES = ("after-net-lock",)
TCP_RESTORE_STAGES = ("before-net-unlock",)
# restore --lazy-pages (restorer/lazy.py): the restore once the uffd is registered; the server, pushing
LAZY_STAGES = ("lazy-after-register", "lazy-mid-push")
# a migration (migration.py): the source once the destination holds the tree, before it kills the
# source; the destination once it holds the tree, before it says so
MIGRATE_STAGES = ("migrate-after-ready", "migrate-held")
# a container's dump, while a POSIX message queue's messages are out of it (objects/ipcns.py)
IPC_DUMP_STAGES = ("mid-mqueue-copy",)
__doc__ += f"  dump: {', '.join(DUMP_STAGES)}\n  restore: {', '.join(RESTORE_STAGES)}\n"
__doc__ += f"  restore, with a fork-built process: {', '.join(FORK_STAGES)}\n"
__doc__ += f"  dump of a tree: {', '.join(TREE_DUMP_STAGES)}\n"
__doc__ += f"  receive (and restore --stream): {', '.join(RECEIVE_STAGES)}\n"
__doc__ += f"  pre-dump: {', '.join(PREDUMP_STAGES)}\n"
__doc__ += f"  restore --lazy-pages: {', '.join(LAZY_STAGES)}\n"
__doc__ += f"  migrate: {', '.join(MIGRATE_STAGES)}\n"
__doc__ += f"  a container's dump, its POSIX message queues: {', '.join(IPC_DUMP_STAGES)}\n"
__doc__ += f"  with live TCP connections: dump {', '.join(TCP_DUMP_STAGES)}; restore {', '.join(TCP_RESTORE_STAGES)}\n"


class InjectedFault(ProcsnapError):
    """A failure asked for with PROCSNAP_FAULT."""


def point(stage: str) -> None:
    spec = os.environ.get("PROCSNAP_FAULT")
    if not spec:
        return
    name, _, how = spec.partition(":")
    if name != stage:
        return
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if how == "stop":  # once: a stage passed many times (a chunk of pages each) goes on after
        del os.environ["PROCSNAP_FAULT"]
        os.kill(os.getpid(), signal.SIGSTOP)
        return
    raise InjectedFault(f"injected fault at stage {stage} (PROCSNAP_FAULT={spec})")
