"""make bench-servers: dump and restore real servers (issue 10 part 5),
each with its own configuration on a loopback port, loaded with data.

    http.server  python3 -m http.server serving a directory
    redis        redis-server with BENCH_REDIS_MIB MiB of values (64)
    nginx        master and two workers (www-data)
    memcached    four threads, BENCH_MEMCACHED_MIB MiB of items (64)

Per server: processes and threads, image size, dump (procsnap.dump, the
server killed), restore (procsnap.restore, in this process: no CLI
start-up) and "serving": from the start of the restore until a new
client's first request is answered, the downtime a client that connects
anew sees after the restore begins.
Figures only, median [min-max] of BENCH_RUNS (3); image on tmpfs.

    redis+client  redis as above, with a client connected across the dump
                  (dump and restore --tcp-established, whole CLI runs): the
                  client sends INCR one at a time and checks each reply is
                  the one before plus one (a lost, doubled or reordered
                  command or reply would show); "peer gap" is the longest
                  time it waited for a reply, the downtime it sees.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

from common import ROOT, descendants, gone, kill_pids

sys.path.insert(0, ROOT)
import procsnap  # noqa: E402

RUNS = int(os.environ.get("BENCH_RUNS", "3"))
REDIS_MIB = int(os.environ.get("BENCH_REDIS_MIB", "64"))
MEMCACHED_MIB = int(os.environ.get("BENCH_MEMCACHED_MIB", "64"))
VALUE = 1000  # bytes per value


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ask(port: int, request: bytes) -> bytes:
    """The first bytes of a new client's reply (enough to tell it serves)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as c:
        c.sendall(request)
        return c.recv(4096)


def http_ok(port: int) -> bool:
    return ask(port, b"GET /index.html HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.")


def redis_cmd(*args) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


def redis_load(port: int) -> None:
    n = (REDIS_MIB << 20) // VALUE
    with socket.create_connection(("127.0.0.1", port), timeout=60) as c:
        for base in range(0, n, 5000):
            batch = range(base, min(n, base + 5000))
            c.sendall(b"".join(redis_cmd(b"SET", b"key:%d" % i, b"v" * VALUE) for i in batch))
            want, got = len(batch) * 5, b""  # +OK\r\n
            while len(got) < want:
                got += c.recv(1 << 16)


def memcached_load(port: int) -> None:
    n = (MEMCACHED_MIB << 20) // VALUE
    with socket.create_connection(("127.0.0.1", port), timeout=60) as c:
        for base in range(0, n, 5000):
            batch = range(base, min(n, base + 5000))
            c.sendall(b"".join(b"set key:%d 0 0 %d\r\n%s\r\n" % (i, VALUE, b"v" * VALUE) for i in batch))
            want, got = len(batch) * 8, b""  # STORED\r\n
            while len(got) < want:
                got += c.recv(1 << 16)


