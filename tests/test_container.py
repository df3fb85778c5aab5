"""Issue 15, done when: a container made with `unshare` that holds a server,
mounts and IPC objects, dumped, killed and restored, serving again with
everything compared equal; and ten copies of one image running at once.

The container is `unshare --fork --pid --mount --mount-proc --net --uts
--ipc` around python3 (CONTAINER below) that names its host, mounts a
tmpfs with a page and a sparse file in it and serves that tmpfs over HTTP
(its cwd), and holds a SysV message queue with messages, a semaphore set
with values and a POSIX message queue (an fd of it) with messages of two
priorities. Reached through a veth pair the test makes (its end outside
named again with --external veth[eth0]:OUTSIDE, then configured by the
test, as a CRIU action script would), or on 127.0.0.1 inside its own
network namespace for the copies. After the restore the test GETs the
page; on SIGUSR1 the container checks everything itself (PASS/FAIL); the
state check runs from inside its pid and network namespaces and compares
the namespaces' own state (hostname, ipc objects and sysctls, mountinfo
and the tmpfs contents, devices/addresses/routes/nft/sysctls).
"""

import os
import signal
import subprocess
import urllib.request
from pathlib import Path

import pytest

import procsnap
from procsnap import nsworker

from conftest import assert_pass, assert_same_snapshot, wait_until
from test_namespaces import copies_killed, init_of, run_to_exit
from test_netns import configure_outside, inside_snapshot, link_local_ready, net, sh  # noqa: F401 - net: the fixture
from test_netns import dump_server as dump

UNSHARE = ["unshare", "--fork", "--pid", "--mount", "--mount-proc", "--net", "--uts", "--ipc"]
PAGE = "served from a tmpfs inside the container\n"

CONTAINER = r'''
import ctypes, errno, http.server, os, signal, socket, subprocess, sys, time
addr, srv = sys.argv[1], sys.argv[2]
libc = ctypes.CDLL(None, use_errno=True)
def ok(ret, what):
    if ret == -1:
        raise OSError(ctypes.get_errno(), what)
    return ret
socket.sethostname("webbox")
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=755", "webroot", srv], check=True)
open(f"{srv}/page.txt", "w").write(sys.argv[3])
with open(f"{srv}/sparse", "wb") as f:
    f.truncate(1 << 20); f.seek(512 << 10); f.write(b"middle")
os.chdir(srv)

class Msg(ctypes.Structure):
    _fields_ = [("mtype", ctypes.c_long), ("text", ctypes.c_char * 64)]
IPC_CREAT, IPC_NOWAIT, SETALL, GETALL = 0o1000, 0o4000, 17, 13
msq = ok(libc.msgget(0x5eb, IPC_CREAT | 0o600), "msgget")
for kind, text in ((1, b"first"), (2, b"second"), (1, b"third")):
    ok(libc.msgsnd(msq, ctypes.byref(Msg(kind, text)), len(text), 0), "msgsnd")
sem = ok(libc.semget(0x5ec, 3, IPC_CREAT | 0o600), "semget")
ok(libc.semctl(sem, 0, SETALL, (ctypes.c_ushort * 3)(7, 0, 32767)), "semctl SETALL")
class MqAttr(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_long), ("maxmsg", ctypes.c_long), ("msgsize", ctypes.c_long),
                ("curmsgs", ctypes.c_long), ("pad", ctypes.c_long * 4)]
libc.mq_open.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_int, ctypes.POINTER(MqAttr)]
mq = ok(libc.mq_open(b"/webq", os.O_CREAT | os.O_RDWR, 0o600, ctypes.byref(MqAttr(0, 8, 128, 0))), "mq_open")
for text, prio in ((b"low", 1), (b"high", 9), (b"low2", 1)):
    ok(libc.mq_send(mq, text, len(text), prio), "mq_send")

if addr == "127.0.0.1":
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
while True:  # its address, given from outside
    try:
        probe = socket.socket(); probe.bind((addr, 0)); probe.close(); break
    except OSError as e:
        if e.errno != errno.EADDRNOTAVAIL: raise
        time.sleep(0.01)
http.server.SimpleHTTPRequestHandler.log_message = lambda *args: None
server = http.server.HTTPServer((addr, 8080), http.server.SimpleHTTPRequestHandler)

def check(*_):
    problems = []
    if socket.gethostname() != "webbox": problems.append(f"hostname {socket.gethostname()}")
    if os.getcwd() != srv: problems.append(f"cwd {os.getcwd()}")
    if open("page.txt").read() != sys.argv[3]: problems.append("page.txt")
    st = os.stat("sparse")
    with open("sparse", "rb") as f:
        f.seek(512 << 10)
        if f.read(6) != b"middle" or st.st_size != 1 << 20: problems.append("sparse contents")
    if st.st_blocks * 512 > 64 << 10: problems.append(f"sparse file filled: {st.st_blocks} blocks")
    if os.getpid() != 1: problems.append(f"pid {os.getpid()}")
    got = []
    m = Msg()
    while (n := libc.msgrcv(msq, ctypes.byref(m), 64, 0, IPC_NOWAIT)) >= 0:
        got.append((m.mtype, m.text[:n]))
    if got != [(1, b"first"), (2, b"second"), (1, b"third")]: problems.append(f"msg queue {got}")
    vals = (ctypes.c_ushort * 3)()
    ok(libc.semctl(sem, 0, GETALL, vals), "semctl GETALL")
    if list(vals) != [7, 0, 32767]: problems.append(f"semaphores {list(vals)}")
    buf, prio, got = ctypes.create_string_buffer(128), ctypes.c_uint(), []
    os.set_blocking(mq, False)
    while (n := libc.mq_receive(mq, buf, 128, ctypes.byref(prio))) >= 0:
        got.append((buf.raw[:n], prio.value))
    if got != [(b"high", 9), (b"low", 1), (b"low2", 1)]: problems.append(f"mqueue {got}")
    print("FAIL: " + ", ".join(problems) if problems else "PASS", flush=True)
    os._exit(1 if problems else 0)
signal.signal(signal.SIGUSR1, check)
print("READY", flush=True)
server.serve_forever()
'''


