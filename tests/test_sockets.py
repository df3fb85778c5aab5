"""Sockets other than pairs: unix sockets bound, listening, with waiting
connections, named datagram sockets (objects/unix.py), and inet sockets
that are not live connections (objects/inet.py). Every target checks its
own sockets after the restore; the state check compares every socket's
kind, addresses, peer, queue and options (tests/statecheck.py)."""

import os
import socket
import sys
import textwrap

import pytest

import procsnap
from conftest import assert_cli_error, assert_pass, assert_untouched, cli, dump_kill, restore

UNIX_PROGRAM = textwrap.dedent("""\
    import os, signal, socket, stat, struct, sys
    d = sys.argv[1]
    path, upath, gone = f"{d}/listen.sock", f"{d}/u.sock", f"{d}/gone.sock"
    abstract = f"\\0procsnap-test-{os.getpid()}".encode()
    seqname = f"\\0procsnap-seq-{os.getpid()}".encode()
    U = socket.AF_UNIX
    L = socket.socket(U, socket.SOCK_STREAM); L.bind(path); os.chmod(path, 0o640); L.listen(5)
    c1 = socket.socket(U, socket.SOCK_STREAM); c1.connect(path); s1, _ = L.accept()
    L.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)  # after: s1 carries no credentials
    c1.send(b"to-server"); s1.send(b"to-client")
    c1.setsockopt(socket.SOL_SOCKET, 42, 0)  # SO_PEEK_OFF
    c2 = socket.socket(U, socket.SOCK_STREAM); c2.connect(path)   # waiting in the backlog
    c3 = socket.socket(U, socket.SOCK_STREAM); c3.bind(f"{d}/c3.sock"); c3.connect(path)
    D = socket.socket(U, socket.SOCK_DGRAM); D.bind(abstract)
    D.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 300000)
    u = socket.socket(U, socket.SOCK_DGRAM); u.bind(upath); u.sendto(b"m1", abstract)
    u.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("qq", 3, 500000))
    v = socket.socket(U, socket.SOCK_DGRAM); v.sendto(b"m2", abstract)
    e = socket.socket(U, socket.SOCK_DGRAM); e.connect(abstract); e.send(b"m3")
    Q = socket.socket(U, socket.SOCK_SEQPACKET); Q.bind(seqname); Q.listen(3)
    q1 = socket.socket(U, socket.SOCK_SEQPACKET); q1.connect(seqname); qs, _ = Q.accept()
    q1.send(b"one"); q1.send(b"two!"); q1.shutdown(socket.SHUT_WR)
    x = socket.socket(U, socket.SOCK_DGRAM); x.bind(gone); os.unlink(gone)
    y = socket.socket(U, socket.SOCK_DGRAM); y.bind(f"{d}/replaced.sock")
    os.unlink(f"{d}/replaced.sock")
    with open(f"{d}/replaced.sock", "w") as f:
        f.write("a file now")
    os.chown(path, 1000, 1001)
    lone = socket.socket(U, socket.SOCK_STREAM)
    signal.signal(signal.SIGUSR1, lambda *a: None)
    os.write(1, b"READY\\n")
    signal.pause()
    bad = []
    def check(what, got, want):
        if got != want:
            bad.append(f"{what}: {got!r} != {want!r}")
    check("listener name", L.getsockname(), path)
    check("listener file mode", oct(os.stat(path).st_mode), oct(stat.S_IFSOCK | 0o640))
    check("listener file owner", (os.stat(path).st_uid, os.stat(path).st_gid), (1000, 1001))
    check("replaced name", y.getsockname(), f"{d}/replaced.sock")
    check("the file that replaced it", open(f"{d}/replaced.sock").read(), "a file now")
    check("nothing left beside it", sorted(os.listdir(d)), ["c3.sock", "listen.sock", "replaced.sock", "u.sock"])
    check("passcred", L.getsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED), 1)
    check("accepted name", s1.getsockname(), path)
    check("to server", s1.recv(100), b"to-server")
    check("to client", c1.recv(100), b"to-client")
    check("peek off", c1.getsockopt(socket.SOL_SOCKET, 42), 0)
    s2, _ = L.accept(); c2.send(b"c2"); check("c2 accepted first", s2.recv(10), b"c2")
    check("passcred inherited", s2.getsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED), 1)
    s3, a3 = L.accept(); check("c3 second, by its name", a3, f"{d}/c3.sock")
    c3.send(b"c3"); check("c3 accepted", s3.recv(100, socket.MSG_PEEK), b"c3")
    msg, anc, _, _ = s3.recvmsg(10, 64)
    check("credentials of the restored sender", [struct.unpack("3i", a[2])[0] for a in anc], [os.getpid()])
    got = [D.recvfrom(100) for _ in range(3)]
    check("datagrams", [g[0] for g in got], [b"m1", b"m2", b"m3"])
    check("sender", got[0][1], upath)
    check("rcvbuf", D.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF), 600000)
    check("sndtimeo", struct.unpack("qq", u.getsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, 16)), (3, 500000))
    check("seqpacket", [qs.recv(10), qs.recv(10), qs.recv(10)], [b"one", b"two!", b""])
    check("unlinked name", x.getsockname(), gone)
    check("unlinked file", os.path.exists(gone), False)
    check("lone", lone.getsockname(), "")
    n = socket.socket(U, socket.SOCK_STREAM); n.connect(path); s4, _ = L.accept(); n.send(b"new")
    check("new connection", s4.recv(10), b"new")
    e.send(b"m4"); check("connected datagram", D.recv(10), b"m4")
    os.write(1, b"PASS\\n" if not bad else ("FAIL " + "; ".join(bad) + "\\n").encode())
    """)


