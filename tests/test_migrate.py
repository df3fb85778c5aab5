"""procsnap migrate between two test hosts (tests/hosts.py): pre-copy rounds,
the final freeze and stream, the restore held on the destination until
the source is killed (migration.py).

The target (targets/migrator.c) writes its memory all the time, checking
each page against the generation table it keeps in memory; after the
migration it checks every page once more on the destination. The state
check runs inside both hosts: the process's visible state in the source
host before against the destination host after. After every migration,
and after every fault, the processes of both hosts are counted: exactly
one copy of the target runs, never zero and never two, except where the
whole source host is killed (then zero: nothing was acknowledged).
"""

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import assert_same_snapshot, wait_until
from hosts import hosts  # noqa: F401 (the fixture)

PROCSNAP = [sys.executable, "-m", "procsnap"]
SIZE_MIB, RATE_MIB = 64, 20
SOURCE_PID = 300  # the target is made as pid 301 in the source host: free in the destination's
UFFD_LINK = "anon_inode:[userfaultfd]"


@pytest.fixture
def pair(hosts, targets, tmp_path):
    """(source host, destination host, start_target())."""
    made = hosts(2)
    src, dst = made[0], made[1]
    src.set_last_pid(SOURCE_PID)

    def start_target(sabotage=False):
        out = tmp_path / f"migrator-{len(src.started)}.out"
        binary = targets.path("migrator", "pie")
        env = "PS_TARGET_SABOTAGE=1 " if sabotage else ""
        # its fds opened inside the host (by sh), on the host's mounts, as a process of that machine's would be
        command = f"exec env {env}{binary} default {SIZE_MIB} {RATE_MIB} < /dev/null > {out} 2>&1"
        t = src.popen(["setsid", "sh", "-c", command], "migrator")
        t.out_path = out
        wait_until(lambda: out.exists() and "READY\n" in out.read_text(), "the target's READY")
        return t

    return src, dst, start_target


def listen(dst, *args, env=None):
    """`procsnap restore --stream tcp://ADDR:0 -d` in the destination host; (proc, HOST:PORT)."""
    r = dst.popen([*PROCSNAP, "restore", "--stream", f"tcp://{dst.addr}:0", "-d", *args], "restore", env=env)
    found = []
    wait_until(lambda: found.append(re.search(r"listening on (\S+)", r.stderr())) or found[-1] or not r.alive(),
               "the destination listening", timeout=30)
    assert found[-1], f"the destination did not listen: {r.stderr()}"
    return r, found[-1].group(1)


def migrate(src, t, to, *args, env=None):
    return src.run([*PROCSNAP, "migrate", "-t", t.inner, "--to", to, *args], timeout=300, env=env)


def copies(src, dst, inner):
    """Where the target runs: the hosts whose process `inner` is not a zombie."""
    return [h.name for h in (src, dst) if inner in h.processes()]


def check_in(host, t, inner, expect_pass=True):
    """SIGUSR1 to the target in `host`; it checks every page and exits; its status as the host's init reaped
    it (the destination's copy is an orphan there) or as nsenter saw it (the source's)."""
    outer = host.outer(inner)
    assert outer is not None, f"no pid {inner} in {host.name}"
    deadline = time.monotonic() + 60
    while host.outer(inner) is not None:
        assert time.monotonic() < deadline, f"{host.name}: pid {inner} still runs 60 s after SIGUSR1: {t.output()}"
        try:
            os.kill(outer, signal.SIGUSR1)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    out = t.output()
    if expect_pass:
        assert "PASS\n" in out and "FAIL" not in out, f"the target in {host.name}:\n{out}"
    return out


def assert_source_untouched(src, t):
    """After a failed migration: the source runs, untraced, without the pre-copy's userfaultfd."""
    outer = src.outer(t.inner)
    assert outer is not None, "the source's target is gone"
    with open(f"/proc/{outer}/status") as f:
        status = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    assert status["State"][0] in "RS" and status["TracerPid"] == "0", status
    links = [os.readlink(f"/proc/{outer}/fd/{fd}") for fd in os.listdir(f"/proc/{outer}/fd")]
    assert UFFD_LINK not in links, f"the pre-copy's dirty tracking left in the source: {links}"


