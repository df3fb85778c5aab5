"""procsnap's stand-ins for stdlib modules that cost start-up time:
records.py (dataclasses), workers.py (a thread pool), log.py (logging).
Each is held to the behaviour of the module it replaces."""

from __future__ import annotations

import dataclasses as std
import os
import subprocess
import sys
import threading

import pytest

from procsnap import log, model, records, workers
from procsnap import records as dataclasses  # as the modules of procsnap say it
from procsnap.image import schema


@dataclasses.dataclass
class Base:
    a: int
    b: list = dataclasses.field(default_factory=list)
    c: str = "c"
    hidden: int = dataclasses.field(default=7, repr=False, metadata={"flags": "x"})


@dataclasses.dataclass
class Child(Base):
    d: int = 0


@dataclasses.dataclass(frozen=True)
class Frozen:
    x: int
    y: frozenset = frozenset()


@dataclasses.dataclass(slots=True)
class Slotted:
    p: int
    q: int = 2


@std.dataclass
class Std:
    a: int = 1
    b: list = std.field(default_factory=list)


def test_records_behave_as_dataclasses():
    x = Base(1)
    assert (x.a, x.b, x.c, x.hidden) == (1, [], "c", 7)
    assert Base(1).b is not Base(1).b  # a fresh list each time
    assert Base.c == "c"  # a plain default stays a class attribute, as dataclasses leaves it
    assert repr(x) == "Base(a=1, b=[], c='c')"
    assert x == Base(1) and x != Base(2) and x != Child(1)
    with pytest.raises(TypeError):
        hash(x)  # eq without frozen: unhashable, as dataclasses makes it
    with pytest.raises(TypeError):
        Base()  # a field without a default is required
    assert [f.name for f in dataclasses.fields(Child)] == ["a", "b", "c", "hidden", "d"]
    assert dataclasses.fields(Base)[3].metadata == {"flags": "x"}
    assert dataclasses.fields(Base)[1].default is dataclasses.MISSING
    assert Child(1, d=4) == Child(a=1, b=[], c="c", hidden=7, d=4)
    assert dataclasses.replace(Child(1), d=5) == Child(1, d=5)
    assert dataclasses.asdict(Child(1, [Base(2)])) == {
        "a": 1, "b": [{"a": 2, "b": [], "c": "c", "hidden": 7}], "c": "c", "hidden": 7, "d": 0}
    assert dataclasses.is_dataclass(x) and dataclasses.is_dataclass(Base) and not dataclasses.is_dataclass(1)


def test_frozen_and_slotted_records():
    f = Frozen(1)
    assert hash(f) == hash(Frozen(1)) and {f, Frozen(1)} == {f}
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.x = 2
    s = Slotted(1)
    assert Slotted.__slots__ == ("p", "q") and not hasattr(s, "__dict__")
    assert dataclasses.replace(s, q=5) == Slotted(1, 5)


def test_standard_dataclasses_still_work_with_the_schema():
    """A module of a kind declared with the standard module (as another
    branch may add) goes through the same functions."""
    assert dataclasses.is_dataclass(Std())
    assert [(f.name, f.default) for f in dataclasses.fields(Std)] == [("a", 1), ("b", dataclasses.MISSING)]
    assert dataclasses.replace(Std(), a=3) == Std(3)
    assert schema.encode(Std(2, [1])) == {"a": 2, "b": [1]}


def test_model_records_round_trip_through_the_schema():
    vma = model.Vma(0x1000, 0x3000, model.VmaKind.ANON, model.Prot.PROT_READ, model.MapFlag.MAP_PRIVATE)
    data = schema.encode(vma)
    assert schema.decode(model.Vma, data, "vma") == vma
    with pytest.raises(schema.SchemaError, match="missing field 'start'"):
        schema.decode(model.Vma, {k: v for k, v in data.items() if k != "start"}, "vma")


