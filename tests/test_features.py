"""`procsnap check --feature NAME` (procsnap/features.py): exit 0 with what
was found if this kernel allows the feature, 1 with one line saying why
not; `--feature list` names them (CRIU's names where CRIU has them); an
unknown name is bad input (one line, exit 2)."""

import os

import pytest

from procsnap import features
from procsnap.kernel.uffdwp import has_soft_dirty

from conftest import assert_cli_error, cli

CRIU_NAMES = ["mnt_id", "mem_dirty_track", "uffd", "uffd-noncoop", "timens", "clone3_set_tid", "pidfd_store",
              "nftables", "get_rseq_conf", "kcmp_epoll", "seccomp_filters", "cgroupns", "userns", "ns_pid"]


def test_list_names_them_all():
    r = cli("check", "--feature", "list")
    assert r.returncode == 0, r.stderr
    listed = r.stdout.split()
    assert listed == features.names()
    assert set(CRIU_NAMES + ["uffd-wp", "tcp_repair", "pidfd_getfd", "memfd", "ipc_msg_copy", "ipc_next_id",
                             "mqueue", "ptrace", "prctl_mm_map"]) <= set(listed), listed


@pytest.mark.parametrize("name", features.names())
def test_each_feature(name):
    """Each probe answers in one line: 0 and what it found, or 1 and why not."""
    r = cli("check", "--feature", name)
    assert "Traceback" not in r.stderr, r.stderr
    if r.returncode == 0:
        assert r.stdout.startswith(f"{name}: ") and len(r.stdout.splitlines()) == 1 and not r.stderr, r
    else:
        assert r.returncode == 1, r
        lines = r.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"procsnap: {name}: not available: "), r.stderr


@pytest.mark.parametrize("name, present", [
    ("mem_dirty_track", has_soft_dirty()),  # DESIGN.md: not in this kernel (CONFIG_MEM_SOFT_DIRTY off)
    ("timens", os.path.exists("/proc/self/ns/time")),
    ("cgroupns", os.path.exists("/proc/self/ns/cgroup")),
    ("ipc_next_id", os.path.exists("/proc/sys/kernel/msg_next_id")),
    ("clone3_set_tid", True),  # procsnap's restore needs it: this suite could not pass without it
    ("uffd-wp", True),  # pre-dump's tracking here (test_predump.py)
])
def test_answers_what_the_machine_has(name, present):
    r = cli("check", "--feature", name)
    assert r.returncode == (0 if present else 1), (r.stdout, r.stderr)
    if name == "mem_dirty_track" and not present:
        assert "soft-dirty" in r.stderr


def test_unknown_feature_is_bad_input():
    r = cli("check", "--feature", "no_such_thing")
    assert_cli_error(r, "no_such_thing", "--feature list")
    assert r.returncode == 2
