"""Streamed images (image/stream.py): dump --stream to `-` or tcp://, the
destination's `receive` / `page-server` / `restore --stream`, TLS, and what
a cut, a corrupt byte or a killed peer leaves on either side.

Every restore is followed by the state check (the tree's visible state
before the dump against the restored one) and the target's own self-check.
A failed stream must leave the source running untraced (it is killed only
once the receiver has acknowledged the whole image) and the destination's
directory without an image (or with the image it had before).
"""

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import procsnap
from conftest import (CASES_BY_ID, REPO, assert_cli_error, dump_kill_to, assert_pass, assert_running_untraced,
                      assert_same_snapshot, cli, descendants, image_hashes, proc_snapshot, reap_gone, restore,
                      wait_until)
from procsnap.image import stream

MEMORY = CASES_BY_ID["memory"]
STREAMED_CASES = ("memory", "threads", "tree-pipes", "ghosts", "files")
PROCSNAP = [sys.executable, "-m", "procsnap"]


class Peer:
    """A procsnap subprocess (receive, restore --stream, dump) with its output in files."""

    def __init__(self, tmp: Path, name: str, *args, env=None, stdin=None, stdout=None, argv=None):
        """argv: run this instead of procsnap ARGS."""
        self.err_path = tmp / f"{name}.err"
        self.out_path = tmp / f"{name}.out"
        out = open(self.out_path, "w") if stdout is None else stdout
        if stdout is not None:
            self.out_path.unlink(missing_ok=True)
        with open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(argv or [*PROCSNAP, *map(str, args)], cwd=REPO, stdin=stdin or subprocess.DEVNULL,
                                         stdout=out, stderr=err, env={**os.environ, **(env or {})},
                                         start_new_session=True)
        if stdout is None:
            out.close()

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()

    def port(self) -> int:
        wait_until(lambda: "listening on" in self.stderr or self.proc.poll() is not None,
                   f"{self.proc.args} to listen", timeout=30)
        assert "listening on" in self.stderr, self.stderr
        return int(self.stderr.split("listening on ")[1].split()[0].rsplit(":", 1)[1])

    def wait(self, timeout=120):
        self.proc.wait(timeout)
        out = self.out_path.read_text() if self.out_path.exists() else ""
        err = "".join(l for l in self.stderr.splitlines(True) if not l.startswith("procsnap: listening on "))
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, out, err)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def peers(tmp_path):
    started = []

    def start(name, *args, **kw):
        p = Peer(tmp_path, name, *args, **kw)
        started.append(p)
        return p

    try:
        yield start
    finally:
        for p in started:
            p.kill()


def listening(peers, name, *args, **kw):
    p = peers(name, *args, "--listen" if name.startswith(("receive", "page-server")) else "--stream",
              "127.0.0.1:0" if name.startswith(("receive", "page-server")) else "tcp://127.0.0.1:0", **kw)
    return p, p.port()


dump_stream = dump_kill_to


def follow_restored(t, result, before):
    """A CLI restore -d printed the pid; it came back to us (the subreaper): state check, self-check."""
    assert result.returncode == 0, result.stderr
    pid = int(result.stdout.split()[-1])
    assert pid == t.pid
    wait_until(lambda: int(open(f"/proc/{pid}/status").read().split("PPid:")[1].split()[0]) == os.getpid(),
               "the restored process to come back to us")
    t.adopt(pid)
    assert_same_snapshot(before, proc_snapshot(pid), ignore_pos=t.ignore_pos)
    assert_pass(t)


def assert_no_image(directory):
    d = Path(directory)
    assert not (d / "procsnap.img").exists(), f"an image was left in {d}: {sorted(os.listdir(d))}"


