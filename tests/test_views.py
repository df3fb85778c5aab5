"""Looking inside images: `show DIR [VIEW]` (summary and the views ps, fds,
mems, rss, sockets, files), `diff DIR1 DIR2` and `core DIR -o FILE` opened
in gdb. Every image is a real dump of a real target; what the views say is
compared with what the kernel showed about the process when it was dumped."""

import difflib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import procsnap
from procsnap.image import schema
from conftest import (CASES_BY_ID, REPO, Case, assert_cli_error, assert_pass, cli, descendants, dump_kill,
                      restore, wait_until)

DEBUGGEE = Case("debuggee")
VIEWS = ("ps", "fds", "mems", "rss", "sockets", "files")


def show_rows(images, view):
    r = cli("show", images, view, "--json")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]


def stat_ids(pid):
    """(comm, ppid, pgid, sid, threads) as /proc/PID shows them."""
    with open(f"/proc/{pid}/stat") as f:
        head, _, rest = f.read().rpartition(")")
    fields = rest.split()
    return head.partition("(")[2], int(fields[1]), int(fields[2]), int(fields[3]), len(os.listdir(f"/proc/{pid}/task"))


def fd_positions(pid):
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with open(f"/proc/{pid}/fdinfo/{fd}") as f:
            pos = next(int(line.split()[1]) for line in f if line.startswith("pos:"))
        out[int(fd)] = (os.readlink(f"/proc/{pid}/fd/{fd}"), pos)
    return out


def maps(pid):
    out = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            rng, perms = line.split()[:2]
            start, end = (int(x, 16) for x in rng.split("-"))
            if not line.rstrip().endswith("[vsyscall]"):  # the kernel's, in no process's mm
                out.append((start, end, perms))
    return out


def test_ps_lists_the_tree(procs, tmp_path):
    """Every process of a tree with its own group and session: pid, ppid,
    pgid, sid, threads and comm as /proc showed them; the text table too."""
    t = procs.start_case(CASES_BY_ID["tree-session"], "pie")
    pids = [t.pid] + descendants(t.pid)
    before = {pid: stat_ids(pid) for pid in pids}
    images = dump_kill(t, tmp_path / "img")
    rows = show_rows(images, "ps")
    assert [r["pid"] for r in rows] == pids
    for r in rows:
        comm, ppid, pgid, sid, threads = before[r["pid"]]
        assert (r["comm"], r["pgid"], r["sid"], r["threads"]) == (comm, pgid, sid, threads), r
        assert r["ppid"] == (0 if r["pid"] == t.pid else ppid), r  # the root's parent is its restorer
    assert len({r["pgid"] for r in rows}) >= 2 and len({r["sid"] for r in rows}) >= 2, rows
    table = cli("show", images, "ps")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["PID", "PPID", "PGID", "SID", "THREADS", "COMM", "STATE"]
    assert [int(line.split()[0]) for line in lines[1:]] == pids
    summary = cli("show", images).stdout.splitlines()
    threads = sum(b[4] for b in before.values())
    assert f": format {schema.MAJOR}.{schema.MINOR}, {len(pids)} processes, {threads} threads; root pid {t.pid} (" in summary[0], summary
    restore(procs, t, images)
    assert_pass(t)


