"""Live TCP connections (objects/tcp.py) and the network lock
(objects/netlock.py): a client outside the dumped tree keeps its
connection to the target (tests/targets/tcp.c) across dump, kill and
restore, and both byte streams are checked byte by byte, by the target and
by the client; the peer never sees a reset nor an error. The lock's rules
are looked for after every success and failure."""

import fcntl
import multiprocessing
import os
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading

import pytest

import procsnap
from conftest import (assert_cli_error, assert_pass, assert_running_untraced, cli, dump_kill, restore,
                      wait_until)
from procsnap.faults import DUMP_STAGES, RESTORE_STAGES, TCP_DUMP_STAGES, TCP_RESTORE_STAGES, InjectedFault
from procsnap.image.reader import open_image
from procsnap.objects import netlock

SIOCINQ, SIOCOUTQ = 0x541B, 0x5411


def in_byte(i):
    return (i * 7 + 3) & 0xFF


def out_byte(j):
    return (j * 13 + 5) & 0xFF


class Client:
    """The peer, outside the tree and outside the test process (a forked
    child of it: the restorer must not have threads of its own at its
    clone3): sends `send` bytes of the client's pattern (paced, or all at
    once), then shuts its write side down once `fin` is set; reads and
    checks the server's bytes until EOF, once `reading` is set."""

    def __init__(self, addr, port, send, expect, paced, reading=True, fin=True):
        self.sk = socket.create_connection((addr, port))
        self.send_total, self.expect, self.paced = send, expect, paced
        ctx = multiprocessing.get_context("fork")
        self._sent, self._got = ctx.Value("q", 0, lock=False), ctx.Value("q", 0, lock=False)
        self.reading = ctx.Event()
        if reading:
            self.reading.set()
        self.fin = ctx.Event()
        if fin:
            self.fin.set()
        self._result_r, self._result_w = ctx.Pipe(duplex=False)
        self.errors = []
        self.proc = ctx.Process(target=self._run, daemon=True)
        self.proc.start()

    sent = property(lambda self: self._sent.value)
    got = property(lambda self: self._got.value)

    def _run(self):
        errors = []
        threads = [threading.Thread(target=self._send, args=(errors,)),
                   threading.Thread(target=self._recv, args=(errors,))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self._result_w.send(errors)

    def _send(self, errors):
        pace = threading.Event()
        try:
            while self._sent.value < self.send_total:
                n = min(4096 if self.paced else 1 << 16, self.send_total - self._sent.value)
                self.sk.sendall(bytes(in_byte(self._sent.value + k) for k in range(n)))
                self._sent.value += n
                if self.paced:
                    pace.wait(0.001)
            self.fin.wait()
            self.sk.shutdown(socket.SHUT_WR)
        except OSError as err:
            errors.append(f"send after {self._sent.value} bytes: {err}")

    def _recv(self, errors):
        self.reading.wait()
        try:
            while True:
                data = self.sk.recv(1 << 16)
                if not data:
                    return
                got = self._got.value
                want = bytes(out_byte(got + k) for k in range(len(data)))
                if data != want:
                    at = next(k for k in range(len(data)) if data[k] != want[k])
                    errors.append(f"byte {got + at} is {data[at]:#x}, expected {want[at]:#x}")
                    return
                self._got.value += len(data)
        except OSError as err:
            errors.append(f"recv after {self._got.value} bytes: {err}")

    def queued(self, request):
        return struct.unpack("<i", fcntl.ioctl(self.sk.fileno(), request, bytes(4)))[0]

    def join(self, timeout=60):
        """Wait until both directions are done; their errors."""
        if self._result_r.poll(timeout):
            self.errors = self._result_r.recv()
        self.proc.join(5)
        assert not self.proc.is_alive(), f"client stuck: sent {self.sent}, got {self.got}"
        return self.errors

    def finish(self):
        assert not self.join(), self.errors
        assert (self.sent, self.got) == (self.send_total, self.expect), \
            f"client sent {self.sent} of {self.send_total}, got {self.got} of {self.expect} bytes"
        self.sk.close()


def start(procs, targets, addr="127.0.0.1", out=1 << 20, inn=1 << 20, mode="stream", reading=True, fin=True):
    binary = targets.path("tcp", "static")
    t = procs.start([binary, addr, str(out), str(inn), mode], ready=False)
    wait_until(lambda: "PORT " in t.output(), "the target's port")
    port = int(t.output().split("PORT ")[1].split()[0])
    client = Client(addr, port, inn, out, paced=mode == "stream", reading=reading, fin=fin)
    t.wait_ready()
    return t, client


def wait_full(client):
    """Until the client's queues have stopped moving, neither empty: the
    peer's windows are closed both ways."""
    last = [-1]

    def settled():
        now = (client.queued(SIOCINQ), client.queued(SIOCOUTQ), client.sent)
        same, last[0] = now == last[0], now
        return same and now[0] > 0 and now[1] > 0

    wait_until(lambda: settled() or (threading.Event().wait(0.05) and False), "both ways full", timeout=30)


def moving_queues(t):
    """The queue sizes of a connection with traffic: they move between the
    snapshot and the dump (the state check compares the rest)."""
    fd = next(fd for fd in os.listdir(f"/proc/{t.pid}/fd")
              if os.readlink(f"/proc/{t.pid}/fd/{fd}").startswith("socket:"))
    return tuple(f"sock.{fd}.{name}" for name in ("inq", "outq", "unsent"))


def dumped(procs, targets, tmp_path):
    """A target and its client with traffic, dumped with --tcp-established:
    (target, client, image, its lock)."""
    t, client = start(procs, targets)
    wait_until(lambda: client.got > 4096, "traffic")
    t.ignore_state = moving_queues(t)
    images = dump_kill(t, tmp_path / "img", tcp_established=True)
    return t, client, images, lock_of(images)


def nft_tables():
    r = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=True)
    return {line.split()[2] for line in r.stdout.splitlines() if "procsnap-" in line}


