"""A series of images (dump --prev-images-dir, procsnap gc): the second
dump of a process stores only what changed and restores whole; a parent
that is damaged or gone is a clear error; gc removes only images that no
kept image refers to."""

import os
import shutil

import pytest

import procsnap
from conftest import CASES_BY_ID, assert_cli_error, assert_pass, cli, dump_kill, our_children, restore


def _pages(d):
    return (d / "pages.img").stat().st_size


@pytest.mark.parametrize("case_id", ["memory", "cpu-busy"])
def test_second_dump_stores_what_changed(procs, tmp_path, case_id):
    series = tmp_path / "series"
    t = procs.start_case(CASES_BY_ID[case_id], "pie")
    procsnap.dump(t.pid, str(series / "1"), leave_running=True)
    images = dump_kill(t, series / "2", prev_images_dir="../1")
    first, second = _pages(series / "1"), _pages(series / "2")
    assert second * 4 < first, f"second image {second} bytes of pages, first {first}"
    refs = procsnap.open_image(str(images)).checkpoint.page_refs
    assert refs and "parent:../1" in refs[0].sources
    # an unrelated image beside them: gc keeps 2 and the 1 it refers to, removes the other
    other = procs.start_case(CASES_BY_ID["sleep-pause"], "pie")
    procsnap.dump(other.pid, str(series / "x"), leave_running=True)
    r = cli("gc", series, "--keep", "2")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in series.iterdir()) == ["1", "2"], r.stdout
    restore(procs, t, images)
    assert_pass(t)


KEY = bytes(range(32))


@pytest.mark.parametrize("options", [{"compress": True}, {"compress": True, "key": KEY}, {"key": KEY}],
                         ids=["compressed", "compressed-encrypted", "encrypted"])
def test_series_of_encoded_images(procs, tmp_path, options):
    """A compressed and encrypted series: the second image refers to the
    pages of the first (read from its chunks) and restores whole."""
    series = tmp_path / "series"
    t = procs.start_case(CASES_BY_ID["memory"], "pie")
    procsnap.dump(t.pid, str(series / "1"), leave_running=True, **options)
    images = dump_kill(t, series / "2", prev_images_dir="../1", **options)
    image = procsnap.open_image(str(images), key=options.get("key"))
    referred = sum(n for refs in image.checkpoint.page_refs if "parent:../1" in refs.sources
                   for _, n, _, _ in procsnap.image.schema.unpack_page_refs(refs))
    stored = sum(r.npages for r in image.checkpoint.pages)
    assert referred > 4 * stored, (referred, stored)
    keyargs = []
    if "key" in options:
        (tmp_path / "key").write_bytes(KEY)
        keyargs = ["--encrypt", tmp_path / "key"]
    # a person looks at the child: the summary, a view (VIEW after the options too), a core file
    r = cli("show", images, *keyargs)
    assert r.returncode == 0 and "unchanged, stored in the previous image (../1)" in r.stdout, r.stdout + r.stderr
    r = cli("show", images, *keyargs, "rss")
    assert r.returncode == 0 and "../1" in r.stdout, r.stdout + r.stderr
    r = cli("core", images, "-o", tmp_path / "core", *keyargs)
    assert r.returncode == 0, r.stderr
    restore(procs, t, images, key=options.get("key"))
    assert_pass(t)


def test_parent_damaged_or_gone(procs, tmp_path):
    series = tmp_path / "series"
    t = procs.start_case(CASES_BY_ID["memory"], "pie")
    procsnap.dump(t.pid, str(series / "1"), leave_running=True)
    images = dump_kill(t, series / "2", prev_images_dir="../1")
    shutil.copytree(series / "1", tmp_path / "saved")
    kids = our_children()
    with open(series / "1" / "pages.img", "r+b") as f:  # a flipped bit in the parent's pages
        f.seek(4096 * 3 + 7)
        b = f.read(1)
        f.seek(4096 * 3 + 7)
        f.write(bytes([b[0] ^ 1]))
    r = cli("restore", "-D", images)
    assert_cli_error(r, str(series / "1"), "parent image", "xxh3")
    shutil.rmtree(series / "1")
    r = cli("restore", "-D", images)
    assert_cli_error(r, str(series / "1"), "parent image")
    r = cli("verify", images)
    assert r.returncode != 0 and "parent image" in r.stderr, r.stderr
    assert our_children() == kids
    r = cli("gc", series)  # the one image left refers to a parent that is gone: it says so
    assert_cli_error(r, str(series / "1"))
    shutil.copytree(tmp_path / "saved", series / "1")
    restore(procs, t, images)
    assert_pass(t)


def test_prev_images_dir_refusals(procs, tmp_path):
    t = procs.start_case(CASES_BY_ID["sleep-pause"], "pie")
    r = cli("dump", "-t", t.pid, "-D", tmp_path / "img", "--prev-images-dir", "../nothing")
    assert_cli_error(r, "nothing")
    r = cli("dump", "-t", t.pid, "-D", tmp_path / "img", "--prev-images-dir", ".")
    assert_cli_error(r, "--prev-images-dir")
    assert t.alive() and not os.path.exists(tmp_path / "img" / "procsnap.img")


def test_tree_whose_shared_pages_the_parent_has(procs, tmp_path):
    """A tree whose processes share pages copy-on-write: the root stores
    those itself even where its parent image has them, since the other
    processes' images refer to them in the root's (tree.CowIndex); a
    reference to a page the root only referred to would restore as zeros."""
    series = tmp_path / "series"
    t = procs.start_case(CASES_BY_ID["tree-prefork"], "pie")
    procsnap.dump(t.pid, str(series / "1"), leave_running=True)
    images = dump_kill(t, series / "2", prev_images_dir="../1")
    restore(procs, t, images)
    assert_pass(t)