def test_fds_mems_rss_files_of_a_running_process(procs, tmp_path):
    """fds: every fd with its target and position; mems: every VMA with
    its protection, and the pages stored add up to the page runs and to
    pages.img; files: the executable, its size, and a file changed since
    the dump named as changed."""
    t = procs.start_case(DEBUGGEE, "pie")
    fds_before, maps_before = fd_positions(t.pid), maps(t.pid)
    exe = os.readlink(f"/proc/{t.pid}/exe")
    images = tmp_path / "img"
    procsnap.dump(t.pid, str(images), leave_running=True)

    fds = {r["fd"]: r for r in show_rows(images, "fds")}
    assert sorted(fds) == sorted(fds_before)
    for fd, (target, pos) in fds_before.items():
        assert fds[fd]["pos"] == pos and fds[fd]["target"].startswith(target), (fds[fd], target, pos)
    assert fds[1]["pos"] == len("READY\n") and fds[1]["kind"] == "regular"
    assert "O_WRONLY" in fds[1]["flags"] and "shares fd 1" in fds[2]["target"]

    mems = show_rows(images, "mems")
    assert [(m["start"], m["end"], m["perms"]) for m in mems] == maps_before
    rss = show_rows(images, "rss")
    stored = sum(m["stored"] + m["shared"] for m in mems)
    assert stored == sum(r["pages"] for r in rss) == (images / "pages.img").stat().st_size // 4096 > 16
    assert any(m["name"] == "[heap]" and m["stored"] for m in mems), mems
    assert all(r["stored_in"] == "own" for r in rss)

    assert show_rows(images, "sockets") == []
    assert_pass(t)  # writes PASS to its output: the file the image needs is not the one dumped now
    files = {r["path"]: r for r in show_rows(images, "files")}
    assert files[exe]["size"] == os.stat(exe).st_size and files[exe]["now"] == "ok"
    assert "exe" in files[exe]["used_by"] and "map" in files[exe]["used_by"]
    out = fds_before[1][0]
    assert files[out]["used_by"] == f"{t.pid}: fd 1, fd 2" and files[out]["now"].startswith("size 6 at dump")

    summary = cli("show", images)
    assert summary.returncode == 0, summary.stderr
    comm = os.path.basename(exe)[:15]
    assert f"1 process, 4 threads; root pid {t.pid} ({comm}), in pause" in summary.stdout, summary.stdout
    assert "needs from the host: 4 files" in summary.stdout and exe in summary.stdout
    assert "fds: 3 (regular 2, device 1)" in summary.stdout, summary.stdout
    assert len(summary.stdout.splitlines()) <= 24


def test_sockets_view(procs, tmp_path):
    """The socket pairs the ipc target's root and child hold (root 20/22/24,
    child 21/23/25): each end by pid:fd, its peer the other end, its type,
    and the bytes queued to it as the kernel counted them at the dump."""
    t = procs.start_case(CASES_BY_ID["ipc-sockets"], "pie")
    (child,) = descendants(t.pid)
    images = tmp_path / "img"
    procsnap.dump(t.pid, str(images), leave_running=True)
    rows = show_rows(images, "sockets")
    by_end = {r["ends"]: r for r in rows}
    by_id = {r["id"]: r for r in rows}
    assert sorted(by_end) == sorted([f"{t.pid}:{fd}" for fd in (20, 22, 24)] + [f"{child}:{fd}" for fd in (21, 23, 25)])
    for k, kind in enumerate(("stream", "dgram", "seqpacket")):
        mine, theirs = by_end[f"{t.pid}:{20 + 2 * k}"], by_end[f"{child}:{21 + 2 * k}"]
        assert (mine["peer"], theirs["peer"]) == (theirs["id"], mine["id"])
        assert mine["type"] == theirs["type"] == kind
    # what each end will read: the child wrote to the root, the root 3000 bytes to the child
    assert [by_end[f"{t.pid}:{fd}"]["queued"] for fd in (20, 22, 24)] == [100000, 6161, 2013]
    assert [by_end[f"{t.pid}:{fd}"]["messages"] for fd in (22, 24)] == [5, 3]
    assert by_end[f"{child}:21"]["queued"] == 3000 and by_id
    assert_pass(t)