@pytest.mark.cases(*STREAMED_CASES)
@pytest.mark.variants("pie")
def test_pipe_dump_into_restore(procs, peers, tmp_path, case, variant):
    """procsnap dump --stream - | procsnap restore --stream - -d, the shell's way."""
    t = procs.start_case(case, variant)
    before = proc_snapshot(t.pid)
    others = descendants(t.pid)
    r, w = os.pipe()
    try:
        rest = peers("restore", "restore", "--stream", "-", "-d", stdin=r, env={"TMPDIR": str(tmp_path)})
        dump = peers("dump", "dump", "-t", t.pid, "--stream", "-", stdout=w)
    finally:
        os.close(r)
        os.close(w)
    assert t.reap() == -signal.SIGKILL
    reap_gone(others)
    assert dump.wait().returncode == 0, dump.stderr
    follow_restored(t, rest.wait(), before)
    assert not list(tmp_path.glob("procsnap-stream-*")), "the restore's temporary image was left"


@pytest.mark.variants("static", "pie", "nopie")
def test_tcp_receive_then_restore(procs, peers, tmp_path, variant):
    """dump --stream tcp:// into `procsnap receive`; the directory image restores as any other."""
    t = procs.start_case(MEMORY, variant)
    images = tmp_path / "received"
    recv, port = listening(peers, "receive", "receive", "-D", images)
    dump_stream(t, f"tcp://127.0.0.1:{port}")
    got = recv.wait()
    assert got.returncode == 0 and "the source was killed" in got.stdout, got.stderr
    assert procsnap.verify(str(images)) == []
    restore(procs, t, images)
    assert_pass(t)


def test_page_server_and_restore_stream_in_process(procs, peers, tmp_path):
    """restore_stream (the API) listening, the dump a CLI connecting; the restore
    starts only once the sender says the source is gone."""
    t = procs.start_case(CASES_BY_ID["tree-pipes"], "pie")
    before = proc_snapshot(t.pid)
    others = descendants(t.pid)
    started = {}

    def on_listen(bound):
        started["dump"] = peers("dump", "dump", "-t", t.pid, "--stream", f"tcp://127.0.0.1:{bound[1]}")
        started["reaper"] = threading.Thread(target=lambda: (t.reap(), reap_gone(others)))
        started["reaper"].start()

    from procsnap.streaming import restore_stream

    pid = restore_stream("tcp://127.0.0.1:0", on_listen=on_listen)
    started["reaper"].join()
    assert started["dump"].wait().returncode == 0, started["dump"].stderr
    t.adopt(pid)
    assert_same_snapshot(before, proc_snapshot(pid), ignore_pos=t.ignore_pos)
    assert_pass(t)


def test_page_server_alias_and_compressed_encrypted_stream(procs, peers, tmp_path):
    """page-server is receive; a compressed, encrypted stream is received
    without the key (checked by its frame checksums) and restored with it."""
    keyfile = tmp_path / "key"
    keyfile.write_bytes(os.urandom(32))
    t = procs.start_case(MEMORY, "pie")
    images = tmp_path / "received"
    recv, port = listening(peers, "page-server", "page-server", "-D", images)
    dump_stream(t, f"tcp://127.0.0.1:{port}", compress=True, key=keyfile.read_bytes())
    assert recv.wait().returncode == 0, recv.stderr
    restore(procs, t, images, key=keyfile.read_bytes())
    assert_pass(t)


