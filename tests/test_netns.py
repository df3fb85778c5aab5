"""Containers with a network namespace of their own (issue 15): a python3
HTTP server as the init of `unshare --fork --pid --net --uts --ipc`, on its
own address behind a veth pair the test makes (its end outside, psv<pid><n>,
in the test's namespace), with a route, a rule and its table, a permanent
neighbour, an nftables table and net sysctls of its own, a UDP socket and
unix sockets (one bound to an abstract name, which is the namespace's).
Dumped, killed, restored with --external veth[eth0]:<outside>; the test
configures the end outside again, as a CRIU action script would, and GETs
a page. The state check runs inside the container's pid and network
namespaces (its sockets as sock_diag shows them there) and compares the
namespace's own state too (statecheck._own_net); the server checks its
own sockets on SIGUSR1. A live TCP connection from outside to a server in
the container goes on (--tcp-established). Device kinds procsnap does not make again are
refused by name, the container left running. Every veth the tests make
outside is deleted, also on failure; everything else dies with the
container's namespace.
"""

import contextlib
import itertools
import json
import os
import signal
import socket
import subprocess
import urllib.request
from pathlib import Path

import pytest

import procsnap
from procsnap import nsworker
from procsnap.errors import RestoreError, Unsupported

from conftest import assert_pass, assert_same_snapshot, cli, descendants, proc_snapshot, reap_gone, wait_until

UNSHARE = ["unshare", "--fork", "--pid", "--net", "--uts", "--ipc"]
PAGE = "served from inside the container\n"

# The container's init: waits for its address, then serves; on SIGUSR1 checks its sockets, PASS or FAIL.
SERVER = r'''
import errno, http.server, os, signal, socket, sys, time
addr = sys.argv[1]
while True:  # the test configures the namespace from outside
    try:
        probe = socket.socket(); probe.bind((addr, 0)); probe.close(); break
    except OSError as e:
        if e.errno != errno.EADDRNOTAVAIL: raise
        time.sleep(0.01)
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); udp.bind((addr, 5353))
named = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); named.bind(b"\0psnetns")
a, b = socket.socketpair(); a.send(b"queued")
server = http.server.HTTPServer((addr, 8080), http.server.SimpleHTTPRequestHandler)
http.server.SimpleHTTPRequestHandler.log_message = lambda *args: None
def check(*_):
    problems = []
    if udp.getsockname() != (addr, 5353): problems.append(f"udp bound to {udp.getsockname()}")
    udp.sendto(b"ping", (addr, 5353)); udp.settimeout(5)
    if udp.recvfrom(16)[0] != b"ping": problems.append("udp to itself")
    other = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); other.sendto(b"hi", b"\0psnetns")
    if named.recv(16) != b"hi": problems.append("abstract unix name")
    if b.recv(16) != b"queued": problems.append("socketpair queue")
    if socket.if_nametoindex("eth0") != 2: problems.append("eth0 ifindex")
    print("FAIL: " + ", ".join(problems) if problems else "PASS", flush=True)
    os._exit(1 if problems else 0)
signal.signal(signal.SIGUSR1, check)
print("READY", flush=True)
server.serve_forever()
'''

_count = itertools.count()


class Net:
    """One test's addresses and the name of the veth end outside."""

    def __init__(self):
        n = next(_count)
        base = (os.getpid() * 4 + n) % 25000
        self.prefix = f"10.{150 + base // 250}.{base % 250}"
        self.outside = f"psv{os.getpid()}{n}"[:15]
        self.inner, self.host = f"{self.prefix}.2", f"{self.prefix}.1"
        self.init = 0  # the container's init (host pid), once started: unshare --fork leaves it when killed
        self.script = ""

    def url(self):
        return f"http://{self.inner}:8080/page.txt"


@pytest.fixture
def net():
    made = []

    def make():
        made.append(Net())
        return made[-1]
    yield make
    for n in made:
        with contextlib.suppress(OSError):  # an init of ours still running (the test failed, or left it)
            if n.init and n.script in Path(f"/proc/{n.init}/cmdline").read_text():
                os.kill(n.init, signal.SIGKILL)
                reap_gone([n.init])
        # the end outside; the inside dies with the container's namespace
        subprocess.run(["ip", "link", "del", n.outside], capture_output=True)


def sh(cmd, init=None):
    argv = ["sh", "-c", cmd] if init is None else ["nsenter", "-t", str(init), "--net", "sh", "-c", cmd]
    r = subprocess.run(argv, capture_output=True, text=True)
    assert r.returncode == 0, f"{cmd}: {r.stderr}"
    return r.stdout