def test_views_quiet_on_a_closed_pipe_and_bad_names(procs, tmp_path):
    t = procs.start_case(DEBUGGEE, "pie")
    images = tmp_path / "img"
    procsnap.dump(t.pid, str(images), leave_running=True)
    for args in [(), ("--json",)] + [(v,) for v in VIEWS] + [(v, "--json") for v in VIEWS if v != "sockets"]:
        # (no sockets here: no JSON lines, nothing written, exit 0)
        r, w = os.pipe()
        os.close(r)  # nobody reads: the first write fails
        show = subprocess.run([sys.executable, "-m", "procsnap", "show", str(images), *args], cwd=REPO,
                              stdout=w, stderr=subprocess.PIPE, text=True, timeout=60)
        os.close(w)
        assert show.stderr == "" and show.returncode == 128 + signal.SIGPIPE, (args, show.returncode, show.stderr)
    assert cli("show", "-D", images, "ps").stdout == cli("show", images, "ps").stdout
    bad = cli("show", images, "nosuch")
    assert bad.returncode == 2 and "unknown view 'nosuch'" in bad.stderr and "Traceback" not in bad.stderr
    assert_cli_error(cli("show", tmp_path / "none", "ps"), "no such directory")
    assert_pass(t)


def symbol_addresses(pid, exe, *names):
    """Run-time addresses of global symbols of a PIE target (nm + its load base)."""
    base = next(s for s, e, p in maps(pid) if os.path.realpath(f"/proc/{pid}/map_files/{s:x}-{e:x}") == exe)
    out = subprocess.run(["nm", exe], capture_output=True, text=True, check=True).stdout
    table = {line.split()[2]: int(line.split()[0], 16) for line in out.splitlines() if len(line.split()) == 3}
    return [base + table[n] for n in names]


