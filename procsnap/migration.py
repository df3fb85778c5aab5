"""migrate(): move a running process tree to another host. pre-copy rounds
-> final freeze and stream -> restore held on the destination -> kill the
source -> release on the destination.

    source (procsnap migrate)                 destination (procsnap restore --stream tcp://H:P)
    pre-dump pass k into LOCAL/k  --- image k (header SERIES ... END) --->  checked into DIR/k
                                  <--- ACK_ ---; DONE {"source": "running"} --->
    ... until the dirty set stops shrinking or max_rounds ...
    freeze; dump --prev-images-dir ../k  --- image k+1 (the final one) --->  checked into DIR/k+1
                                  <--- ACK_ ---                              restore: every process built,
                                  <--- RDY_ ---                              registers loaded, held
    kill the source               --- DONE {"source": "killed"} --->         released: it runs
                                  <--- RUN_ {"pid": ROOT} ---
    downtime = from the freeze to RUN_

The pre-copy passes are those of dumper/predump.py (userfaultfd
write-protection, or content hashes), written on the source into a
temporary directory LOCAL (each pass needs its parent) and sent as they
are; the destination keeps the same series in DIR, so the final image's
references to its parents ("parent:../k") hold there as they do on the
source. Each image is checked whole (frame checksums, open_image's checks
of every record and page run, and for the final one verify's checks of
what a restore needs on this host) before it is acknowledged.

One copy: the source is killed only once the destination holds the whole
tree rebuilt and waiting (RDY_), and the destination lets it run only once
the source says it is killed (DONE). Before RDY_, any failure (the
connection cut, the destination or its restore failing, this side failing)
thaws the source, which runs on with its dirty tracking taken down, and
the destination removes what it built. A cut between the kill and the
destination's reading of DONE (one message) leaves no copy running: the
destination's tree is removed and its image kept for a restore by hand.
"""

from __future__ import annotations

import contextlib
from . import records as dataclasses  # the dataclasses API, cheap to import
from . import log as logging  # the logging API, cheap to import
import os
import shutil
import tempfile
import time

from . import faults
from .errors import ImageError, ProcsnapError, RestoreError, describe
from .image import schema
from .image.receive import receive_into, wait_done
from .image.stream import (FAIL, MAX_FRAME, PREFIX, READY, RUNNING, SERIES, Channel, FrameReader, Sender,
                           StreamError, Tls, connect, encode_header, json_payload, read_json, send_frame, staged)

log = logging.getLogger("procsnap.migrate")

MAX_ROUNDS = 8
SHRINK = 0.9  # a round that copies more than this share of the round before: the dirty set stopped shrinking
FEW_PAGES = 256  # a dirty set this small is not worth another round (1 MiB)


@dataclasses.dataclass
class Round:
    copied: int  # pages
    referred: int
    frozen_s: float
    seconds: float  # the pass and its sending


@dataclasses.dataclass
class MigrateStats:
    rounds: list = dataclasses.field(default_factory=list)  # Round of each pre-copy pass
    downtime_s: float = 0.0  # from the final freeze until the destination runs the tree
    frozen_s: float = 0.0  # the source's freeze until it was killed
    final_bytes: int = 0  # page data in the final image
    total_s: float = 0.0
    pid: int = 0  # the root's on the destination
    net_lock: str = ""  # --tcp-established: the source's lock, kept ("inet TABLE", or the iptables rules' comment)


def converged(rounds: list[Round]) -> bool:
    """The dirty set stopped shrinking, or is small enough for the final freeze."""
    if not rounds:
        return False
    if rounds[-1].copied <= FEW_PAGES and len(rounds) > 1:
        return True
    return len(rounds) > 1 and rounds[-1].copied > rounds[-2].copied * SHRINK


# --------------------------------------------------------------------------
# The source


def migrate(pid: int, to: str, max_rounds: int = MAX_ROUNDS, tls: Tls | None = None, shell_job: bool = False,
            dirty_tracking: str = "auto", tcp_established: bool = False, net_lock: str = "",
            workdir: str | None = None, on_round=None) -> MigrateStats:
    """Move the tree rooted at `pid` to the destination listening at `to`
    (tcp://HOST:PORT: `procsnap restore --stream` there). on_round(k, Round)
    hears of each pre-copy pass. On any error before the destination holds
    the rebuilt tree the source runs on as before."""
    from .dumper import dump
    from .dumper.predump import pre_dump, untrack_image

    started = time.monotonic()
    stats = MigrateStats()
    channel = connect(to, tls)
    local = tempfile.mkdtemp(prefix="procsnap-migrate-", dir=workdir)
    killed = False
    passes = 0  # pre-dump images written: the last one's dirty tracking is in the target
    try:
        for k in range(1, max_rounds + 1):
            t0 = time.monotonic()
            where = os.path.join(local, str(k))
            p = pre_dump(pid, where, prev_images_dir=f"../{k - 1}" if k > 1 else None, method=dirty_tracking,
                         shell_job=shell_job, tcp_established=tcp_established)
            passes = k
            send_image(channel, where)
            stats.rounds.append(Round(p.copied, p.referred, p.frozen_s, time.monotonic() - t0))
            log.info("pid %d: pre-copy round %d: %d pages copied, %d referred to", pid, k, p.copied, p.referred)
            if on_round:
                on_round(k, stats.rounds[-1])
            if converged(stats.rounds):
                break
        n = len(stats.rounds)
        final = Final(channel, os.path.join(local, str(n + 1)))
        d = dump(pid, to, shell_job=shell_job, prev_images_dir=f"../{n}" if n else None,
                 tcp_established=tcp_established, net_lock=net_lock, migration=final)
        killed = True
        pid_there = final.running()
        stats.downtime_s = time.monotonic() - d.frozen_at
        stats.frozen_s, stats.final_bytes, stats.pid = d.frozen_s, d.pages_bytes, pid_there
        for lock in d.checkpoint.net_lock:  # dropped at the source once the addresses have moved: the caller's
            if lock.table:
                stats.net_lock = f"inet {lock.table}" if lock.method == "nftables" else lock.table
    except BaseException:
        if passes and not killed:  # the source runs on: without the pre-copy's tracking
            with contextlib.suppress(ProcsnapError, OSError):
                untrack_image(pid, os.path.join(local, str(passes)))
        raise
    finally:
        channel.close()
        shutil.rmtree(local, ignore_errors=True)  # the series is the destination's now (or no one's)
    stats.total_s = time.monotonic() - started
    return stats


