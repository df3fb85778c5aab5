"""Real servers (issue 10, part 5), each dumped while serving, killed,
restored and serving again with its data; the state check of
conftest.restore runs on every restore.

    python3 -m http.server   a file fetched before the dump and after the restore
    redis-server             some MiB of keys; a few read back by value after
    nginx                    master and workers (workers as nobody), a file
                             served after the restore, then a reload (SIGHUP)
    memcached                items set before, read after
    asyncio                  a server and its client in one process, over a
                             unix socket (and over TCP: refused by name today)

Each runs with its own configuration in the test's directory, on a
loopback port picked free at test time; never the system's service. The
programs are installed by the Makefile (apt-get, when missing).
"""

import os
import shutil
import signal
import socket
import struct
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

import procsnap
from conftest import assert_pass, assert_untouched, dump_kill, restore, wait_until
from test_sockets import free_port, http_get


def need(program):
    path = shutil.which(program) or shutil.which(program, path="/usr/sbin:/sbin")
    if path is None:
        pytest.fail(f"{program} is not installed (make test installs it)")
    return path


def serving(probe):
    """A wait_until condition: probe() returns truth without an OSError."""
    def check():
        try:
            return probe()
        except OSError:
            return False
    return check


def socket_inodes(pid):
    links = (os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd"))
    return {link for link in links if link.startswith("socket:")}


def socket_fds(pid):
    return sum(os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:") for fd in os.listdir(f"/proc/{pid}/fd"))


def sent_acknowledged(pid):
    """Every byte the TCP sockets of `pid` sent is acknowledged (SIOCOUTQ 0):
    the state check compares the queues' sizes, and a reply just sent gets
    its (delayed) ACK between the snapshot and the freeze, or after the restore."""
    import fcntl

    from procsnap.kernel.libc import copy_fd

    for fd in os.listdir(f"/proc/{pid}/fd"):
        if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
            with socket.socket(fileno=copy_fd(pid, int(fd))) as sk:
                if sk.family in (socket.AF_INET, socket.AF_INET6) and sk.type == socket.SOCK_STREAM \
                        and sk.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] not in (7, 10) \
                        and struct.unpack("<i", fcntl.ioctl(sk.fileno(), 0x5411, bytes(4)))[0]:  # SIOCOUTQ
                    return False
    return True


# --------------------------------------------------------------------------
# python3 -m http.server


def test_http_server(procs, tmp_path):
    """The stdlib's server as a program (ThreadingHTTPServer: one thread per
    request, gone again before the dump), serving a directory."""
    port = free_port()
    www = tmp_path / "www"
    www.mkdir()
    (www / "data.bin").write_bytes(os.urandom(200_000))
    t = procs.start([need("python3"), "-m", "http.server", "--bind", "127.0.0.1", "--directory", str(www),
                     str(port)], name="http.server", ready=False)
    wait_until(serving(lambda: http_get(port, "/data.bin").endswith((www / "data.bin").read_bytes())),
               "http.server serving")
    wait_until(lambda: len(os.listdir(f"/proc/{t.pid}/task")) == 1, "the request threads to end")
    images = dump_kill(t, tmp_path / "img")
    restore(procs, t, images)
    reply = http_get(port, "/data.bin")
    assert reply.startswith(b"HTTP/1.0 200 OK") and reply.endswith((www / "data.bin").read_bytes())
    assert b"404" in http_get(port, "/missing")


# --------------------------------------------------------------------------
# redis-server


class Resp:
    """A redis client over one TCP connection (RESP2, enough for the tests)."""

    def __init__(self, port):
        """port: a TCP port on loopback, or the path of a unix socket."""
        if isinstance(port, int):
            self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        else:
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.settimeout(30)
            self.sock.connect(str(port))
        self.buf = b""

    def close(self):
        self.sock.close()

    def _line(self):
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _reply(self):
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind in (b"+", b":"):
            return rest if kind == b"+" else int(rest)
        if kind == b"-":
            raise AssertionError(f"redis error: {rest.decode()}")
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            while len(self.buf) < n + 2:
                self.buf += self.sock.recv(1 << 16)
            value, self.buf = self.buf[:n], self.buf[n + 2:]
            return value
        if kind == b"*":
            return [self._reply() for _ in range(int(rest))]
        raise AssertionError(f"redis: unexpected reply {line!r}")

    @staticmethod
    def encode(*args):
        out = [b"*%d\r\n" % len(args)]
        for a in args:
            a = a if isinstance(a, bytes) else str(a).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(a), a))
        return b"".join(out)

    def pipeline(self, commands):
        self.sock.sendall(b"".join(self.encode(*c) for c in commands))
        return [self._reply() for _ in commands]

    def __call__(self, *args):
        return self.pipeline([args])[0]