def configure_outside(n):
    """The end outside, as an action script would: up, with its address."""
    sh(f"ip link set {n.outside} up && ip addr add {n.host}/24 dev {n.outside}")


def link_local_ready(init):
    """eth0's link-local address, which the kernel adds once the link has carrier."""
    info = json.loads(sh("ip -j -6 addr show dev eth0", init))
    return any(a["local"].startswith("fe80:") and not a.get("tentative") for a in info[0].get("addr_info", []))


def container_init(t, n, script):
    """The host pid of the container's init (unshare's child), remembered for the cleanup."""
    wait_until(lambda: Path(f"/proc/{t.pid}/task/{t.pid}/children").read_text().split(), "unshare's child")
    n.init, n.script = int(Path(f"/proc/{t.pid}/task/{t.pid}/children").read_text().split()[0]), str(script)
    return n.init


def start_server(procs, n, extra="", shell=False):
    """The container, configured from outside: veth, addresses, routes, a
    rule with its table, a neighbour, an nft table, sysctls; READY once it
    serves. shell: its init is a shell, the server its child."""
    Path(procs.workdir / "page.txt").write_text(PAGE)
    script = procs.workdir / "server.py"
    script.write_text(SERVER)
    server = ["python3", str(script), n.inner]
    t = procs.start([*UNSHARE, *(["sh", "-c", f"{' '.join(server)} & wait"] if shell else server)], name="netns",
                    ready=False)
    init = container_init(t, n, script)
    sh(f"ip link add {n.outside} type veth peer name eth0 netns {init}")
    sh(f"""set -e
        ip link set lo up
        sysctl -qw net.ipv6.conf.eth0.accept_dad=0 net.ipv6.conf.eth0.hop_limit=33 net.core.somaxconn=1234 \
            net.ipv4.conf.eth0.rp_filter=2 net.ipv4.ip_forward=1 net.ipv4.conf.default.arp_announce=2
        ip link set eth0 mtu 1400 up
        ip addr add {n.inner}/24 dev eth0
        ip -6 addr add fd00:{n.prefix.split('.')[1]}::2/64 dev eth0 nodad
        ip route add 10.250.0.0/16 via {n.host}
        ip -6 route add fd99:{n.prefix.split('.')[1]}::/64 via fd00:{n.prefix.split('.')[1]}::1 metric 77
        ip route add default via {n.host} table 100
        ip rule add from {n.inner} to 10.251.0.0/16 table 100 priority 100
        ip neigh add {n.prefix}.9 lladdr 02:00:00:00:00:09 dev eth0 nud permanent
        nft add table inet psfilter
        nft add chain inet psfilter input '{{ type filter hook input priority 0; policy accept; }}'
        nft add set inet psfilter blocked '{{ type ipv4_addr; elements = {{ 10.252.0.1, 10.252.0.2 }}; }}'
        nft add rule inet psfilter input ip saddr @blocked counter drop
        {extra}""", init)
    configure_outside(n)
    t.wait_ready()
    wait_until(lambda: link_local_ready(init), "eth0's link-local address")
    return t, init


def inside_snapshot(host_pid):
    """proc_snapshot from inside the container's pid and network namespaces."""
    return nsworker.run_inside(host_pid, lambda: proc_snapshot(1), enter=("net",))


def get_page(n):
    with urllib.request.urlopen(n.url(), timeout=10) as r:
        return r.read().decode()


def dump_server(t, init, images):
    before = inside_snapshot(init)
    others = descendants(init)
    procsnap.dump(init, str(images))
    t.wait_exit()
    reap_gone([init, *others])
    return before


def restore_server(t, n, images):
    pid = procsnap.restore(str(images), external={"veth": {"eth0": n.outside}})
    t.adopt(pid)
    configure_outside(n)
    wait_until(lambda: link_local_ready(pid), "eth0's link-local address after the restore")
    return pid


@pytest.mark.parametrize("shell", [False, True], ids=["python-init", "shell-init"])
def test_server_restored_and_serving(shell, procs, net, tmp_path):
    """The server answers on its own address again, its namespace compared
    equal (devices, addresses, routes, rules, neighbours, nft, sysctls),
    its UDP and unix sockets checked by itself (as the init, or the child
    of a shell that is)."""
    n = net()
    t, init = start_server(procs, n, shell=shell)
    assert get_page(n) == PAGE
    before = dump_server(t, init, tmp_path / "img")
    pid = restore_server(t, n, tmp_path / "img")
    after = inside_snapshot(pid)
    assert_same_snapshot(before, after)
    assert after.state[1]["ns.net.nft"].count("10.252.0.2") == 1, after.state[1]["ns.net.nft"]
    assert get_page(n) == PAGE
    os.kill(descendants(pid)[0] if shell else pid, signal.SIGUSR1)
    assert_pass(t)


