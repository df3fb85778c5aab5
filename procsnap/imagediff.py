"""What changed between two images (`procsnap diff DIR1 DIR2`): processes,
threads, VMAs, fds, registers and pages.

Pages are compared by content: every stored 4 KiB page of each image is
hashed (XXH3-64), so two dumps of one process that ran in between show
which of its pages it wrote, wherever each image stored them. A page
stored in only one image was, in the other, never touched or all zero
(anonymous memory) or clean (a file mapping): it counts as changed.

The result is plain JSON-able data (`--json` prints it); `render` writes it
for a person. Empty sections are left out, so two equal images give {}
for every process and `render` says "no differences".
"""

from __future__ import annotations

import bisect
from . import records as dataclasses  # the dataclasses API, cheap to import

from . import model
from .image.checksum import data_hash
from .image.pagedata import TreePages
from .kernel.arch.x86_64 import PAGE_SIZE
from .image import schema
from .views import Tree, fd_target, load, perms

LISTED = 20  # ranges of pages listed per kind of change in the text
PROC_FIELDS = ("ppid", "pgid", "sid", "zombie", "exit_status")
FD_FIELDS = ("kind", "target", "pos", "flags")
VMA_FIELDS = ("end", "perms", "kind", "offset", "name")


def _split(first: dict, second: dict) -> tuple[list, list, list]:
    """Keys only in first, only in second, in both (sorted)."""
    return (sorted(first.keys() - second.keys()), sorted(second.keys() - first.keys()),
            sorted(first.keys() & second.keys()))


def _changes(a: dict, b: dict, fields) -> dict:
    return {f: [a[f], b[f]] for f in fields if a[f] != b[f]}


def _vma(v: model.Vma) -> dict:
    return {"start": v.start, "end": v.end, "perms": perms(v), "kind": v.kind.value, "offset": v.offset,
            "name": v.name}


def _fd(e: model.FdEntry) -> dict:
    return {"fd": e.fd, "kind": e.kind.value, "target": fd_target(e), "pos": e.pos,
            "flags": schema.describe(e.flags)}


def _thread_states(ckpt: model.Checkpoint) -> dict[int, model.ThreadState]:
    return {ckpt.task.pid: ckpt.task, **{t.tid: t for t in ckpt.threads}}


def _page_hashes(pages: TreePages, image) -> dict[int, int]:
    out = {}
    for run in pages.runs(image):
        data = pages.data(run)
        for i in range(run.npages):
            out[run.vaddr + i * PAGE_SIZE] = data_hash(data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE])
        data.release()
        pages.drop(run)
    return out


def _ranges(addrs: list[int], vmas: list[model.Vma]) -> list[list]:
    """Sorted page addresses as [start, npages, VMA name] of adjacent pages."""
    starts = [v.start for v in vmas]
    out: list[list] = []
    for a in addrs:
        if out and out[-1][0] + out[-1][1] * PAGE_SIZE == a:
            out[-1][1] += 1
            continue
        i = bisect.bisect_right(starts, a) - 1
        out.append([a, 1, vmas[i].name if i >= 0 and a < vmas[i].end else ""])
    return out


def _pages(first: dict[int, int], second: dict[int, int], vmas: list[model.Vma]) -> dict:
    only_a, only_b, both = _split(first, second)
    changed = [a for a in both if first[a] != second[a]]
    if not (only_a or only_b or changed):
        return {}
    return {"first": len(first), "second": len(second), "unchanged": len(both) - len(changed),
            "changed": _ranges(changed, vmas), "only_first": _ranges(only_a, vmas),
            "only_second": _ranges(only_b, vmas)}


def _process(a, b, pages_a: TreePages, pages_b: TreePages) -> dict:
    out: dict = {}
    ca, cb = a.checkpoint, b.checkpoint
    if ca.task.comm != cb.task.comm:
        out["comm"] = [ca.task.comm, cb.task.comm]
    ta, tb = _thread_states(ca), _thread_states(cb)
    gone, new, both = _split(ta, tb)
    if gone or new:
        out["threads"] = {"only_first": gone, "only_second": new}
    regs = []
    for tid in both:
        x, y = ta[tid], tb[tid]
        change = {"tid": tid}
        names = [n for n in x.regs if x.regs[n] != y.regs.get(n)]
        if names:
            change["regs"] = {n: [x.regs[n], y.regs.get(n)] for n in names}
        if x.sigmask != y.sigmask:
            change["sigmask"] = [x.sigmask, y.sigmask]
        if x.xstate != y.xstate:
            change["xstate"] = True  # FPU/SIMD state: too big to list
        if len(change) > 1:
            regs.append(change)
    if regs:
        out["registers"] = regs
    for name, rec, key, fields in (("vmas", _vma, "start", VMA_FIELDS), ("fds", _fd, "fd", FD_FIELDS)):
        xs = {r[key]: r for r in map(rec, getattr(ca, name))}
        ys = {r[key]: r for r in map(rec, getattr(cb, name))}
        gone, new, both = _split(xs, ys)
        changed = [{key: k, **_changes(xs[k], ys[k], fields)} for k in both if _changes(xs[k], ys[k], fields)]
        if gone or new or changed:
            out[name] = {"only_first": [xs[k] for k in gone], "only_second": [ys[k] for k in new],
                         "changed": changed}
    vmas = sorted(cb.vmas + [v for v in ca.vmas if v.start not in {w.start for w in cb.vmas}], key=lambda v: v.start)
    pages = _pages(_page_hashes(pages_a, a), _page_hashes(pages_b, b), vmas)
    if pages:
        out["pages"] = pages
    return out


