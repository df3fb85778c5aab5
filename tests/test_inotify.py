"""inotify (issue 11 part 4): `tail -f` follows its file after a restore,
also when the file was renamed while watched; events not yet read are
refused by name. The C target's watches (tests/targets/inotify.c) run in
every variant through test_dump_restore's cases."""

import os
import textwrap

from conftest import (assert_cli_error, assert_pass, assert_untouched, cli, dump_kill, proc_snapshot, assert_same_snapshot,
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


FANOTIFY = textwrap.dedent("""\
    import ctypes, os, select, signal, struct, sys
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p]
    FAN_CLOEXEC, FAN_NONBLOCK, FAN_MARK_ADD, FAN_MARK_IGNORED_MASK = 0x1, 0x2, 0x1, 0x20
    FAN_MODIFY, FAN_CLOSE_WRITE, FAN_EVENT_ON_CHILD = 0x2, 0x8, 0x08000000
    d = sys.argv[1]
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    g = libc.fanotify_init(FAN_CLOEXEC | FAN_NONBLOCK, os.O_RDONLY | os.O_LARGEFILE)
    assert g >= 0, ctypes.get_errno()
    for name in ("watched", "quiet", "moved"):
        open(f"{d}/{name}", "w").close()
    assert libc.fanotify_mark(g, FAN_MARK_ADD, FAN_MODIFY, -100, f"{d}/watched".encode()) == 0
    assert libc.fanotify_mark(g, FAN_MARK_ADD, FAN_CLOSE_WRITE | FAN_EVENT_ON_CHILD, -100, d.encode()) == 0
    assert libc.fanotify_mark(g, FAN_MARK_ADD | FAN_MARK_IGNORED_MASK | 0x40, FAN_CLOSE_WRITE, -100, f"{d}/quiet".encode()) == 0  # IGNORED_SURV_MODIFY
    assert libc.fanotify_mark(g, FAN_MARK_ADD, FAN_MODIFY, -100, f"{d}/moved".encode()) == 0
    os.rename(f"{d}/moved", f"{d}/moved.1")   # marked on its inode
    if os.environ.get("PS_TARGET_SABOTAGE") == "1":
        assert libc.fanotify_mark(g, 0x2, FAN_MODIFY, -100, f"{d}/moved.1".encode()) == 0  # FAN_MARK_REMOVE
    print("READY", flush=True)
    signal.sigwait({signal.SIGUSR1})
    for name in ("watched", "quiet", "moved.1"):
        with open(f"{d}/{name}", "a") as f:
            f.write("x")
    got = []
    while select.select([g], [], [], 1)[0]:
        data = os.read(g, 4096)
        while data:
            length, _, _, _, mask, fd, pid = struct.unpack_from("<IBBHQii", data)
            got.append((os.path.basename(os.readlink(f"/proc/self/fd/{fd}")), mask))
            os.close(fd)
            data = data[length:]
    want = [("watched", FAN_MODIFY), ("watched", FAN_CLOSE_WRITE), ("moved.1", FAN_MODIFY),
            ("moved.1", FAN_CLOSE_WRITE)]
    # events of one file may merge into one with both bits
    merged = {}
    for name, mask in got:
        merged[name] = merged.get(name, 0) | mask
    expect = {"watched": FAN_MODIFY | FAN_CLOSE_WRITE, "moved.1": FAN_MODIFY | FAN_CLOSE_WRITE}
    print("PASS" if merged == expect else f"FAIL: events {got}, expected {expect}", flush=True)
    sys.exit(0 if merged == expect else 1)
""")


def test_fanotify_marks(procs, tmp_path):
    """A fanotify group with an inode mark, a directory mark for its
    children, an ignored mask and a mark on a file renamed since: after the
    restore it reports exactly the events it would have (the sabotaged run,
    one mark removed, must not)."""
    script = tmp_path / "fan.py"
    script.write_text(FANOTIFY)
    for sabotage in ("1", "0"):
        d = tmp_path / f"dir{sabotage}"
        d.mkdir()
        t = procs.start([PYTHON, script, d], name=f"fanotify{sabotage}", env={"PS_TARGET_SABOTAGE": sabotage})
        if sabotage == "1":
            status, out = t.wait_result()
            assert status == 1 and "FAIL: events" in out, out
            continue
        restore(procs, t, dump_kill(t, tmp_path / "img"))
        assert_pass(t)


RENAMED = textwrap.dedent("""\
    import ctypes, os, select, signal, struct, sys
    libc = ctypes.CDLL(None, use_errno=True)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    fd = libc.inotify_init1(0)
    wd = libc.inotify_add_watch(fd, sys.argv[1].encode(), 0x2 | 0x800)  # IN_MODIFY | IN_MOVE_SELF
    print("READY", flush=True)
    signal.sigwait({signal.SIGUSR1})
    got = []
    while select.select([fd], [], [], 2)[0]:
        data = os.read(fd, 4096)
        while data:
            w, mask, _, length = struct.unpack_from("<iIII", data)
            got.append((w, mask))
            data = data[16 + length:]
        if (wd, 0x2) in got:
            break
    ok = got == [(wd, 0x2)]
    print("PASS" if ok else f"FAIL: events {got}, expected {[(wd, 0x2)]}", flush=True)
    sys.exit(0 if ok else 1)
""")


def test_watch_survives_rename_between_dump_and_restore(procs, tmp_path):
    """The watched file is renamed after the dump, before the restore (no
    fd of the process names it): the watch is made again by its handle and
    reports the file's modification under its new name."""
    watched = tmp_path / "watched"
    watched.write_text("")
    script = tmp_path / "renamed.py"
    script.write_text(RENAMED)
    t = procs.start([PYTHON, script, watched], name="renamed")
    images = dump_kill(t, tmp_path / "img")
    moved = tmp_path / "elsewhere"
    watched.rename(moved)
    restore(procs, t, images)
    with open(moved, "a") as f:
        f.write("x")
    assert_pass(t)