def our_rules():
    out = []
    for tool in ("iptables", "ip6tables"):
        r = subprocess.run([tool, "-w", "-S"], capture_output=True, text=True, check=True)
        out += [line for line in r.stdout.splitlines() if "procsnap-" in line]
    return out


@pytest.fixture
def no_locks(procs):
    """No lock of this test's dumps is left after it, whatever it did (the
    tables are named after the dumped pid: others' dumps are not ours)."""
    before = nft_tables()
    yield before
    ours = {t.pid for t in procs.started}
    left = {name for name in nft_tables() - before if int(name.split("-")[1]) in ours}
    for table in left:
        subprocess.run(["nft", "delete", "table", "inet", table], check=False)
    assert not left, f"network lock tables left: {left}"


def lock_of(images):
    return open_image(str(images)).checkpoint.net_lock[0]


def connection_of(images):
    (conn,) = open_image(str(images)).checkpoint.tcp_connections
    return conn


@pytest.mark.parametrize("addr", ["127.0.0.1", "::1", "::ffff:127.0.0.1"])
def test_stream_survives(procs, targets, tmp_path, no_locks, addr):
    """Bytes flowing both ways through the dump, the kill and the restore:
    every byte arrives once, in order, at both ends; the lock is held
    between the dump and the restore, and gone after."""
    t, client = start(procs, targets, addr)
    wait_until(lambda: client.got > 4096 and client.sent > 4096, "traffic both ways")
    t.ignore_state = moving_queues(t)
    images = dump_kill(t, tmp_path / "img", tcp_established=True)
    lock = lock_of(images)
    assert lock.tcp_established and lock.method == "nftables" and netlock.held(lock)
    assert lock.connections and lock.connections[0][0] == (4 if "." in addr else 6)
    restore(procs, t, images, tcp_established=True)
    assert not netlock.held(lock)
    assert_pass(t)
    client.finish()


def test_full_queues_and_zero_window(procs, targets, tmp_path, no_locks):
    """Neither end reads: the client's send queue and the server's receive
    queue fill, and the server's send queue too, against a zero window.
    All of it is in the image (sent, unsent, received) and arrives after."""
    total = 16 << 20
    t, client = start(procs, targets, out=total, inn=total, mode="stuffed", reading=False)
    wait_full(client)
    t.ignore_state = moving_queues(t)  # the server still queues what its growing send buffer takes
    images = dump_kill(t, tmp_path / "img", tcp_established=True)
    conn = connection_of(images)
    assert conn.window[1] == 0, f"the peer's window at the dump: {conn.window[1]}, expected 0"
    assert conn.unsent_len > 0 and conn.recv_len > 0, conn
    restore(procs, t, images, tcp_established=True)
    client.reading.set()
    assert_pass(t)
    client.finish()