def send_image(channel: Channel, directory: str) -> None:
    """The image in `directory` as one image of a series (header SERIES,
    its files, END; then the receiver's ACK_, and DONE "running")."""
    sender = Sender(channel)
    try:
        channel.send(encode_header(SERIES))
    except OSError as err:
        raise StreamError(f"{channel.name}: cannot write the stream: {describe(err)}") from err
    base = PREFIX + sender.id + "/"
    names = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel = os.path.relpath(root, directory)
        names += [n if rel == "." else f"{rel}/{n}" for n in sorted(files) if n != schema.INVENTORY]
    names.append(schema.INVENTORY)  # last, as a dump commits
    buf = bytearray(MAX_FRAME)
    for name in names:
        index = sender.file(base + name)
        with open(os.path.join(directory, name), "rb") as f:
            offset = 0
            while n := f.readinto(buf):
                sender.data(index, offset, memoryview(buf)[:n])
                offset += n
        sender.size(index, offset)
    sender.end()
    sender.finish("running")


class Final:
    """The final image's staging on the migration's connection: after its
    ACK_ the destination restores and answers RDY_ (swap_in returns only
    then: the dump kills the source next and says so, DONE); running()
    waits for RUN_."""

    def __init__(self, channel: Channel, home: str):
        self.channel, self.home = channel, home

    def staged(self, leave_running: bool):
        return staged(self.channel.name, channel=self.channel, flags=SERIES, after_ack=self._held,
                      leave_running=leave_running)

    def _answer(self, expected: bytes, what: str):
        try:
            tag, _, _, payload = FrameReader(self.channel).read((expected, FAIL), before=f"before {what}")
        except OSError as err:
            raise StreamError(f"{self.channel.name}: no word from the destination {what}: {describe(err)}") from err
        except StreamError as err:
            raise StreamError(f"{self.channel.name}: the destination did not answer {what}: {err}") from err
        if tag == FAIL:
            raise StreamError(f"{self.channel.name}: the destination failed {what}: "
                              f"{bytes(payload).decode(errors='replace')}")
        return payload

    def _held(self) -> None:
        self._answer(READY, "while it restored")
        faults.point("migrate-after-ready")

    def running(self) -> int:
        payload = self._answer(RUNNING, "after the source was killed")
        return int(read_json(payload, self.channel.name).get("pid", 0))


# --------------------------------------------------------------------------
# The destination


def receive_series(channel: Channel, header: bytes, directory: str, keep: bool, **options) -> int:
    """restore --stream when the sender is a migration: its images into
    directory/1, /2, ... (pre-copy passes, then the final image), the final
    one restored, held until the source is killed, then released. Returns
    the root's pid. options: procsnap.restore's."""
    from .image.reader import open_image
    from .restorer import restore
    from .restorer.tree import open_tree
    from .restorer.verify import verify_image

    key = options.get("key")
    k = 0
    while True:
        k += 1
        where = os.path.join(directory, str(k))
        final = []

        def check(staged: str) -> None:
            image = open_image(staged, key=key)
            if image.checkpoint.tracking:  # a pre-copy pass: memory only
                open_tree(image, home=where, verify_parents=False)
                return
            problems = verify_image(staged, allow_other_owner=options.get("allow_other_owner", False),
                                    allow_setuid=options.get("allow_setuid", False), key=key, home=where,
                                    verify_parents=False)  # each checked whole as it came (the pre-copy)
            if problems:
                raise ImageError(f"the image cannot be restored here: {'; '.join(problems)}")
            final.append(True)

        got = receive_into(channel, where, check, durable=keep, header=header if k == 1 else None, wait_done=False)
        log.info("%s: image %d: %d MiB in %.2f s", channel.name, k, got.bytes >> 20, got.seconds)
        if final:
            break
        source = wait_done(channel)
        if source != "running":
            raise StreamError(f"{channel.name}: after pre-copy image {k} the sender did not say the source runs on "
                              f"({source or 'no DONE'})")

    def held() -> None:
        faults.point("migrate-held")
        try:
            send_frame(channel, READY)
        except OSError as err:
            raise StreamError(f"{channel.name}: the source is gone ({describe(err)}); the restored tree is removed")
        source = wait_done(channel)
        if source != "killed":
            raise RestoreError(f"{channel.name}: the source was not killed ({source or 'no word from it'}); "
                               f"the restored tree is removed" + (f", the image kept in {where}" if keep else ""))

    try:
        pid = restore(where, before_release=held, checked=True, **options)  # checked as it came
    except ProcsnapError as err:
        with contextlib.suppress(OSError):
            send_frame(channel, FAIL, 0, 0, str(err).encode())
        raise
    with contextlib.suppress(OSError):
        send_frame(channel, RUNNING, 0, 0, json_payload({"pid": pid}))
    return pid
