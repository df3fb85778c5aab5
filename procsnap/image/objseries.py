"""A series in object storage: which generations may go.

A dump with --prev-images-dir into s3:// refers to the generation of the
parent it read (never to its CURRENT, which moves on), and says so where
the parent lives, before its own CURRENT is put:

    PARENT/REFS/gen-A/BUCKET/CHILD/gen-B     (empty) gen-B of s3://BUCKET/CHILD refers to gen-A

A generation is live if it is a root (the CURRENT of a kept image: the
one a dump just made, or those `gc` keeps) or a live generation refers to
it. A referrer outside the prefix being collected counts as live while its
inventory exists or a dump holds its prefix's lock (it is being written).
Only references in REFS are followed, so nothing needs the images' keys.
Everything else under the prefix is removed: old generations, those a dump
left when it died, and the REFS entries of generations that are gone.

    s3://b/job/CURRENT -> gen-3    gen-3 refers to gen-2 and gen-1 (the pages each stores):
    s3://b/job/gen-1/ gen-2/ gen-3/   all three stay; a dump without --prev-images-dir removes 1 and 2
"""

from __future__ import annotations

import contextlib
import posixpath

from ..errors import ImageError, ImageWriteError
from . import objstore
from .objlock import LOCK, locked

REFS = "REFS"


def join(url: str, rel: str) -> str:
    """s3://BUCKET/KEY joined with a relative path (.. allowed, not past the bucket)."""
    bucket, key = objstore.split(url)
    depth = 0
    for part in f"{key}/{rel}".split("/"):
        depth += -1 if part == ".." else part not in ("", ".")
        if depth < 0:
            break
    if rel.startswith("/") or depth < 0:
        raise ImageError(f"{url}: {rel!r} leads out of the bucket")
    path = posixpath.normpath(posixpath.join("/" + key, rel)).lstrip("/")
    return f"{objstore.SCHEME}{bucket}/{path}" if path and path != "." else f"{objstore.SCHEME}{bucket}"


def relative(target: str, base: str) -> str:
    """The path of `target` relative to `base` (both in one bucket)."""
    tb, tk = objstore.split(target)
    bb, bk = objstore.split(base)
    if tb != bb:
        raise ImageError(f"{target}: in another bucket than {base}; a series stays in one bucket")
    return posixpath.relpath("/" + tk, "/" + bk)


def refer(child: str, parents: set[str]) -> None:
    """Record that generation `child` (a URL) refers to each parent generation."""
    cb, ck = objstore.split(child)
    for parent in sorted(parents):
        bucket, key = objstore.split(parent)
        prefix, _, gen = key.rpartition("/")
        marker = "/".join(p for p in (prefix, REFS, gen, cb, ck) if p)
        objstore.put(f"{objstore.SCHEME}{bucket}/{marker}", b"")
        try:  # a dump into the parent's prefix that listed REFS before we wrote ours may have removed it
            objstore.size(f"{parent}/procsnap.img")
        except objstore.ImageCorrupt as err:
            raise ImageWriteError(f"{parent}: the parent generation was removed during this dump "
                                  f"(by a dump into its prefix)") from err


def _parse(key: str):
    """('gen', generation key) for an object of a generation, ('ref', parent
    generation key, child URL) for a REFS entry, None for anything else."""
    parts = key.split("/")
    for i, part in enumerate(parts):
        if part == REFS and i + 3 < len(parts) and parts[i + 1].startswith(objstore.GEN_PREFIX):
            return "ref", "/".join(parts[:i] + [parts[i + 1]]), f"{objstore.SCHEME}{'/'.join(parts[i + 2:])}"
        if part.startswith(objstore.GEN_PREFIX):
            return ("gen", "/".join(parts[: i + 1])) if i + 1 < len(parts) else None
    return None


def _alive_outside(child: str) -> bool:
    """A referrer outside the collected prefix: its inventory is there, or its prefix is locked."""
    bucket, key = objstore.split(child)
    prefix = key.rpartition("/")[0]
    for name in (f"{key}/procsnap.img", f"{prefix}/{LOCK}" if prefix else LOCK):
        with contextlib.suppress(objstore.ImageCorrupt):
            objstore.size(f"{objstore.SCHEME}{bucket}/{name}")
            return True
    return False


