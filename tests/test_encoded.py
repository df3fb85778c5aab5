"""Compressed and encrypted images (dump --compress, --encrypt KEYFILE):
real targets dumped in each encoding, restored (state check included) and
self-checked; every kind of damage to an encrypted image is a clear error
before any process exists, and leaves the image as it was."""

import os
import shutil
import signal
from pathlib import Path

import pytest

import procsnap
from conftest import (assert_cli_error, assert_pass, cli, dump_kill, image_hashes, our_children, proc_snapshot,
                      restore)
from procsnap.image import chunks, schema

ENCODINGS = {
    "compress": {"compress": True},
    "encrypt": {"key": bytes(range(32))},
    "both": {"compress": True, "key": bytes(range(32))},
}


@pytest.mark.cases("memory", "threads", "ghosts", "ghosts-shared", "memfd", "tree-prefork", "signals")
@pytest.mark.variants("pie")
@pytest.mark.parametrize("encoding", list(ENCODINGS))
def test_encoded_round_trip(procs, case, variant, encoding, tmp_path):
    options = ENCODINGS[encoding]
    t = procs.start_case(case, variant)
    images = dump_kill(t, tmp_path / "img", **options)
    key = options.get("key")
    image = procsnap.open_image(str(images), key=key)
    codec = image.checkpoint.codec[0]
    assert codec.compress == ("zstd" if options.get("compress") else "")
    assert codec.cipher == ("AES-256-GCM" if key else "")
    if key:  # nothing of the process in the clear: not its executable's name, not its records
        for f in Path(images).rglob("*.img"):
            data = f.read_bytes()
            assert case.target.encode() not in data and b'"pid"' not in data, f"{f} holds plain text"
        with pytest.raises(procsnap.errors.ImageError, match="encrypted"):
            procsnap.open_image(str(images))
    if options.get("compress") and case.id == "memory":  # its areas are patterned: they compress
        assert codec.stored_size * 2 < image.pages_size, (codec.stored_size, image.pages_size)
    restore(procs, t, images, key=key)
    assert_pass(t)


KEY = bytes.fromhex("00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff")


@pytest.fixture
def sealed(procs, targets, tmp_path):
    """The memory target dumped by the CLI, compressed and encrypted, and
    the key file (64 hex digits)."""
    keyfile = tmp_path / "key"
    keyfile.write_text(KEY.hex() + "\n")
    t = procs.start_case(procsnap_case("memory"), "pie")
    images = tmp_path / "img"
    t.dumped = proc_snapshot(t.pid)
    r = cli("dump", "-t", t.pid, "-D", images, "--compress", "--encrypt", keyfile)
    assert r.returncode == 0, r.stderr
    t.reap()
    return t, images, keyfile


def procsnap_case(name):
    from conftest import CASES_BY_ID

    return CASES_BY_ID[name]


def _flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x10]))


def _refused(images, keyfile, damage, *names, key_args=None):
    """Restore, verify and show each fail with one line naming `names`,
    create no process and leave the (damaged) image as it is."""
    key_args = ["--encrypt", keyfile] if key_args is None else key_args
    before = image_hashes(images)
    kids = our_children()
    for verb in (["restore", "-D", images], ["show", images]):
        r = cli(*verb, *key_args)
        assert_cli_error(r, *names)
    r = cli("verify", images, *key_args)
    assert r.returncode != 0 and "Traceback" not in r.stderr and all(n in r.stderr for n in names), r.stderr
    assert our_children() == kids, "a process was made before the image was found bad"
    assert image_hashes(images) == before, f"{damage}: the image was changed"


