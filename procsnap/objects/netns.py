"""A container's network namespace (issue 15): dumped by the container's
worker, which has entered it (nsworker.run_inside enters "net"), and made
again around the restored tree before any socket of it is made.

    what                       dumped as                       made again by
    -------------------------  ------------------------------  -----------------------------
    lo                         mtu, flags                      the new namespace's own lo
    veth (peer outside, in     name, ifindex, MAC, mtu,        `ip link add NAME index N
    procsnap's namespace)      txqlen, flags, addrgenmode;     address MAC type veth peer
                               the peer's ifindex and name     name OUTSIDE netns HOST`
                               as the dump sees them           (--external veth[NAME]:OUTSIDE)
    addresses                  `ip addr add` arguments; the    `ip -batch`
                               kernel's own (lo's 127.0.0.1/8
                               and ::1, an EUI-64 link-local
                               of the saved MAC) are left to
                               come back by themselves
    routes, every table        `ip route add` arguments of     `ip -batch`, after the
                               each route not proto kernel     addresses
    rules                      only when not a new             the defaults not kept
                               namespace's defaults            deleted, the others added
    neighbours                 the permanent ones              `ip -batch`
    nftables ruleset           `nft -j list ruleset`           `nft -j -f -` (counters too)
    net sysctls                the writable ones of            written, devices' after
                               /proc/sys/net that differ       the devices are made
                               from a new namespace's
                               (made by the dump to compare),
                               and every one of a device

Refused at dump, by name, the tree left running: any other device kind
(tun, tap, macvlan, vlan, bridge, dummy, ...), a veth whose peer is not in
procsnap's namespace, addresses, routes, rules and neighbours with
attributes not in ADDR_KEYS, ROUTE_KEYS, RULE_KEYS, NEIGH_KEYS, legacy
iptables rules (x_tables), nftables rules with x_tables compat expressions
(iptables-nft's -m comment, -m conntrack, ...: nft cannot make them again).

Live TCP connections (--tcp-established): the dump's worker takes the
network lock inside the namespace (netlock.py runs nft there), so the
ruleset it reads holds the lock's table; the restore makes it again with
the ruleset, before the connections, and removes it at the end (the
kinds' finish runs before the restorer's thread leaves the namespace).

At restore the restorer's thread unshares CLONE_NEWNET and configures it
(enter_net), as it does the IPC namespace: the tree's sockets are made in
it (prepare), the root is cloned from it (the fork that clones it copies
the thread's namespaces), and the rebuild's worker is in it too; the thread
goes back to its own namespace when the restore is over. A veth's end
outside is made in the restorer's namespace, down and without addresses:
configuring it is the caller's (as CRIU's action scripts do).
"""

from __future__ import annotations

from .. import records as dataclasses  # the dataclasses API, cheap to import
import json
import os

from .. import model, nsworker
from ..errors import RestoreError, Unsupported
from . import netlock, protocol

CLONE_NEWNET = 0x40000000  # include/uapi/linux/sched.h
FOREVER = 4294967295  # an address lifetime of INFINITY_LIFE_TIME (include/net/addrconf.h)
SYSCTLS = "/proc/sys/net"  # the reading thread's network namespace
LINK_FLAGS = {"NOARP": ("arp", "off"), "PROMISC": ("promisc", "on"), "ALLMULTI": ("allmulticast", "on")}
ADDR_FLAGS = ("nodad", "noprefixroute", "home", "mngtmpaddr", "optimistic")
ADDR_KEYS = {"family", "local", "prefixlen", "scope", "label", "broadcast", "address", "valid_life_time",
             "preferred_life_time", "tentative", "dadfailed", "deprecated", "permanent", *ADDR_FLAGS}
ROUTE_KEYS = {"type", "dst", "gateway", "dev", "protocol", "scope", "prefsrc", "metric", "table", "flags", "pref"}
RULE_KEYS = {"priority", "src", "srclen", "dst", "dstlen", "table", "fwmark", "fwmask", "iif", "oif", "not"}
NEIGH_KEYS = {"dst", "dev", "lladdr", "state", "router"}


