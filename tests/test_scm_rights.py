"""SCM_RIGHTS in flight on unix sockets: the files passed are dumped as the
files of the tree they are (the same open file descriptions) and arrive
again after the restore."""

import sys
import textwrap

import pytest

import procsnap
from conftest import assert_pass, dump_kill, restore, rewrite_records
from procsnap.errors import ImageCorrupt


def test_files_in_flight(procs, tmp_path):
    """A regular file (with its offset, shared with the sender's own fd), a
    pipe end and a socket pair end in one message, the file again in a
    second; received and checked by the target after the restore."""
    t = procs.start([procs._targets.path("scmrights", "pie"), str(tmp_path / "data")], name="scmrights")
    images = dump_kill(t, tmp_path / "img")
    restore(procs, t, images)
    assert_pass(t)


CHILD_PROGRAM = textwrap.dedent("""\
    import os, signal, socket
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    r, w = os.pipe()
    kid = os.fork()
    if kid == 0:  # the child sends its write end to the root, keeps it
        socket.send_fds(a, [b"from the child"], [w])
        signal.pause()
        os._exit(0)
    os.close(w)
    b.recv(100, socket.MSG_PEEK)
    signal.signal(signal.SIGUSR1, lambda *x: None)
    os.write(1, b"READY\\n")
    signal.pause()
    msg, fds, _, _ = socket.recv_fds(b, 100, 4, socket.MSG_DONTWAIT)
    ok = msg == b"from the child" and len(fds) == 1 and os.write(fds[0], b"y") == 1 and os.read(r, 1) == b"y"
    os.kill(kid, 9); os.waitpid(kid, 0)
    os.write(1, b"PASS\\n" if ok else f"FAIL {msg!r} {fds}\\n".encode())
    """)


def test_file_held_by_another_process(procs, tmp_path):
    """A file in flight to the root that only its child holds: sent again
    from the restored child's fd, it writes into the root's pipe."""
    t = procs.start([sys.executable, "-c", CHILD_PROGRAM], name="scm-child")
    images = dump_kill(t, tmp_path / "img")
    restore(procs, t, images)
    assert_pass(t)


UNHELD_PROGRAM = textwrap.dedent("""\
    import os, signal, socket, sys
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    f = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    os.write(f, b"0123456789"); os.lseek(f, 3, os.SEEK_SET)
    r, w = os.pipe(); os.write(w, b"queued")
    p, q = socket.socketpair()
    m = os.memfd_create("in-flight"); os.write(m, b"memfd data"); os.lseek(m, 2, os.SEEK_SET)
    e = os.eventfd(7)
    c, d = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)  # d in flight, with a file in flight itself
    r2, w2 = os.pipe()
    socket.send_fds(c, [b"inner"], [r2])
    socket.send_fds(b, [b"one"], [f, w, p.fileno(), m, e, d.fileno()])
    socket.send_fds(b, [b"two"], [f, f])  # one description in flight three times
    for x in (f, w, m, e, r2):
        os.close(x)
    p.close(); d.close()
    signal.signal(signal.SIGUSR1, lambda *x: None)
    os.write(1, b"READY\\n")
    signal.pause()
    checks = []  # (what, expected, found)
    check = lambda *c: checks.append(c)
    msg, fds, _, _ = socket.recv_fds(a, 100, 16, socket.MSG_DONTWAIT)
    check("first message", (b"one", 6), (msg, len(fds)))
    msg2, fds2, _, _ = socket.recv_fds(a, 100, 16, socket.MSG_DONTWAIT)
    check("second message", (b"two", 2), (msg2, len(fds2)))
    if len(fds) == 6 and len(fds2) == 2:
        f1, w1, p1, m1, e1, d1 = fds
        check("offset of the file", 3, os.lseek(f1, 0, os.SEEK_CUR))
        check("read of the file", b"34", os.read(f1, 2))
        check("offset of the file sent again (one description)", [5, 5],
              [os.lseek(x, 0, os.SEEK_CUR) for x in fds2])
        os.read(fds2[1], 1)
        check("offset after reading the third copy", 6, os.lseek(f1, 0, os.SEEK_CUR))
        os.write(w1, b"+")
        check("the pipe through the end in flight", b"queued+", os.read(r, 100))
        p1 = socket.socket(fileno=p1); p1.send(b"ping")
        check("the socket pair end in flight", b"ping", q.recv(10))
        q.send(b"pong")
        check("its peer to it", b"pong", p1.recv(10))
        check("offset of the memfd", 2, os.lseek(m1, 0, os.SEEK_CUR))
        check("the memfd's data", b"memfd data", os.pread(m1, 100, 0))
        check("the eventfd's count", 7, os.eventfd_read(e1))
        inner, ifds, _, _ = socket.recv_fds(socket.socket(fileno=d1), 100, 4, socket.MSG_DONTWAIT)
        check("message on the socket in flight", (b"inner", 1), (inner, len(ifds)))
        if ifds:
            os.write(w2, b"deep")
            check("the pipe end in flight on the socket in flight", b"deep", os.read(ifds[0], 10))
    bad = [f"{what}: {want!r} != {got!r}" for what, want, got in checks if want != got]
    os.write(1, b"PASS\\n" if not bad else ("FAIL " + "; ".join(bad) + "\\n").encode())
    """)