@pytest.mark.parametrize("rounds", ["8", "0"])
def test_migrate_between_hosts(pair, rounds):
    src, dst, start_target = pair
    t = start_target()
    before = src.snapshot(t.inner)
    restore, to = listen(dst)
    r = migrate(src, t, to, "--max-rounds", rounds)
    assert r.returncode == 0, r.stderr
    assert restore.wait() == 0, restore.stderr()
    assert restore.output().strip() == str(t.inner)  # restore -d prints the pid
    line = r.stdout.splitlines()[-1]
    assert re.search(rf"pid {t.inner} migrated to tcp://{re.escape(to)} \(pid {t.inner} there\): downtime [0-9.]+ ms",
                     line), r.stdout
    copied = re.findall(r"pre-copy round (\d+): (\d+) pages copied", r.stdout)
    if rounds == "0":
        assert not copied, r.stdout
    else:
        assert copied and int(copied[0][1]) >= SIZE_MIB * 256, r.stdout  # round 1: all of it
        assert len(copied) == 1 or int(copied[1][1]) < int(copied[0][1]), r.stdout  # round 2: what was written
    wait_until(lambda: copies(src, dst, t.inner) == ["host1"], "one copy, in the destination")
    after = dst.snapshot(t.inner)
    assert_same_snapshot(before, after)
    check_in(dst, t, t.inner)
    assert dst.exits().get(t.inner) == 0, dst.exits()
    assert copies(src, dst, t.inner) == []


def test_self_check_can_fail_after_migration(pair):
    """PS_TARGET_SABOTAGE: one word of one page changed behind the generation
    table; the check on the destination must find it."""
    src, dst, start_target = pair
    t = start_target(sabotage=True)
    restore, to = listen(dst)
    r = migrate(src, t, to, "--max-rounds", "2")
    assert r.returncode == 0, r.stderr
    wait_until(lambda: copies(src, dst, t.inner) == ["host1"], "one copy, in the destination")
    out = check_in(dst, t, t.inner, expect_pass=False)
    assert "FAIL: pages" in out, out


@pytest.mark.parametrize("fault, where", [
    ("mid-receive:kill", "pre-copy: the destination killed while it receives (the connection cut)"),
    ("migrate-held:kill", "the destination killed once it holds the tree, before it says so"),
    ("before-registers:kill", "the destination killed mid-restore"),
    ("mid-memory-load", "the destination's restore failing mid-restore"),
])
def test_destination_fault_leaves_the_source(pair, fault, where):
    src, dst, start_target = pair
    t = start_target()
    restore, to = listen(dst, env={"PROCSNAP_FAULT": fault})
    r = migrate(src, t, to)
    assert r.returncode != 0, f"{where}: migrate exited 0: {r.stdout}"
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("procsnap: error: ") and "Traceback" not in r.stderr, r.stderr
    restore.wait()
    assert copies(src, dst, t.inner) == ["host0"], where
    assert dst.processes() == [], f"{where}: left in the destination: {dst.processes()}"
    assert_source_untouched(src, t)
    check_in(src, t, t.inner)


def test_source_procsnap_killed_after_the_destination_holds_it(pair):
    """migrate SIGKILLed between the destination's RDY_ and the kill: the
    target, detached by its tracer's death, runs on in the source; the
    destination hears no DONE and removes the tree it held."""
    src, dst, start_target = pair
    t = start_target()
    restore, to = listen(dst)
    r = migrate(src, t, to, env={"PROCSNAP_FAULT": "migrate-after-ready:kill"})
    assert r.returncode == -signal.SIGKILL or r.returncode == 128 + signal.SIGKILL, r
    assert restore.wait() != 0
    assert "the source was not killed" in restore.stderr(), restore.stderr()
    wait_until(lambda: dst.processes() == [], "the destination's held tree removed")
    assert copies(src, dst, t.inner) == ["host0"]
    assert_source_untouched(src, t)
    check_in(src, t, t.inner)