@dataclasses.dataclass
class NetDevice:
    """A device of the namespace: lo or a veth whose peer is outside."""

    name: str
    kind: str  # "loopback" or "veth"
    ifindex: int
    mtu: int = 0
    address: str = ""  # the MAC
    txqlen: int = 0
    flags: list[str] = dataclasses.field(default_factory=list)  # of UP and LINK_FLAGS
    addrgenmode: str = ""  # inet6_addr_gen_mode: eui64, none, stable_secret, random
    addrs: list[list[str]] = dataclasses.field(default_factory=list)  # `ip addr add` arguments, without dev
    peer_ifindex: int = 0  # a veth's peer in procsnap's namespace, as the dump saw it
    peer_name: str = ""


@dataclasses.dataclass
class NetNamespace:
    """What a container's own network namespace holds (1.6), once per tree."""

    devices: list[NetDevice] = dataclasses.field(default_factory=list)
    routes: list[list[str]] = dataclasses.field(default_factory=list)  # `ip route add` arguments
    rules: list[list[str]] = dataclasses.field(default_factory=list)  # `ip rule add` ones, if not the defaults
    default_rules: list[list[str]] = dataclasses.field(default_factory=list)  # a new namespace's, then
    neighbours: list[list[str]] = dataclasses.field(default_factory=list)  # `ip neigh add` ones
    nft: str = ""  # `nft -j list ruleset`, "" when empty
    sysctls: dict[str, str] = dataclasses.field(default_factory=dict)  # under /proc/sys/net -> value


def _run(argv: list[str], stdin: str = "", pass_fds=(), error=Unsupported) -> str:
    return netlock._run(argv, stdin, "network namespace", error, pass_fds)


def _ip_json(*args: str, pass_fds=(), prefix=()) -> list[dict]:
    return json.loads(_run([*prefix, "ip", "-j", *args], pass_fds=pass_fds) or "[]")


def _ip_batch(options: list[str], *commands: str) -> list[list[dict]]:
    """The JSON of each of `commands`, from one `ip -j OPTIONS -batch -`."""
    text, docs, at = _run(["ip", "-j", *options, "-batch", "-"], "".join(c + "\n" for c in commands)), [], 0
    decoder = json.JSONDecoder()
    while (at := len(text) - len(text[at:].lstrip())) < len(text):
        doc, at = decoder.raw_decode(text, at)
        docs.append(doc)
    if len(docs) != len(commands):
        raise Unsupported(f"network namespace: ip -batch of {commands}: {len(docs)} answers")
    return docs


def read_sysctls() -> dict[str, str]:
    """Every writable, readable sysctl of this thread's network namespace."""
    out = {}
    for top, _, names in os.walk(SYSCTLS):
        for name in names:
            path = os.path.join(top, name)
            try:
                if not os.stat(path).st_mode & 0o200:
                    continue
                with open(path) as f:
                    out[path[len(SYSCTLS) + 1:]] = f.read().strip()
            except OSError:
                continue  # write-only (route/flush) or unreadable until set (stable_secret)
    return out


def _read_fresh() -> tuple[dict[str, str], dict[str, list[list[str]]]]:
    nsworker.unshare(CLONE_NEWNET)
    return read_sysctls(), {fam: [_rule_args(x) for x in _ip_batch([fam], "rule show")[0]] for fam in ("-4", "-6")}


def _fresh() -> tuple[dict[str, str], dict[str, list[list[str]]]]:
    """A new network namespace's sysctls and rules, read in a
    forked child that unshares one (the comparison CRIU makes against the
    kernel's defaults)."""
    return nsworker.run_forked(_read_fresh)


