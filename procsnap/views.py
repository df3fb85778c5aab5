"""What an image holds, as a person reads it: a one-screen summary and
tables (`procsnap show DIR [VIEW]`), in the manner of CRIU's `crit x`.

Every view is built from the validated reader's records (open_tree), so it
shows what a restore would use. A view is a Table: named columns and rows
of plain values; `render` lays it out for a terminal, `json_lines` gives
one JSON object per row, with the same keys and the raw values.

    ps       the tree: pid, ppid, pgid, sid, threads, comm, state
    fds      per process: fd, kind, target, position, flags
    mems     VMAs: range, protection, kind, backing file, pages stored
    rss      the stored page runs, where each is stored, in which VMA
    sockets  the unix sockets of the tree: ends, peer, what is queued
    files    the files the image needs from the host: size, mtime, now
"""

from __future__ import annotations

import bisect
import collections
from . import records as dataclasses  # the dataclasses API, cheap to import
import datetime
import json
import os
import typing

from . import model
from .errors import plural
from .image import schema
from .image.pagedata import TreePages
from .image.reader import Image, open_image
from .kernel.arch.x86_64 import NR, PAGE_SIZE, signed
from .objects.file import changed_since_dump

Tree = list[tuple[model.Proc, Image | None]]
SUMMARY_FILES = 8  # files listed by the summary; the files view has them all


def load(directory: str, key: bytes | None = None) -> tuple[Image, Tree]:
    """The root's image and the tree, validated as a restore validates them."""
    from .restorer.tree import open_tree

    root = open_image(directory, key=key)
    return root, open_tree(root)


def full_json(root: Image, tree: Tree) -> dict:
    """Every record, flags by name: `show --json` (the format of `show` before views)."""

    def described(image) -> dict:
        out = {"pages_size": image.pages_size, "ghosts_size": image.ghosts_size}
        for tag, (_, field, _) in schema.RECORDS.items():
            value = getattr(image.checkpoint, field)
            if value or field not in ("procs", "pipes", "shms", "sockets", "threads", "inet_sockets"):
                out[field] = schema.describe(value)
        return out

    out = {"format": f"{root.major}.{root.minor}", **described(root)}
    others = {str(p.pid): described(img) for p, img in tree[1:] if img is not None}
    if others:
        out["processes"] = others  # the other processes of the tree, by pid
    return out


# --------------------------------------------------------------------------
# Tables


@dataclasses.dataclass
class Column:
    key: str  # the JSON key, and the heading upper-cased
    show: typing.Callable[[typing.Any], str] = str
    right: bool = False  # numbers are aligned right


@dataclasses.dataclass
class Table:
    columns: list[Column]
    rows: list[dict]


def render(table: Table) -> str:
    """The table as aligned text, headings first (no trailing spaces)."""
    cells = [[c.key.upper() for c in table.columns]]
    cells += [[c.show(row[c.key]) for c in table.columns] for row in table.rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(table.columns))]
    out = []
    for line in cells:
        parts = [cell.rjust(w) if c.right else cell.ljust(w) for c, cell, w in zip(table.columns, line, widths)]
        out.append("  ".join(parts).rstrip())
    return "\n".join(out) + "\n"


def json_lines(table: Table) -> str:
    return "".join(json.dumps(row) + "\n" for row in table.rows)


def _hex(value: int) -> str:
    return f"{value:#x}"


def size(nbytes: int) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes} B" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError


def _time(ns: int) -> str:
    return datetime.datetime.fromtimestamp(ns / 1e9).strftime("%Y-%m-%d %H:%M:%S")


def _live(tree: Tree) -> list[tuple[model.Proc, Image]]:
    return [(p, img) for p, img in tree if img is not None]


def syscall_name(nr: int) -> str:
    try:
        return NR(nr).name
    except ValueError:
        return f"syscall {nr}"


def thread_state(regs: dict[str, int]) -> str:
    """'in clock_nanosleep' for a thread stopped in a syscall, else 'running'."""
    nr = signed(regs.get("orig_rax", -1))
    return "running" if nr < 0 else f"in {syscall_name(nr)}"


