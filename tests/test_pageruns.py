"""The page runs of an image held packed (schema.PageRuns) and the PMAP
record written and read by slices: the same bytes and the same runs as
through json, and a corrupt record still refused."""

import json
import zlib

import pytest

from procsnap import model
from procsnap.image import reader, schema, writer


def test_page_runs_sequence():
    runs = schema.PageRuns()
    assert len(runs) == 0 and not runs
    for i in range(5):
        assert runs.append(0x1000 * (2 * i + 1), 1, 4096 * i) == i
    runs.set_hash(3, 0xDEADBEEF)
    assert len(runs) == 5 and runs[3] == model.PageRun(0x7000, 1, 3 * 4096, 0xDEADBEEF)
    assert runs[-1].vaddr == 0x9000 and [r.offset for r in runs[1::2]] == [4096, 3 * 4096]
    with pytest.raises(IndexError):
        runs[5]
    again = schema.unpack_page_runs(schema.pack_page_runs(runs))
    assert list(again) == list(runs) and again == runs
    again.set_hash(0, 7)  # read-only bytes become a bytearray when changed
    assert again[0].xxh3 == 7 and runs[0].xxh3 == 0


@pytest.mark.parametrize("piece", [1, 7, 1 << 20])
def test_pmap_record_as_json_writes_it(piece):
    runs = schema.PageRuns()
    for i in range(1000):
        runs.append(i << 13, 1, i << 12, i * 0x9E3779B97F4A7C15 & (2**64 - 1))
    body = bytearray()
    writer._append_hex_record(body, b"PMAP", bytes(runs.data), piece)
    assert bytes(body) == writer._record(b"PMAP", schema.encode(schema.pack_page_runs(runs)))
    (tag, _, obj), end = reader._read_record(bytes(body), 0, "inv")
    assert tag == b"PMAP" and end == len(body)
    assert schema.unpack_page_runs(schema.decode(model.PageMap, obj, "PageMap")) == runs


def test_pmap_record_corrupt_hex_refused():
    data = b'{"runs":"0g' + b"0" * 62 + b'"}'
    body = schema.RECORD.pack(b"PMAP", len(data), zlib.crc32(data)) + data
    with pytest.raises(reader.ImageCorrupt, match="PageMap runs"):
        reader._read_record(body, 0, "inv")


def test_pmap_record_other_json_decoded_as_any():
    data = json.dumps({"runs": "00" * 32, "more": 1}).encode()
    body = schema.RECORD.pack(b"PMAP", len(data), zlib.crc32(data)) + data
    (_, _, obj), _ = reader._read_record(body, 0, "inv")
    assert obj == {"runs": "00" * 32, "more": 1}