def test_refused_without_flag(procs, targets, tmp_path, proc_snapshot, assert_same_snapshot, no_locks):
    t, client = start(procs, targets)
    images = tmp_path / "img"
    images.mkdir()
    r = cli("dump", "-t", t.pid, "-D", images)
    assert_cli_error(r, f"pid {t.pid}", "live TCP connection", "ESTABLISHED", "--tcp-established")
    assert_running_untraced(t.pid)
    assert not list(images.iterdir())
    assert_pass(t)
    client.finish()


def test_fin_wait1(procs, targets, tmp_path, no_locks):
    """The server has shut its side down behind data the client does not
    read (a zero window): FIN_WAIT1, its FIN unsent in the image; after the
    restore the client reads every byte, then the EOF."""
    t, client = start(procs, targets, out=200000, inn=16 << 20, mode="shut", reading=False)
    wait_until(lambda: _state_of(t.pid) == ["FIN_WAIT1"], "FIN_WAIT1", timeout=30)
    wait_full(client)
    t.ignore_state = moving_queues(t)  # the client's data still arrives
    images = dump_kill(t, tmp_path / "img", tcp_established=True)
    conn = connection_of(images)
    assert conn.state == 4 and conn.unsent_len > 0 and conn.window[1] == 0, conn
    restore(procs, t, images, tcp_established=True)
    client.reading.set()
    assert_pass(t)
    client.finish()


BOTH_ENDS = textwrap.dedent("""\
    import fcntl, os, signal, socket, struct, sys, time
    # argv: the listener's address, the one the client connects to
    L = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET); L.bind((sys.argv[1], 0)); L.listen(4)
    c = socket.create_connection((sys.argv[2], L.getsockname()[1])); s, _ = L.accept()
    def v6only(sk):  # bind() to a specific IPv6 address sets it, a connect() does not; the accepted one inherits it
        return sk.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) if sk.family == socket.AF_INET6 else None
    v6 = [v6only(x) for x in (L, c, s)]
    c.sendall(b"hello-before"); s.sendall(b"x" * 100000)   # queued both ways, not read
    def size(sk, request):  # FIONREAD, SIOCOUTQ
        return struct.unpack("i", fcntl.ioctl(sk.fileno(), request, bytes(4)))[0]
    while (size(s, 0x541B), size(c, 0x541B), size(s, 0x5411), size(c, 0x5411)) != (12, 100000, 0, 0):
        time.sleep(0.01)  # at rest: all arrived and acknowledged, so the state check compares the sizes
    signal.signal(signal.SIGUSR1, lambda *a: None)
    os.write(1, b"READY\\n")
    signal.pause()
    bad = []
    got = b""
    while len(got) < 12: got += s.recv(100)
    if got != b"hello-before": bad.append(f"server got {got!r}")
    n = 0
    while n < 100000:
        d = c.recv(65536); n += len(d)
        if d.strip(b"x"): bad.append("client data"); break
    c.sendall(b"after")
    if s.recv(10) != b"after": bad.append("after")
    if [v6only(x) for x in (L, c, s)] != v6: bad.append(f"IPV6_V6ONLY {[v6only(x) for x in (L, c, s)]}, was {v6}")
    c2 = socket.create_connection((sys.argv[2], L.getsockname()[1])); s2, _ = L.accept()   # the listener still listens
    os.write(1, (f"FAIL: {bad}\\n" if bad else "PASS\\n").encode())
""")


@pytest.mark.parametrize("listen,to", [("127.0.0.1", "127.0.0.1"), ("::1", "::1"), ("::", "::1")])
def test_both_ends_in_tree(procs, tmp_path, no_locks, listen, to):
    """Client, server and listener in one process, data queued both ways
    and not read: the pair is restored (the accepted socket binds beside
    its listener: repair forces the reuse), the queues' sizes compared by
    the state check, and the listener accepts again. IPv6: the client,
    bound by its connect, and the socket accepted by a listener on ::
    keep IPV6_V6ONLY off (a bind() to their address would set it)."""
    t = procs.start([sys.executable, "-c", BOTH_ENDS, listen, to])
    images = dump_kill(t, tmp_path / "img", tcp_established=True)
    assert len(open_image(str(images)).checkpoint.tcp_connections) == 2
    restore(procs, t, images, tcp_established=True)
    assert_pass(t)


