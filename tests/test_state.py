"""Nothing lost without a word: state that real programs hold is restored,
or the dump is refused by name with the tree left running (issue 9).

Every dump/restore here also runs the state check (statecheck.py, through
conftest.dump_kill and restore)."""

import fcntl
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import procsnap
from conftest import REPO, CASES_BY_ID, assert_cli_error, assert_pass, descendants, dump_kill, restore, wait_until
from procsnap.errors import RestoreError, Unsupported

PYTHON = "/usr/bin/python3"
LOCKS = CASES_BY_ID["locks"]

# A writer that holds sqlite's write lock across the checkpoint: it waits
# inside its transaction until the test creates GO.
SQLITE_WRITER = textwrap.dedent("""\
    import os, signal, sqlite3, sys, time
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    db, go = sys.argv[1], sys.argv[2]
    con = sqlite3.connect(db, timeout=0, isolation_level=None)
    con.execute("CREATE TABLE IF NOT EXISTS t (who TEXT, n INTEGER)")
    for n in range(20):
        con.execute("BEGIN IMMEDIATE")
        con.execute("INSERT INTO t VALUES ('writer', ?)", (n,))
        if n == 10:
            print("IN TRANSACTION", flush=True)
            while not os.path.exists(go):
                time.sleep(0.01)
        con.execute("COMMIT")
    print("DONE", flush=True)
    print("READY", flush=True)  # the handshake: then it waits for SIGUSR1
    signal.sigwait({signal.SIGUSR1})
    print("PASS", flush=True)
""")


def _try_write(db, who, rows):
    """Another process's transaction; returns None or the error it met."""
    con = sqlite3.connect(db, timeout=0, isolation_level=None)
    try:
        con.execute("BEGIN IMMEDIATE")
        for n in range(rows):
            con.execute("INSERT INTO t VALUES (?, ?)", (who, n))
        con.execute("COMMIT")
        return None
    except sqlite3.OperationalError as err:
        return str(err)
    finally:
        con.close()


def test_sqlite_writer_keeps_its_lock(procs, tmp_path):
    """python3's sqlite3 in a transaction keeps its database lock across
    dump and restore: an outside writer cannot commit in the middle of the
    restored writer's transaction, and no row is lost (before locks were
    restored, the outside writer's 50 rows were committed and then lost)."""
    db, go = tmp_path / "data.db", tmp_path / "go"
    script = tmp_path / "writer.py"
    script.write_text(SQLITE_WRITER)
    t = procs.start([PYTHON, script, db, go], name="sqlite-writer", ready=False)
    wait_until(lambda: "IN TRANSACTION" in t.output(), "the writer inside its transaction")
    assert _try_write(db, "outside", 1) == "database is locked", "the writer holds no lock before the dump"
    images = dump_kill(t, tmp_path / "img")
    restore(procs, t, images)
    assert _try_write(db, "outside", 50) == "database is locked", \
        "an outside writer got the restored writer's database lock"
    go.touch()
    wait_until(lambda: "READY" in t.output(), "the restored writer to finish its transactions")
    assert _try_write(db, "outside", 50) is None
    assert_pass(t)
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    rows = con.execute("SELECT who, COUNT(*) FROM t GROUP BY who ORDER BY who").fetchall()
    assert rows == [("outside", 50), ("writer", 20)], rows


def test_lock_taken_meanwhile_fails_the_restore(procs, tmp_path):
    """A lock another process took between the dump and the restore: the
    restore fails naming the file and the lock, leaves no process, and the
    image restores once the lock is free again."""
    t = procs.start_case(LOCKS, "pie")
    images = dump_kill(t, tmp_path / "img")
    path = Path(procs.workdir) / "locks-dir" / "a.dat"
    with open(path, "r+") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(RestoreError) as exc:
            procsnap.restore(str(images))
        assert "a.dat" in str(exc.value) and "FLOCK" in str(exc.value) and "another process" in str(exc.value)
        wait_until(lambda: not os.path.exists(f"/proc/{t.pid}"), "the half-restored process to be gone")
    restore(procs, t, images)
    assert_pass(t)