def test_source_procsnap_killed_mid_stream(pair):
    """migrate SIGKILLed after the final freeze, its stream half sent: the
    target runs on in the source; the destination keeps nothing."""
    src, dst, start_target = pair
    t = start_target()
    restore, to = listen(dst)
    r = migrate(src, t, to, "--max-rounds", "1", env={"PROCSNAP_FAULT": "after-freeze:kill"})
    assert r.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL), r
    assert restore.wait() != 0
    assert copies(src, dst, t.inner) == ["host0"]
    assert dst.processes() == []
    outer = src.outer(t.inner)
    wait_until(lambda: open(f"/proc/{outer}/status").read().count("TracerPid:\t0"), "the target detached")
    check_in(src, t, t.inner)  # the final dump had taken the tracking down: the source runs on without it


def test_source_host_killed_mid_stream(pair):
    """The whole source host gone while the final image is on its way (its
    procsnap stopped after the freeze, then the host's init killed): zero
    copies, as expected: the destination never acknowledged an image it
    could run and restores nothing."""
    src, dst, start_target = pair
    t = start_target()
    restore, to = listen(dst)
    m = src.popen([*PROCSNAP, "migrate", "-t", t.inner, "--to", to, "--max-rounds", "1"], "migrate",
                  env={"PROCSNAP_FAULT": "after-freeze:stop"})
    wait_until(lambda: open(f"/proc/{m.outer}/stat").read().rpartition(")")[2].split()[0] == "T",
               "migrate stopped after the freeze", timeout=120)
    src.kill()
    assert src.unshare.poll() is not None, "the source host is still there"
    assert restore.wait() != 0
    assert "stream ended" in restore.stderr() or "broke" in restore.stderr(), restore.stderr()
    assert dst.processes() == []


def test_migrate_bad_input(pair):
    src, dst, start_target = pair
    r = src.run([*PROCSNAP, "migrate", "-t", "4000000", "--to", "nowhere"])
    assert r.returncode != 0 and "--to" in r.stderr and "Traceback" not in r.stderr, r.stderr
    restore, to = listen(dst)
    r = src.run([*PROCSNAP, "migrate", "-t", "4000000", "--to", to])
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "4000000" in r.stderr, r.stderr
    assert restore.wait() != 0


# --------------------------------------------------------------------------
# A python3 server with a live TCP client, its address moved with it

SERVER = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 7000))
s.listen(1)
print("READY", flush=True)
c, _ = s.accept()
f = c.makefile("rwb", buffering=0)
n = 0
for line in f:
    if line == b"quit\n":
        f.write(b"bye %d\n" % n)
        sys.exit(0)
    n += 1
    f.write(b"%d:" % n + line)
sys.exit(3)
"""

CLIENT = r"""
import os, socket, sys, time
stop, count = sys.argv[2], sys.argv[3]
pause = stop + ".pause"  # while it exists: no request (the connection quiet, for the state check)
c = socket.create_connection((sys.argv[1], 7000), timeout=60)
f = c.makefile("rwb", buffering=0)
i = 0
try:
    while not os.path.exists(stop):
        if os.path.exists(pause):
            time.sleep(0.01)
            continue
        i += 1
        f.write(b"%d\n" % i)
        got = f.readline()
        if got != b"%d:%d\n" % (i, i):
            print(f"FAIL: reply {i}: expected {i}:{i}, found {got!r}", flush=True)
            sys.exit(1)
        with open(count + ".tmp", "w") as out:
            out.write(str(i))
        os.rename(count + ".tmp", count)
        time.sleep(0.02)
    f.write(b"quit\n")
    got = f.readline()
    if got != b"bye %d\n" % i:
        print(f"FAIL: bye: expected {i}, found {got!r}", flush=True)
        sys.exit(1)
except OSError as err:
    print(f"FAIL: {err}", flush=True)
    sys.exit(1)