def _eui64(mac: str) -> str:
    """The link-local address the kernel gives a device of MAC `mac` (addrgenmode eui64)."""
    b = [int(x, 16) for x in mac.split(":")]
    if len(b) != 6:
        return ""
    b = [b[0] ^ 2, *b[1:3], 0xFF, 0xFE, *b[3:]]
    groups = [f"{b[i] << 8 | b[i + 1]:x}" for i in range(0, 8, 2)]
    import ipaddress

    return str(ipaddress.IPv6Address("fe80::" + ":".join(groups)))


def _automatic(dev: dict, a: dict) -> bool:
    """An address the kernel makes by itself on a device made again the same way."""
    if dev.get("link_type") == "loopback":
        return (a["local"], a["prefixlen"]) in (("127.0.0.1", 8), ("::1", 128))
    return (a["family"] == "inet6" and a.get("scope") == "link" and a["prefixlen"] == 64
            and dev.get("inet6_addr_gen_mode", "eui64") == "eui64" and a["local"] == _eui64(dev.get("address", "")))


def _addr_args(dev: dict, a: dict, what: str) -> list[str]:
    if set(a) - ADDR_KEYS:
        raise Unsupported(f"{what}: address {a.get('local')}/{a.get('prefixlen')} has {sorted(set(a) - ADDR_KEYS)}, "
                          "not restored")
    args = ["-6" if a["family"] == "inet6" else "-4", "addr", "add", f"{a['local']}/{a['prefixlen']}"]
    if "address" in a:
        args[-1:] = [a["local"], "peer", f"{a['address']}/{a['prefixlen']}"]
    if "broadcast" in a:
        args += ["broadcast", a["broadcast"]]
    args += ["scope", a.get("scope", "global")]
    if a.get("label", dev["ifname"]) != dev["ifname"]:
        args += ["label", a["label"]]
    args += [flag for flag in ADDR_FLAGS if a.get(flag)]
    if a.get("valid_life_time", FOREVER) != FOREVER:
        args += ["valid_lft", str(a["valid_life_time"]), "preferred_lft", str(a["preferred_life_time"])]
    return args


def _route_args(fam: str, r: dict, what: str) -> list[str]:
    if set(r) - ROUTE_KEYS:
        raise Unsupported(f"{what}: route {r.get('dst')} (table {r.get('table', 'main')}) has "
                          f"{sorted(set(r) - ROUTE_KEYS)}, not restored")
    args = [fam, "route", "add", r.get("type", "unicast"), r["dst"]]
    for key, word in (("gateway", "via"), ("dev", "dev"), ("table", "table"), ("protocol", "proto"),
                      ("scope", "scope"), ("prefsrc", "src"), ("metric", "metric"), ("pref", "pref")):
        if key in r:
            args += [word, str(r[key])]
    return args + [flag for flag in r.get("flags", []) if flag == "onlink"]


def _rule_args(r: dict) -> list[str]:
    if set(r) - RULE_KEYS:
        raise Unsupported(f"rule {r.get('priority')}: has {sorted(set(r) - RULE_KEYS)}, not restored")
    args = ["priority", str(r["priority"])] + (["not"] if r.get("not") else [])
    for key, word in (("src", "from"), ("dst", "to")):
        if key in r:
            args += [word, r[key] + (f"/{r[key + 'len']}" if key + "len" in r else "")]
    if "fwmark" in r:
        args += ["fwmark", r["fwmark"] + (f"/{r['fwmask']}" if "fwmask" in r else "")]
    for key in ("iif", "oif"):
        if key in r:
            args += [key, r[key]]
    return args + ["table", str(r.get("table", "main"))]


def _peer_names(links: list[dict]) -> dict[int, str]:
    """ifindex -> name of the devices of procsnap's network namespace (the
    caller's: the worker holds it open), for the veth peers."""
    fd = nsworker.host_net_fd()
    return {d["ifindex"]: d["ifname"] for d in
            _ip_json("link", "show", pass_fds=(fd,), prefix=("nsenter", f"--net=/proc/self/fd/{fd}"))}


