"""What a process shares with its tree: fd tables and fs structs shared
between processes are refused by name at dump."""

from pathlib import Path

import pytest

import procsnap
from procsnap.errors import Unsupported

from conftest import Case, assert_pass, assert_same_snapshot, assert_untouched, proc_snapshot


def assert_refused_untouched(t, tmp_path, *names) -> None:
    """A dump of `t` is refused, the message naming each of `names`; the
    tree runs on untouched and passes its check."""
    before = proc_snapshot(t.pid)
    images = tmp_path / "img"
    images.mkdir()
    with pytest.raises(Unsupported) as exc:
        procsnap.dump(t.pid, str(images))
    for name in names:
        assert name in str(exc.value), exc.value
    assert_untouched(t.pid, before, images, proc_snapshot, assert_same_snapshot)
    assert_pass(t)


@pytest.mark.parametrize("mode,what,flag", [("sharefiles", "fd table", "CLONE_FILES"),
                                            ("sharefs", "root, working directory and umask", "CLONE_FS")])
def test_shared_tables_refused(mode, what, flag, procs, tmp_path):
    """Two processes sharing one fd table (or fs struct): refused at dump
    naming both and the flag; the tree runs on untouched and still shares it."""
    t = procs.start_case(Case("treestate", mode), "pie")
    child = int(Path(f"/proc/{t.pid}/task/{t.pid}/children").read_text().split()[0])
    key = f"shares.{'files' if mode == 'sharefiles' else 'fs'}"
    assert proc_snapshot(t.pid).state[child][key] == f"pid {t.pid}'s"  # the state check sees it
    assert_refused_untouched(t, tmp_path, f"pid {child}", f"pid {t.pid}", what, flag)
