"""pre-dump: passes that copy a running process's memory, each only what
was written since the last, and a final `dump --prev-images-dir` that
refers to the rest (dumper/predump.py). Dirty tracking by userfaultfd
async write-protection + PAGEMAP_SCAN, or by content hashes; the
tracking is procsnap's, left in the target between passes and gone at the
final dump (and after any failure)."""

import dataclasses
import os
import signal
import sys

import pytest

import procsnap
from conftest import (CASES_BY_ID, assert_cli_error, assert_pass, assert_running_untraced, cli, dump_kill,
                      proc_snapshot, restore, status_kib, wait_until)
from procsnap.dumper.predump import pre_dump
from procsnap import model
from procsnap.errors import RestoreError, Unsupported
from procsnap.image import schema

PG = 4096
WRITER = CASES_BY_ID["writer"]  # writes its 64 MiB all the time, checks the chain after restore
METHODS = ["uffd-wp", "hashes"]
# step -> the pages of the area (index) and of the new area it writes (predump.c)
WRITTEN = {1: {20, 40, 41, 100}, 2: set(), 3: {60}}
NEW = 32  # pages of the area of step 2; page 16 rewritten at step 3


def start_predump(procs):
    t = procs.start([procs._targets.path("predump", "pie"), "default"], name="predump")
    line = next(l for l in t.output().splitlines() if l.startswith("AREA "))
    _, addr, pages = line.split()
    return t, int(addr, 16), int(pages)


def step(t, n):
    """The target's next step; the address of the area it maps (0: none)."""
    t.signal(signal.SIGUSR2)
    wait_until(lambda: f"STEP {n} " in t.output(), f"step {n} of {t}")
    line = next(l for l in t.output().splitlines() if l.startswith(f"STEP {n} "))
    return int(line.split()[2], 16)


def own_pages(images, start, npages):
    """Indexes of the pages of start.. that the image stores itself, and of those it refers to."""
    ckpt = procsnap.open_image(str(images)).checkpoint
    end = start + npages * PG
    own = {(r.vaddr - start) // PG + i for r in ckpt.pages for i in range(r.npages)
           if start <= r.vaddr + i * PG < end}
    referred = {(v - start) // PG + i for refs in ckpt.page_refs for v, n, _, _ in schema.unpack_page_refs(refs)
                for i in range(n) if start <= v + i * PG < end}
    return own, referred


def tracking(images):
    return procsnap.open_image(str(images)).checkpoint.tracking[0]