def ps(tree: Tree) -> Table:
    rows = []
    for p, img in tree:
        row = {"pid": p.pid, "ppid": p.ppid, "pgid": p.pgid, "sid": p.sid, "threads": 0, "comm": "",
               "state": f"zombie (status {p.exit_status:#x})"}
        if img is not None:
            t = img.checkpoint.task
            row.update(threads=1 + len(img.checkpoint.threads), comm=t.comm, state=thread_state(t.regs))
            if not tree[0][0].pgid:  # an image of one process (before PROC records): its own ids
                row.update(pgid=t.pid if t.group_leader else 0, sid=t.pid if t.session_leader else 0)
        rows.append(row)
    num = dict(right=True)
    return Table([Column("pid", **num), Column("ppid", **num), Column("pgid", **num), Column("sid", **num),
                  Column("threads", **num), Column("comm"), Column("state")], rows)


def fd_target(e: model.FdEntry) -> str:
    """What an fd refers to, in a few words."""
    kind = model.FdKind
    if e.kind == kind.PIPE:
        return f"pipe#{e.file_id}" + (f" {e.path}" if e.path and not e.path.startswith("pipe:[") else "")
    if e.kind == kind.UNIX:
        return f"unix#{e.file_id}"
    if e.kind == kind.EPOLL:
        return f"epoll, {plural(len(e.watches), 'watch')}: " + ",".join(str(w[0]) for w in e.watches)
    if e.params:
        return f"{e.kind.value} " + " ".join(f"{k}={v}" for k, v in sorted(e.params.items()))
    return e.path


def fds(tree: Tree) -> Table:
    rows = []
    for p, img in _live(tree):
        for e in sorted(img.checkpoint.fds, key=lambda e: e.fd):
            target = fd_target(e) + (f" (shares fd {e.shares_with})" if e.shares_with != -1 else "")
            rows.append({"pid": p.pid, "fd": e.fd, "kind": e.kind.value, "target": target, "pos": e.pos,
                         "flags": schema.describe(e.flags)})
    return Table([Column("pid", right=True), Column("fd", right=True), Column("kind"), Column("target"),
                  Column("pos", right=True), Column("flags")], rows)


def perms(v: model.Vma) -> str:
    """'rw-p', as /proc/PID/maps spells it."""
    prot = model.Prot
    return ("r" if v.prot & prot.PROT_READ else "-") + ("w" if v.prot & prot.PROT_WRITE else "-") + \
        ("x" if v.prot & prot.PROT_EXEC else "-") + ("s" if v.flags & model.MapFlag.MAP_SHARED else "p")


def _stored_by_vma(pages: TreePages, img: Image) -> dict[int, tuple[int, int]]:
    """VMA start -> (pages stored in its own pages.img, pages stored by another process)."""
    vmas = sorted(img.checkpoint.vmas, key=lambda v: v.start)
    starts = [v.start for v in vmas]
    out: dict[int, list[int]] = collections.defaultdict(lambda: [0, 0])
    for run in pages.runs(img):
        i = bisect.bisect_right(starts, run.vaddr) - 1
        out[vmas[i].start][1 if run.shared else 0] += run.npages
    return {k: tuple(v) for k, v in out.items()}