# --------------------------------------------------------------------------
# TLS, with a CA, a server and a client certificate made here by openssl


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "other-ca"):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN=procsnap test {ca}",
                 "-keyout", f"{ca}.key", "-out", f"{ca}.pem", cwd=d)
    for name, san in (("server", "IP:127.0.0.1"), ("client", "DNS:client")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
                 "-out", f"{name}.csr", cwd=d)
        (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem", cwd=d)
    return d


def test_tls_mutual_auth(procs, peers, tmp_path, pki):
    t = procs.start_case(MEMORY, "pie")
    images = tmp_path / "received"
    recv, port = listening(peers, "receive", "receive", "-D", images, "--tls-cert", pki / "server.pem",
                           "--tls-key", pki / "server.key", "--tls-ca", pki / "ca.pem")
    dump_stream(t, f"tcp://127.0.0.1:{port}",
                tls=stream.Tls(str(pki / "client.pem"), str(pki / "client.key"), str(pki / "ca.pem")))
    assert recv.wait().returncode == 0, recv.stderr
    restore(procs, t, images)
    assert_pass(t)


@pytest.mark.parametrize("client", ["no-client-cert", "wrong-ca"])
def test_tls_refused_leaves_source_running(procs, peers, tmp_path, pki, client):
    """A listener that requires a client certificate and a sender that does
    not trust the listener's: one line on each side, the source runs on."""
    t = procs.start_case(MEMORY, "pie")
    before = proc_snapshot(t.pid)
    images = tmp_path / "received"
    recv, port = listening(peers, "receive", "receive", "-D", images, "--tls-cert", pki / "server.pem",
                           "--tls-key", pki / "server.key", "--tls-ca", pki / "ca.pem")
    tls = ["--tls-ca", pki / "ca.pem"] if client == "no-client-cert" else \
        ["--tls-ca", pki / "other-ca.pem", "--tls-cert", pki / "client.pem", "--tls-key", pki / "client.key"]
    line = assert_cli_error(cli("dump", "-t", t.pid, "--stream", f"tcp://127.0.0.1:{port}", *tls),
                            f"127.0.0.1:{port}")
    assert ("TLS handshake failed" in line) == (client == "wrong-ca") and "Traceback" not in line
    assert_cli_error(recv.wait(), "TLS handshake failed")
    assert_running_untraced(t.pid)
    assert_same_snapshot(before, proc_snapshot(t.pid))
    assert_no_image(images)
    assert_pass(t)


# --------------------------------------------------------------------------
# Bad streams: one clear line, non-zero, nothing restored


@pytest.fixture
def saved_stream(procs, tmp_path):
    """A stream written to a file by dump -R --stream - (the target runs on)."""
    t = procs.start_case(MEMORY, "pie")
    path = tmp_path / "saved.stream"
    with open(path, "wb") as f:
        r = subprocess.run([*PROCSNAP, "dump", "-R", "-t", str(t.pid), "--stream", "-"], cwd=REPO, stdout=f,
                           stderr=subprocess.PIPE, text=True)
    assert r.returncode == 0, r.stderr
    return t, path


def _patched_header(data: bytes, at: int, value: int) -> bytes:
    head = bytearray(data[:stream.HEADER.size])
    head[at : at + 2] = value.to_bytes(2, "little")
    head[16:20] = (__import__("zlib").crc32(bytes(head[:16]))).to_bytes(4, "little")
    return bytes(head) + data[stream.HEADER.size:]


BAD_STREAMS = {
    "stream-version": (lambda d: _patched_header(d, 8, 2), "stream version 2"),
    "image-version": (lambda d: _patched_header(d, 10, 2), "format version 2."),
    "not-a-stream": (lambda d: b"PSNAPIMG" + d[8:], "not a procsnap stream"),
    "flipped-page-byte": (lambda d: d[: len(d) // 2] + bytes([d[len(d) // 2] ^ 1]) + d[len(d) // 2 + 1:], "xxh3"),
    "truncated": (lambda d: d[: len(d) // 2], "the stream ended"),
    "no-done": (lambda d: d[: d.rindex(b"DONE")], "did not say the source was killed"),
}


@pytest.mark.parametrize("bad", sorted(BAD_STREAMS))
def test_bad_stream_is_refused(saved_stream, tmp_path, bad):
    t, path = saved_stream
    edit, named = BAD_STREAMS[bad]
    bad_path = tmp_path / "bad.stream"
    bad_path.write_bytes(edit(path.read_bytes()))
    images = tmp_path / "received"
    with open(bad_path, "rb") as f:
        r = subprocess.run([*PROCSNAP, "receive", "--stream", "-", "-D", str(images)], cwd=REPO, stdin=f,
                           capture_output=True, text=True)
    if bad == "no-done":  # receive keeps an acknowledged image; the sender's last word is a warning
        assert r.returncode == 0 and (images / "procsnap.img").exists(), r.stderr
    else:
        assert_cli_error(r, named)
        assert_no_image(images)
    with open(bad_path, "rb") as f:
        r = subprocess.run([*PROCSNAP, "restore", "--stream", "-", "-d"], cwd=REPO, stdin=f, capture_output=True,
                           text=True, env={**os.environ, "TMPDIR": str(tmp_path)})
    assert_cli_error(r, named)
    left = list(tmp_path.glob("procsnap-stream-*"))
    assert (len(left) == 1) if bad == "no-done" else not left, left  # kept only once it was complete
    assert_running_untraced(t.pid)  # the original, never touched by any of this
    assert_pass(t)


# --------------------------------------------------------------------------
# Faults: a cut at several points, a peer killed


def _old_image(procs, peers, tmp_path):
    """A directory holding an image received earlier (of a -R dump), and its hashes."""
    other = procs.start_case(MEMORY, "pie")
    images = tmp_path / "received"
    recv, port = listening(peers, "receive-old", "receive", "-D", images)
    assert cli("dump", "-R", "-t", other.pid, "--stream", f"tcp://127.0.0.1:{port}").returncode == 0
    assert recv.wait().returncode == 0
    return images, image_hashes(images)


RECEIVER_FAULTS = {  # PROCSNAP_FAULT of the receiver -> what the sender says
    "mid-receive": "broke off",
    "before-ack": "did not acknowledge",
}


@pytest.mark.parametrize("fault", sorted(RECEIVER_FAULTS))
def test_receiver_fails_source_runs_on(procs, peers, tmp_path, fault):
    """The receiver fails mid-stream or just before its acknowledgement: the
    dump (without -R) fails in one line and the source was not killed; the
    receiver's directory keeps the image it had."""
    images, hashes = _old_image(procs, peers, tmp_path)
    t = procs.start_case(MEMORY, "pie")
    before = proc_snapshot(t.pid)
    recv, port = listening(peers, "receive", "receive", "-D", images, env={"PROCSNAP_FAULT": fault})
    r = cli("dump", "-t", t.pid, "--stream", f"tcp://127.0.0.1:{port}")
    line = assert_cli_error(r, f"127.0.0.1:{port}")
    assert RECEIVER_FAULTS[fault] in line or "refused the image" in line, line
    assert_cli_error(recv.wait(), "injected fault")
    assert_running_untraced(t.pid)
    assert_same_snapshot(before, proc_snapshot(t.pid))
    assert image_hashes(images) == hashes
    assert_pass(t)


@pytest.mark.parametrize("how", ["receiver-killed", "restore-killed"])
def test_destination_killed_mid_stream(procs, peers, tmp_path, how):
    """A real cut: the destination SIGKILLed while the pages stream in. The
    source runs on; the directory holds no image (what the killed receiver
    was writing is hidden in staging and removed by the next receive)."""
    t = procs.start_case(CASES_BY_ID["writer"], "pie")  # 64 MiB: the cut comes mid-pages
    images = tmp_path / "received"
    env = {"PROCSNAP_FAULT": "mid-receive:stop", "TMPDIR": str(tmp_path)}
    if how == "receiver-killed":
        dest, port = listening(peers, "receive", "receive", "-D", images, env=env)
    else:
        dest, port = listening(peers, "restore", "restore", "-d", env=env)
    dump = peers("dump", "dump", "-t", t.pid, "--stream", f"tcp://127.0.0.1:{port}")
    wait_until(lambda: open(f"/proc/{dest.proc.pid}/stat").read().rpartition(")")[2].split()[0] == "T",
               "the destination to stop mid-stream", timeout=60)
    dest.kill()
    r = dump.wait()
    assert_cli_error(r, f"127.0.0.1:{port}")
    assert_running_untraced(t.pid)
    if how == "receiver-killed":
        assert_no_image(images)
        staged = [p.name for p in images.iterdir()]
        assert all(n.startswith(".procsnap-new.") for n in staged), staged
        again, port = listening(peers, "receive-again", "receive", "-D", images)
        other = procs.start_case(MEMORY, "pie")
        assert cli("dump", "-R", "-t", other.pid, "--stream", f"tcp://127.0.0.1:{port}").returncode == 0
        assert again.wait().returncode == 0
        assert sorted(p.name for p in images.iterdir()) == ["ghosts.img", "pages.img", "procsnap.img"]
    assert_pass(t)


@pytest.mark.parametrize("fault", ["mid-page-write:kill", "before-commit", "mid-page-write"])
def test_sender_fails_destination_keeps_nothing(procs, peers, tmp_path, fault):
    """The dump killed or failing mid-stream: the receiver and restore --stream
    report it in one line and keep nothing new; the source runs on."""
    images, hashes = _old_image(procs, peers, tmp_path)
    for dest in ("receive", "restore"):
        t = procs.start_case(MEMORY, "pie")
        if dest == "receive":
            peer, port = listening(peers, "receive", "receive", "-D", images)
        else:
            peer, port = listening(peers, "restore", "restore", "-d", env={"TMPDIR": str(tmp_path)})
        r = cli("dump", "-t", t.pid, "--stream", f"tcp://127.0.0.1:{port}", env={"PROCSNAP_FAULT": fault})
        assert r.returncode != 0
        got = peer.wait()
        assert_cli_error(got, "the stream ended" if fault.endswith(":kill") else "the sender gave up")
        wait_until(lambda: open(f"/proc/{t.pid}/status").read().split("TracerPid:")[1].split()[0] == "0",
                   "the source to be untraced")
        assert_running_untraced(t.pid)
        assert image_hashes(images) == hashes
        assert not list(tmp_path.glob("procsnap-stream-*"))
        assert_pass(t)


def test_usage_errors():
    for args, named in ((["dump", "-t", "999999"], "-D DIR or --stream"),
                        (["dump", "-t", "999999", "--stream", "tcp://nowhere"], "expected tcp://HOST:PORT"),
                        (["dump", "-t", "999999", "--stream", "-", "--tls-ca", "x"], "--tls-*"),
                        (["receive", "-D", "/tmp/x", "--listen", "127.0.0.1:0", "--tls-ca", "x"],
                         "--tls-cert")):
        r = cli(*args)
        assert r.returncode != 0 and named in r.stderr and "Traceback" not in r.stderr, r.stderr


# --------------------------------------------------------------------------
# Into another network namespace: a test host's receiver behind a veth pair


@pytest.fixture
def netns_receiver(tmp_path):
    """start(images) -> (Peer, address): `procsnap receive` in a network
    namespace of its own (unshare -n), joined to ours by a veth pair on a
    /30 made here; the namespace and the pair go with the receiver."""
    made = []
    n = os.getpid() % 100000
    host_if, peer_if = f"psst{n}a", f"psst{n}b"
    net = f"10.213.{os.getpid() % 250}"

    def start(images):
        script = (f"while ! ip link show {peer_if} >/dev/null 2>&1; do sleep 0.02; done; "
                  f"ip link set lo up && ip addr add {net}.2/30 dev {peer_if} && ip link set {peer_if} up && "
                  f"exec {sys.executable} -m procsnap receive --listen {net}.2:0 -D {images}")
        p = Peer(tmp_path, "receive-netns", argv=["unshare", "-n", "sh", "-c", script])
        made.append(p)
        subprocess.run(["ip", "link", "add", host_if, "type", "veth", "peer", "name", peer_if], check=True)
        subprocess.run(["ip", "link", "set", peer_if, "netns", str(p.proc.pid)], check=True)
        subprocess.run(["ip", "addr", "add", f"{net}.1/30", "dev", host_if], check=True)
        subprocess.run(["ip", "link", "set", host_if, "up"], check=True)
        return p, f"{net}.2:{p.port()}"

    try:
        yield start
    finally:
        for p in made:
            p.kill()
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)  # gone with the namespace, normally


def test_into_network_namespace(procs, tmp_path, netns_receiver):
    t = procs.start_case(CASES_BY_ID["threads"], "pie")
    images = tmp_path / "received"
    recv, where = netns_receiver(images)
    dump_stream(t, f"tcp://{where}")
    assert recv.wait().returncode == 0, recv.stderr
    restore(procs, t, images)
    assert_pass(t)