def test_lease_refused_by_name(procs, tmp_path, proc_snapshot, assert_same_snapshot):
    code = textwrap.dedent("""\
        import fcntl, signal, sys
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
        f = open(sys.argv[1], "r")
        fcntl.fcntl(f, fcntl.F_SETLEASE, fcntl.F_RDLCK)
        print("READY", flush=True)
        signal.sigwait({signal.SIGUSR1})
        print("PASS", flush=True)
    """)
    target = tmp_path / "leased"
    target.write_text("x")
    t = procs.start([PYTHON, "-c", code, target], name="lease")
    before = proc_snapshot(t.pid)
    images = tmp_path / "img"
    with pytest.raises(Unsupported) as exc:
        procsnap.dump(t.pid, str(images))
    assert f"pid {t.pid}" in str(exc.value) and "lease" in str(exc.value) and str(target) in str(exc.value)
    assert_same_snapshot(before, proc_snapshot(t.pid))
    assert_pass(t)


@pytest.mark.parametrize("unshare, names", [
    (["--uts"], ["uts:["]),
    (["--fork", "--pid", "--mount-proc", "--uts"], ["pid:[", "uts:[", "mnt:["]),
    (["--ipc", "--net"], ["ipc:[", "net:["]),
], ids=["uts", "pid-namespace-init", "ipc-net"])
def test_namespaces_refused_by_name(unshare, names, procs, tmp_path, proc_snapshot, assert_same_snapshot):
    """A tree that lives in namespaces of its own is refused, naming them,
    and runs on untouched (before, a pid-namespace init with its own
    hostname was restored into the host's namespaces with exit 0)."""
    # a hostname of its own only where it has a UTS namespace of its own
    rename = "hostname inside; " if "--uts" in unshare else ""
    t = procs.start(["unshare", *unshare, "sh", "-c", f"{rename}echo READY; exec sleep 1000"], name="unshare")
    def sleeping():  # past its exec and its loader: in clock_nanosleep
        return any(Path(f"/proc/{p}/comm").read_text().strip() == "sleep"
                   and Path(f"/proc/{p}/syscall").read_text().split()[0] == "230"
                   for p in [t.pid] + descendants(t.pid))
    wait_until(sleeping, "sleep in the namespaces")
    before = proc_snapshot(t.pid)
    with pytest.raises(Unsupported) as exc:
        procsnap.dump(t.pid, str(tmp_path / "img"))
    for name in names:
        assert name in str(exc.value), (name, str(exc.value))
    assert "namespaces" in str(exc.value)
    assert_same_snapshot(before, proc_snapshot(t.pid))
    assert not (tmp_path / "img" / "procsnap.img").exists()


CREDS = CASES_BY_ID["creds"]


@pytest.mark.variants("pie", "static")
def test_credentials_restored(variant, procs, tmp_path):
    """uids, gids, groups, the five capability sets, securebits and
    no_new_privs of both threads come back (with --allow-other-owner: the
    image is of uid 1000); before, the process came back as full root."""
    t = procs.start_case(CREDS, variant)
    images = dump_kill(t, tmp_path / "img")
    with pytest.raises(RestoreError, match="uid 1000 gid 1002.*--allow-other-owner"):
        procsnap.restore(str(images))
    wait_until(lambda: not os.path.exists(f"/proc/{t.pid}"), "nothing left of the refused restore")
    restore(procs, t, images, allow_other_owner=True)
    assert_pass(t)


def test_capabilities_beyond_the_restorers_refused(procs, tmp_path):
    """A restorer without CAP_NET_BIND_SERVICE (dropped from its bounding
    set, so root's permitted set lacks it) does not hand it to the restored
    process: the restore is refused by name, nothing is left running."""
    t = procs.start_case(CREDS, "pie")
    images = dump_kill(t, tmp_path / "img")
    r = subprocess.run(["setpriv", "--bounding-set", "-net_bind_service", sys.executable, "-m", "procsnap",
                        "restore", "-D", images, "--allow-other-owner"], cwd=REPO, capture_output=True, text=True,
                       timeout=60)
    assert_cli_error(r, f"pid {t.pid}", "capabilities [10]", "restorer does not have")
    wait_until(lambda: not os.path.exists(f"/proc/{t.pid}"), "nothing left of the refused restore")