def collect_net() -> NetNamespace:
    """In the container's worker, which has entered its network namespace."""
    link = os.readlink("/proc/thread-self/ns/net")
    fresh_sysctls, fresh_rules = _fresh()
    links, addr_info = _ip_batch(["-d"], "link show", "addr show")
    addrs = {d["ifname"]: d.get("addr_info", []) for d in addr_info}
    tables = {fam: _ip_batch([fam], "route show table all", "rule show", "neigh show nud permanent")
              for fam in ("-4", "-6")}
    peers = _peer_names(links) if any(d.get("linkinfo", {}).get("info_kind") == "veth" for d in links) else {}
    net = NetNamespace()
    for d in links:
        name, kind = d["ifname"], d.get("linkinfo", {}).get("info_kind", d.get("link_type", ""))
        what = f"net namespace {link}: device {name}"
        if d.get("link_type") == "loopback" and name == "lo":
            kind = "loopback"
        elif kind != "veth":
            raise Unsupported(f"{what} (kind {kind or 'unknown'}): not restored; only lo and veth devices are")
        elif "link_netnsid" not in d or d.get("link_index") not in peers:
            raise Unsupported(f"{what} (kind veth): its peer (ifindex {d.get('link_index')}) is not in procsnap's "
                              "network namespace; only a veth whose peer is outside, in procsnap's, is restored")
        dev = NetDevice(name, kind, d["ifindex"], d.get("mtu", 0), d.get("address", "") if kind == "veth" else "",
                        d.get("txqlen", 0), [f for f in d.get("flags", []) if f == "UP" or f in LINK_FLAGS],
                        d.get("inet6_addr_gen_mode", ""))
        if kind == "veth":
            dev.peer_ifindex, dev.peer_name = d["link_index"], peers[d["link_index"]]
        dev.addrs = [_addr_args(d, a, what) for a in addrs.get(name, []) if not _automatic(d, a)]
        net.devices.append(dev)
    for fam, (routes, rules, neighbours) in tables.items():
        for r in routes:
            if r.get("protocol") != "kernel":
                net.routes.append(_route_args(fam, r, f"net namespace {link}"))
        try:
            rules = [_rule_args(r) for r in rules]
        except Unsupported as err:
            raise Unsupported(f"net namespace {link}: {fam} {err}") from err
        if rules != fresh_rules[fam]:
            net.rules += [[fam, *r] for r in rules]
            net.default_rules += [[fam, *r] for r in fresh_rules[fam]]
    for fam, (_, _, neighbours) in tables.items():
        for n in neighbours:
            if set(n) - NEIGH_KEYS:
                raise Unsupported(f"net namespace {link}: neighbour {n.get('dst')} has {sorted(set(n) - NEIGH_KEYS)}, "
                                  "not restored")
            net.neighbours.append([fam, "neigh", "add", n["dst"], "lladdr", n["lladdr"], "dev", n["dev"], "nud",
                                   "permanent"] + (["router"] if n.get("router") else []))
    _check_legacy_iptables(link)
    ruleset = json.loads(_run(["nft", "-j", "list", "ruleset"]) or '{"nftables": []}')
    if any("metainfo" not in item for item in ruleset.get("nftables", [])):
        _check_xt(link, ruleset["nftables"])
        net.nft = json.dumps(ruleset)
    # a device's conf/ and neigh/ values, every one: a device made again takes the "default" ones,
    # and writing a "default" one changes it in every device (lo too) that has not set its own
    devices = {dev.name for dev in net.devices}
    for key, value in read_sysctls().items():
        parts = key.split("/")
        if len(parts) > 3 and parts[2] in devices or fresh_sysctls.get(key) != value:
            net.sysctls[key] = value
    return net