def test_files_no_process_holds(procs, tmp_path):
    """Files in flight whose sender closed them: a regular file (offset
    kept; in flight three times, one description), a pipe end with data
    whose other end the process holds, a socket pair end whose peer it
    holds, a memfd, an eventfd, and a datagram socket end with a file in
    flight of its own; dumped from procsnap's copies and received after
    the restore."""
    t = procs.start([sys.executable, "-c", UNHELD_PROGRAM, str(tmp_path / "data")], name="scm-unheld")
    images = dump_kill(t, tmp_path / "img")
    restore(procs, t, images)
    assert_pass(t)


STREAM_PROGRAM = textwrap.dedent("""\
    import os, signal, socket, sys
    a, b = socket.socketpair()
    f = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    os.write(f, b"0123456789"); os.lseek(f, 4, os.SEEK_SET)
    r, w = os.pipe()
    socket.send_fds(b, [b"one"], [f])
    socket.send_fds(b, [b"two"], [w, f])
    socket.send_fds(b, [b"three"], [r])  # held by the process too
    b.send(b"tail")
    os.close(f); os.close(w)
    signal.signal(signal.SIGUSR1, lambda *x: None)
    os.write(1, b"READY\\n")
    signal.pause()
    got = []
    for size in (2, 100, 100, 100):  # the files come with the first byte of their piece, a read stops after it
        msg, fds, _, _ = socket.recv_fds(a, size, 4, socket.MSG_DONTWAIT)
        got.append((msg, len(fds), fds))
    bad = []
    shape = [(m, n) for m, n, _ in got]
    if shape != [(b"on", 1), (b"etwo", 2), (b"three", 1), (b"tail", 0)]:
        bad.append(f"pieces {shape}")
    else:
        f1, (w1, f2), (r1,) = got[0][2][0], got[1][2], got[2][2]
        if os.lseek(f1, 0, os.SEEK_CUR) != 4 or os.read(f2, 2) != b"45" or os.lseek(f1, 0, os.SEEK_CUR) != 6:
            bad.append("the file in flight twice is not one description at offset 4")
        os.write(w1, b"!")
        if os.read(r, 10) != b"!" or os.write(w1, b"?") != 1 or os.read(r1, 10) != b"?":
            bad.append("the pipe ends in flight do not reach their pipe")
    os.write(1, b"PASS\\n" if not bad else ("FAIL " + "; ".join(bad) + "\\n").encode())
    """)


def test_files_on_a_stream(procs, tmp_path):
    """Files in flight on a stream socket pair, each piece sent as one
    skb: after the restore the files arrive with the same bytes (a read
    of 2 bytes gets the first piece's files, the next read runs on to the
    end of the second piece and gets its two), the file sent twice is one
    description, the pipe ends (one held by no process) reach their pipe."""
    t = procs.start([sys.executable, "-c", STREAM_PROGRAM, str(tmp_path / "data")], name="scm-stream")
    images = dump_kill(t, tmp_path / "img")
    restore(procs, t, images)
    assert_pass(t)


def test_crafted_files_in_flight_refused(procs, tmp_path):
    """An image whose file in flight names a pipe it does not hold, or a
    message naming a file in flight it does not have, is refused at
    restore as corrupt, naming both, before anything is made."""
    t = procs.start([sys.executable, "-c", UNHELD_PROGRAM, str(tmp_path / "data")], name="scm-crafted")
    images = dump_kill(t, tmp_path / "img")

    def craft(records):
        flight = [obj for tag, obj in records if tag == b"FLIT"]
        next(obj for obj in flight if obj["kind"] == "pipe")["file_id"] = 999
        sock = next(obj for tag, obj in records if tag == b"SOCK" and obj.get("rights"))
        sock["rights"][0].append([-1, 77])

    rewrite_records(images, craft)
    with pytest.raises(ImageCorrupt) as exc:
        procsnap.restore(str(images))
    assert "unknown pipe 999" in str(exc.value) and "file in flight 77 is not in the image" in str(exc.value)