def test_state_check_sees_lost_network_state(procs, net, tmp_path):
    """Each piece of the namespace's state, changed behind the tree's back,
    is a difference the state check names."""
    n = net()
    t, init = start_server(procs, n)
    before = inside_snapshot(init)
    for change, key in [("ip route add 10.253.0.0/16 via " + n.host, "ns.net.routes4"),
                        ("sysctl -qw net.ipv4.conf.eth0.rp_filter=0", "ns.net.sysctls"),
                        ("nft delete table inet psfilter", "ns.net.nft"),
                        ("ip rule del priority 100", "ns.net.rules4"),
                        ("ip neigh del " + n.prefix + ".9 dev eth0", "ns.net.neighbours"),
                        ("ip link set eth0 mtu 1300", "ns.net.links")]:
        sh(change, init)
        with pytest.raises(AssertionError, match=key.replace(".", r"\.")):
            assert_same_snapshot(before, inside_snapshot(init))
        before = inside_snapshot(init)
    os.kill(init, signal.SIGKILL)
    t.wait_exit()
    reap_gone([init])


def test_restore_needs_the_veth_outside_named(procs, net, tmp_path):
    """Without --external veth[eth0]:NAME the restore is refused naming the
    device (CLI: one line, no traceback), nothing left running; with a name
    taken outside, refused too; the image restores afterwards."""
    n = net()
    t, init = start_server(procs, n)
    dump_server(t, init, tmp_path / "img")
    r = cli("restore", "-D", tmp_path / "img", "-d")
    assert r.returncode != 0 and "veth device eth0" in r.stderr and "--external veth[eth0]" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    with pytest.raises(RestoreError, match=r"--external veth\[eth1\]: .* no veth eth1"):
        procsnap.restore(str(tmp_path / "img"), external={"veth": {"eth0": n.outside, "eth1": "x"}})
    taken, its_peer = net(), net()
    sh(f"ip link add {taken.outside} type veth peer name {its_peer.outside}")
    with pytest.raises(RestoreError, match="network namespace: ip -batch"):
        procsnap.restore(str(tmp_path / "img"), external={"veth": {"eth0": taken.outside}})
    restore_server(t, n, tmp_path / "img")
    assert get_page(n) == PAGE
    os.kill(t.pid, signal.SIGUSR1)
    assert_pass(t)


def test_restored_through_the_cli(procs, net, tmp_path):
    """`procsnap restore -D DIR --external veth[eth0]:OUTSIDE -d`."""
    n = net()
    t, init = start_server(procs, n)
    dump_server(t, init, tmp_path / "img")
    r = cli("restore", "-D", tmp_path / "img", "--external", f"veth[eth0]:{n.outside}", "-d")
    assert r.returncode == 0, r.stderr
    pid = int(r.stdout.split()[0])
    try:
        configure_outside(n)
        assert get_page(n) == PAGE
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        reap_gone([pid])


@pytest.mark.parametrize("make, name", [
    ("ip tuntap add tun0 mode tun", r"device tun0 \(kind tun\)"),
    ("ip link add mv0 link eth0 type macvlan", r"device mv0 \(kind macvlan\)"),
    ("ip link add va type veth peer name vb", r"device v[ab] \(kind veth\): its peer"),
    ("iptables-legacy -A INPUT -p tcp --dport 9 -j DROP", r"legacy iptables rules \(tables filter: '-A INPUT"),
    ("iptables -A INPUT -m comment --comment hi -j ACCEPT", r"nftables table ip filter chain INPUT: a rule "
     r"with the x_tables match comment"),
], ids=["tun", "macvlan", "veth-inside", "iptables-legacy", "iptables-nft-xt"])
def test_devices_refused_by_name(make, name, procs, net, tmp_path):
    """Device kinds not made again are refused naming the device and its
    kind, legacy iptables rules naming the first; the container serves on
    and passes its own check."""
    n = net()
    t, init = start_server(procs, n, extra=make)
    before = inside_snapshot(init)
    with pytest.raises(Unsupported, match=r"net namespace net:\[\d+\]: " + name):
        procsnap.dump(init, str(tmp_path / "img"))
    assert not (tmp_path / "img" / "procsnap.img").exists()
    assert_same_snapshot(before, inside_snapshot(init))
    assert get_page(n) == PAGE
    os.kill(init, signal.SIGUSR1)
    status, out = t.wait_exit()
    assert status == 0 and "PASS\n" in out, out