def test_the_method_cache_is_used_and_survives_a_bad_file(tmp_path):
    """A second run takes __init__ from the cache (no compile); a corrupt
    or foreign cache is ignored, never an error."""
    cache = tmp_path / "records.marshal"
    code = ("import sys; from procsnap import records as r; r._CACHE_PATH = sys.argv[1]\n"
            "import builtins; compiled = []; real = builtins.compile\n"
            "builtins.compile = lambda *a, **k: compiled.append(a[1]) or real(*a, **k)\n"
            "@r.dataclass\nclass T:\n    a: int\n    b: int = 2\n"
            "assert T(1) == T(1, 2)\n"
            "if len(sys.argv) > 2: r._save(__import__('os').getpid())\n"
            "print(len(compiled))\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}

    def run(*extra):
        p = subprocess.run([sys.executable, "-c", code, str(cache), *extra], capture_output=True, text=True, env=env)
        assert p.returncode == 0, p.stderr
        return int(p.stdout)

    assert run("save") == 1 and cache.exists()
    assert run() == 0
    cache.write_bytes(b"not marshal data")
    assert run() == 1


def test_thread_pool_results_errors_and_order():
    with workers.ThreadPool(2, thread_name_prefix="t") as pool:
        jobs = [pool.submit(lambda i=i: i * i) for i in range(20)]
        assert [j.result() for j in jobs] == [i * i for i in range(20)]
        assert list(pool.map(lambda i: -i, range(5))) == [0, -1, -2, -3, -4]
        bad = pool.submit(lambda: 1 / 0)
        assert isinstance(bad.exception(), ZeroDivisionError)
        with pytest.raises(ZeroDivisionError):
            bad.result()
        assert len(pool.threads) == 2
    assert not any(t.is_alive() for t in pool.threads)
    assert workers.Job.completed(5).result() == 5


def test_thread_pool_shutdown_cancels_what_has_not_started():
    gate = threading.Event()
    pool = workers.ThreadPool(1)
    first = pool.submit(gate.wait)
    later = pool.submit(lambda: "ran")
    pool.shutdown(wait=False, cancel_futures=True)
    gate.set()
    assert first.result() is True
    with pytest.raises(RuntimeError, match="cancelled"):
        later.result()


def test_log_writes_one_line_when_configured_and_defers_to_logging_otherwise(capsys, caplog):
    logger = log.getLogger("procsnap.test")
    saved = log._level
    try:
        log._level = None
        with caplog.at_level("INFO", logger="procsnap.test"):
            logger.info("library %d", 1)
        assert [r.getMessage() for r in caplog.records] == ["library 1"]
        log.configure(log.WARNING)
        logger.info("quiet %d", 2)
        logger.warning("loud %s", "x")
        assert capsys.readouterr().err == "procsnap: loud x\n"
    finally:
        log._level = saved


def test_the_cli_imports_none_of_the_costly_modules(tmp_path):
    """`procsnap --help` builds the whole parser (a verb builds only its
    own) beside the dump's and the restore's modules; none of logging,
    concurrent.futures, dataclasses, inspect, tempfile, shutil, socket (a TCP FIN, a container's mounts, an object
    store's lock import it where used), pickle (a container's worker) may
    come with them."""
    code = ("import sys, runpy\n"
            "sys.argv = ['procsnap', '--help']\n"
            "import procsnap.cli, procsnap.dumper, procsnap.restorer\n"
            "try:\n    runpy.run_module('procsnap', run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "print('MODS:' + ' '.join(m for m in ('logging', 'concurrent.futures', 'dataclasses', 'inspect', 'tempfile', "
            "'shutil', 'hashlib', 'socket', 'selectors', 'pickle') if m in sys.modules))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[-1] == "MODS:", p.stdout


def test_the_restore_imports_nothing_of_the_dumper():
    """A restore's modules leave the dumper's package out (its dozen modules
    and the image writer's); what both need is below them (kernel/structs.py)."""
    code = ("import sys, procsnap.cli, procsnap.restorer\n"
            "print('MODS:' + ' '.join(m for m in sys.modules if m.startswith(('procsnap.dumper', 'procsnap.image.writer'))))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[-1] == "MODS:", p.stdout
