"""The network lock of live TCP connections (--tcp-established), as CRIU's:
from just after the freeze to the end of the restore, every packet of each
dumped connection is dropped, both ways, so that the peer sees silence (it
retransmits) and never a reset, and the dumped socket never answers.

    nftables  a table of its own, `inet procsnap-<pid>-<tag>` (CRIU's is
              `inet CRIU-<pid>`), two chains hooked at input and output,
              one rule per connection and direction, after one that lets
              packets marked MARK through; unlocking deletes the table.
    iptables  where nft is missing: one INPUT and one OUTPUT rule per
              connection (ip6tables for IPv6), each after (below) one that
              lets packets marked MARK through, all with the table's name as
              their comment; unlocking deletes those rules.

MARK (CRIU's SOCCR_MARK 0xC114) is the SO_MARK of the segments the restore
makes up as the peer's (tcpfin.py: a FIN received, our FIN acknowledged).

When          dump                                       restore
taken         per connection, before TCP_REPAIR reads it
dropped       on any failure; --leave-running: after      after success
              the thaw
kept          after a dump that killed the tree: its     after a failure: the image is
              name and rules are in the image (NLCK)     intact, a second restore can
                                                         still bring the connection back
--skip-net-lock (dump and restore): none taken or dropped, the caller locks.
"""

from __future__ import annotations

from .. import records as dataclasses  # the dataclasses API, cheap to import
from .. import log as logging  # the logging API, cheap to import
import os

from .. import faults
from ..errors import ProcsnapError, Unsupported

log = logging.getLogger("procsnap.netlock")


def _subprocess():
    import subprocess  # only with live TCP connections: 10 ms of imports otherwise

    return subprocess


def _which(tool: str) -> str | None:
    import shutil

    return shutil.which(tool)

METHODS = ("nftables", "iptables", "skip")
MARK = 0xC114  # tcpfin.MARK: the made-up segments of the restore pass the lock
PRIORITY = -150  # before conntrack and the filter chains of others: "mangle"


@dataclasses.dataclass
class NetLock:
    """How the dump's live TCP connections were treated (1.4), once per tree."""

    tcp_established: bool = False  # dumped with --tcp-established: restore needs it (or --tcp-close)
    tcp_close: bool = False  # dumped with --tcp-close: its connections were not read; restored closed
    method: str = "skip"  # nftables, iptables, or skip (none taken: --skip-net-lock, or no connection)
    table: str = ""  # the nftables table / the iptables rules' comment
    # each locked connection: [family (4 or 6), local address, local port, peer address, peer port]
    connections: list[list[int | str]] = dataclasses.field(default_factory=list)


class LockError(ProcsnapError):
    """A rule could not be added or removed."""


def _run(argv: list[str], stdin: str = "", what: str = "network lock", error: type | None = None,
         pass_fds=()) -> str:
    """argv's output; its failure an `error` (LockError) naming `what` and its first line of complaint."""
    try:
        result = _subprocess().run(argv, input=stdin, capture_output=True, text=True, check=False, pass_fds=pass_fds)
    except OSError as err:
        raise (error or LockError)(f"{what}: cannot run {argv[0]}: {err.strerror}") from err
    if result.returncode:
        msg = (result.stderr or result.stdout).strip().splitlines()
        raise (error or LockError)(f"{what}: {' '.join(argv)} failed (exit {result.returncode}): "
                                   f"{msg[0] if msg else 'no message'}")
    return result.stdout


def default_method() -> str:
    return "nftables" if _which("nft") or not _which("iptables") else "iptables"


def _family(addr: str) -> tuple[int, str]:
    """(4 or 6, the address as packets carry it): a v4-mapped IPv6 socket's are IPv4 packets."""
    if addr.startswith("::ffff:") and "." in addr:
        return 4, addr[7:]
    return (6, addr) if ":" in addr else (4, addr)


def connection(local: list, peer: list) -> list[int | str]:
    fam, laddr = _family(str(local[0]))
    _, paddr = _family(str(peer[0]))
    return [fam, laddr, int(local[1]), paddr, int(peer[1])]


def _nft_rules(table: str, conn: list) -> str:
    fam, laddr, lport, paddr, pport = conn
    ip = "ip" if fam == 4 else "ip6"
    return (f"add rule inet {table} output {ip} saddr {laddr} {ip} daddr {paddr} "
            f"tcp sport {lport} tcp dport {pport} drop\n"
            f"add rule inet {table} input {ip} saddr {paddr} {ip} daddr {laddr} "
            f"tcp sport {pport} tcp dport {lport} drop\n")