def start(procs, addr):
    """The container; returns (its unshare Target, the init's host pid, the tmpfs's path)."""
    script, srv = procs.workdir / "container.py", procs.workdir / "srv"
    script.write_text(CONTAINER)
    srv.mkdir(exist_ok=True)
    t = procs.start([*UNSHARE, "python3", str(script), addr, str(srv), PAGE], name="webbox", ready=False)
    return t, init_of(t), srv


def get_inside(pid, url="http://127.0.0.1:8080/page.txt"):
    """GET from inside the network namespace of `pid` (its own loopback)."""
    r = subprocess.run(["nsenter", "-t", str(pid), "--net", "python3", "-c",
                        f"import urllib.request; print(urllib.request.urlopen({url!r}, timeout=10).read().decode(), "
                        "end='')"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_container_with_server_mounts_and_ipc(procs, net, tmp_path):
    """Dumped, killed, restored: the page is served again from the restored
    tmpfs on the container's address; every namespace's state compared
    equal; the container's own check passes."""
    n = net()
    t, init, srv = start(procs, n.inner)
    sh(f"ip link add {n.outside} type veth peer name eth0 netns {init}")
    sh(f"ip link set lo up && ip link set eth0 up && ip addr add {n.inner}/24 dev eth0", init)
    configure_outside(n)
    t.wait_ready()
    wait_until(lambda: link_local_ready(init), "eth0's link-local address")
    with urllib.request.urlopen(f"http://{n.inner}:8080/page.txt", timeout=10) as r:
        assert r.read().decode() == PAGE
    before = dump(t, init, tmp_path / "img")
    state = before.state[1]
    assert {"ns.uts.state", "ns.ipc.state", "ns.net.addrs", f"ns.mnt.tmpfs {srv}/sparse"} <= set(state), sorted(state)

    pid = procsnap.restore(str(tmp_path / "img"), external={"veth": {"eth0": n.outside}})
    t.adopt(pid)
    assert nsworker.ns_pids(pid)[-1] == 1
    configure_outside(n)
    wait_until(lambda: link_local_ready(pid), "eth0's link-local address after the restore")
    assert_same_snapshot(before, inside_snapshot(pid))
    with urllib.request.urlopen(f"http://{n.inner}:8080/page.txt", timeout=10) as r:
        assert r.read().decode() == PAGE
    os.kill(pid, signal.SIGUSR1)
    assert_pass(t)


def test_container_sabotaged_fails(procs):
    """The container's own check can fail: a message taken from its queue behind its back."""
    t, init, _ = start(procs, "127.0.0.1")
    t.wait_ready()
    subprocess.run(["nsenter", "-t", str(init), "--ipc", "python3", "-c",
                    "import ctypes; libc = ctypes.CDLL(None); q = libc.msgget(0x5eb, 0); "
                    "b = ctypes.create_string_buffer(72); assert libc.msgrcv(q, b, 64, 0, 0o4000) >= 0"], check=True)
    os.kill(init, signal.SIGUSR1)
    status, out = t.wait_exit()
    assert status != 0 and "FAIL: msg queue" in out, out


def test_ten_copies_serving(procs, tmp_path):
    """One image of the container (serving on 127.0.0.1 in its own network
    namespace) restored ten times at once: each copy has its own
    namespaces, serves its page, and passes its own check; the state check
    of one copy compares equal."""
    t, init, _ = start(procs, "127.0.0.1")
    t.wait_ready()
    assert get_inside(init) == PAGE
    before = dump(t, init, tmp_path / "img")
    pids = procsnap.restore_copies(str(tmp_path / "img"), 10)
    with copies_killed(pids):
        for kind in ("pid", "mnt", "net", "ipc", "uts"):
            assert len({os.readlink(f"/proc/{p}/ns/{kind}") for p in pids}) == 10, kind
        assert_same_snapshot(before, inside_snapshot(pids[-1]))  # first: a GET sets page.txt's atime
        assert [get_inside(p) for p in pids] == [PAGE] * 10
        statuses = [run_to_exit(p) for p in pids]
        assert statuses == [0] * 10, statuses  # each exits 1 on a failed check
        # each copy writes at the position its fd 1 was dumped with: the lines overwrite each other
        assert "PASS\n" in t.output() and "FAIL" not in t.output(), t.output()