def test_encrypted_image_damage(procs, sealed, tmp_path):
    t, images, keyfile = sealed
    pages = images / schema.PAGES
    good = tmp_path / "good"
    shutil.copytree(images, good)
    key = KEY

    def fresh():
        shutil.rmtree(images)
        shutil.copytree(good, images)

    codec = procsnap.open_image(str(images), key=key).checkpoint.codec[0]
    table = chunks.unpack_chunks(codec)
    # a flipped bit in the middle of a page chunk
    c = max(table, key=lambda c: c.stored)
    _flip(pages, c.file_offset + c.stored // 2)
    _refused(images, keyfile, "flipped page bit", "pages.img", "authentication failed")
    fresh()
    # a flipped bit in the sealed records
    inv = images / schema.INVENTORY
    _flip(inv, inv.stat().st_size - 100)
    _refused(images, keyfile, "flipped record bit", "procsnap.img")
    fresh()
    # two chunks of one size swapped in place (the table cannot be changed to match: it is sealed)
    same = {}
    for c in table:
        same.setdefault(c.stored, []).append(c)
    pair = next((v for v in same.values() if len(v) >= 2), None)
    assert pair is not None, "no two chunks of one stored size to swap"  # the target's 8 MiB area: same pattern
    if pair is not None:
        a, b = pair[:2]
        data = bytearray(pages.read_bytes())
        da, db = data[a.file_offset:a.file_offset + a.stored], data[b.file_offset:b.file_offset + b.stored]
        data[a.file_offset:a.file_offset + a.stored], data[b.file_offset:b.file_offset + b.stored] = db, da
        pages.write_bytes(bytes(data))
        _refused(images, keyfile, "swapped chunks", "pages.img", "authentication failed")
        fresh()
    # a truncated page file
    os.truncate(pages, pages.stat().st_size - 4096)
    _refused(images, keyfile, "truncated pages.img", "pages.img", "size")
    fresh()
    # a wrong key, no key, a missing key file, a key file that is not a key
    wrong = tmp_path / "wrong"
    wrong.write_bytes(os.urandom(32))
    _refused(images, keyfile, "wrong key", "wrong key", key_args=["--encrypt", wrong])
    _refused(images, keyfile, "no key", "encrypted", "--encrypt", key_args=[])
    _refused(images, keyfile, "missing key file", "key file", "no such file", key_args=["--encrypt", tmp_path / "nokey"])
    short = tmp_path / "short"
    short.write_bytes(b"0123")
    _refused(images, keyfile, "bad key file", "key file", "32 bytes", key_args=["--encrypt", short])
    # an encrypted image's files swapped for another image's (a chunk moved between images)
    # is covered by the per-image key: the other image's salt gives another key.
    # After all that, the image restores with its key.
    assert procsnap.verify(str(images), key=key) == []
    restore(procs, t, images, key=key)
    assert_pass(t)


def test_key_for_plain_image_refused(procs, tmp_path):
    """An attacker's plain image in place of an encrypted one is refused
    when the restore expects encryption."""
    keyfile = tmp_path / "key"
    keyfile.write_bytes(KEY)
    t = procs.start_case(procsnap_case("memory"), "pie")
    images = dump_kill(t, tmp_path / "img")
    t.dumped = None
    r = cli("restore", "-D", images, "--encrypt", keyfile)
    assert_cli_error(r, "not encrypted")
    assert not os.path.exists(f"/proc/{t.pid}")


def test_compressed_without_zstandard(procs, tmp_path):
    """Restoring a compressed image where zstandard cannot be imported is
    a clear error; so is dump --compress."""
    t = procs.start_case(procsnap_case("memory"), "pie")
    images = dump_kill(t, tmp_path / "img", compress=True)
    t.dumped = None
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "zstandard.py").write_text("raise ImportError('zstandard hidden by the test')\n")
    env = {"PYTHONPATH": str(shadow)}
    before = image_hashes(images)
    r = cli("restore", "-D", images, env=env)
    assert_cli_error(r, "zstandard", "procsnap[compress]")
    assert image_hashes(images) == before
    other = procs.start_case(procsnap_case("sleep-pause"), "pie")
    r = cli("dump", "-t", other.pid, "-D", tmp_path / "img2", "--compress", env=env)
    assert_cli_error(r, "zstandard")
    assert other.alive()
    other.signal(signal.SIGKILL)


@pytest.mark.parametrize("memory", ["enough", "short"])
def test_each_chunk_decoded_once(procs, tmp_path, monkeypatch, memory):
    """A restore of a compressed, encrypted tree decodes each chunk once:
    the check decodes it into the page source the fill writes from. With
    too little memory to keep them all, the check decodes one at a time and
    the fill decodes each again; both restore whole."""
    from procsnap.image import reader

    decoded: dict[tuple[str, int], int] = {}
    real = chunks.decode_chunk

    def counting(read, index, c, sealer, path):
        decoded[path, index] = decoded.get((path, index), 0) + 1
        return real(read, index, c, sealer, path)

    t = procs.start_case(procsnap_case("tree-prefork"), "pie")
    images = dump_kill(t, tmp_path / "img", compress=True, key=KEY)
    monkeypatch.setattr(chunks, "decode_chunk", counting)
    if memory == "short":
        monkeypatch.setattr(reader, "_mem_available", lambda: 0)
    restore(procs, t, images, key=KEY)
    assert_pass(t)
    files = {path for path, _ in decoded}
    assert len(files) > 1, decoded  # the root's pages.img and its children's
    expected = 1 if memory == "enough" else 2
    assert set(decoded.values()) == {expected}, decoded