def _check_xt(link: str, items: list[dict]) -> None:
    """A rule holding an x_tables compat expression (what iptables-nft adds
    for a match or target nftables has no native form of, -m comment,
    -m conntrack, ...) is refused by name: `nft -j -f` cannot make it again."""
    def xt(expr) -> str | None:
        if isinstance(expr, dict):
            if "xt" in expr and isinstance(expr["xt"], dict):
                return f"{expr['xt'].get('type', '')} {expr['xt'].get('name', '')}"
            return next((found for v in expr.values() if (found := xt(v))), None)
        if isinstance(expr, list):
            return next((found for v in expr if (found := xt(v))), None)
        return None

    for item in items:
        rule = item.get("rule")
        if rule and (found := xt(rule.get("expr", []))):
            raise Unsupported(f"net namespace {link}: nftables table {rule.get('family')} {rule.get('table')} chain "
                              f"{rule.get('chain')}: a rule with the x_tables {found} of iptables-nft; not restored "
                              "(nft cannot make it again)")


LEGACY = {"ip": "iptables-legacy-save", "ip6": "ip6tables-legacy-save", "arp": "arptables-legacy-save"}


def _check_legacy_iptables(link: str) -> None:
    """Rules of the legacy iptables (x_tables, not nftables) are refused by
    name: a table is listed once any legacy command touched it; refused if it
    holds a rule or a policy other than ACCEPT."""
    for family, tool in LEGACY.items():
        try:
            with open(f"/proc/thread-self/net/{family}_tables_names") as f:
                tables = f.read().split()
        except FileNotFoundError:
            continue
        if not tables:
            continue
        try:
            saved = _run([tool])
        except Unsupported:
            saved = "-A (unreadable)"
        rules = [line for line in saved.splitlines() if line.startswith("-A") or
                 line.startswith(":") and " ACCEPT " not in line + " "]
        if rules:
            raise Unsupported(f"net namespace {link}: legacy {family}tables rules (tables {', '.join(tables)}: "
                              f"{rules[0]!r} of {len(rules)}): not restored; only nftables rulesets are "
                              "(iptables-nft's rules are in them)")


class Collect(protocol.Collect):
    def collect_tree(self, root: model.Checkpoint, tree_pids: set[int]) -> None:
        """The root's network namespace, if it is a container's own."""
        if not (nsworker.inside() and root.task.pid == 1):
            return
        if os.readlink("/proc/1/ns/net") == nsworker.host_namespaces().get("net"):
            return
        root.net_namespaces = [collect_net()]


_VERBS = (["addr", "add"], ["route", "add"], ["rule", "add"], ["neigh", "add"])


def check_image(ckpt: model.Checkpoint, image) -> list[str]:
    problems = []
    for net in ckpt.net_namespaces:
        if not ckpt.namespaces or "pid" not in ckpt.namespaces[0].own:
            problems.append("net namespace: only a container's (the init of a pid namespace of its own) is made again")
        for dev in net.devices:
            if dev.kind not in ("loopback", "veth") or (dev.kind == "loopback") != (dev.name == "lo"):
                problems.append(f"net namespace: device {dev.name} of kind {dev.kind}")
        lines = [a for dev in net.devices for a in dev.addrs] + net.routes + net.neighbours
        lines += [[r[0], "rule", "add", *r[1:]] for r in net.rules + net.default_rules]
        for args in lines:
            if args[:1] not in (["-4"], ["-6"]) or args[1:3] not in _VERBS or any(
                    not a or any(c in a for c in "\n\r\0") for a in args):
                problems.append(f"net namespace: ip arguments {args}")
        for key in net.sysctls:
            if ".." in key.split("/") or key.startswith("/"):
                problems.append(f"net namespace: sysctl {key!r}")
    return problems


def _write(key: str, value: str) -> None:
    path = os.path.join(SYSCTLS, key)
    try:
        with open(path) as f:
            if f.read().strip() == value:
                return
        with open(path, "w") as f:
            f.write(value)
    except OSError as err:
        raise RestoreError(f"net namespace: cannot set net.{key.replace('/', '.')} to {value!r}: "
                           f"{err.strerror}") from err