def test_unix_sockets_named_listening_waiting(procs, tmp_path):
    """A listener at a path (its file's mode kept) with an accepted
    connection holding data both ways and two connections waiting in its
    backlog (accepted after the restore, in order); an abstract datagram
    socket with datagrams from a named, an unnamed and a connected sender;
    a seqpacket pair with boundaries and a shutdown; a socket bound to a
    path since unlinked, one whose path now names a regular file; an unbound
    one; the listener's socket file keeps its mode and owner."""
    (tmp_path / "d").mkdir()
    t = procs.start([sys.executable, "-c", UNIX_PROGRAM, str(tmp_path / "d")], name="unix")
    images = dump_kill(t, tmp_path / "img")
    restore(procs, t, images)
    assert_pass(t)


def free_port(family=socket.AF_INET, host="127.0.0.1"):
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def http_get(port, path="/"):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        c.sendall(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
        data = b""
        while chunk := c.recv(65536):
            data += chunk
    return data


def test_http_server_serves_after_restore(procs, tmp_path):
    """python3 -m http.server on loopback: dumped after serving a request
    (its port has a connection in TIME_WAIT), killed, restored onto the
    same port, and serving again."""
    port = free_port()
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "hello.txt").write_text("hello from before the dump\n")
    t = procs.start([sys.executable, "-u", "-c",
                     "import runpy, sys; sys.argv = ['http.server', '--bind', '127.0.0.1', sys.argv[1]]; "
                     "print('READY', flush=True); runpy.run_module('http.server', run_name='__main__')",
                     str(port)], cwd=tmp_path / "www", name="http", ready=False)
    t.wait_ready()

    def serving():
        try:
            return b"hello from before" in http_get(port, "/hello.txt")
        except OSError:
            return False
    from conftest import wait_until
    wait_until(serving, "http.server serving")
    # its handler threads (one per request) are gone before the state is taken
    wait_until(lambda: len(os.listdir(f"/proc/{t.pid}/task")) == 1, "the request threads to end")
    images = dump_kill(t, tmp_path / "img")
    restore(procs, t, images)
    assert b"200 OK" in http_get(port, "/hello.txt") and b"hello from before" in http_get(port, "/hello.txt")


# tests/targets/inet.c (every kind of inet socket with options, checked by the
# target itself) is case inet-all: test_dump_restore runs it in every variant,
# test_targets under sabotage.