ECHO = r'''
import socket, sys, time
addr = sys.argv[1]
while True:
    try:
        l = socket.socket(); l.bind((addr, 7000)); break
    except OSError:
        time.sleep(0.01)
l.listen(1)
print("LISTENING", flush=True)
c, _ = l.accept()
print("READY", flush=True)
got = b""
while not got.endswith(b"end"):
    data = c.recv(100)
    if not data:
        break
    got += data
    c.sendall(data.upper())
print("PASS" if got == b"before-after-end" else f"FAIL: received {got!r}", flush=True)
'''


def test_live_tcp_connection(procs, net, tmp_path):
    """--tcp-established: a connection from outside to a server in the
    container goes on after the restore (the network lock taken and
    dropped inside the namespace); the server checks the whole stream."""
    n = net()
    script = procs.workdir / "echo.py"
    script.write_text(ECHO)
    t = procs.start([*UNSHARE, "python3", str(script), n.inner], name="echo", ready=False)
    init = container_init(t, n, script)
    sh(f"ip link add {n.outside} type veth peer name eth0 netns {init}")
    sh(f"ip link set lo up && ip link set eth0 up && ip addr add {n.inner}/24 dev eth0", init)
    configure_outside(n)
    wait_until(lambda: "LISTENING" in t.output(), "the echo server listening")
    with socket.create_connection((n.inner, 7000), timeout=10) as conn:
        t.wait_ready()
        conn.sendall(b"before-")
        assert conn.recv(100) == b"BEFORE-"
        before = inside_snapshot(init)
        procsnap.dump(init, str(tmp_path / "img"), tcp_established=True)
        t.wait_exit()
        pid = procsnap.restore(str(tmp_path / "img"), external={"veth": {"eth0": n.outside}}, tcp_established=True)
        t.adopt(pid)
        assert "procsnap-" not in sh("nft list ruleset", pid)  # the lock, made again with the ruleset, is gone
        configure_outside(n)
        assert_same_snapshot(before, inside_snapshot(pid))
        conn.sendall(b"after-")
        assert conn.recv(100) == b"AFTER-"
        conn.sendall(b"end")
        assert conn.recv(100) == b"END"
    assert_pass(t)


@pytest.mark.parametrize("edit, found", [
    (lambda net: net["routes"].append(["-4", "link", "del", "eth0"]), "ip arguments"),
    (lambda net: net["routes"].append(["-4", "route", "add", "10.0.0.0/8\nlink del eth0"]), "ip arguments"),
    (lambda net: net["devices"][1].update(kind="macvlan"), "device eth0 of kind macvlan"),
    (lambda net: net["sysctls"].update({"../kernel/core_pattern": "|/bin/sh"}), "sysctl"),
], ids=["verb", "newline", "kind", "sysctl"])
def test_corrupt_net_record(edit, found, procs, net, tmp_path):
    """A NETN record restore cannot trust is ImageCorrupt, naming it, before
    anything is made (no ip command beyond the verbs it needs, no sysctl
    outside /proc/sys/net)."""
    from conftest import our_children, rewrite_records
    from procsnap.errors import ImageCorrupt

    n = net()
    t, init = start_server(procs, n)
    dump_server(t, init, tmp_path / "img")
    rewrite_records(tmp_path / "img", lambda records: [edit(p) for tag, p in records if tag == b"NETN"])
    mine = set(our_children())
    with pytest.raises(ImageCorrupt, match=found):
        procsnap.restore(str(tmp_path / "img"), external={"veth": {"eth0": n.outside}})
    assert set(our_children()) <= mine
    assert subprocess.run(["ip", "link", "show", n.outside], capture_output=True).returncode != 0


@pytest.mark.parametrize("stage", ["after-spawn", "before-detach"])
def test_failed_restore_leaves_nothing(stage, procs, net, tmp_path, monkeypatch):
    """A restore that fails once the namespace is made leaves no process,
    and the veth's end outside goes with the namespace (the kernel tears
    a namespace down after its last process, asynchronously); the image
    restores and serves afterwards."""
    from conftest import our_children
    from procsnap.faults import InjectedFault

    n = net()
    t, init = start_server(procs, n)
    dump_server(t, init, tmp_path / "img")
    mine = set(our_children())
    monkeypatch.setenv("PROCSNAP_FAULT", stage)
    with pytest.raises(InjectedFault):
        procsnap.restore(str(tmp_path / "img"), external={"veth": {"eth0": n.outside}})
    monkeypatch.delenv("PROCSNAP_FAULT")
    assert set(our_children()) <= mine
    wait_until(lambda: subprocess.run(["ip", "link", "show", n.outside], capture_output=True).returncode != 0,
               f"{n.outside} gone with the failed restore's namespace")
    pid = restore_server(t, n, tmp_path / "img")
    assert get_page(n) == PAGE
    os.kill(pid, signal.SIGUSR1)
    assert_pass(t)