def collect(bucket: str, keys: list[str], roots: set[str]) -> list[str]:
    """Of `keys` (a listing), those to remove: the objects of every
    generation in it that is not live, and stale REFS entries.
    roots: generation keys that are live. A referrer not in the listing is
    asked about (_alive_outside)."""
    gens: dict[str, list[str]] = {}
    refs: list[tuple[str, str, str]] = []  # (object key, parent generation key, child URL)
    for k in keys:
        what = _parse(k)
        if what and what[0] == "gen":
            gens.setdefault(what[1], []).append(k)
        elif what:
            refs.append((k, what[1], what[2]))

    def listed(child: str) -> str | None:
        cb, ck = objstore.split(child)
        return ck if cb == bucket and ck in gens else None

    outside: dict[str, bool] = {}
    live = set(roots)
    changed = True
    while changed:  # a chain of references within the listing: to a fixed point
        changed = False
        for _, parent, child in refs:
            if parent in live:
                continue
            here = listed(child)
            ok = here in live if here else outside.setdefault(child, _alive_outside(child))
            if ok:
                live.add(parent)
                changed = True
    doomed = [k for g, ks in gens.items() if g not in live for k in ks]
    def stale(parent: str, child: str) -> bool:
        here = listed(child)
        return parent not in live or (here not in live if here else not outside.get(child, True))

    stale_refs = [k for k, parent, child in refs if stale(parent, child)]
    return doomed + stale_refs


def _listing(url: str, bucket: str, base: str) -> dict:
    with objstore._errors(url, "list"):
        out = {}
        for page in objstore.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=base):
            out.update({o["Key"]: o for o in page.get("Contents", [])})
        return out


def _owner_prefix(key: str) -> str | None:
    """The image prefix an object belongs to: its generation's, its REFS entry's, its CURRENT's or LOCK's."""
    what = _parse(key)
    if what and what[0] == "gen":
        return what[1].rpartition("/")[0]
    if what:
        return key.split(f"/{REFS}/")[0] if f"/{REFS}/" in key else ""
    return key.rpartition("/")[0] if key.rpartition("/")[2] in (objstore.CURRENT, LOCK) else None


def finish(url: str, new: str) -> None:
    """After a dump into s3://BUCKET/PREFIX made generation `new` its CURRENT."""
    bucket, prefix = objstore.split(url)
    base = f"{prefix}/" if prefix else ""
    keys = objstore._list(bucket, base + objstore.GEN_PREFIX) + objstore._list(bucket, base + REFS + "/")
    objstore._delete(bucket, collect(bucket, keys, {base + new}))


def gc(url: str, keep: list[str] | None = None) -> list[str]:
    """`procsnap gc s3://BUCKET/PREFIX`: the images are PREFIX and the
    prefixes under it that hold a CURRENT (named relative to PREFIX, "."
    for PREFIX itself); kept: those in `keep`, or else the newest. Removes
    every generation no kept image needs and the CURRENT of every image
    not kept that none needs; returns what went: generations and images (URLs)."""
    bucket, prefix = objstore.split(url.rstrip("/"))
    base = f"{prefix}/" if prefix else ""
    listing = _listing(url, bucket, base)
    currents = {k: o for k, o in listing.items() if k.rpartition("/")[2] == objstore.CURRENT
                and _parse(k) is None}
    if not currents:
        raise ImageError(f"{url}: holds no images")
    names = {(k[len(base):].rpartition("/")[0] or "."): k for k in currents}
    for name in keep or []:
        if name not in names:
            raise ImageError(f"{url}: no image {name!r} to keep (images: {', '.join(sorted(names))})")
    kept = keep or [max(names, key=lambda n: currents[names[n]]["LastModified"])]
    # where a dump may be under way: images, and prefixes with generations, REFS or a lock
    held = {p for p in map(_owner_prefix, listing) if p is not None}
    with contextlib.ExitStack() as stack:
        for where in sorted(held):  # a dump under way into one of them: nothing is removed
            stack.enter_context(locked(f"{objstore.SCHEME}{bucket}/{where}" if where else f"{objstore.SCHEME}{bucket}"))
        # again, now that no dump can change them: only what is under the prefixes we hold
        listing = {k: o for k, o in _listing(url, bucket, base).items() if _owner_prefix(k) in held}
        roots = set()
        for name in kept:
            current = objstore.read(f"{objstore.SCHEME}{bucket}/{names[name]}").decode(errors="replace").strip()
            roots.add(f"{names[name].rpartition('/')[0]}/{current}".lstrip("/"))
        doomed = collect(bucket, [k for k in listing if k.rpartition("/")[2] != LOCK], roots)
        gone = set(doomed)
        removed = sorted({f"{objstore.SCHEME}{bucket}/{what[1]}" for k in doomed
                          if (what := _parse(k)) and what[0] == "gen"})
        for name, key in sorted(names.items()):
            if name in kept:
                continue
            current = objstore.read(f"{objstore.SCHEME}{bucket}/{key}").decode(errors="replace").strip()
            gen = f"{key.rpartition('/')[0]}/{current}".lstrip("/")
            if not any(k.startswith(gen + "/") for k in listing if k not in gone):
                doomed.append(key)  # nothing of its image is left: it is no image any more
                removed.append(url if name == "." else f"{url.rstrip('/')}/{name}")
        with objstore._errors(url, "delete", ImageWriteError):
            objstore._delete(bucket, doomed)
    return removed