ACCEPTED_OUTSIDE = textwrap.dedent("""\
    import os, signal, socket, sys
    s = socket.socket(fileno=int(sys.argv[1]))
    v6 = s.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
    s.sendall(b"before")
    signal.signal(signal.SIGUSR1, lambda *a: None)
    os.write(1, b"READY\\n")
    signal.pause()
    s.sendall(b"after")
    got = b""
    while len(got) < 4: got += s.recv(10)
    after = s.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
    ok = (v6, after, got) == (0, 0, b"back")
    os.write(1, b"PASS\\n" if ok else f"FAIL IPV6_V6ONLY {v6} then {after}, got {got!r}\\n".encode())
""")


def test_accepted_by_listener_outside(procs, tmp_path, no_locks):
    """A connection accepted by a listener on :: outside the tree (the
    test's) keeps IPV6_V6ONLY off: restored bound to :: and its port
    beside that listener, then connected in repair mode; both ends talk."""
    listener = socket.socket(socket.AF_INET6)
    listener.bind(("::", 0))
    listener.listen(1)
    with listener, socket.create_connection(("::1", listener.getsockname()[1])) as c:
        s, _ = listener.accept()
        with s:
            t = procs.start([sys.executable, "-c", ACCEPTED_OUTSIDE, str(s.fileno())], pass_fds=[s.fileno()])
        got = b""
        while len(got) < 6 and (piece := c.recv(10)):
            got += piece
        images = dump_kill(t, tmp_path / "img", tcp_established=True)
        restore(procs, t, images, tcp_established=True)
        assert got == b"before", got
        t.signal(signal.SIGUSR1)  # in pause() since before the dump
        c.settimeout(60)
        got = b""
        while len(got) < 5 and (piece := c.recv(20)):
            got += piece
        assert got == b"after", got
        c.sendall(b"back")
        status, out = t.wait_exit()  # signalled already: a SIGUSR1 more could land in its exit
        assert status == 0 and "PASS\n" in out and "FAIL" not in out, out


@pytest.mark.parametrize("addr,lock", [("127.0.0.1", "nftables"), ("::1", "nftables"),
                                       ("::ffff:127.0.0.1", "nftables"), ("::1", "iptables")])
def test_close_wait(procs, targets, tmp_path, no_locks, addr, lock):
    """CLOSE_WAIT: the client has sent its bytes and its FIN, the server has
    read none of them. Restored, the FIN made up from the peer (IPv4, IPv6)
    and let through the lock by its mark: the server reads every byte, then
    the EOF; the client sees no reset and the server's EOF at its close."""
    t, client = start(procs, targets, addr, out=1 << 16, inn=1 << 16, mode="stuffed")
    wait_until(lambda: client.sent == 1 << 16 and client.got == 1 << 16, "the client's FIN sent")
    wait_until(lambda: _state_of(t.pid) == ["CLOSE_WAIT"], "CLOSE_WAIT")
    images = dump_kill(t, tmp_path / "img", tcp_established=True, net_lock=lock)
    assert lock_of(images).method == lock and netlock.held(lock_of(images))
    conn = connection_of(images)
    assert conn.state == 8 and conn.recv_len == 1 << 16, conn
    restore(procs, t, images, tcp_established=True)
    assert_pass(t)
    client.finish()


def test_fin_wait2(procs, targets, tmp_path, no_locks):
    """FIN_WAIT2: the server has sent its bytes and its FIN, the client has
    read them and acknowledged the FIN but not sent its own. Restored, our
    FIN queued as sent and its ACK made up from the peer: after the
    restore the client sends its FIN, the server reads every byte, then
    the EOF."""
    t, client = start(procs, targets, out=1 << 16, inn=1 << 16, mode="shut", fin=False)
    wait_until(lambda: client.sent == 1 << 16 and client.got == 1 << 16, "the server's bytes read")
    wait_until(lambda: _state_of(t.pid) == ["FIN_WAIT2"], "FIN_WAIT2")
    images = dump_kill(t, tmp_path / "img", tcp_established=True)
    conn = connection_of(images)
    assert conn.state == 5 and conn.send_len == 0 and conn.recv_len == 1 << 16, conn
    restore(procs, t, images, tcp_established=True)
    os.kill(t.pid, signal.SIGUSR1)  # it reads its names, then its bytes: then the client's FIN may come
    wait_until(lambda: _queued(t.pid) == 0, "the server's reading")  # (before: it ends in CLOSE, ENOTCONN)
    client.fin.set()
    assert_pass(t)
    client.finish()