def diff_trees(tree_a: Tree, tree_b: Tree) -> dict:
    procs_a, procs_b = {p.pid: (p, img) for p, img in tree_a}, {p.pid: (p, img) for p, img in tree_b}
    gone, new, both = _split(procs_a, procs_b)
    out = {"processes": {"only_first": gone, "only_second": new, "both": both}, "changed": []}
    with TreePages(tree_a) as pages_a, TreePages(tree_b) as pages_b:
        for pid in both:
            (pa, a), (pb, b) = procs_a[pid], procs_b[pid]
            change = _changes(dataclasses.asdict(pa), dataclasses.asdict(pb), PROC_FIELDS)
            if a is not None and b is not None:
                change.update(_process(a, b, pages_a, pages_b))
            if change:
                comm = (a or b).checkpoint.task.comm if (a or b) else ""
                out["changed"].append({"pid": pid, "comm": comm, **change})
    return out


def diff(first: str, second: str, key: bytes | None = None) -> dict:
    """What changed from image directory `first` to `second` (both validated)."""
    return diff_trees(load(first, key)[1], load(second, key)[1])


# --------------------------------------------------------------------------
# Text


HEX = ("start", "end", "offset")  # addresses, in hex


def _val(key: str, v) -> str:
    return f"{v:#x}" if key in HEX and isinstance(v, int) else str(v)


def _listed(label: str, ranges: list[list]) -> list[str]:
    lines = [f"    {label} {start:#x} +{n} {name}".rstrip() for start, n, name in ranges[:LISTED]]
    if len(ranges) > LISTED:
        lines.append(f"    ... {len(ranges) - LISTED} more {label} ranges")
    return lines


def _fields(change: dict, skip: str) -> str:
    return ", ".join(f"{k} {_val(k, ab[0])} -> {_val(k, ab[1])}" for k, ab in change.items() if k != skip)


def render(d: dict) -> str:
    p = d["processes"]
    lines = []
    if p["only_first"] or p["only_second"]:
        lines.append(f"processes: {len(p['both'])} in both; only in the first: "
                     f"{' '.join(map(str, p['only_first'])) or '-'}; only in the second: "
                     f"{' '.join(map(str, p['only_second'])) or '-'}")
    for c in d["changed"]:
        lines.append(f"pid {c['pid']} ({c['comm']}):")
        head = {k: v for k, v in c.items() if k in PROC_FIELDS or k == "comm" and isinstance(v, list)}
        if head:
            lines.append(f"  process: {_fields(head, '')}")
        if "threads" in c:
            t = c["threads"]
            lines.append(f"  threads: only in the first {t['only_first'] or '-'}, only in the second "
                         f"{t['only_second'] or '-'}")
        for r in c.get("registers", []):
            what = [f"{n} {a:#x} -> {b:#x}" if b is not None else f"{n} {a:#x} -> -" for n, (a, b) in
                    r.get("regs", {}).items()]
            if "sigmask" in r:
                what.append(f"sigmask {r['sigmask'][0]:#x} -> {r['sigmask'][1]:#x}")
            if r.get("xstate"):
                what.append("xstate")
            lines.append(f"  thread {r['tid']}: " + ", ".join(what))
        for name, key in (("vmas", "start"), ("fds", "fd")):
            if name not in c:
                continue
            s = c[name]
            label = (lambda r: f"{r['start']:#x}-{r['end']:#x} {r['perms']} {r['name']}".rstrip()) if name == "vmas" \
                else (lambda r: f"fd {r['fd']} {r['kind']} {r['target']} pos {r['pos']}")
            lines += [f"  {name}: only in the first: {label(r)}" for r in s["only_first"]]
            lines += [f"  {name}: only in the second: {label(r)}" for r in s["only_second"]]
            lines += [f"  {name}: {'fd ' if key == 'fd' else ''}{_val(key, r[key])}: "
                      f"{_fields(r, key)}" for r in s["changed"]]
        if "pages" in c:
            g = c["pages"]
            count = lambda rs: sum(n for _, n, _ in rs)  # noqa: E731
            lines.append(f"  pages: {g['first']} stored in the first, {g['second']} in the second: "
                         f"{g['unchanged']} unchanged, {count(g['changed'])} changed, "
                         f"{count(g['only_first'])} only in the first, {count(g['only_second'])} only in the second")
            lines += _listed("changed", g["changed"]) + _listed("only in the first", g["only_first"]) \
                + _listed("only in the second", g["only_second"])
    return "\n".join(lines) + "\n" if lines else "no differences\n"
