"""Pages shared copy-on-write after a fork are shared again after restore
(restorer/forkbuild.py, inherit.py), with the forked server of
tests/targets/cow.c: every worker changed its view of the area in its own
way after the fork.

The proof of sharing cannot be faked: the physical frame (pagemap bits
0-54, readable as root) of a page is the same in the root and a worker
exactly where the worker never wrote it, before the dump and after the
restore; the tree's summed Pss says the same. The workers check their
contents themselves, and write after the restore: the root's pages must
not change (copy-on-write still works). The state check runs on every
restore.
"""

import os
import re
import signal

import pytest

import procsnap
from conftest import Case, assert_pass, cli, descendants, dump_kill, image_hashes, reap_gone, restore
from procsnap.faults import FORK_STAGES, InjectedFault

COW = Case("cow", "server")
PAGE = 4096
# cow.c's layout of the area, in pages
W1 = range(0, 16)        # rewritten by worker 1
DROPPED = range(16, 32)  # MADV_DONTNEED by worker 2
UNMAPPED = range(32, 48)  # munmapped by worker 2
W4 = range(48, 64)       # rewritten by worker 4, before it forked the grandchild
PRESENT = 1 << 63
PFN_MASK = (1 << 55) - 1


def start_cow(procs, sabotage=False):
    t = procs.start_case(COW, "pie", sabotage=sabotage)
    out = t.output()
    start, npages = re.search(r"^AREA (0x[0-9a-f]+) (\d+)$", out, re.M).groups()
    pids = [int(p) for p in re.search(r"^PIDS ([\d ]+)$", out, re.M).group(1).split()]
    return t, int(start, 16), int(npages), pids[:-1], pids[-1]


def frames(pid, start, npages):
    """The pagemap entry of each page: PRESENT | frame number, or 0."""
    with open(f"/proc/{pid}/pagemap", "rb") as f:
        data = os.pread(f.fileno(), 8 * npages, start // PAGE * 8)
    return [e & (PRESENT | PFN_MASK) if e & PRESENT else 0
            for e in (int.from_bytes(data[i:i + 8], "little") for i in range(0, len(data), 8))]


def tree_pss_kib(pid):
    total = 0
    for p in [pid] + descendants(pid):
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                total += sum(int(line.split()[1]) for line in f if line.startswith("Pss:"))
        except ProcessLookupError:  # a zombie: no memory
            continue
    return total


def assert_shared_as_forked(root, start, npages, workers, grandchild):
    """Each fork-built process's frames: the root's where it never wrote, its own where it did."""
    mine = frames(root, start, npages)
    assert all(mine), "the root's area is not all present"
    view = {w: frames(pid, start, npages) for w, pid in enumerate(workers)}
    g = frames(grandchild, start, npages)
    untouched = [i for i in range(npages) if i not in W1 and i not in DROPPED and i not in UNMAPPED and i not in W4]
    for w in range(9):  # 9 (an epoll's holder) is spawned as before
        same = [i for i in untouched if view[w][i] == mine[i]]
        assert len(same) == len(untouched), f"worker {w}: {len(untouched) - len(same)} pages not shared with the root"
    assert all(g[i] == mine[i] for i in untouched), "grandchild: pages not shared with the root"
    assert all(view[1][i] and view[1][i] != mine[i] for i in W1), "worker 1: its own pages are the root's"
    assert not any(view[2][i] for i in [*DROPPED, *UNMAPPED]), "worker 2: dropped or unmapped pages present"
    assert all(view[4][i] and view[4][i] != mine[i] for i in W4), "worker 4: its own pages are the root's"
    assert all(g[i] == view[4][i] for i in W4), "grandchild: worker 4's pages not shared with it"


def test_forked_server_shares_again(procs, tmp_path):
    """Before the dump and after the restore, the same pages are one frame
    in the root, the workers and the grandchild; the tree's Pss does not
    grow by a copy per worker; every process checks its view."""
    t, start, npages, workers, grandchild = start_cow(procs)
    assert_shared_as_forked(t.pid, start, npages, workers, grandchild)
    before = tree_pss_kib(t.pid)
    images = dump_kill(t, tmp_path / "img")
    restore(procs, t, images)
    assert_shared_as_forked(t.pid, start, npages, workers, grandchild)
    after = tree_pss_kib(t.pid)
    area_kib = npages * PAGE // 1024
    # worker 9 holds a copy now; a copy per process would be 11 areas more
    assert after < before + 2 * area_kib, f"tree Pss {before} KiB before the dump, {after} KiB after the restore"
    assert_pass(t)


def test_forked_server_checks_can_fail(procs, tmp_path):
    """Sabotage: worker 0 rewrites a page before its check, which must see it."""
    t, *_ = start_cow(procs, sabotage=True)
    restore(procs, t, dump_kill(t, tmp_path / "img"))
    status, out = t.wait_result()
    assert status != 0 and "FAIL: worker 0 page 0 expected seed 1" in out, out


@pytest.mark.parametrize("how", ["error", "kill"])
@pytest.mark.parametrize("stage", FORK_STAGES)
def test_fault_after_fork_leaves_no_process(stage, how, procs, tmp_path, monkeypatch):
    """A restore that fails (or is killed) once a process was forked from its
    parent leaves none of the tree, and the image as it was; the next one
    works and shares again."""
    t, start, npages, workers, grandchild = start_cow(procs)
    pids = [t.pid] + descendants(t.pid)
    images = dump_kill(t, tmp_path / "img")
    hashes = image_hashes(images)
    spec = stage if how == "error" else f"{stage}:kill"
    if how == "error":
        monkeypatch.setenv("PROCSNAP_FAULT", spec)
        with pytest.raises(InjectedFault):
            procsnap.restore(str(images))
        monkeypatch.delenv("PROCSNAP_FAULT")
    else:
        r = cli("restore", "-D", images, env={"PROCSNAP_FAULT": spec})
        assert r.returncode == -signal.SIGKILL, r.stderr
    reap_gone(pids)
    assert image_hashes(images) == hashes
    restore(procs, t, images)
    assert_shared_as_forked(t.pid, start, npages, workers, grandchild)
    assert_pass(t)