def test_other_exit_signal_refused_by_name(procs, targets, tmp_path, proc_snapshot, assert_same_snapshot):
    t = procs.start([targets.path("exitsig", "pie"), "default"], name="exitsig")
    child = descendants(t.pid)[0]
    before = proc_snapshot(t.pid)
    with pytest.raises(Unsupported) as exc:
        procsnap.dump(t.pid, str(tmp_path / "img"))
    assert f"pid {child}" in str(exc.value) and "SIGUSR2" in str(exc.value)
    assert_same_snapshot(before, proc_snapshot(t.pid))
    assert_pass(t)


MEMPOLICY = textwrap.dedent("""\
    import ctypes, signal
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    libc = ctypes.CDLL(None, use_errno=True)
    MPOL_BIND, MPOL_F_STATIC_NODES = 2, 1 << 15
    nodes = ctypes.c_ulong(1)
    assert libc.syscall(238, MPOL_BIND | MPOL_F_STATIC_NODES, ctypes.byref(nodes), 64) == 0, ctypes.get_errno()
    print("READY", flush=True)
    signal.sigwait({signal.SIGUSR1})
    mode, got = ctypes.c_int(), ctypes.c_ulong()
    assert libc.syscall(239, ctypes.byref(mode), ctypes.byref(got), 64, 0, 0) == 0
    ok = mode.value == MPOL_BIND | MPOL_F_STATIC_NODES and got.value == 1
    print("PASS" if ok else f"FAIL: mempolicy expected {MPOL_BIND | MPOL_F_STATIC_NODES} nodes 1 "
          f"found {mode.value} nodes {got.value}", flush=True)
""")


def test_numa_policy_restored(procs, tmp_path):
    t = procs.start([PYTHON, "-c", MEMPOLICY], name="mempolicy")
    images = dump_kill(t, tmp_path / "img")
    restore(procs, t, images)
    assert_pass(t)


# A session leader (procs.start makes one) whose autogroup the test renices:
# the target reads its own autogroup's nice after the restore.
AUTOGROUP = textwrap.dedent("""\
    import signal
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    print("READY", flush=True)
    signal.sigwait({signal.SIGUSR1})
    text = open("/proc/self/autogroup").read()
    print("PASS" if text.split()[-1] == "7" else f"FAIL: autogroup {text.strip()!r}, expected nice 7", flush=True)
""")


def test_autogroup_nice_restored(procs, tmp_path):
    """setsid makes the restored leader a new autogroup (nice 0): its nice is
    written back; the state check compares it too."""
    t = procs.start([PYTHON, "-c", AUTOGROUP], name="autogroup")
    Path(f"/proc/{t.pid}/autogroup").write_text("7")
    images = dump_kill(t, tmp_path / "img")
    restore(procs, t, images)
    assert_pass(t)


def test_autogroup_of_an_outside_session_checked(procs, tmp_path):
    """A root that leads no session (--shell-job) comes back in the restorer's: if that
    session's autogroup has another nice, the restore fails by name (it will
    not renice the caller's own session) and leaves nothing behind."""
    t = procs.start([PYTHON, "-c", "import subprocess, sys; "
                     "p = subprocess.Popen([sys.executable, '-c', sys.argv[1]]); p.wait()", AUTOGROUP],
                    name="leader")
    wait_until(lambda: len(descendants(t.pid)) == 1, "the child")
    child = descendants(t.pid)[0]
    Path(f"/proc/{child}/autogroup").write_text("7")
    images = tmp_path / "img"
    procsnap.dump(child, str(images), shell_job=True)  # its session led from outside: as a shell's job
    with pytest.raises(RestoreError, match=f"pid {child}: its session's autogroup had nice 7"):
        procsnap.restore(str(images), shell_job=True)
    assert not Path(f"/proc/{child}").exists()