def _batch(lines: list[list[str]]) -> None:
    """`ip -batch`, one per family: a line's -4/-6 (an option, not allowed in a batch's lines)."""
    for fam in (None, "-4", "-6"):
        mine = [args[1:] if fam else args for args in lines if (args[0] if args[0] in ("-4", "-6") else None) == fam]
        if mine:
            _run(["ip", *([fam] if fam else []), "-batch", "-"],
                 "".join(" ".join(_quote(a) for a in args) + "\n" for args in mine), error=RestoreError)


def _quote(arg: str) -> str:
    return '"' + arg + '"' if any(c.isspace() for c in arg) else arg


def make_net(net: NetNamespace, outside: dict[str, str], host_net: int) -> None:
    """In the restorer's thread, just moved into a new network namespace:
    everything the image holds of the container's, in the kernel's order
    (namespace-wide sysctls, devices, their sysctls and addresses, routes,
    rules, neighbours, nftables)."""
    devices = {dev.name for dev in net.devices}
    device_keys = {k for k in net.sysctls if len(k.split("/")) > 3 and k.split("/")[2] in devices}
    for key, value in net.sysctls.items():
        if key not in device_keys:
            _write(key, value)
    lines = []
    for dev in net.devices:
        if dev.kind == "veth":
            lines.append(["link", "add", dev.name, "index", str(dev.ifindex), "address", dev.address, "mtu",
                          str(dev.mtu), "txqlen", str(dev.txqlen), "type", "veth", "peer", "name",
                          outside[dev.name], "netns", f"/proc/{os.getpid()}/fd/{host_net}"])
        elif dev.mtu:
            lines.append(["link", "set", dev.name, "mtu", str(dev.mtu)])
        if dev.addrgenmode:
            lines.append(["link", "set", dev.name, "addrgenmode", dev.addrgenmode])
        for flag in dev.flags:
            if flag in LINK_FLAGS:
                lines.append(["link", "set", dev.name, *LINK_FLAGS[flag]])
    _batch(lines)
    for key in sorted(device_keys):
        _write(key, net.sysctls[key])
    lines = [["link", "set", dev.name, "up"] for dev in net.devices if "UP" in dev.flags]
    lines += [[*args, "dev", dev.name] for dev in net.devices for args in dev.addrs]
    _batch(lines)
    _batch(net.routes)
    if net.rules:
        _batch([[r[0], "rule", "del", *r[1:]] for r in net.default_rules if r not in net.rules])
        _batch([[r[0], "rule", "add", *r[1:]] for r in net.rules if r not in net.default_rules])
    _batch(net.neighbours)
    if net.nft:
        _run(["nft", "-j", "-f", "-"], net.nft, error=RestoreError)


def enter_net(ckpt: model.Checkpoint, stack, outside: dict[str, str]) -> None:
    """The restorer's thread in a new network namespace made as the image's,
    for the whole restore, if the image has one (see the module docstring);
    back in its own as `stack` closes. outside: --external veth[IF]:OUTSIDE."""
    if not ckpt.net_namespaces:
        if outside:
            raise RestoreError(f"--external veth[{next(iter(outside))}]: the image has no network namespace")
        return
    net = ckpt.net_namespaces[0]
    veths = {dev.name: dev for dev in net.devices if dev.kind == "veth"}
    for name, dev in veths.items():
        if name not in outside:
            raise RestoreError(f"net namespace: veth device {name} (its peer was {dev.peer_name}): give the name of "
                               f"its peer outside with --external veth[{name}]:OUTSIDE")
    for name in outside:
        if name not in veths:
            raise RestoreError(f"--external veth[{name}]: the image's network namespace has no veth {name} "
                               f"(it has: {', '.join(sorted(veths)) or 'none'})")
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    stack.callback(_back_to, own)
    nsworker.unshare(CLONE_NEWNET)
    make_net(net, outside, own)


def _back_to(fd: int) -> None:
    try:
        nsworker.setns_fd(fd, "net")
    finally:
        os.close(fd)