REFUSED = {
    # kind: (set-up code that leaves `fd` = the fd refused, what the refusal names)
    "tcp-established": ("a = socket.socket(); a.bind(('127.0.0.1', 0)); a.listen()\n"
                        "c = socket.create_connection(a.getsockname()); s, _ = a.accept(); fd = c.fileno()",
                        ("live TCP connection", "ESTABLISHED", "127.0.0.1")),
    "accept-queue": ("a = socket.socket(); a.bind(('127.0.0.1', 0)); a.listen()\n"
                     "c = socket.create_connection(a.getsockname()); c.detach(); fd = a.fileno()",
                     ("listening", "1 connection in its accept queue")),
    "udp-queued": ("a = socket.socket(type=socket.SOCK_DGRAM); a.bind(('127.0.0.1', 0))\n"
                   "a.sendto(b'x' * 33, a.getsockname()); fd = a.fileno()",
                   ("UDP socket bound to 127.0.0.1:", "datagrams queued", "33 bytes")),
    "udp-multicast": ("import struct; a = socket.socket(type=socket.SOCK_DGRAM)\n"
                      "a.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, struct.pack('4s4s', "
                      "socket.inet_aton('239.7.7.7'), socket.inet_aton('127.0.0.1'))); fd = a.fileno()",
                      ("multicast group 239.7.7.7", "not supported")),
    "packet-ring": ("import struct; a = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0)\n"
                    "a.setsockopt(263, 5, struct.pack('4I', 4096, 1, 2048, 2)); fd = a.fileno()",  # PACKET_RX_RING
                    ("packet socket", "packet ring")),
    "unix-data-not-accepted": ("a = socket.socket(socket.AF_UNIX); a.bind(b'\\0procsnap-refused-%d' % os.getpid())\n"
                               "a.listen(); c = socket.socket(socket.AF_UNIX); c.connect(a.getsockname())\n"
                               "c.send(b'early'); fd = c.fileno()",
                               ("waits to be accepted", "data already sent")),
    "unix-credentials": ("a, b = socket.socketpair(); a.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)\n"
                         "kid = os.fork()\n"
                         "if kid == 0: b.send(b'from a process gone since'); os._exit(0)\n"
                         "os.waitpid(kid, 0); fd = a.fileno()",
                         ("credentials in flight from pid", "outside the dumped tree")),
    "unix-rights": ("import select; a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM); "
                    "e = select.epoll(); socket.send_fds(b, [b'x'], [e.fileno()]); e.close(); fd = a.fileno()",
                    ("socket:[", "file descriptor in flight", "SCM_RIGHTS", "anon_inode:[eventpoll]",
                     "an epoll instance", "no process of the dumped tree holds")),
    "unix-rights-stream": ("a, b = socket.socketpair(); b.send(b'plain'); socket.send_fds(b, [b'x'], [0]); "
                           "fd = a.fileno()",
                           ("stream socket", "file descriptors in flight", "SCM_RIGHTS", "place in the byte stream",
                            "glued")),
}


@pytest.mark.parametrize("kind", sorted(REFUSED))
def test_refused_by_name(kind, procs, tmp_path, proc_snapshot, assert_same_snapshot):
    """What is not restored yet is refused at dump, naming the pid, the fd
    and why; the process runs on untouched and passes its own check."""
    setup, names = REFUSED[kind]
    code = ("import os, signal, socket\n" + setup + "\n"
            "signal.signal(signal.SIGUSR1, lambda *x: None)\n"
            "os.write(1, f'READY\\n{fd}\\n'.encode())\n"
            "signal.pause()\n"
            "os.write(1, b'PASS\\n')\n")
    t = procs.start([sys.executable, "-c", code], name=kind)
    fd = t.output().split()[1]
    images = tmp_path / "img"
    images.mkdir()
    before = proc_snapshot(t.pid)
    with pytest.raises(procsnap.Unsupported) as exc:
        procsnap.dump(t.pid, str(images))
    for name in (f"pid {t.pid}", f"fd {fd}", *names):
        assert name in str(exc.value), exc.value
    assert_untouched(t.pid, before, images, proc_snapshot, assert_same_snapshot)
    assert_cli_error(cli("dump", "-t", t.pid, "-D", images), f"pid {t.pid}", f"fd {fd}", *names)
    assert_untouched(t.pid, before, images, proc_snapshot, assert_same_snapshot)
    assert_pass(t)


EXT_PROGRAM = textwrap.dedent("""\
    import os, signal, socket, sys
    d = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    d.connect(sys.argv[1])
    d.send(b"before")
    signal.signal(signal.SIGUSR1, lambda *a: None)
    os.write(1, f"READY\\n{d.fileno()}\\n".encode())
    signal.pause()
    d.send(b"after")
    os.write(1, b"PASS\\n")
    """)


