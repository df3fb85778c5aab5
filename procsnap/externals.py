"""`--external KIND[KEY]:VALUE`, as CRIU's: what a container shares with the
host, named by the caller at dump and given again at restore.

    mnt[KEY]:PATH     a mount of the container bound from the host (dump:
                      KEY names the mount point inside the container; restore:
                      KEY is the name the dump gave it, PATH where it is now)
    veth[IF]:OUTSIDE  the container's veth device IF, whose peer outside is
                      OUTSIDE (restore: made again with that peer name)

Parsed once here; each kind's code reads its own entries.
"""

from __future__ import annotations

import re

from .errors import ProcsnapError

KINDS = ("mnt", "veth")
_SPEC = re.compile(r"(?P<kind>[a-z]+)\[(?P<key>[^\]]+)\]:(?P<value>.+)")


class ExternalError(ProcsnapError):
    """A malformed or unknown --external."""

    exit_code = 2


def parse(specs) -> dict[str, dict[str, str]]:
    """kind -> {key: value} of each `KIND[KEY]:VALUE`; a key given twice for
    one kind, an unknown kind or a malformed spec is an ExternalError."""
    out: dict[str, dict[str, str]] = {}
    for spec in specs or ():
        m = _SPEC.fullmatch(spec)
        if m is None:
            raise ExternalError(f"--external {spec!r}: expected KIND[KEY]:VALUE, e.g. mnt[/data]:/srv/data "
                                "or veth[eth0]:veth-host0")
        kind, key, value = m["kind"], m["key"], m["value"]
        if kind not in KINDS:
            raise ExternalError(f"--external {spec!r}: unknown kind {kind!r} (known: {', '.join(KINDS)})")
        if key in out.setdefault(kind, {}):
            raise ExternalError(f"--external {spec!r}: {kind}[{key}] given twice")
        out[kind][key] = value
    return out


def check_used(external: dict | None, handled) -> None:
    """Refuse (by name) an --external of a kind this verb does not read:
    never accepted and silently ignored."""
    for kind, entries in (external or {}).items():
        if entries and kind not in handled:
            names = ", ".join(f"{kind}[{key}]" for key in entries)
            raise ExternalError(f"--external {names}: not supported yet by this verb")