def test_last_ack(procs, targets, tmp_path, no_locks):
    """LAST_ACK: the client's bytes and FIN received, not read; then the
    server's FIN, behind data the client does not read (a zero window).
    Restored: the peer's FIN made up, then ours after it; the client reads
    every byte, then the EOF; the server reads its bytes, then the EOF."""
    t, client = start(procs, targets, out=200000, inn=1 << 16, mode="lastack", reading=False)
    wait_until(lambda: _state_of(t.pid) == ["LAST_ACK"], "LAST_ACK", timeout=30)
    _both_fins_survive(procs, t, client, tmp_path, 9)


def test_closing(procs, targets, tmp_path, no_locks):
    """CLOSING: the server's FIN behind data the client does not read (a
    zero window), then the client's bytes and FIN arrive. Restored: our
    FIN, then the peer's made up; both ends read every byte, then the EOF."""
    t, client = start(procs, targets, out=200000, inn=1 << 16, mode="shut", reading=False, fin=False)
    wait_until(lambda: _state_of(t.pid) == ["FIN_WAIT1"] and client.sent == 1 << 16, "FIN_WAIT1", timeout=30)
    client.fin.set()
    wait_until(lambda: _state_of(t.pid) == ["CLOSING"], "CLOSING", timeout=30)
    _both_fins_survive(procs, t, client, tmp_path, 11)


def _both_fins_survive(procs, t, client, tmp_path, state):
    """Dump, kill, restore a connection with a FIN each way, ours behind
    data the client has not read; then the client reads."""
    t.ignore_state = moving_queues(t)  # the client's window may still move
    images = dump_kill(t, tmp_path / "img", tcp_established=True)
    conn = connection_of(images)
    assert conn.state == state and conn.send_len > 0 and conn.recv_len == 1 << 16, conn
    restore(procs, t, images, tcp_established=True)
    client.reading.set()
    assert_pass(t)
    client.finish()


CONNECTING = textwrap.dedent("""\
    import os, select, signal, socket, sys
    c = socket.socket(socket.AF_INET6 if ":" in sys.argv[2] else socket.AF_INET); c.setblocking(False)
    err = c.connect_ex((sys.argv[2], int(sys.argv[1])))
    name = c.getsockname()
    signal.signal(signal.SIGUSR1, lambda *a: None)
    os.write(1, f"CONNECTING {err}\\n".encode())
    os.write(1, b"READY\\n")
    signal.pause()
    bad = []
    if not select.select([], [c], [], 60)[1]: bad.append("not connected in 60 s")
    e = c.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if e: bad.append(f"SO_ERROR {os.strerror(e)}")
    if c.getsockname() != name: bad.append(f"name {c.getsockname()} != {name}")
    c.setblocking(True); c.sendall(b"hello")
    got = b""
    while True:
        d = c.recv(100)
        if not d: break
        got += d
    if got != b"world": bad.append(f"got {got!r}")
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # resent by the test: not at the interpreter's exit
    os.write(1, (f"FAIL: {bad}\\n" if bad else "PASS\\n").encode())
""")