def test_ext_unix_sk_datagram_reconnects(procs, tmp_path):
    """A datagram socket connected to a named socket outside the tree is
    refused unless --ext-unix-sk; with it, the restore (also given the flag)
    connects it to that name again and what it sends arrives there."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "outside.sock")
    server.bind(path)
    try:
        t = procs.start([sys.executable, "-c", EXT_PROGRAM, path], name="ext")
        fd = t.output().split()[1]
        assert server.recv(10) == b"before"
        r = cli("dump", "-t", t.pid, "-D", tmp_path / "img")
        assert_cli_error(r, f"pid {t.pid}", f"fd {fd}", "outside the dumped tree", "--ext-unix-sk")
        images = tmp_path / "img"
        t.dumped = None
        from conftest import proc_snapshot, reap_gone
        t.dumped = proc_snapshot(t.pid)
        procsnap.dump(t.pid, str(images), ext_unix_sk=True)
        t.reap()
        with pytest.raises(procsnap.RestoreError, match="--ext-unix-sk"):
            procsnap.restore(str(images))
        restore(procs, t, images, ext_unix_sk=True)
        assert_pass(t)
        assert server.recv(10) == b"after"
    finally:
        server.close()


def test_ext_unix_sk_stream_refused(procs, tmp_path):
    """A stream connection to a process outside the tree cannot be made
    again: refused with the reason, even with --ext-unix-sk."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path = str(tmp_path / "outside.sock")
    listener.bind(path)
    listener.listen()
    try:
        code = EXT_PROGRAM.replace("SOCK_DGRAM", "SOCK_STREAM")
        t = procs.start([sys.executable, "-c", code, path], name="ext")
        fd = t.output().split()[1]
        r = cli("dump", "--ext-unix-sk", "-t", t.pid, "-D", tmp_path / "img")
        assert_cli_error(r, f"pid {t.pid}", f"fd {fd}", "outside the dumped tree", "stream", "--ext-unix-sk")
        assert_pass(t)
    finally:
        listener.close()


def test_restore_refused_when_the_socket_directory_is_gone(procs, tmp_path):
    """A socket bound in a directory removed since the dump: verify names
    it, and the restore fails naming the path, before any process exists;
    nothing is left behind."""
    d = tmp_path / "d"
    d.mkdir()
    code = ("import os, signal, socket, sys\n"
            "s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1] + '/l.sock'); s.listen()\n"
            "signal.signal(signal.SIGUSR1, lambda *a: None)\n"
            "os.write(1, b'READY\\n'); signal.pause()\n")
    t = procs.start([sys.executable, "-c", code, str(d)], name="gone-dir")
    images = dump_kill(t, tmp_path / "img")
    t.dumped = None
    (d / "l.sock").unlink()
    d.rmdir()
    assert any(str(d) in p for p in procsnap.verify(str(images)))
    with pytest.raises(procsnap.RestoreError, match=str(d / "l.sock")):
        procsnap.restore(str(images))
    assert not os.path.exists(f"/proc/{t.pid}") and not d.exists()
    assert_cli_error(cli("restore", "-D", images), str(d / "l.sock"))


CREDS_PROGRAM = textwrap.dedent("""\
    import os, signal, socket, struct
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    a.send(b"from the root")
    name = b"\\0procsnap-creds-%d" % os.getpid()
    d = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); d.bind(name)
    d.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    s, c = socket.socketpair(); c.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    kid = os.fork()
    if kid == 0:
        e = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); e.sendto(b"from the child", name)
        s.send(b"stream from the child")
        signal.pause()
        os._exit(0)
    signal.signal(signal.SIGUSR1, lambda *x: None)
    for sk in (d, c):  # the child's messages are there
        sk.recv(100, socket.MSG_PEEK)
    os.write(1, b"READY\\n")
    signal.pause()
    bad = []
    for sk, want, who in ((b, b"from the root", os.getpid()), (d, b"from the child", kid),
                          (c, b"stream from the child", kid)):
        msg, anc, _, _ = sk.recvmsg(100, 64, socket.MSG_DONTWAIT)
        cred = [struct.unpack("<iII", data[:12]) for level, kind, data in anc if kind == socket.SCM_CREDENTIALS]
        if msg != want or cred != [(who, 0, 0)]:
            bad.append(f"{msg!r} {cred} (expected {want!r} from {who})")
    os.kill(kid, 9); os.waitpid(kid, 0)
    os.write(1, b"PASS\\n" if not bad else ("FAIL " + "; ".join(bad) + "\\n").encode())
    """)


def test_credentials_in_flight(procs, tmp_path):
    """SCM_CREDENTIALS in flight (receivers with SO_PASSCRED): datagrams
    from the root and from its child, stream bytes from the child, each
    arriving after the restore with the sender's pid, uid and gid."""
    t = procs.start([sys.executable, "-c", CREDS_PROGRAM], name="creds")
    images = dump_kill(t, tmp_path / "img")
    restore(procs, t, images)
    assert_pass(t)