def _iptables(action: str, table: str, conn: list) -> list[list[str]]:
    fam, laddr, lport, paddr, pport = conn
    tool = "iptables" if fam == 4 else "ip6tables"
    rules = []
    for verdict in (["-j", "DROP"], ["-m", "mark", "--mark", hex(MARK), "-j", "ACCEPT"]):  # -I: accept on top
        tail = ["-m", "comment", "--comment", table] + verdict
        rules += [[tool, "-w", action, "OUTPUT", "-p", "tcp", "-s", laddr, "--sport", str(lport),
                   "-d", paddr, "--dport", str(pport)] + tail,
                  [tool, "-w", action, "INPUT", "-p", "tcp", "-s", paddr, "--sport", str(pport),
                   "-d", laddr, "--dport", str(lport)] + tail]
    return rules


class DumpLock:
    """The lock of one dump: empty until the first connection is locked."""

    def __init__(self, pid: int, method: str):
        self.record = NetLock(method=method)
        self.pid = pid
        self.kept = False

    def lock(self, local: list, peer: list, what: str) -> None:
        """Drop every packet of the connection local <-> peer from now on."""
        rec = self.record
        if rec.method == "skip":
            return
        conn = connection(local, peer)
        tool = "nft" if rec.method == "nftables" else "iptables" if conn[0] == 4 else "ip6tables"
        if not _which(tool):
            raise Unsupported(f"{what}: no {tool} to lock the network with (--network-lock, or --skip-net-lock "
                              "when the caller locks it)", self.pid)
        if not rec.table:
            rec.table = f"procsnap-{self.pid}-{os.urandom(3).hex()}"
            if rec.method == "nftables":
                _run(["nft", "-f", "-"], f"add table inet {rec.table}\n" + "".join(
                    f"add chain inet {rec.table} {hook} {{ type filter hook {hook} priority {PRIORITY}; "
                    f"policy accept; }}\nadd rule inet {rec.table} {hook} meta mark {MARK:#x} accept\n"
                    for hook in ("input", "output")))
            log.info("network lock %s (%s) taken", rec.table, rec.method)
        rec.connections.append(conn)
        if rec.method == "nftables":
            _run(["nft", "-f", "-"], _nft_rules(rec.table, conn))
        else:
            for argv in _iptables("-I", rec.table, conn):
                _run(argv)
        faults.point("after-net-lock")

    def keep(self) -> None:
        """The dump killed the tree: the lock stays until its restore."""
        self.kept = True

    def __enter__(self) -> DumpLock:
        return self

    def __exit__(self, *exc) -> None:
        if not self.kept:
            unlock(self.record)


def unlock(rec: NetLock) -> None:
    """Remove every rule of the lock; what is gone already is not an error."""
    if rec.method == "skip" or not rec.table:
        return
    if rec.method == "nftables":
        if _which("nft"):
            try:
                _run(["nft", "delete", "table", "inet", rec.table])
            except LockError:
                if _nft_has(rec.table):
                    raise
    else:
        for conn in rec.connections:
            for argv in _iptables("-D", rec.table, conn):
                while _exists(argv):
                    _run(argv)
    log.info("network lock %s (%s) removed", rec.table, rec.method)


def _nft_has(table: str) -> bool:
    result = _subprocess().run(["nft", "list", "table", "inet", table], capture_output=True, check=False)
    return result.returncode == 0


def _exists(argv: list[str]) -> bool:
    check = [a if a != "-D" else "-C" for a in argv]
    return _subprocess().run(check, capture_output=True, check=False).returncode == 0


def held(rec: NetLock) -> bool:
    """Some rule of the lock is still in place (for tests and `show`)."""
    if rec.method == "nftables":
        return bool(rec.table) and _nft_has(rec.table)
    if rec.method == "iptables":
        return any(_exists(argv) for conn in rec.connections for argv in _iptables("-D", rec.table, conn))
    return False


def check(rec: NetLock) -> list[str]:
    problems = []
    if rec.method not in METHODS:
        problems.append(f"network lock: unknown method {rec.method!r}")
    if rec.table and (not rec.table.startswith("procsnap-") or not all(c.isalnum() or c == "-" for c in rec.table)):
        problems.append(f"network lock: bad table name {rec.table!r}")
    for conn in rec.connections:
        if len(conn) != 5 or conn[0] not in (4, 6) or not all(isinstance(conn[i], int) for i in (2, 4)) \
                or not all(isinstance(conn[i], str) and conn[i] and all(c in "0123456789abcdefABCDEF.:" for c in conn[i])
                           for i in (1, 3)):
            problems.append(f"network lock: bad connection {conn!r}")
    return problems