def server(name: str, work: str, port: int):
    """(argv, load, probe) of one server in `work`."""
    www = os.path.join(work, "www")
    os.makedirs(www, mode=0o755, exist_ok=True)
    os.chmod(work, 0o755)
    with open(os.path.join(www, "index.html"), "w") as f:
        f.write("hello\n")
    if name == "http.server":
        return (["python3", "-m", "http.server", "--bind", "127.0.0.1", "--directory", www, str(port)],
                None, lambda: http_ok(port))
    if name == "redis":
        conf = os.path.join(work, "redis.conf")
        with open(conf, "w") as f:
            f.write(f'port {port}\nbind 127.0.0.1\nsave ""\nappendonly no\ndir {work}\nlogfile ""\n')
        return (["redis-server", conf], lambda: redis_load(port),
                lambda: ask(port, redis_cmd(b"GET", b"key:1")).startswith(b"$"))
    if name == "nginx":
        conf = os.path.join(work, "nginx.conf")
        temp = " ".join(f"{k}_temp_path {work}/{k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        with open(conf, "w") as f:
            f.write(textwrap.dedent(f"""\
                daemon off; worker_processes 2; user www-data; pid {work}/nginx.pid; error_log {work}/error.log;
                events {{ worker_connections 64; }}
                http {{ access_log off; {temp} server {{ listen 127.0.0.1:{port}; root {www}; }} }}
                """))
        return (["nginx", "-p", work, "-c", conf, "-e", os.path.join(work, "error.log")], None,
                lambda: http_ok(port))
    if name == "memcached":
        return (["memcached", "-u", "root", "-l", "127.0.0.1", "-p", str(port), "-U", "0", "-t", "4",
                 "-m", str(MEMCACHED_MIB * 2)], lambda: memcached_load(port),
                lambda: ask(port, b"version\r\n").startswith(b"VERSION"))
    raise SystemExit(f"unknown server {name}")


def until(probe, timeout: float = 60.0) -> float:
    """Seconds until probe() answers."""
    t = time.perf_counter()
    while True:
        try:
            if probe():
                return time.perf_counter() - t
        except OSError:
            pass
        if time.perf_counter() - t > timeout:
            raise SystemExit("the server did not answer")
        time.sleep(0.001)


kill_tree = kill_pids  # root first: nginx's master makes a new worker for one that dies


def start(argv: list[str], work: str) -> subprocess.Popen:
    return subprocess.Popen([shutil.which(argv[0], path="/usr/sbin:/usr/bin:/bin") or argv[0], *argv[1:]],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, cwd=work)


def one_run(name: str, work: str) -> dict:
    port = free_port()
    argv, load, probe = server(name, work, port)
    images = os.path.join(work, "img")
    os.mkdir(images)
    p = start(argv, work)
    pids = [p.pid]
    try:
        until(probe)
        if load:
            load()
        time.sleep(0.5)  # the request threads and connections of the load end
        pids = [p.pid] + descendants(p.pid)
        threads = sum(len(os.listdir(f"/proc/{q}/task")) for q in pids)
        t = time.perf_counter()
        procsnap.dump(p.pid, images)
        dump = time.perf_counter() - t
        p.wait()
        gone(pids)
        size = sum(os.path.getsize(os.path.join(d, n)) for d, _, ns in os.walk(images) for n in ns)
        t = time.perf_counter()
        procsnap.restore(images)
        restore = time.perf_counter() - t
        serving = restore + until(probe)
        pids = [p.pid] + descendants(p.pid)
    finally:
        kill_tree(pids)
    return {"procs": len(pids), "threads": threads, "image": size / (1 << 20), "dump": dump, "restore": restore,
            "serving": serving}


def live_run(work: str) -> dict:
    """redis with a client that keeps its connection across dump and restore."""
    import threading

    port = free_port()
    argv, load, probe = server("redis", work, port)
    images = os.path.join(work, "img")
    os.mkdir(images)
    p = start(argv, work)
    pids = [p.pid]
    gaps, errors, stop = [0.0], [], threading.Event()

    def client(c: socket.socket) -> None:
        want, last = 1, time.perf_counter()
        try:
            while not stop.is_set():
                c.sendall(redis_cmd(b"INCR", b"live"))
                got = b""
                while not got.endswith(b"\r\n"):
                    piece = c.recv(64)
                    if not piece:
                        raise OSError("the connection was closed")
                    got += piece
                if got != b":%d\r\n" % want:
                    raise OSError(f"reply {got!r} to INCR number {want}")
                now = time.perf_counter()
                gaps[0], last, want = max(gaps[0], now - last), now, want + 1
        except OSError as err:
            errors.append(str(err))

    try:
        until(probe)
        load()
        time.sleep(0.5)
        pids = [p.pid] + descendants(p.pid)
        threads = sum(len(os.listdir(f"/proc/{q}/task")) for q in pids)
        c = socket.create_connection(("127.0.0.1", port), timeout=120)
        worker = threading.Thread(target=client, args=(c,))
        worker.start()
        time.sleep(0.5)
        size = 0
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "procsnap", "dump", "-t", str(p.pid), "-D", images,
                            "--tcp-established"], capture_output=True, text=True, cwd=ROOT)
        dump = time.perf_counter() - t
        if r.returncode:
            raise SystemExit(f"dump: {r.stderr.strip()}")
        p.wait()
        gone(pids)
        size = sum(os.path.getsize(os.path.join(d, n)) for d, _, ns in os.walk(images) for n in ns)
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "procsnap", "restore", "-D", images, "-d", "--tcp-established"],
                           capture_output=True, text=True, cwd=ROOT)
        restore = time.perf_counter() - t
        if r.returncode:
            raise SystemExit(f"restore: {r.stderr.strip()}")
        time.sleep(1.0)  # replies flow again
        stop.set()
        worker.join(60)
        c.close()
        if errors or worker.is_alive():
            raise SystemExit(f"the connected client saw: {errors or ['no reply']}")
        pids = [p.pid] + descendants(p.pid)
    finally:
        stop.set()
        kill_tree(pids)
    return {"procs": len(pids), "threads": threads, "image": size / (1 << 20), "dump": dump, "restore": restore,
            "serving": gaps[0]}


def med(values: list[float], scale: float = 1000) -> str:
    v = sorted(x * scale for x in values)
    return f"{statistics.median(v):.0f} [{v[0]:.0f}-{v[-1]:.0f}]"


def main() -> int:
    ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: the restored servers come back to us
    names = sys.argv[1:] or ["http.server", "redis", "nginx", "memcached", "redis+client"]
    print(f"procsnap servers bench {time.strftime('%Y-%m-%d')}: {os.cpu_count()} cores, kernel "
          f"{os.uname().release}; {RUNS} runs; median [min-max] ms; image on tmpfs; redis {REDIS_MIB} MiB, "
          f"memcached {MEMCACHED_MIB} MiB of {VALUE}-byte values")
    print(f"{'server':>11} | {'procs':>5} {'thr':>4} | {'image MiB':>9} | {'dump':>14} | {'restore':>14} | "
          f"{'serving again':>14}")
    for name in names:
        runs = []
        for _ in range(RUNS):
            with tempfile.TemporaryDirectory(dir="/dev/shm") as work:
                runs.append(live_run(work) if name == "redis+client" else one_run(name, work))
        r = runs[0]
        print(f"{name:>11} | {r['procs']:>5} {r['threads']:>4} | {r['image']:>9.1f} | "
              f"{med([x['dump'] for x in runs]):>14} | {med([x['restore'] for x in runs]):>14} | "
              f"{med([x['serving'] for x in runs]):>14}" + ("  (peer gap)" if name == "redis+client" else ""),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