print(f"PASS {i}", flush=True)
"""


def test_migrate_python_server_with_a_client(hosts, tmp_path):
    """A python3 server migrates from host 1 to host 2 with --tcp-established
    while a client in host 0 keeps talking to it; the server's address is
    on both hosts, and host 0's route to it is moved to host 2 once the
    destination runs it (the source's network lock drops the client's
    packets meanwhile: it retransmits). The client sees every reply once,
    in order, and no error; the state check runs inside both hosts."""
    made = hosts(3)
    made.route_between()
    hub, src, dst = made
    vip = f"10.{made.net}.99.1"
    for h in (src, dst):
        h.add_addr(f"{vip}/32", "lo")
    hub.run(["ip", "route", "add", vip, "via", src.addr], check=True)
    src.set_last_pid(SOURCE_PID)
    (tmp_path / "server.py").write_text(SERVER)
    (tmp_path / "client.py").write_text(CLIENT)
    out = tmp_path / "server.out"
    server = src.popen(["setsid", "sh", "-c", f"exec python3 {tmp_path}/server.py {vip} < /dev/null > {out} 2>&1"],
                       "server")
    wait_until(lambda: out.exists() and "READY" in out.read_text(), "the server's READY")
    stop, count = tmp_path / "stop", tmp_path / "count"
    client = hub.popen(["python3", tmp_path / "client.py", vip, stop, count], "client")
    progress = lambda: int(count.read_text()) if count.exists() else 0  # noqa: E731

    def quiet_snapshot(host):
        """The server's state with the connection quiet (nothing in flight either way: its queues are state)."""
        pause = tmp_path / "stop.pause"
        pause.write_text("")
        last = [-1]
        wait_until(lambda: (last[0] == progress(), last.__setitem__(0, progress()), time.sleep(0.5))[0],
                   "the client paused")
        snap = host.snapshot(server.inner)
        pause.unlink()
        return snap

    wait_until(lambda: progress() > 5, "the client talking")
    before = quiet_snapshot(src)
    restore, to = listen(dst, "--tcp-established")
    r = migrate(src, server, to, "--tcp-established")
    assert r.returncode == 0, r.stderr
    assert restore.wait() == 0, restore.stderr()
    hub.run(["ip", "route", "replace", vip, "via", dst.addr], check=True)
    table = re.search(r"network lock (inet \S+) kept", r.stdout)
    assert table, r.stdout
    src.run(["nft", "delete", "table", *table.group(1).split()], check=True)
    at = progress()
    wait_until(lambda: progress() > at + 10, "the client talking to the destination", timeout=60)
    after = quiet_snapshot(dst)
    assert_same_snapshot(before, after)
    assert copies(src, dst, server.inner) == ["host2"]
    stop.write_text("")
    assert client.wait(60) == 0, client.output() + client.stderr()
    assert "PASS" in client.output()
    wait_until(lambda: server.inner in dst.exits(), "the server's exit in the destination")
    assert dst.exits()[server.inner] == 0, out.read_text()


def test_migrate_over_tls(pair, tmp_path):
    """The migration's stream in TLS: the destination's certificate (its
    host address as SAN) checked by the source against the CA made here."""
    src, dst, start_target = pair
    pki = tmp_path / "pki"
    pki.mkdir()
    openssl = lambda *a: subprocess.run(["openssl", *a], cwd=pki, check=True, capture_output=True)  # noqa: E731
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    openssl("req", "-x509", *ec, "-days", "2", "-subj", "/CN=procsnap test ca", "-keyout", "ca.key", "-out", "ca.pem")
    openssl("req", *ec, "-subj", "/CN=destination", "-keyout", "dst.key", "-out", "dst.csr")
    (pki / "dst.ext").write_text(f"subjectAltName=IP:{dst.addr}\n")
    openssl("x509", "-req", "-in", "dst.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2",
            "-extfile", "dst.ext", "-out", "dst.pem")
    t = start_target()
    restore, to = listen(dst, "--tls-cert", pki / "dst.pem", "--tls-key", pki / "dst.key")
    r = migrate(src, t, to, "--max-rounds", "2", "--tls-ca", pki / "ca.pem")
    assert r.returncode == 0, r.stderr
    assert restore.wait() == 0, restore.stderr()
    wait_until(lambda: copies(src, dst, t.inner) == ["host1"], "one copy, in the destination")
    check_in(dst, t, t.inner)