def test_diff_of_two_dumps_of_a_counter(procs, tmp_path):
    """Two dumps of the debuggee with it running in between: the page of
    its spin counter changed, the 16 pages of its quiet buffer (written once)
    did not; main, waiting in pause(), has the same registers; nothing else
    of the process moved (fds, VMAs, threads). An image against itself: no
    differences, in text and JSON."""
    t = procs.start_case(DEBUGGEE, "pie")
    exe = os.readlink(f"/proc/{t.pid}/exe")
    spins, quiet = symbol_addresses(t.pid, exe, "spins", "quiet")
    first, second = tmp_path / "first", tmp_path / "second"
    procsnap.dump(t.pid, str(first), leave_running=True)
    procsnap.dump(t.pid, str(second), leave_running=True)

    r = cli("diff", first, second, "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["processes"] == {"only_first": [], "only_second": [], "both": [t.pid]}
    (c,) = d["changed"]
    assert c["pid"] == t.pid and not {"threads", "fds", "vmas"} & c.keys(), c
    assert t.pid not in [reg["tid"] for reg in c.get("registers", [])]
    pages = c["pages"]
    changed = {start + i * 4096 for start, n, _ in pages["changed"] for i in range(n)}
    page = lambda a: a & ~4095  # noqa: E731
    assert page(spins) in changed, (hex(spins), pages)
    quiet_pages = set(range(page(quiet + 4095), page(quiet + 65536), 4096))
    assert len(quiet_pages) >= 15 and not quiet_pages & changed
    assert pages["unchanged"] >= len(quiet_pages) and not pages["only_first"] and not pages["only_second"]
    text = cli("diff", first, second)
    assert f"pid {t.pid} (" in text.stdout and f"changed {page(spins):#x} +" in text.stdout, text.stdout
    assert f"{pages['unchanged']} unchanged, {len(changed)} changed" in text.stdout, text.stdout

    same = cli("diff", first, first)
    assert same.returncode == 0 and same.stdout == "no differences\n", same.stdout
    assert json.loads(cli("diff", "--json", second, second).stdout)["changed"] == []
    assert_cli_error(cli("diff", first, tmp_path / "nothing"), "nothing")
    assert_pass(t)


def test_diff_and_views_of_encoded_images(procs, tmp_path):
    """diff, show and core read the pages of compressed and encrypted images
    (decoded chunk by chunk, image/chunks.py): the same changed and
    unchanged pages as of plain ones; the rss view counts what is stored."""
    t = procs.start_case(DEBUGGEE, "pie")
    exe = os.readlink(f"/proc/{t.pid}/exe")
    spins, quiet = symbol_addresses(t.pid, exe, "spins", "quiet")
    keyfile = tmp_path / "key"
    keyfile.write_text(bytes(range(32)).hex())
    first, second = tmp_path / "first", tmp_path / "second"
    assert cli("dump", "-t", t.pid, "-D", first, "-R", "--compress", "--encrypt", keyfile).returncode == 0
    assert cli("dump", "-t", t.pid, "-D", second, "-R", "--encrypt", keyfile).returncode == 0

    r = cli("diff", first, second, "--json", "--encrypt", keyfile)
    assert r.returncode == 0, r.stderr
    (c,) = json.loads(r.stdout)["changed"]
    changed = {start + i * 4096 for start, n, _ in c["pages"]["changed"] for i in range(n)}
    page = lambda a: a & ~4095  # noqa: E731
    assert page(spins) in changed, (hex(spins), c["pages"])
    quiet_pages = set(range(page(quiet + 4095), page(quiet + 65536), 4096))
    assert len(quiet_pages) >= 15 and not quiet_pages & changed
    same = cli("diff", first, first, "--encrypt", keyfile)
    assert same.returncode == 0 and same.stdout == "no differences\n", same.stdout
    assert cli("show", first, "rss", "--encrypt", keyfile).returncode == 0
    core = tmp_path / "core"
    r = cli("core", first, "-o", core, "--encrypt", keyfile)
    assert r.returncode == 0, r.stderr
    out, _ = gdb(exe, core, "print/x quiet[1000]", "print/x quiet[60000]")
    expect = [(i * 193 + 11 + (i >> 9)) & 0xFF for i in (1000, 60000)]  # debuggee.c's quiet_pat
    assert [int(line.split("=")[1], 16) for line in out.splitlines() if "=" in line] == expect, out
    assert_cli_error(cli("diff", first, second), "key")  # without the key: refused, naming it
    assert_pass(t)


def test_diff_of_a_tree_across_a_restore(procs, tmp_path):
    """The session tree dumped, restored and dumped again: every process is
    in both, with its ids; the diff names no process only on one side."""
    t = procs.start_case(CASES_BY_ID["tree-session"], "pie")
    pids = sorted([t.pid] + descendants(t.pid))
    first = dump_kill(t, tmp_path / "first")
    restore(procs, t, first)
    second = tmp_path / "second"
    procsnap.dump(t.pid, str(second), leave_running=True)
    d = json.loads(cli("diff", "--json", first, second).stdout)
    assert d["processes"] == {"only_first": [], "only_second": [], "both": pids}
    for c in d["changed"]:
        assert not {"ppid", "pgid", "sid", "threads", "vmas"} & c.keys(), c
    assert_pass(t)


# --------------------------------------------------------------------------
# Core files, opened in gdb

CORE_MAGIC = 0x600DC0DE12345678
HEAP_NOTE = "procsnap heap note 0451"
WORKERS = ("spin_worker", "nap_worker", "wait_worker")


def quiet_pat(i):
    return (i * 193 + 11 + (i >> 9)) & 0xFF


def gdb(exe, core, *commands):
    """gdb in batch mode on exe + core, no init files, no network; (stdout, stderr)."""
    assert shutil.which("gdb"), "gdb is missing: `make test` installs it"
    args = ["gdb", "-batch", "-nx", "-ex", "set debuginfod enabled off", "-ex", "set width 0"]
    for c in commands:
        args += ["-ex", c]
    r = subprocess.run(args + [str(exe), str(core)], capture_output=True, text=True, timeout=120,
                       env={"PATH": os.environ["PATH"], "LC_ALL": "C", "HOME": "/nonexistent"})
    assert r.returncode == 0, r.stderr
    return r.stdout, r.stderr


def thread_backtraces(out):
    """{tid: backtrace text} from `thread apply all bt`."""
    found = {}
    for block in out.split("\nThread ")[1:]:
        tid = int(block.split("(LWP ")[1].split(")")[0])
        found[tid] = block
    return found


@pytest.mark.variants("pie", "static")
def test_core_opens_in_gdb(procs, tmp_path, variant):
    """`procsnap core` of a running debuggee (dumped with -R): gdb names
    the function each thread was in (main in main_wait, the workers in
    theirs), has every thread by its tid, and prints the global, the heap
    string and a byte of the .bss buffer with their values; it complains of
    nothing in the core."""
    t = procs.start_case(DEBUGGEE, variant)
    tids = sorted(int(x) for x in os.listdir(f"/proc/{t.pid}/task"))
    exe = os.readlink(f"/proc/{t.pid}/exe")
    images, core = tmp_path / "img", tmp_path / f"core.{t.pid}"
    procsnap.dump(t.pid, str(images), leave_running=True)
    r = cli("core", images, "-o", core)
    assert r.returncode == 0 and r.stderr == "" and f"core of pid {t.pid}, 4 threads" in r.stdout, r.stderr
    out, err = gdb(exe, core, "bt", "thread apply all bt", "print/x core_magic", "print heap_note",
                   "print/x quiet[4096]", "print/x quiet[65535]")
    assert "warning" not in err.lower(), err  # e.g. "Section .reg-xstate in core file too small"
    assert f"Core was generated by `{exe} default'." in out, out
    first_bt = out.split("\nThread ")[0]
    assert "main_wait ()" in first_bt and " in main (" in first_bt, out
    bts = thread_backtraces(out)
    assert sorted(bts) == tids, (tids, out)
    assert "main_wait ()" in bts[t.pid]
    for name in WORKERS:
        (holder,) = [tid for tid, bt in bts.items() if f" {name} (" in bt]
        assert holder != t.pid
    assert f"= {CORE_MAGIC:#x}" in out, out
    assert f'"{HEAP_NOTE}"' in out, out
    assert f"= {quiet_pat(4096):#x}\n" in out and f"= {quiet_pat(65535):#x}\n" in out, out
    assert_pass(t)


def test_core_matches_gcore(procs, tmp_path):
    """The same running debuggee, dumped by procsnap and then cored by gdb's
    own gcore: gdb reads the same threads, the same shared libraries, the
    same stopped main thread (frames and registers) and the same values
    from both cores."""
    assert shutil.which("gcore"), "gcore (with gdb) is missing: `make test` installs it"
    t = procs.start_case(DEBUGGEE, "pie")
    exe = os.readlink(f"/proc/{t.pid}/exe")
    images, ours, theirs = tmp_path / "img", tmp_path / "core.procsnap", tmp_path / "core.gcore"
    procsnap.dump(t.pid, str(images), leave_running=True)
    assert cli("core", images, "-o", ours).returncode == 0
    g = subprocess.run(["gcore", "-o", str(theirs), str(t.pid)], capture_output=True, text=True, timeout=120)
    assert g.returncode == 0, g.stderr
    theirs = Path(f"{theirs}.{t.pid}")
    # (not $pkru: gdb 13 reads a live PKRU at Intel's XSAVE offset, so on
    # this AMD CPU its gcore says 0; the procsnap core has the true value)
    commands = ["info sharedlibrary", "bt", "info registers rip rsp rbp fs_base", "p $xmm0", "p $mxcsr",
                "print/x core_magic", "print heap_note", "print/x quiet[777]", "info threads"]
    a, _ = gdb(exe, ours, *commands)
    b, _ = gdb(exe, theirs, *commands)
    assert f"Core was generated by `{exe} default'." in a  # as the kernel writes it; gcore leaves the arguments out

    def stable(text):  # the running threads' frames move between the two cores
        return [line for line in text.splitlines()
                if not line.startswith(("  2 ", "  3 ", "  4 ", "Core was generated by"))]

    assert stable(a) == stable(b), "\n".join(difflib.unified_diff(stable(b), stable(a), "gcore", "procsnap"))
    assert assert_pass(t) is None


def test_core_of_a_tree_process_and_refusals(procs, tmp_path):
    """--pid picks a process of the tree: its core has its tid; a zombie
    or a pid that is not in the image is refused by name, nothing written."""
    t = procs.start_case(CASES_BY_ID["tree-zombie"], "pie")
    kids = descendants(t.pid)
    zombie = [p for p in kids if open(f"/proc/{p}/stat").read().rpartition(")")[2].split()[0] == "Z"]
    (live,) = [p for p in kids if p not in zombie]
    exe = os.readlink(f"/proc/{t.pid}/exe")
    images = tmp_path / "img"
    procsnap.dump(t.pid, str(images), leave_running=True)
    core = tmp_path / "core.child"
    assert cli("core", images, "--pid", live, "-o", core).returncode == 0
    out, _ = gdb(exe, core, "info threads")
    assert f"(LWP {live})" in out and f"(LWP {t.pid})" not in out, out
    for pid, what in ((zombie[0], "is a zombie"), (1, "is not in the image")):
        bad = tmp_path / f"core.{pid}"
        assert_cli_error(cli("core", images, "--pid", pid, "-o", bad), f"pid {pid}", what)
        assert not bad.exists() and not Path(f"{bad}.part").exists()
    assert_cli_error(cli("core", "-D", images, "-o", tmp_path / "nodir" / "core"), "nodir")
    assert_pass(t)


def test_core_warns_of_a_mapped_file_changed_since_the_dump(procs, tmp_path):
    """gdb reads the clean pages of a file mapping from the file: a core of
    an image whose mapped file has changed since says so, naming it."""
    t = procs.start_case(CASES_BY_ID["memory"], "pie")
    images = tmp_path / "img"
    procsnap.dump(t.pid, str(images), leave_running=True)
    quiet = cli("core", images, "-o", tmp_path / "core.before")
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
    priv = procs.workdir / "priv.dat"
    st = priv.stat()
    os.utime(priv, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    r = cli("core", images, "-o", tmp_path / "core.after")
    assert r.returncode == 0, r.stderr
    assert r.stderr == f"procsnap: warning: {priv}: modified since the dump; gdb reads the pages the image " \
                       "does not hold from it\n", r.stderr
    assert_pass(t)


GROWER = """
import mmap, os, signal, sys
areas = []
def grow(sig, frame):
    areas.append(mmap.mmap(-1, 1 << 20))
    areas[-1][:5] = b"grown"
    os.write(1, b"grown\\n")
signal.signal(signal.SIGUSR2, grow)
os.write(1, b"READY\\n")
while True:
    signal.pause()
"""


def test_diff_names_a_new_mapping_and_a_moved_fd(procs, tmp_path):
    """A python3 process maps 1 MiB and writes a line between two dumps:
    the diff names the new mapping and fd 1's position moved by the line,
    in text and in JSON (the text of a changed fd and VMA once raised)."""
    t = procs.start([sys.executable, "-c", GROWER], name="grower")
    first, second = tmp_path / "first", tmp_path / "second"
    procsnap.dump(t.pid, str(first), leave_running=True)
    t.signal(signal.SIGUSR2)
    wait_until(lambda: "grown\n" in t.output(), "the grower's new mapping")
    procsnap.dump(t.pid, str(second), leave_running=True)
    d = json.loads(cli("diff", "--json", first, second).stdout)
    (c,) = d["changed"]
    assert {"fd": 1, "pos": [6, 12]} in c["fds"]["changed"], c["fds"]
    (grown,) = c["vmas"]["only_second"]  # python's mmap(-1, n) is MAP_SHARED: its own VMA
    assert grown["end"] - grown["start"] == 1 << 20 and grown["kind"] == "shared-mem", grown
    text = cli("diff", first, second)
    assert text.returncode == 0 and text.stderr == "", text.stderr
    assert "  fds: fd 1: pos 6 -> 12" in text.stdout, text.stdout
    assert f"  vmas: only in the second: {grown['start']:#x}-{grown['end']:#x} rw-s" in text.stdout, text.stdout
