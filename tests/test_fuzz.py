"""The reader against hostile images whose framing is valid: each example
replaces one field of one record with a hostile value, re-encodes the
record and recomputes every CRC (so the checksums cannot save us), and the
reader must answer ImageCorrupt (or accept the image if it is still
consistent) - never another exception, never a hang."""

import copy
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import procsnap
from conftest import CASES_BY_ID, read_inventory, rewrite_records
from procsnap.errors import ImageCorrupt
from procsnap.restorer.tree import open_tree

HOSTILE_INTS = st.one_of(
    st.integers(-(2**70), 2**70),
    st.sampled_from([-1, 0, 1, 4095, 4096, 2**47, 2**47 - 4096, 2**63, 2**64 - 1, 2**64, 10**9, -(2**63)]),
)
HOSTILE = st.one_of(
    HOSTILE_INTS,
    st.sampled_from(["", "..", "/..", "/usr/../etc/shadow", "relative/path", "/a\x00b", "zz", "00" * 33]),
    st.none(), st.booleans(), st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@pytest.fixture
def image(procs, tmp_path):
    images = tmp_path / "img"
    images.mkdir()
    t = procs.start_case(CASES_BY_ID["sleep-pause"], "pie")
    procsnap.dump(t.pid, str(images), leave_running=True)
    return images


@settings(max_examples=300, deadline=5000,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_hostile_field_values(image, data):
    header, raw = read_inventory(image)
    original = [[tag, json.loads(payload)] for tag, _, payload in raw]
    records = [r for r in original if r[0] != b"END "]
    i = data.draw(st.integers(0, len(records) - 1), label="record")
    tag, obj = records[i]
    key = data.draw(st.sampled_from(sorted(obj)), label=f"field of {tag!r}")
    value = data.draw(HOSTILE, label="value")

    def edit(recs):
        target = [r for r in recs if r[0] != b"END "][i][1]
        if isinstance(target[key], dict) and isinstance(value, int) and target[key]:
            sub = sorted(target[key])[0]  # e.g. a register
            target[key][sub] = value
        else:
            target[key] = value

    snapshot = copy.deepcopy(original)
    rewrite_records(image, edit)
    try:
        procsnap.open_image(str(image))
    except ImageCorrupt:
        pass
    finally:
        # put the pristine inventory back for the next example
        rewrite_records(image, lambda recs: recs.__setitem__(slice(None), [r for r in snapshot if r[0] != b"END "]))


@pytest.fixture(params=["ipc-fifo", "ipc-sockets", "inet-all"])
def tree_image(request, procs, tmp_path):
    """A tree's image: PROC, PIPE (a named FIFO), SHM, SOCK, INET records in the root's."""
    images = tmp_path / "img"
    images.mkdir()
    t = procs.start_case(CASES_BY_ID[request.param], "pie")
    procsnap.dump(t.pid, str(images), leave_running=True)
    return images


@settings(max_examples=150, deadline=5000,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_hostile_tree_records(tree_image, data):
    """The same for the tree's own records, read as a restore reads them
    (open_tree: every process's image and what they share)."""
    header, raw = read_inventory(tree_image)
    original = [[tag, json.loads(payload)] for tag, _, payload in raw]
    records = [r for r in original if r[0] in (b"PROC", b"PIPE", b"SHM ", b"SOCK", b"INET", b"FD  ", b"VMA ", b"VMAT")]
    tag, obj = data.draw(st.sampled_from(records), label="record")
    i = original.index([tag, obj])
    key = data.draw(st.sampled_from(sorted(obj)), label=f"field of {tag!r}")
    value = data.draw(HOSTILE, label="value")

    def edit(recs):
        recs[i][1][key] = value

    snapshot = copy.deepcopy(original)
    rewrite_records(tree_image, edit)
    try:
        open_tree(procsnap.open_image(str(tree_image)))
    except ImageCorrupt:
        pass
    finally:
        rewrite_records(tree_image, lambda recs: recs.__setitem__(slice(None), [r for r in snapshot if r[0] != b"END "]))
