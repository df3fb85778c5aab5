"""SCM_RIGHTS in flight on unix sockets: the files passed are dumped as the
files of the tree they are (the same open file descriptions) and arrive
again after the restore."""

from conftest import assert_pass, dump_kill, restore


def test_files_in_flight(procs, tmp_path):
    """A regular file (with its offset, shared with the sender's own fd), a
    pipe end and a socket pair end in one message, the file again in a
    second; received and checked by the target after the restore."""
    t = procs.start([procs._targets.path("scmrights", "pie"), str(tmp_path / "data")], name="scmrights")
    images = dump_kill(t, tmp_path / "img")
    restore(procs, t, images)
    assert_pass(t)
