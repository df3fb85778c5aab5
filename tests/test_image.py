"""The image format on disk: `show`, and the validating reader against
corrupt, truncated, foreign and semantically impossible images made from
real dumps."""

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import procsnap
from conftest import (CASES_BY_ID, IMG_HEADER, assert_pass, dump_kill, edit_vmas, read_inventory, restore,
                      rewrite_records)
from procsnap.errors import ImageCorrupt, ImageVersionError
from procsnap.image import schema, vmatable
from procsnap.image.writer import ImageWriter
from procsnap.records import replace
from procsnap.model import VmaKind

REPO = Path(__file__).resolve().parent.parent
RECORD_FIELDS = ("task", "mm", "vmas", "pages", "sigactions", "pending", "files", "fds", "ghosts")


def dump_running(procs, case, images):
    """Dump `case` leaving it running (procs kills it at the end)."""
    t = procs.start_case(case, "pie")
    images.mkdir()
    procsnap.dump(t.pid, str(images), leave_running=True)
    return t


@pytest.fixture
def image(procs, tmp_path):
    """A small valid image of the sleep target."""
    images = tmp_path / "img"
    dump_running(procs, CASES_BY_ID["sleep-pause"], images)
    procsnap.open_image(str(images))
    return images


def show(images):
    r = subprocess.run([sys.executable, "-m", "procsnap", "show", "--json", str(images)], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    return json.loads(r.stdout)


def test_show_decodes_every_record(procs, tmp_path):
    files_img, signals_img = tmp_path / "img-files", tmp_path / "img-signals"
    dump_running(procs, CASES_BY_ID["files"], files_img)
    dump_running(procs, CASES_BY_ID["signals"], signals_img)
    shown = {"files": show(files_img), "signals": show(signals_img)}
    for name, out in shown.items():
        missing = [f for f in RECORD_FIELDS if f not in out]
        assert not missing, f"{name}: show lacks {missing}: {sorted(out)}"
        for field in ("vmas", "pages", "sigactions", "files", "fds"):
            assert out[field], f"{name}: no {field} shown"

    files, signals = shown["files"], shown["signals"]
    assert files["ghosts"] and files["ghosts"][0]["path"].endswith("ghost.dat"), files["ghosts"]
    assert signals["pending"], "signals target has pending SIGUSR2/SIGRTMIN+3"
    assert "PROT_READ|PROT_WRITE" in {v["prot"] for v in files["vmas"]}, files["vmas"]
    assert any(v["prot"] == "PROT_READ|PROT_EXEC" for v in files["vmas"])
    fd4 = next(fd for fd in files["fds"] if fd["fd"] == 4)         # wo.dat, O_WRONLY
    assert "O_WRONLY" in fd4["flags"].split("|"), fd4
    assert fd4["kind"] == "regular"
    assert any("SA_RESTORER" in sa["flags"].split("|") for sa in signals["sigactions"])
    assert files["task"]["pid"] > 0 and files["mm"]["start_brk"].startswith("0x")


# --------------------------------------------------------------------------
# Corruption of single bytes and lengths


def assert_corrupt(images, path, offset=None, cls=ImageCorrupt):
    with pytest.raises(cls) as exc:
        procsnap.open_image(str(images))
    msg = str(exc.value)
    assert str(path) in msg, f"{path} not named in: {msg}"
    if offset is not None:
        assert f"offset {offset}" in msg, f"offset {offset} not named in: {msg}"
    return msg


def flip(path, offset):
    data = bytearray(Path(path).read_bytes())
    data[offset] ^= 0x20
    Path(path).write_bytes(bytes(data))


def test_missing_inventory(image):
    inv = image / "procsnap.img"
    inv.unlink()
    assert "missing" in assert_corrupt(image, inv)


def test_truncated_inventory(image):
    inv = image / "procsnap.img"
    data = inv.read_bytes()
    _, records = read_inventory(image)
    lengths = {0, 1, 8, 15, 16, 20, 27, records[0][1] + 10, records[-1][1] - 1,
               records[-1][1] + 1, len(data) - 1}
    for n in sorted(lengths):
        inv.write_bytes(data[:n])
        msg = assert_corrupt(image, inv)
        assert "offset" in msg, msg


def test_flipped_record_byte(image):
    inv = image / "procsnap.img"
    _, records = read_inventory(image)
    for tag, start, payload in (records[0], records[len(records) // 2], records[-1]):
        original = inv.read_bytes()
        flip(inv, start + len(payload) // 2)
        msg = assert_corrupt(image, inv, start)
        assert "crc32" in msg, msg
        inv.write_bytes(original)
    procsnap.open_image(str(image))


def test_wrong_magic(image):
    inv = image / "procsnap.img"
    flip(inv, 0)
    assert "magic" in assert_corrupt(image, inv, 0)


def test_extra_bytes_after_end(image):
    inv = image / "procsnap.img"
    size = inv.stat().st_size
    with open(inv, "ab") as f:
        f.write(b"\0" * 7)
    assert_corrupt(image, inv, size)


def test_unknown_major_version(image):
    inv = image / "procsnap.img"
    data = inv.read_bytes()
    magic, major, minor, _ = IMG_HEADER.unpack_from(data)
    head = struct.pack("<8sHH", magic, 2, minor)
    inv.write_bytes(head + struct.pack("<I", zlib.crc32(head)) + data[IMG_HEADER.size:])
    msg = assert_corrupt(image, inv, cls=ImageVersionError)
    assert "2." in msg, msg


def test_flipped_page_byte(image):
    pages = image / "pages.img"
    ckpt = procsnap.open_image(str(image)).checkpoint
    run = max(ckpt.pages, key=lambda r: r.npages)
    flip(pages, run.offset + 4096 * run.npages - 1)
    msg = assert_corrupt(image, pages, run.offset)
    assert f"{run.vaddr:#x}" in msg, msg


def test_truncated_pages(image):
    pages = image / "pages.img"
    size = pages.stat().st_size
    with open(pages, "r+b") as f:
        f.truncate(size - 4096)
    msg = assert_corrupt(image, pages)
    assert f"expected {size}, found {size - 4096}" in msg, msg


# --------------------------------------------------------------------------
# Property: no mutation of procsnap.img makes the reader raise anything else


@pytest.fixture
def inventory_bytes(image):
    return (image / "procsnap.img").read_bytes()


@settings(max_examples=200, deadline=2000, derandomize=False,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_reader_never_crashes(image, inventory_bytes, data):
    """The fixture's image is shared by all examples: each writes its own
    procsnap.img over it (pages.img and ghosts.img stay intact)."""
    n = len(inventory_bytes)
    cut = data.draw(st.integers(0, n), label="truncate to")
    mutated = bytearray(inventory_bytes[:cut])
    if mutated and data.draw(st.booleans(), label="flip"):
        pos = data.draw(st.integers(0, len(mutated) - 1), label="at")
        mutated[pos] ^= data.draw(st.integers(1, 255), label="xor")
    (image / "procsnap.img").write_bytes(bytes(mutated))
    try:
        procsnap.open_image(str(image))
    except (ImageCorrupt, ImageVersionError):
        return
    # Only the untouched image may be accepted (a CRC32 catches every
    # single-byte change; no truncation leaves a complete image).
    assert bytes(mutated) == inventory_bytes, "a mutated procsnap.img was accepted"


# --------------------------------------------------------------------------
# Records well framed but impossible together: only the semantic checks see them

TASK_SIZE = 0x7FFFFFFFF000


def records_of(records, tag):
    return [obj for t, obj in records if t == tag]


def overlapping_vmas(records):
    def edit(vmas):
        vmas.append(replace(vmas[0]))
        return f"VMA {vmas[0].start:#x}-{vmas[0].end:#x}: overlaps"
    return edit_vmas(records, edit)


def vma_outside_user_space(records):
    def edit(vmas):
        vma = replace(vmas[0], start=TASK_SIZE + 0x10000, end=TASK_SIZE + 0x20000, kind=VmaKind.ANON,
                       file_id=-1, name="")
        vmas.append(vma)
        return f"VMA {vma.start:#x}-{vma.end:#x}: outside user space"
    return edit_vmas(records, edit)


def page_run_outside_vmas(records):
    pmap = records_of(records, b"PMAP")[0]
    runs = bytearray.fromhex(pmap["runs"])
    vaddr, npages, offset, xxh3 = struct.unpack_from("<QQQQ", runs)   # schema.PAGE_RUN
    struct.pack_into("<QQQQ", runs, 0, 0x10000, npages, offset, xxh3)
    pmap["runs"] = runs.hex()
    return f"page run 0x10000+{npages}: not inside one VMA"


def huge_fd(records):
    fd = records_of(records, b"FD  ")[0]
    fd["fd"] = 10**9
    return f"fd {10**9}: number out of range"


def dotdot_path(records):
    ref = records_of(records, b"FILE")[0]
    ref["path"] = "/usr/../etc/passwd"
    return f"file {ref['id']}: path '/usr/../etc/passwd' is not a plain absolute path"


CRAFTS = [overlapping_vmas, vma_outside_user_space, page_run_outside_vmas, huge_fd, dotdot_path]


def test_rewrite_helper_keeps_image_valid(image):
    before = procsnap.open_image(str(image)).checkpoint
    rewrite_records(image, lambda records: None)
    assert procsnap.open_image(str(image)).checkpoint == before


@pytest.mark.parametrize("craft", CRAFTS, ids=lambda c: c.__name__)
def test_semantic_problem(image, craft):
    expected = []
    rewrite_records(image, lambda records: expected.append(craft(records)))
    msg = assert_corrupt(image, image)
    assert expected[0] in msg, f"expected {expected[0]!r} in: {msg}"


def test_semantic_problems_all_listed(image):
    expected = []
    rewrite_records(image, lambda records: expected.extend(c(records) for c in CRAFTS))
    msg = assert_corrupt(image, image)
    missing = [e for e in expected if e not in msg]
    assert not missing, f"not listed: {missing}\nin: {msg}"
    assert f"{len(expected)} problems" in msg, msg


def test_show_and_restore_refuse_crafted(image, tmp_path):
    rewrite_records(image, huge_fd)
    copy = tmp_path / "copy"
    shutil.copytree(image, copy)
    r = subprocess.run([sys.executable, "-m", "procsnap", "show", str(image)], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert "number out of range" in r.stderr
    with pytest.raises(ImageCorrupt):
        procsnap.restore(str(image))
    for f in copy.iterdir():
        assert (image / f.name).read_bytes() == f.read_bytes(), f"restore changed {f.name}"


def test_ghost_record_of_an_older_image(procs, tmp_path):
    """A GHST record as images before Ghost.extents wrote it (the whole
    contents at offset, size; no owner or times) still restores: the target
    finds its unlinked file's contents. Such an image never kept the times,
    so the state check (which compares them) is not run on this restore."""
    t = procs.start_case(CASES_BY_ID["files"], "pie")
    images = dump_kill(t, tmp_path / "img")

    def older(records):
        for tag, obj in records:
            if tag == b"GHST":
                (pos, length, blob, xxh3), = obj.pop("extents")
                assert pos == 0 and length == obj["size"], obj
                obj.update(offset=blob, xxh3=xxh3)
                for field in ("attrs", "rdev", "link", "ino"):
                    obj.pop(field)

    rewrite_records(images, older)
    t.dumped = None
    restore(procs, t, images)
    assert os.readlink(f"/proc/{t.pid}/fd/12").endswith("ghost.dat (deleted)")
    assert_pass(t)


# --------------------------------------------------------------------------
# The VMA table (VMAT, format 1.7), and images of 1.6 with a VMA record each

def test_vmas_are_one_table(image):
    header, raw = read_inventory(image)
    tags = [tag for tag, _, _ in raw]
    assert IMG_HEADER.unpack(header)[2] == schema.MINOR == 7
    assert tags.count(b"VMAT") == 1 and b"VMA " not in tags, tags
    assert len(procsnap.open_image(str(image)).checkpoint.vmas) > 5


@pytest.mark.parametrize("case_id", ["files", "memlock-guard", "ghostmap", "memfd"])
def test_image_of_vma_records_restores(procs, tmp_path, monkeypatch, case_id):
    """An image as format 1.6 wrote it (the writer's per_vma path: a VMA
    record each) is read, shown and restored (state check, self-check); its
    VMAs (names, guards, ghosts, shared memory) pack into a table and back
    unchanged."""
    t = procs.start_case(CASES_BY_ID[case_id], "pie")
    monkeypatch.setattr(ImageWriter, "per_vma", True)
    images = dump_kill(t, tmp_path / "img")
    monkeypatch.undo()
    header, raw = read_inventory(images)
    tags = [tag for tag, _, _ in raw]
    assert IMG_HEADER.unpack(header)[2] == 6 and b"VMAT" not in tags and tags.count(b"VMA ") > 5, tags
    vmas = procsnap.open_image(str(images)).checkpoint.vmas
    assert len(vmas) == tags.count(b"VMA ")
    assert vmatable.unpack(vmatable.pack(vmas)) == vmas
    if case_id == "memlock-guard":
        assert any(v.guards for v in vmas)
    assert [v["start"] for v in show(images)["vmas"]] == [f"{v.start:#x}" for v in vmas]
    restore(procs, t, images)
    assert_pass(t)


def _table_entry(vmat, index, **changes):
    """The VMAT record's entry `index` with some of its fields changed (vmatable.ENTRY)."""
    entries = bytearray.fromhex(vmat["entries"])
    names = ("start", "end", "offset", "file_id", "shm", "access", "ghost", "kind", "prot", "lock", "advice",
             "flags", "name_at", "name_len", "guards_first", "guards_count")
    values = dict(zip(names, vmatable.ENTRY.unpack_from(entries, index * vmatable.ENTRY.size)))
    values.update(changes)
    vmatable.ENTRY.pack_into(entries, index * vmatable.ENTRY.size, *values.values())
    vmat["entries"] = entries.hex()


TABLE_DAMAGE = {
    "entries cut": (lambda recs: [t.update(entries=t["entries"][:-2]) for t in records_of(recs, b"VMAT")],
                    f"is not a whole number of {vmatable.ENTRY.size}-byte entries"),
    "guards cut": (lambda recs: records_of(recs, b"VMAT")[0].update(guards="00" * 15),
                   "guards: 15 bytes is not a whole number"),
    "unknown kind": (lambda recs: _table_entry(records_of(recs, b"VMAT")[0], 1, kind=999),
                     "entry 1 (0x"),
    "name outside strings": (lambda recs: _table_entry(records_of(recs, b"VMAT")[0], 2, name_at=1 << 30, name_len=4),
                             "entry 2 (0x"),
    "guards outside": (lambda recs: _table_entry(records_of(recs, b"VMAT")[0], 0, guards_first=7, guards_count=1),
                       "entry 0 (0x"),
    "a second table": (lambda recs: recs.append([b"VMAT", dict(records_of(recs, b"VMAT")[0])]),
                       "expected the only record of vmas"),
    "a VMA record beside": (lambda recs: recs.append([b"VMA ", schema.encode(edit_vmas(recs, lambda vmas: vmas[0]))]),
                            "expected none beside VMAT"),
}


@pytest.mark.parametrize("what", sorted(TABLE_DAMAGE))
def test_corrupt_vma_table(image, what):
    """A VMAT record well framed (its crc32 right) but not a table: one
    line naming the record, its offset and what is wrong; nothing restored."""
    damage, expected = TABLE_DAMAGE[what]
    rewrite_records(image, damage)
    msg = assert_corrupt(image, image / "procsnap.img")
    assert "VMAT" in msg and " record at offset " in msg and expected in msg, msg
    assert "\n" not in msg
    with pytest.raises(ImageCorrupt):
        procsnap.restore(str(image))


def test_truncated_vma_table(image):
    inv = image / "procsnap.img"
    _, raw = read_inventory(image)
    start, payload = next((start, payload) for tag, start, payload in raw if tag == b"VMAT")
    inv.write_bytes(inv.read_bytes()[: start + len(payload) // 2])
    msg = assert_corrupt(image, inv, start)
    assert "VMAT payload (truncated)" in msg, msg


def test_vma_table_missing_from_a_new_image(image):
    """A 1.7 image always has its VMAT: one without it is corrupt (not a
    process with no VMAs), named so, and nothing is restored."""
    rewrite_records(image, lambda records: records.__delitem__(
        next(i for i, r in enumerate(records) if r[0] == b"VMAT")))
    msg = assert_corrupt(image, image / "procsnap.img")
    assert "no VMAT record" in msg, msg
    with pytest.raises(ImageCorrupt):
        procsnap.restore(str(image))


def test_vma_records_in_a_new_image(image):
    """A 1.7 image holding its VMAs as the 1.6 records each instead of the
    table: refused by name."""
    def to_records(records):
        at = next(i for i, r in enumerate(records) if r[0] == b"VMAT")
        vmas = edit_vmas(records, lambda vmas: list(vmas))
        records[at:at + 1] = [[b"VMA ", schema.encode(v)] for v in vmas]
    rewrite_records(image, to_records)
    msg = assert_corrupt(image, image / "procsnap.img")
    assert "VMA record" in msg and "VMAT holds them" in msg, msg