REDIS_KEYS = 20_000
REDIS_VALUE = 256   # about 5 MiB of values


def redis_value(i):
    return (b"%08d" % i) * (REDIS_VALUE // 8)


def start_redis(procs, tmp_path):
    port = free_port()
    conf = tmp_path / "redis.conf"
    conf.write_text(textwrap.dedent(f"""\
        port {port}
        bind 127.0.0.1
        daemonize no
        save ""
        appendonly no
        dir {tmp_path}
        logfile ""
        unixsocket {tmp_path}/redis.sock
        unixsocketperm 700
        """))
    t = procs.start([need("redis-server"), str(conf)], name="redis", ready=False)
    wait_until(serving(lambda: Resp(port)("PING") == b"PONG"), "redis-server answering PING")
    c = Resp(port)
    for base in range(0, REDIS_KEYS, 1000):
        assert c.pipeline([("SET", f"key:{i}", redis_value(i)) for i in range(base, base + 1000)]) == [b"OK"] * 1000
    c("RPUSH", "list", "a", "b", "c")
    c("HSET", "hash", "field", "value")
    c("SET", "expiring", "soon", "EX", 3600)
    return t, port, c


def check_redis(c):
    assert c("DBSIZE") == REDIS_KEYS + 3
    for i in (0, 1, 4242, REDIS_KEYS - 1):
        assert c("GET", f"key:{i}") == redis_value(i)
    assert c("LRANGE", "list", 0, -1) == [b"a", b"b", b"c"]
    assert c("HGET", "hash", "field") == b"value"
    assert 0 < c("TTL", "expiring") <= 3600
    c("SET", "after", "restore")
    assert c("GET", "after") == b"restore"


def test_redis(procs, tmp_path):
    """redis-server (its bio threads, epoll, pipes; a TCP and a unix
    listener) with about 5 MiB of keys; clients that connect anew after
    the restore, over TCP and over the unix socket, read them."""
    t, port, c = start_redis(procs, tmp_path)
    c.close()
    wait_until(lambda: socket_fds(t.pid) == 2, "the loading client's connection to close (the listeners left)")
    images = dump_kill(t, tmp_path / "img")
    restore(procs, t, images)
    c = Resp(port)
    check_redis(c)
    c.close()
    c = Resp(tmp_path / "redis.sock")
    assert c("GET", "after") == b"restore" and c("GET", "key:7") == redis_value(7)
    c.close()


def test_redis_connected_client(procs, tmp_path):
    """A client that keeps its connection across dump, kill and restore:
    a live TCP connection (--tcp-established, objects/tcp.py)."""
    t, port, c = start_redis(procs, tmp_path)
    wait_until(lambda: sent_acknowledged(t.pid), "its replies acknowledged")
    images = dump_kill(t, tmp_path / "img", tcp_established=True)
    restore(procs, t, images, tcp_established=True)
    check_redis(c)
    c.close()


# --------------------------------------------------------------------------
# nginx


def nginx_conf(tmp_path, www, port):
    d = tmp_path
    return textwrap.dedent(f"""\
        daemon off;
        master_process on;
        worker_processes 2;
        user www-data;
        worker_rlimit_nofile 777;
        worker_priority 5;
        worker_cpu_affinity auto;
        pid {d}/nginx.pid;
        error_log {d}/error.log;
        events {{ worker_connections 64; }}
        http {{
            access_log {d}/access.log;
            client_body_temp_path {d}/body;
            proxy_temp_path {d}/proxy;
            fastcgi_temp_path {d}/fastcgi;
            uwsgi_temp_path {d}/uwsgi;
            scgi_temp_path {d}/scgi;
            server {{
                listen 127.0.0.1:{port} reuseport;
                root {www};
                location = /status {{ stub_status; }}
            }}
        }}
        """)


def nginx_requests(port):
    """stub_status's request counter, in memory all of nginx's processes share
    (MAP_SHARED|MAP_ANONYMOUS); this request counts itself."""
    reply = http_get(port, "/status").decode()
    return int(reply.split("server accepts handled requests")[1].split()[2])


def nginx_workers(pid):
    return sorted(int(p) for p in open(f"/proc/{pid}/task/{pid}/children").read().split())


def syscall_of(pid):
    return open(f"/proc/{pid}/syscall").read().split()[0]


def nginx_settled(pid, workers=2):
    """The master in sigsuspend (130), each worker done with its set-up
    (its epoll, eventfd) and waiting in epoll_wait (232)."""
    found = nginx_workers(pid)
    return len(found) == workers and syscall_of(pid) == "130" and all(syscall_of(w) == "232" for w in found)


@pytest.fixture
def www():
    """A directory the workers (nobody) can read: the test's own is in
    pytest's, which only root may enter."""
    d = Path(tempfile.mkdtemp(prefix="procsnap-nginx-"))
    try:
        d.chmod(0o755)
        yield d
    finally:
        shutil.rmtree(d)


def test_nginx(procs, tmp_path, www):
    """nginx's master (root, in sigsuspend) and two workers (www-data:
    credentials differ per process; their own rlimit, nice and affinity;
    a reuseport listener each; shared anonymous memory holding the request
    counters, epoll, eventfd, the channel socket pairs between master and
    workers); serves a file after the restore, counting on from where it
    was, then reloads (SIGHUP): new workers, serving."""
    port = free_port()
    (www / "index.html").write_text("hello from nginx\n")
    conf = tmp_path / "nginx.conf"
    conf.write_text(nginx_conf(tmp_path, www, port))
    t = procs.start([need("nginx"), "-p", str(tmp_path), "-c", str(conf), "-e", str(tmp_path / "error.log")],
                    name="nginx", ready=False)
    wait_until(serving(lambda: http_get(port, "/index.html").endswith(b"hello from nginx\n")), "nginx serving")
    wait_until(lambda: nginx_settled(t.pid), "nginx's master and two workers to settle")
    workers = nginx_workers(t.pid)
    assert {os.stat(f"/proc/{w}").st_uid for w in workers} == {33}
    idle = [socket_fds(w) for w in workers]
    served = nginx_requests(port)
    wait_until(lambda: nginx_settled(t.pid) and [socket_fds(w) for w in workers] == idle,
               "the worker that answered to be done with the connection")
    images = dump_kill(t, tmp_path / "img")
    restore(procs, t, images)
    assert nginx_workers(t.pid) == workers
    assert int((tmp_path / "nginx.pid").read_text()) == t.pid
    assert nginx_requests(port) == served + 1
    for _ in range(4):
        assert http_get(port, "/index.html").endswith(b"hello from nginx\n")
    assert nginx_requests(port) == served + 6
    (www / "index.html").write_text("after the reload\n")
    t.signal(signal.SIGHUP)
    wait_until(lambda: len(nginx_workers(t.pid)) == 2 and not set(nginx_workers(t.pid)) & set(workers),
               "new workers after the reload")
    assert http_get(port, "/index.html").endswith(b"after the reload\n")
    assert "[emerg]" not in (tmp_path / "error.log").read_text()


# --------------------------------------------------------------------------
# memcached


def memcached(port, request, end):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        c.sendall(request)
        data = b""
        while not data.endswith(end):
            chunk = c.recv(1 << 16)
            if not chunk:
                break
            data += chunk
    return data


def memcached_udp(port, request):
    """One request over UDP (each datagram after an 8-byte frame header:
    request id, sequence number, datagram count, reserved); the reply's body."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.settimeout(10)
        u.sendto(struct.pack("!HHHH", 7, 0, 1, 0) + request, ("127.0.0.1", port))
        reply = u.recv(1 << 16)
    assert reply[:2] == struct.pack("!H", 7)
    return reply[8:]


def test_memcached(procs, tmp_path):
    """memcached (four worker threads, libevent over epoll, the pipes
    between its threads, a UDP socket per thread on one port) with items
    set before the dump, read after over TCP and UDP."""
    port = free_port()
    t = procs.start([need("memcached"), "-u", "root", "-l", "127.0.0.1", "-p", str(port), "-U", str(port),
                     "-t", "4", "-m", "64"], name="memcached", ready=False)
    wait_until(serving(lambda: memcached(port, b"version\r\n", b"\r\n").startswith(b"VERSION")), "memcached serving")
    items = {f"item{i}": os.urandom(300 + i).hex().encode() for i in range(200)}
    for key, value in items.items():
        assert memcached(port, b"set %s 7 0 %d\r\n%s\r\n" % (key.encode(), len(value), value),
                         b"\r\n") == b"STORED\r\n"
    wait_until(lambda: len(socket_inodes(t.pid)) == 2, "the clients' connections to close (the TCP and UDP "
               "sockets left)")
    images = dump_kill(t, tmp_path / "img")
    restore(procs, t, images)
    for key, value in items.items():
        assert memcached(port, b"get %s\r\n" % key.encode(), b"END\r\n") == \
            b"VALUE %s 7 %d\r\n%s\r\nEND\r\n" % (key.encode(), len(value), value)
    assert memcached(port, b"incr missing 1\r\n", b"\r\n") == b"NOT_FOUND\r\n"
    assert memcached_udp(port, b"get item3\r\n") == b"VALUE item3 7 %d\r\n%s\r\nEND\r\n" % (
        len(items["item3"]), items["item3"])


# --------------------------------------------------------------------------
# asyncio: a server and its client in one process

ASYNCIO_PROGRAM = textwrap.dedent("""\
    # A server and a client in one event loop, talking a counter protocol:
    # the client sends n, the server answers n + 1. Before READY: 100
    # rounds, then one request the server does not read yet (in flight
    # across the dump); after SIGUSR1 the server reads it and 100 more
    # rounds follow. Any lost, doubled or reordered message fails.
    import asyncio, os, signal, sys

    kind, where = sys.argv[1], sys.argv[2]
    go = None

    async def serve(reader, writer):
        while True:
            if not go.is_set():  # what the client sends now stays in the socket
                writer.transport.pause_reading()
                await go.wait()
                writer.transport.resume_reading()
            line = await reader.readline()
            if not line:
                break
            writer.write(b"%d\\n" % (int(line) + 1))
            await writer.drain()
        writer.close()

    async def main():
        global go
        go = asyncio.Event()
        go.set()
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, go.set)
        if kind == "unix":
            server = await asyncio.start_unix_server(serve, where)
            reader, writer = await asyncio.open_unix_connection(where)
        else:
            server = await asyncio.start_server(serve, "127.0.0.1", 0)
            reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname())
        n = 0
        for i in range(100):
            if i == 99:
                go.clear()  # the server stops reading after this round
            writer.write(b"%d\\n" % n)
            n = int(await reader.readline())
        writer.write(b"%d\\n" % n)
        await writer.drain()
        print("READY", flush=True)
        for _ in range(101):
            got = int(await reader.readline())
            if got != n + 1:
                print(f"FAIL: sent {n}, answered {got}", flush=True)
                sys.exit(1)
            n = got
            writer.write(b"%d\\n" % n)
        writer.close()
        server.close()
        print("PASS" if n == 201 else f"FAIL: n = {n}", flush=True)

    asyncio.run(main())
    """)


def test_asyncio_unix_server_and_client(procs, tmp_path):
    """One process, one event loop (epoll, its self-pipe socket pair): a
    server on a unix socket and its client, a request in flight."""
    t = procs.start([need("python3"), "-c", ASYNCIO_PROGRAM, "unix", str(tmp_path / "counter.sock")],
                    name="asyncio-unix")
    images = dump_kill(t, tmp_path / "img")
    restore(procs, t, images)
    assert_pass(t)


def test_asyncio_tcp_server_and_client(procs, tmp_path, proc_snapshot, assert_same_snapshot):
    """The same over TCP on loopback: both ends of the connection are in
    the tree (--tcp-established); without the flag the live connection is
    refused by name and the program runs on untouched."""
    t = procs.start([need("python3"), "-c", ASYNCIO_PROGRAM, "tcp", "-"], name="asyncio-tcp")
    before = proc_snapshot(t.pid)
    images = tmp_path / "img"
    with pytest.raises(procsnap.Unsupported) as exc:
        procsnap.dump(t.pid, str(images))
    assert "ESTABLISHED" in str(exc.value) and "127.0.0.1" in str(exc.value) and "--tcp-established" in str(exc.value), \
        str(exc.value)
    assert_untouched(t.pid, before, images, proc_snapshot, assert_same_snapshot)
    wait_until(lambda: sent_acknowledged(t.pid), "its replies acknowledged")
    images = dump_kill(t, images, tcp_established=True)
    restore(procs, t, images, tcp_established=True)
    assert_pass(t)
