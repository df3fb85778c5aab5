"""inotify (issue 11 part 4): `tail -f` follows its file after a restore,
also when the file was renamed while watched; events not yet read are
refused by name. The C target's watches (tests/targets/inotify.c) run in
every variant through test_dump_restore's cases."""

import os
import textwrap

from conftest import (assert_cli_error, assert_untouched, cli, dump_kill, proc_snapshot, assert_same_snapshot,
                      restore, wait_until)

PYTHON = "/usr/bin/python3"


def _inotify_fds(pid):
    return [fd for fd in os.listdir(f"/proc/{pid}/fd") if os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:inotify"]


def test_tail_follows_renamed_file(procs, tmp_path):
    """coreutils `tail -f` (inotify on the file, following its descriptor):
    the file is renamed while tail watches it, tail is dumped, killed and
    restored, and lines appended to the file under its new name after the
    restore are printed."""
    log = tmp_path / "app.log"
    log.write_text("line 1\n")
    t = procs.start(["tail", "-n", "+1", "-f", log], name="tail", ready=False)
    wait_until(lambda: t.output() == "line 1\n", "tail to print the first line")
    wait_until(lambda: _inotify_fds(t.pid), "tail to watch its file with inotify")
    moved = tmp_path / "app.log.1"
    log.rename(moved)
    with open(moved, "a") as f:
        f.write("line 2\n")
    wait_until(lambda: t.output() == "line 1\nline 2\n", "tail to follow the renamed file")
    restore(procs, t, dump_kill(t, tmp_path / "img"))
    with open(moved, "a") as f:
        f.write("line 3\n")
    wait_until(lambda: t.output() == "line 1\nline 2\nline 3\n", "the restored tail to print a new line")
    assert t.alive()


QUEUED = textwrap.dedent("""\
    import ctypes, os, sys, time
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(0)
    assert libc.inotify_add_watch(fd, sys.argv[1].encode(), 0x2) == 1  # IN_MODIFY
    with open(sys.argv[1], "a") as f:
        f.write("x")
    print("READY", flush=True)
    time.sleep(600)
""")


def test_queued_events_refused(procs, tmp_path):
    """An inotify with an event not yet read: refused naming the pid, the fd
    and the bytes queued; the process runs on untouched."""
    watched = tmp_path / "watched"
    watched.write_text("")
    script = tmp_path / "queued.py"
    script.write_text(QUEUED)
    t = procs.start([PYTHON, script, watched], name="queued")
    (fd,) = _inotify_fds(t.pid)
    images = tmp_path / "img"
    images.mkdir()
    before = proc_snapshot(t.pid)
    r = cli("dump", "-t", t.pid, "-D", images)
    assert_cli_error(r, f"pid {t.pid}: fd {fd}", "inotify", "bytes of events not yet read")
    assert_untouched(t.pid, before, images, proc_snapshot, assert_same_snapshot)
