"""SCM_RIGHTS in flight on unix sockets: the files passed are dumped as the
files of the tree they are (the same open file descriptions) and arrive
again after the restore."""

import sys
import textwrap

from conftest import assert_pass, dump_kill, restore


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