def uffds(pid):
    return [int(fd) for fd in os.listdir(f"/proc/{pid}/fd")
            if os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:[userfaultfd]"]


def registered(pid):
    with open(f"/proc/{pid}/smaps") as f:
        return [l for l in f if l.startswith("VmFlags:") and " uw" in l]


def assert_not_tracked(pid):
    assert not uffds(pid), f"pid {pid}: a userfaultfd left: fds {uffds(pid)}"
    assert not registered(pid), f"pid {pid}: areas left registered: {registered(pid)}"


def without_fd(snap, fd):
    """`snap` as if fd `fd` of each process (the pre-dump's uffd, procsnap's;
    a child forked since has it too) were not there."""
    tree = {pid: dataclasses.replace(ids, fds=tuple(e for e in ids.fds if e[0] != fd))
            for pid, ids in snap.tree.items()}
    state = snap.state
    if state is not None:
        state = {pid: {k: v for k, v in values.items() if not k.startswith(f"fdinfo.{fd}.")}
                 for pid, values in state.items()}
    return dataclasses.replace(snap, fds={k: v for k, v in snap.fds.items() if k != fd}, tree=tree, state=state)


def final_snapshot(t, images):
    """The target's state as the final dump will find it once it has taken the tracking down."""
    snap = proc_snapshot(t.pid)
    t_rec = tracking(images)
    return without_fd(snap, t_rec.uffd) if t_rec.method == "uffd-wp" else snap


@pytest.mark.parametrize("method", METHODS)
def test_passes_copy_what_was_written(procs, tmp_path, method):
    """Pass 2 copies exactly the pages written since pass 1, pass 3 a new
    area whole, the final dump the pages written since pass 3 (not one that
    was dropped); the rest is referred to, and the restore is whole."""
    s = tmp_path / "series"
    t, area, npages = start_predump(procs)
    stats = pre_dump(t.pid, str(s / "1"), method=method)
    assert stats.method == method and stats.passes == 1
    own, referred = own_pages(s / "1", area, npages)
    assert own == set(range(npages)) and not referred
    if method == "uffd-wp":
        assert uffds(t.pid) == [tracking(s / "1").uffd] and registered(t.pid)
    step(t, 1)
    stats = pre_dump(t.pid, str(s / "2"), prev_images_dir="../1", method=method)
    own, referred = own_pages(s / "2", area, npages)
    assert own == WRITTEN[1], f"pass 2 copied pages {sorted(own)} of the area"
    assert referred == set(range(npages)) - WRITTEN[1]
    assert stats.passes == 2 and stats.referred >= npages - len(WRITTEN[1])
    new = step(t, 2)
    pre_dump(t.pid, str(s / "3"), prev_images_dir="../2", method=method)
    assert own_pages(s / "3", area, npages)[0] == set()
    assert own_pages(s / "3", new, NEW) == (set(range(NEW)), set()), "a new area is copied whole"
    step(t, 3)
    images = dump_kill(t, s / "final", before=final_snapshot(t, s / "3"), prev_images_dir="../3")
    own, referred = own_pages(images, area, npages)
    assert own == WRITTEN[3], f"the final dump copied pages {sorted(own)} of the area"
    assert referred == set(range(npages)) - WRITTEN[3] - {50}, "page 50 was dropped: neither stored nor referred"
    assert own_pages(images, new, NEW) == ({16}, set(range(NEW)) - {16})
    restore(procs, t, images)
    assert_pass(t)


def test_sabotage_is_seen(procs, tmp_path):
    """The target's check fails when a page is not as the steps left it."""
    s = tmp_path / "series"
    t = procs.start([procs._targets.path("predump", "pie"), "default"], name="predump",
                    env={"PS_TARGET_SABOTAGE": "1"})
    pre_dump(t.pid, str(s / "1"))
    step(t, 1)
    images = dump_kill(t, s / "final", before=final_snapshot(t, s / "1"), prev_images_dir="../1")
    restore(procs, t, images)
    status, out = t.wait_result()
    assert status != 0 and "FAIL: area page 40" in out, out


@pytest.mark.parametrize("method", METHODS)
def test_pages_changing_during_the_passes(procs, tmp_path, method):
    """A process writing all the time: pages copied while it runs are torn,
    the final dump makes the chain consistent (the writer checks it)."""
    s = tmp_path / "series"
    t = procs.start_case(WRITER, "pie")
    first = pre_dump(t.pid, str(s / "1"), method=method)
    second = pre_dump(t.pid, str(s / "2"), prev_images_dir="../1", method=method)
    assert first.copied >= 16384 and second.passes == 2, (first, second)  # it writes every page between passes
    images = dump_kill(t, s / "final", before=final_snapshot(t, s / "2"), prev_images_dir="../2")
    restore(procs, t, images)
    assert_pass(t)


def test_never_touched_pages_stay_so(procs, tmp_path):
    """Tracking protects only the pages that are there: the page tables of
    a sparse area do not fill (uffdwp.written_ranges), no clean page of a
    library is taken for a private one, and the memory target (its 64 MiB
    area with 5 pages touched, checked with mincore) restores whole."""
    s = tmp_path / "series"
    t = procs.start_case(CASES_BY_ID["memory"], "pie")
    pte = status_kib(t.pid, "VmPTE")
    pre_dump(t.pid, str(s / "1"))
    pre_dump(t.pid, str(s / "2"), prev_images_dir="../1")
    assert status_kib(t.pid, "VmPTE") <= pte + 16, f"VmPTE {pte} kB before, {status_kib(t.pid, 'VmPTE')} after"
    ckpt = procsnap.open_image(str(s / "1")).checkpoint
    text = [v for v in ckpt.vmas if v.kind == model.VmaKind.FILE_PRIVATE and v.prot & model.Prot.PROT_EXEC]
    stored = [r for r in ckpt.pages for v in text if v.start <= r.vaddr < v.end]
    assert text and not stored, f"pages of code stored: {stored}"
    images = dump_kill(t, s / "final", before=final_snapshot(t, s / "2"), prev_images_dir="../2")
    restore(procs, t, images)
    assert_pass(t)


FORKER = """
import os, signal, sys
signal.signal(signal.SIGUSR2, lambda *a: None)
print("READY", flush=True)
signal.pause()  # pre-dumped here
child = os.fork()
if child == 0:
    signal.pause()
    os._exit(0)
print("FORKED", child, flush=True)
signal.pause()
"""


@pytest.mark.parametrize("method", METHODS)
def test_child_forked_since(procs, tmp_path, method):
    """A child forked after the pre-dump shares pages copy-on-write with
    the root, which the root stores itself (the child's image refers to
    them there, not to the chain); it inherits the uffd fd, which the
    final dump closes there too: neither restored process has it."""
    s = tmp_path / "series"
    t = procs.start([sys.executable, "-c", FORKER], name="forker")
    pre_dump(t.pid, str(s / "1"), method=method)
    t.signal(signal.SIGUSR2)
    wait_until(lambda: "FORKED" in t.output(), "the fork")
    child = int(t.output().split("FORKED")[1].split()[0])
    if method == "uffd-wp":
        assert uffds(child) == [tracking(s / "1").uffd], "the child inherits the uffd"
    images = dump_kill(t, s / "final", before=final_snapshot(t, s / "1"), prev_images_dir="../1")
    restore(procs, t, images)
    for pid in (t.pid, child):
        assert_not_tracked(pid)


def test_restore_of_a_pre_dump_is_refused(procs, tmp_path):
    t, _, _ = start_predump(procs)
    pre_dump(t.pid, str(tmp_path / "1"))
    with pytest.raises(RestoreError) as exc:
        procsnap.restore(str(tmp_path / "1"))
    assert "pre-dump" in str(exc.value) and str(t.pid) in str(exc.value)
    r = cli("verify", tmp_path / "1")
    assert r.returncode == 1 and "is a pre-dump" in r.stdout, r.stdout + r.stderr
    assert_running_untraced(t.pid)


def test_dump_without_the_chain_is_refused_by_name(procs, tmp_path):
    """The uffd a pre-dump leaves is refused by a dump that does not name
    the pre-dump, leaving the process as it was; --untrack takes it down."""
    t, _, _ = start_predump(procs)
    pre_dump(t.pid, str(tmp_path / "1"))
    fd = tracking(tmp_path / "1").uffd
    (tmp_path / "plain").mkdir()
    before = proc_snapshot(t.pid)
    r = cli("dump", "-t", t.pid, "-D", tmp_path / "plain")
    assert_cli_error(r, f"pid {t.pid}", f"fd {fd}", "userfaultfd", "pre-dump")
    assert_running_untraced(t.pid)
    assert proc_snapshot(t.pid).fds == before.fds and not os.listdir(tmp_path / "plain")
    r = cli("pre-dump", "-t", t.pid, "-D", tmp_path / "1", "--untrack")
    assert r.returncode == 0 and f"uffd fd {fd}" in r.stdout, r.stdout + r.stderr
    assert_not_tracked(t.pid)
    t.signal(signal.SIGUSR1)
    assert_pass(t)


def test_check_reports_dirty_tracking():
    r = cli("check")
    line = next((l for l in r.stdout.splitlines() if " dirty_tracking:" in l), None)
    assert line and line.startswith("ok") and "uffd-wp" in line and "soft-dirty bits: not in this kernel" in line, \
        r.stdout


def test_uffd_wp_asked_where_missing_is_refused(procs, tmp_path, monkeypatch):
    from procsnap.dumper import predump

    monkeypatch.setattr(predump, "uffd_wp_missing", lambda: "no UFFD_FEATURE_WP_ASYNC")
    t, _, _ = start_predump(procs)
    with pytest.raises(Unsupported, match="uffd-wp: no UFFD_FEATURE_WP_ASYNC"):
        pre_dump(t.pid, str(tmp_path / "1"), method="uffd-wp")
    assert pre_dump(t.pid, str(tmp_path / "1")).method == "hashes"  # auto: the fallback
    assert_not_tracked(t.pid)


PASS_FAULTS = ["predump-after-freeze", "predump-after-uffd", "predump-after-rearm", "predump-after-thaw",
               "mid-page-write", "before-commit"]


@pytest.mark.parametrize("stage", PASS_FAULTS)
@pytest.mark.parametrize("which", [1, 2], ids=["first-pass", "second-pass"])
def test_failed_pass_leaves_no_tracking(procs, tmp_path, stage, which):
    """A pass that fails at any stage leaves the process running, untraced,
    and no image; without the uffd and registered areas, unless it failed
    before re-arming the tracking of the pass before (which then stays).
    The next pass (by content where the tracking is gone) copies what was
    written, and the final dump restores whole."""
    s = tmp_path / "series"
    t, area, npages = start_predump(procs)
    prev = []
    if which == 2:
        pre_dump(t.pid, str(s / "1"))
        prev = ["--prev-images-dir", "../1"]
    step(t, 1)
    (s / "2").mkdir(parents=True)
    r = cli("pre-dump", "-t", t.pid, "-D", s / "2", *prev, env={"PROCSNAP_FAULT": stage})
    assert_cli_error(r, stage)
    assert_running_untraced(t.pid)
    if which == 2 and stage in ("predump-after-freeze", "predump-after-uffd"):
        assert uffds(t.pid) == [tracking(s / "1").uffd] and registered(t.pid)
    else:
        assert_not_tracked(t.pid)
    assert not os.listdir(s / "2"), os.listdir(s / "2")
    stats = pre_dump(t.pid, str(s / "2"), prev_images_dir="../1" if prev else None)
    if which == 2:
        assert own_pages(s / "2", area, npages)[0] == WRITTEN[1] and stats.method == "uffd-wp"
    images = dump_kill(t, s / "final", before=final_snapshot(t, s / "2"), prev_images_dir="../2")
    restore(procs, t, images)
    assert_pass(t)


def test_failed_final_dump(procs, tmp_path):
    """A final dump that fails once the tracking is taken down leaves the
    process running without it; dumped again, by content, it restores whole."""
    s = tmp_path / "series"
    t, area, npages = start_predump(procs)
    pre_dump(t.pid, str(s / "1"))
    step(t, 1)
    (s / "final").mkdir()
    r = cli("dump", "-t", t.pid, "-D", s / "final", "--prev-images-dir", "../1",
            env={"PROCSNAP_FAULT": "final-after-untrack"})
    assert_cli_error(r, "final-after-untrack")
    assert_running_untraced(t.pid)
    assert_not_tracked(t.pid)
    images = dump_kill(t, s / "final", prev_images_dir="../1")
    assert own_pages(images, area, npages)[0] == WRITTEN[1]
    restore(procs, t, images)
    assert_pass(t)


def test_final_dump_left_running_reads_the_snapshot(procs, tmp_path):
    """A final dump with leave_running reads its pages from the copy-on-write
    snapshot, as any --leave-running dump (one dump flow, dumper/plan.py):
    it stores the pages written since the pass and refers to the rest, the
    tracking is gone, the target runs on untraced, and the image restores."""
    s = tmp_path / "series"
    t, area, npages = start_predump(procs)
    pre_dump(t.pid, str(s / "1"), method="uffd-wp")
    step(t, 1)
    before = final_snapshot(t, s / "1")
    (s / "final").mkdir()
    stats = procsnap.dump(t.pid, str(s / "final"), leave_running=True, prev_images_dir="../1")
    assert stats.snapshot and 0 < stats.frozen_s < stats.total_s, stats
    assert_not_tracked(t.pid)
    assert_running_untraced(t.pid)
    own, referred = own_pages(s / "final", area, npages)
    assert own == WRITTEN[1], f"the final dump copied pages {sorted(own)} of the area"
    assert referred == set(range(npages)) - WRITTEN[1]
    t.kill_and_reap()
    t.dumped = before  # restore() compares against it
    restore(procs, t, s / "final")
    assert_pass(t)