@pytest.mark.parametrize("addr", ["127.0.0.1", "::1"])
def test_syn_sent(procs, tmp_path, no_locks, addr):
    """SYN_SENT: a non-blocking connect whose SYN the test's own table
    drops. Restored: connect() again with repair off, the SYN with the ISN
    it had; once the test's table is gone the kernel's retransmission
    connects, the listener accepts, and both ends exchange their bytes."""
    listener = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET)
    listener.bind((addr, 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    table = f"psnaptest-syn-{os.getpid()}"
    subprocess.run(["nft", "-f", "-"], check=True, text=True, input=(
        f"add table inet {table}\nadd chain inet {table} input {{ type filter hook input priority -150; "
        f"policy accept; }}\nadd rule inet {table} input tcp dport {port} drop\n"))
    dropping = True
    try:
        t = procs.start([sys.executable, "-c", CONNECTING, str(port), addr])
        assert _state_of(t.pid) == ["SYN_SENT"]
        images = dump_kill(t, tmp_path / "img", tcp_established=True)
        conn = connection_of(images)
        assert conn.state == 2, conn
        restore(procs, t, images, tcp_established=True)  # its state check sees SYN_SENT: the SYN still dropped
        subprocess.run(["nft", "delete", "table", "inet", table], check=True)
        dropping = False
        os.kill(t.pid, signal.SIGUSR1)  # it sends once connected (assert_pass sends it again: no matter)
        listener.settimeout(60)
        s, _ = listener.accept()
        with s:
            s.settimeout(60)
            assert s.recv(5) == b"hello"
            s.sendall(b"world")
        assert_pass(t)
    finally:
        listener.close()
        if dropping:
            subprocess.run(["nft", "delete", "table", "inet", table], check=False)


def _queued(pid):
    """SIOCINQ of the target's one socket."""
    from procsnap.kernel.libc import copy_fd

    (fd,) = [fd for fd in os.listdir(f"/proc/{pid}/fd") if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")]
    with socket.socket(fileno=copy_fd(pid, int(fd))) as sk:
        return struct.unpack("<i", fcntl.ioctl(sk.fileno(), SIOCINQ, bytes(4)))[0]


def _state_of(pid):
    from procsnap.kernel.libc import copy_fd
    from procsnap.objects.inet import TCP_STATES

    states = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
            with socket.socket(fileno=copy_fd(pid, int(fd))) as sk:
                states.append(TCP_STATES[sk.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)[0]])
    return states


def test_restore_needs_flag_and_tcp_close(procs, targets, tmp_path, no_locks):
    """Restore refuses the image without --tcp-established or --tcp-close,
    keeping the lock; --tcp-close restores the socket unconnected (the
    program sees ENOTCONN), removes the lock, and the peer gets a reset,
    not silence."""
    t, client = start(procs, targets, out=1 << 30, inn=1 << 30)
    wait_until(lambda: client.got > 4096, "traffic")
    images = tmp_path / "img"
    images.mkdir()
    # no state check: the restored target fails at once, by design (its socket is another one)
    procsnap.dump(t.pid, str(images), tcp_established=True)
    t.reap()
    lock = lock_of(images)
    r = cli("restore", "-D", images, "-d")
    assert_cli_error(r, "live TCP connection", "--tcp-established", "--tcp-close")
    assert netlock.held(lock)
    t.adopt(procsnap.restore(str(images), tcp_close=True))
    assert not netlock.held(lock)
    status, out = t.wait_result()
    assert status != 0 and ("not connected" in out or "Broken pipe" in out), out
    errors = client.join()
    assert any("reset" in e.lower() or "Broken pipe" in e for e in errors), errors


def test_leave_running(procs, targets, tmp_path, no_locks):
    """--leave-running: repair mode off and the lock gone once the tree runs on."""
    t, client = start(procs, targets)
    wait_until(lambda: client.got > 4096, "traffic")
    images = tmp_path / "img"
    images.mkdir()
    procsnap.dump(t.pid, str(images), leave_running=True, tcp_established=True)
    assert not netlock.held(lock_of(images))
    assert_pass(t)
    client.finish()


def test_iptables_lock(procs, targets, tmp_path, no_locks):
    t, client = start(procs, targets, addr="::1")
    wait_until(lambda: client.got > 4096, "traffic")
    t.ignore_state = moving_queues(t)
    images = dump_kill(t, tmp_path / "img", tcp_established=True, net_lock="iptables")
    lock = lock_of(images)
    assert lock.method == "iptables" and netlock.held(lock)
    assert len([r for r in our_rules() if lock.table in r]) == 4  # a drop and a mark's accept each way
    restore(procs, t, images, tcp_established=True)
    assert not netlock.held(lock) and not [r for r in our_rules() if lock.table in r]
    assert_pass(t)
    client.finish()


def test_skip_net_lock(procs, targets, tmp_path, no_locks):
    """--skip-net-lock: the caller locks (here: the test, with a table of
    its own on the client's port); the dump adds no rule, the image says
    so, the restore removes nothing."""
    t, client = start(procs, targets)
    wait_until(lambda: client.got > 4096, "traffic")
    t.ignore_state = moving_queues(t)
    port = client.sk.getsockname()[1]
    table = f"psnaptest-{os.getpid()}"
    subprocess.run(["nft", "-f", "-"], check=True, text=True, input=(
        f"add table inet {table}\n" + "".join(
            f"add chain inet {table} {h} {{ type filter hook {h} priority -150; policy accept; }}\n"
            f"add rule inet {table} {h} tcp sport {port} drop\nadd rule inet {table} {h} tcp dport {port} drop\n"
            for h in ("input", "output"))))
    try:
        images = dump_kill(t, tmp_path / "img", tcp_established=True, net_lock="skip")
        assert not [name for name in nft_tables() - no_locks if name.startswith(f"procsnap-{t.pid}-")]
        assert lock_of(images).method == "skip" and not lock_of(images).table
        restore(procs, t, images, tcp_established=True, skip_net_lock=True)
    finally:
        subprocess.run(["nft", "delete", "table", "inet", table], check=True)
    assert_pass(t)
    client.finish()


@pytest.mark.parametrize("stage", DUMP_STAGES + TCP_DUMP_STAGES)
def test_dump_failure_removes_lock(procs, targets, tmp_path, monkeypatch, no_locks, stage):
    """A dump failing at any stage: no rule left, repair mode off, the
    connection goes on whole."""
    t, client = start(procs, targets)
    wait_until(lambda: client.got > 4096, "traffic")
    images = tmp_path / "img"
    images.mkdir()
    monkeypatch.setenv("PROCSNAP_FAULT", stage)
    with pytest.raises(InjectedFault):
        procsnap.dump(t.pid, str(images), tcp_established=True)
    monkeypatch.delenv("PROCSNAP_FAULT")
    assert not [name for name in nft_tables() - no_locks if name.startswith(f"procsnap-{t.pid}-")]
    assert_running_untraced(t.pid)
    assert_pass(t)
    client.finish()


@pytest.mark.parametrize("stage", RESTORE_STAGES)
def test_restore_failure_keeps_lock(procs, targets, tmp_path, monkeypatch, no_locks, stage):
    """A restore failing at any stage keeps the lock (the image is intact:
    the peer waits, silent) and leaves the address pair free: a second
    restore brings the connection back and removes the lock."""
    t, client, images, lock = dumped(procs, targets, tmp_path)
    monkeypatch.setenv("PROCSNAP_FAULT", stage)
    snapshot = t.dumped
    with pytest.raises(InjectedFault):
        restore(procs, t, images, tcp_established=True)
    monkeypatch.delenv("PROCSNAP_FAULT")
    assert netlock.held(lock)
    wait_until(lambda: not os.path.exists(f"/proc/{t.pid}"), "the half-restored process gone")
    t.dumped = snapshot
    restore(procs, t, images, tcp_established=True)
    assert not netlock.held(lock)
    assert_pass(t)
    client.finish()


def test_unlock_failure_named(procs, targets, tmp_path, monkeypatch, no_locks):
    """Unlocking fails after the tree runs: the restore fails naming the
    lock that stays (and the pid that runs); removed, the connection goes on."""
    (stage,) = TCP_RESTORE_STAGES
    t, client, images, lock = dumped(procs, targets, tmp_path)
    monkeypatch.setenv("PROCSNAP_FAULT", stage)
    with pytest.raises(procsnap.RestoreError, match=rf"pid {t.pid}: restored and running, .* {lock.table}"):
        procsnap.restore(str(images), tcp_established=True)
    monkeypatch.delenv("PROCSNAP_FAULT")
    t.adopt(t.pid)
    assert netlock.held(lock)
    netlock.unlock(lock)
    assert_pass(t)
    client.finish()


def test_sabotage_fails(procs, targets, tmp_path, no_locks):
    """The target's own check can fail."""
    binary = targets.path("tcp", "static")
    t = procs.start([binary, "127.0.0.1", "1000", "1000", "stream"], ready=False, env={"PS_TARGET_SABOTAGE": "1"})
    wait_until(lambda: "PORT " in t.output(), "the target's port")
    client = Client("127.0.0.1", int(t.output().split("PORT ")[1].split()[0]), 1000, 1000, paced=True)
    t.wait_ready()
    status, out = t.wait_result()
    assert status != 0 and "FAIL: bytes sent" in out, out
    client.finish()
