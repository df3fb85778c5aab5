"""An image is never lost: a dump into a directory that holds an image
writes beside it and swaps in only a complete image (image/staging.py).

A dump that fails with an error, is SIGKILLed before its commit or runs out
of disk leaves the previous image byte for byte and restorable; SIGKILLed
after the commit (mid-swap, before-thaw) it leaves the new complete image
(a swap cut short is finished by the next reader). What a killed dump
leaves in hidden staging directories is removed by the next dump.
"""

import signal
import subprocess
from pathlib import Path

import pytest

import procsnap
from conftest import CASES_BY_ID, assert_cli_error, assert_pass, cli, image_hashes, image_size, restore
from procsnap.errors import ImageWriteError
from procsnap.faults import DUMP_STAGES, InjectedFault

MEMORY = CASES_BY_ID["memory"]
SLEEPER = CASES_BY_ID["sleep-pause"]
IMAGE_FILES = {"procsnap.img", "pages.img", "ghosts.img"}
COMMITTED = ("mid-swap", "before-thaw")  # SIGKILLed from here on, the new image stands


def visible_hashes(images):
    """image_hashes without procsnap's hidden staging directories."""
    return {k: v for k, v in image_hashes(images).items() if not k.startswith(".")}


def restores_and_passes(procs, t, images, out_size):
    """End the original, restore `images` onto its pid; the copy passes."""
    if t.alive():
        t.signal(signal.SIGKILL)
    t.reap()
    t.truncate_output(out_size)
    restore(procs, t, images)
    assert_pass(t)


@pytest.mark.parametrize("how", ["error", "kill"])
@pytest.mark.parametrize("stage", DUMP_STAGES)
def test_failed_dump_keeps_the_image(stage, how, procs, tmp_path, monkeypatch):
    t = procs.start_case(MEMORY, "pie")
    out_size = t.output_size()
    images = tmp_path / "img"
    procsnap.dump(t.pid, str(images), leave_running=True)
    hashes = visible_hashes(images)
    assert set(hashes) == IMAGE_FILES

    if how == "error":
        monkeypatch.setenv("PROCSNAP_FAULT", stage)
        with pytest.raises(InjectedFault):
            procsnap.dump(t.pid, str(images))
        monkeypatch.delenv("PROCSNAP_FAULT")
        assert {p.name for p in images.iterdir()} == IMAGE_FILES, sorted(images.iterdir())
    else:
        r = cli("dump", "-t", t.pid, "-D", images, env={"PROCSNAP_FAULT": f"{stage}:kill"})
        assert r.returncode == -signal.SIGKILL, r.stderr
    assert t.alive(), f"{t} died when the dump failed at {stage}"

    image = procsnap.open_image(str(images))  # finishes a swap cut short
    assert image.checkpoint.task.pid == t.pid
    if how == "error" or stage not in COMMITTED:
        assert visible_hashes(images) == hashes, f"the image changed after a dump failed at {stage}"
    else:
        assert {p.name for p in images.iterdir()} == IMAGE_FILES, sorted(images.iterdir())
    restores_and_passes(procs, t, images, out_size)


def test_leftovers_of_a_killed_dump_are_removed(procs, tmp_path):
    t = procs.start_case(SLEEPER, "pie")
    images = tmp_path / "img"
    r = cli("dump", "-t", t.pid, "-D", images, "-R", env={"PROCSNAP_FAULT": "mid-page-write:kill"})
    assert r.returncode == -signal.SIGKILL, r.stderr
    left = [p.name for p in images.iterdir()]
    assert len(left) == 1 and left[0].startswith(".procsnap-new."), left
    procsnap.dump(t.pid, str(images), leave_running=True)
    assert {p.name for p in images.iterdir()} == IMAGE_FILES
    assert_pass(t)


def test_second_dump_replaces_the_first(procs, tmp_path):
    """The second dump (of another process) replaces the first and says so;
    the directory then holds only the new image, which restores."""
    first = procs.start_case(SLEEPER, "pie")
    second = procs.start_case(SLEEPER, "pie")
    out_size = second.output_size()
    images = tmp_path / "img"
    r = cli("dump", "-t", first.pid, "-D", images, "-R")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    r = cli("dump", "-t", second.pid, "-D", images, "-R")
    assert r.returncode == 0, r.stderr
    assert r.stderr.startswith(f"procsnap: {images}: replaced the image of pid {first.pid} taken "), r.stderr
    assert {p.name for p in images.iterdir()} == IMAGE_FILES
    assert procsnap.open_image(str(images)).checkpoint.task.pid == second.pid
    assert_pass(first)
    restores_and_passes(procs, second, images, out_size)


@pytest.fixture
def small_fs(tmp_path):
    """Mounts a tmpfs of the size given (bytes) at tmp_path/small; unmounted after."""
    mnt = tmp_path / "small"
    mnt.mkdir()

    def mount(size):
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], check=True)
        return mnt

    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0 and mnt.is_mount():
            subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_full_disk_keeps_the_image(procs, tmp_path, small_fs):
    """A filesystem with room for one image but not two: the second dump
    fails with 'No space left' and the first image stays, restorable."""
    t = procs.start_case(SLEEPER, "pie")
    out_size = t.output_size()
    probe = tmp_path / "probe"
    procsnap.dump(t.pid, str(probe), leave_running=True)
    size = image_size(probe)
    mnt = small_fs((size * 8 // 5 + 4095) // 4096 * 4096)
    images = mnt / "img"
    procsnap.dump(t.pid, str(images), leave_running=True)
    hashes = visible_hashes(images)

    with pytest.raises(ImageWriteError) as exc:
        procsnap.dump(t.pid, str(images))
    assert "No space left" in str(exc.value), str(exc.value)
    line = assert_cli_error(cli("dump", "-t", t.pid, "-D", images), f"pid {t.pid}")
    assert "No space left" in line, line
    assert image_hashes(images) == hashes, "a full disk changed the image or left files"
    restores_and_passes(procs, t, images, out_size)


def test_images_dir_made_or_refused(procs, tmp_path):
    """A missing -D DIR is made (parents too); a -D that is a file is
    refused, naming it, and not taken for a vanished process."""
    t = procs.start_case(SLEEPER, "pie")
    deep = tmp_path / "a" / "b" / "img"
    procsnap.dump(t.pid, str(deep), leave_running=True)
    assert {p.name for p in deep.iterdir()} == IMAGE_FILES
    plain = tmp_path / "file"
    plain.write_text("not a directory\n")
    with pytest.raises(ImageWriteError) as exc:
        procsnap.dump(t.pid, str(plain))
    assert str(exc.value) == f"{plain}: not a directory"
    line = assert_cli_error(cli("dump", "-t", t.pid, "-D", plain), f"{plain}: not a directory")
    assert "File exists" not in line
    assert_pass(t)