def mems(tree: Tree) -> Table:
    rows = []
    with TreePages(tree) as pages:
        for p, img in _live(tree):
            stored = _stored_by_vma(pages, img)
            for v in sorted(img.checkpoint.vmas, key=lambda v: v.start):
                own, shared = stored.get(v.start, (0, 0))
                rows.append({"pid": p.pid, "start": v.start, "end": v.end, "perms": perms(v), "kind": v.kind.value,
                             "pages": v.size // PAGE_SIZE, "stored": own, "shared": shared, "name": v.name})
    num = dict(right=True)
    return Table([Column("pid", **num), Column("start", _hex), Column("end", _hex), Column("perms"), Column("kind"),
                  Column("pages", **num), Column("stored", **num), Column("shared", **num), Column("name")], rows)


def rss(tree: Tree) -> Table:
    rows = []
    with TreePages(tree) as pages:
        for p, img in _live(tree):
            vmas = sorted(img.checkpoint.vmas, key=lambda v: v.start)
            starts = [v.start for v in vmas]
            for run in pages.runs(img):
                v = vmas[bisect.bisect_right(starts, run.vaddr) - 1]
                where = os.path.relpath(run.source.directory, tree[0][1].directory) if run.shared else "own"
                rows.append({"pid": p.pid, "addr": run.vaddr, "pages": run.npages, "stored_in": where,
                             "offset": run.offset, "vma": f"{v.start:#x} {perms(v)} {v.name}".rstrip()})
    num = dict(right=True)
    return Table([Column("pid", **num), Column("addr", _hex), Column("pages", **num), Column("stored_in"),
                  Column("offset", _hex, right=True), Column("vma")], rows)


def sockets(tree: Tree) -> Table:
    ends: dict[int, list[str]] = collections.defaultdict(list)
    for p, img in _live(tree):
        for e in img.checkpoint.fds:
            if e.kind == model.FdKind.UNIX:
                ends[e.file_id].append(f"{p.pid}:{e.fd}")
    types = {1: "stream", 2: "dgram", 5: "seqpacket"}
    rows = []
    for s in tree[0][1].checkpoint.sockets:
        rows.append({"id": s.id, "type": types.get(s.type, str(s.type)), "ends": ",".join(ends[s.id]),
                     "peer": s.peer, "queued": sum(len(m) for m in s.queued), "messages": len(s.queued),
                     "shutdown": s.shutdown, "sndbuf": s.sndbuf, "rcvbuf": s.rcvbuf})
    num = dict(right=True)
    return Table([Column("id", **num), Column("type"), Column("ends"), Column("peer", **num),
                  Column("queued", **num), Column("messages", **num), Column("shutdown", **num),
                  Column("sndbuf", **num), Column("rcvbuf", **num)], rows)


def _file_uses(tree: Tree) -> dict[str, tuple[object, list[str]]]:
    """path -> (its FileRef, how the processes use it), in order of first use."""
    out: dict[str, tuple[object, list[str]]] = {}
    for p, img in _live(tree):
        ckpt = img.checkpoint
        uses: dict[int, list[str]] = collections.defaultdict(list)
        uses[ckpt.mm.exe_file_id].append("exe")
        for v in ckpt.vmas:
            if v.file_id != -1 and "map" not in uses[v.file_id]:
                uses[v.file_id].append("map")
        for e in ckpt.fds:
            if e.kind in (model.FdKind.REG, model.FdKind.DIR) and e.file_id != -1:
                uses[e.file_id].append(f"fd {e.fd}")
        for ref in ckpt.files:
            entry = out.setdefault(ref.path, (ref, []))
            entry[1].append(f"{p.pid}: " + ", ".join(uses.get(ref.id) or ["-"]))
    return out


def host_state(ref) -> str:
    """'ok', or how the file on this host differs from the one dumped."""
    try:
        st = os.stat(ref.path)
    except OSError as err:
        return err.strerror.lower()
    return changed_since_dump(ref, st) or "ok"


def files(tree: Tree) -> Table:
    rows = [{"path": path, "size": ref.size, "mtime": _time(ref.mtime_ns), "mode": f"{ref.mode:o}",
             "used_by": "; ".join(uses), "now": host_state(ref)}
            for path, (ref, uses) in _file_uses(tree).items()]
    return Table([Column("path"), Column("size", right=True), Column("mtime"), Column("mode"), Column("used_by"),
                  Column("now")], rows)


VIEWS = {"ps": ps, "fds": fds, "mems": mems, "rss": rss, "sockets": sockets, "files": files}


def view(name: str, tree: Tree) -> Table:
    return VIEWS[name](tree)


# --------------------------------------------------------------------------
# The summary


def _inheritable(tree: Tree) -> list[str]:
    """What restore --inherit-fd fd[N]:RESOURCE can be given for: the pipes, then the files."""
    from .inheritfd import resources

    held: dict[str, list[str]] = {}
    for name, pid, fd in resources(tree):
        held.setdefault(name, []).append(f"pid {pid} fd {fd}")
    ordered = sorted(held.items(), key=lambda kv: (not kv[0].startswith("pipe:["), kv[0]))
    out = [f"inherit-fd: {name} ({', '.join(where)})" for name, where in ordered[:SUMMARY_FILES]]
    if len(ordered) > SUMMARY_FILES:
        out.append(f"inherit-fd: ... {len(ordered) - SUMMARY_FILES} more")
    return out


def summary(root: Image, tree: Tree) -> str:
    live = _live(tree)
    zombies = len(tree) - len(live)
    threads = sum(1 + len(img.checkpoint.threads) for _, img in live)
    t = root.checkpoint.task
    lines = [f"image {root.directory}: format {root.major}.{root.minor}, {plural(len(tree), 'process')}"
             + (f" ({zombies} zombie{'s' * (zombies != 1)})" if zombies else "")
             + f", {plural(threads, 'thread')}; root pid {t.pid} ({t.comm}), {thread_state(t.regs)}"]
    for ns in root.checkpoint.namespaces:  # a container's (objects/namespaces.py)
        lines.append(f"namespaces of its own: {' '.join(ns.own)}; pids are its pid namespace's"
                     + (f"; hostname {ns.hostname}" if "uts" in ns.own else ""))
        ipc = [plural(len(objs), what) for objs, what in ((ns.msg_queues, "SysV message queue"),
               (ns.sem_sets, "semaphore set"), (ns.segments, "unattached segment"),
               (ns.mqueues, "POSIX message queue")) if objs]
        if ipc:
            nmsgs = sum(len(q.messages) for q in [*ns.msg_queues, *ns.mqueues])
            lines.append(f"ipc objects: {', '.join(ipc)}; {plural(nmsgs, 'message')} in them")
    by_kind: dict[str, int] = collections.Counter()
    shared = nruns = earlier = 0
    ours = {id(img) for _, img in live}
    with TreePages(tree) as pages:
        for _, img in live:
            vmas = sorted(img.checkpoint.vmas, key=lambda v: v.start)
            starts = [v.start for v in vmas]
            for run in pages.runs(img):
                if run.shared and id(run.source) not in ours:  # in a parent image (dump --prev-images-dir)
                    earlier += run.npages
                    continue
                if run.shared:
                    shared += run.npages
                    continue
                nruns += 1
                by_kind[vmas[bisect.bisect_right(starts, run.vaddr) - 1].kind.value] += run.npages * PAGE_SIZE
    kinds = ", ".join(f"{k} {size(n)}" for k, n in sorted(by_kind.items(), key=lambda kv: -kv[1]))
    shm = sum(e[1] for s in root.checkpoint.shms for e in s.extents)
    line = f"memory stored: {size(sum(by_kind.values()))} in {plural(nruns, 'run')}" + (f" ({kinds})" if kinds else "")
    if shared:
        line += f"; {size(shared * PAGE_SIZE)} shared copy-on-write, stored once"
    if earlier:
        parents = ", ".join(sorted(name[len("parent:"):] for name in root.parents))
        line += f"; {size(earlier * PAGE_SIZE)} unchanged, stored in the previous image{'s' * (len(root.parents) > 1)} ({parents})"
    if shm:
        line += f"; shared memory objects {size(shm)}"
    lines.append(line)
    fd_kinds = collections.Counter(e.kind.value for _, img in live for e in img.checkpoint.fds)
    nfds = sum(fd_kinds.values())
    lines.append(f"fds: {nfds}" + (" (" + ", ".join(f"{k} {n}" for k, n in fd_kinds.most_common()) + ")"
                                   if nfds else ""))
    uses = _file_uses(tree)
    lines.append(f"needs from the host: {plural(len(uses), 'file')}")
    shown = list(uses.items())[:SUMMARY_FILES]
    width = max((len(path) for path, _ in shown), default=0)
    for path, (ref, _) in shown:
        lines.append(f"  {path.ljust(width)}  {size(ref.size):>10}  {_time(ref.mtime_ns)}  {host_state(ref)}")
    if len(uses) > len(shown):
        lines.append(f"  ... {len(uses) - len(shown)} more (view: files)")
    lines += _inheritable(tree)
    lines.append("views: " + " ".join(VIEWS) + f" (procsnap show DIR VIEW; --json for JSON)")
    return "\n".join(lines) + "\n"
