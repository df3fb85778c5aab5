"""The part of `dataclasses` procsnap uses, under the same names, cheap to
import: modules say `from . import records as dataclasses` and declare
their records as before.

Why: every CLI run imports some sixty record classes. The standard module
costs ~10 ms to import (it pulls in inspect, ast, dis, tokenize) and then
compiles an __init__, __repr__ and __eq__ per class with exec(): together
about a third of the import time of `procsnap dump`. Here only __init__ is
generated per class (the others are shared functions that walk the fields),
and it is compiled once: the code objects are kept in a cache beside the
byte code (__pycache__/records.<tag>.marshal, keyed by the generated
source, so a changed class is compiled again), and a later run only
unmarshals them.

Supported, with the standard semantics: dataclass(frozen=, slots=),
field(default=, default_factory=, repr=, metadata=), fields, replace,
asdict, is_dataclass, MISSING, FrozenInstanceError; fields are inherited
from record base classes. Not supported (and not used): ClassVar/InitVar
annotations, __post_init__, order=, kw_only=.
"""

from __future__ import annotations

import marshal
import os
import sys

__all__ = ["dataclass", "field", "fields", "replace", "asdict", "is_dataclass", "MISSING", "Field",
           "FrozenInstanceError"]

_FIELDS = "__record_fields__"  # name -> Field, in declaration order (bases first)


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING = _Missing()


class FrozenInstanceError(AttributeError):
    """An assignment to a field of a frozen record."""


class Field:
    __slots__ = ("name", "type", "default", "default_factory", "repr", "metadata")

    def __init__(self, default=MISSING, default_factory=MISSING, repr: bool = True, metadata=None):
        if default is not MISSING and default_factory is not MISSING:
            raise ValueError("cannot specify both default and default_factory")
        self.name = None
        self.type = None
        self.default = default
        self.default_factory = default_factory
        self.repr = repr
        self.metadata = metadata if metadata is not None else {}

    def __repr__(self) -> str:
        return f"Field(name={self.name!r}, default={self.default!r}, default_factory={self.default_factory!r})"


def field(*, default=MISSING, default_factory=MISSING, repr: bool = True, metadata=None) -> Field:
    return Field(default, default_factory, repr, metadata)


def is_dataclass(obj) -> bool:
    """A record, or a class of the standard module (a module that declares
    its classes with it still works with image/schema.py)."""
    cls = obj if isinstance(obj, type) else type(obj)
    return hasattr(cls, _FIELDS) or hasattr(cls, "__dataclass_fields__")


def fields(class_or_instance) -> tuple[Field, ...]:
    own = getattr(class_or_instance, _FIELDS, None)
    if own is not None:
        return tuple(own.values())
    if not hasattr(class_or_instance, "__dataclass_fields__"):
        raise TypeError("must be called with a record type or instance")
    import dataclasses

    return tuple(_converted(f, dataclasses.MISSING) for f in dataclasses.fields(class_or_instance))


def _converted(std, std_missing) -> Field:
    f = Field(MISSING if std.default is std_missing else std.default,
              MISSING if std.default_factory is std_missing else std.default_factory, std.repr, std.metadata)
    f.name, f.type = std.name, std.type
    return f


def replace(obj, **changes):
    for f in fields(obj):
        if f.name not in changes:
            changes[f.name] = getattr(obj, f.name)
    return obj.__class__(**changes)


def asdict(obj) -> dict:
    if not is_dataclass(obj) or isinstance(obj, type):
        raise TypeError("asdict() should be called on record instances")
    return _asdict(obj)


def _asdict(obj):
    if is_dataclass(obj):
        return {f.name: _asdict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_asdict(x) for x in obj)
    if isinstance(obj, dict):
        return {_asdict(k): _asdict(v) for k, v in obj.items()}
    return obj


def dataclass(cls=None, /, *, frozen: bool = False, slots: bool = False):
    def wrap(cls):
        return _process(cls, frozen, slots)

    return wrap if cls is None else wrap(cls)


def _process(cls, frozen: bool, slots: bool):
    all_fields: dict[str, Field] = {}
    for base in reversed(cls.__mro__[1:]):
        all_fields.update(getattr(base, _FIELDS, {}))
    for name, annotation in cls.__dict__.get("__annotations__", {}).items():
        value = cls.__dict__.get(name, MISSING)
        f = value if isinstance(value, Field) else Field(default=value)
        f.name, f.type = name, annotation
        all_fields[name] = f
        if isinstance(value, Field):  # as dataclasses: a plain default stays a class attribute
            if f.default is MISSING:
                delattr(cls, name)
            else:
                setattr(cls, name, f.default)
    setattr(cls, _FIELDS, all_fields)
    explicit_hash = cls.__dict__.get("__hash__", MISSING) not in (MISSING, None)  # None: Python's, for __eq__
    for name, fn in _methods(cls.__qualname__, list(all_fields.values()), frozen).items():
        if name == "__hash__" and not explicit_hash or name not in cls.__dict__:
            if fn is None:
                setattr(cls, name, None)
                continue
            if name == "__init__":
                fn.__qualname__ = f"{cls.__qualname__}.{name}"
            setattr(cls, name, fn)
    if slots:
        cls = _with_slots(cls, all_fields)
    return cls


def _with_slots(cls, all_fields):
    """A new class with __slots__ (a class's slots cannot be added later)."""
    own = [n for n in cls.__dict__.get("__annotations__", {})]
    body = {k: v for k, v in cls.__dict__.items() if k not in own and k not in ("__dict__", "__weakref__")}
    body["__slots__"] = tuple(own)
    new = type(cls)(cls.__name__, cls.__bases__, body)
    new.__qualname__ = cls.__qualname__
    return new


def _methods(qualname: str, flds: list[Field], frozen: bool) -> dict:
    """__init__ compiled from generated source (or taken from the cache): it
    runs once per record made, hundreds of thousands of times for a big
    image. The others are the shared ones below."""
    params, body = [], []
    for f in flds:
        if f.default is not MISSING:
            params.append(f"{f.name}=_dflt_{f.name}")
            value = f.name
        elif f.default_factory is not MISSING:
            params.append(f"{f.name}=_HAS_FACTORY")
            value = f"_dflt_{f.name}() if {f.name} is _HAS_FACTORY else {f.name}"
        else:
            params.append(f.name)
            value = f.name
        body.append(f"  _setattr(self, {f.name!r}, {value})" if frozen else f"  self.{f.name} = {value}")
    src = [f"def __create__({', '.join(['_setattr', '_HAS_FACTORY'] + [f'_dflt_{f.name}' for f in flds])}):",
           f" def __init__({', '.join(['self'] + params)}):", *(body or ["  pass"]),
           " return __init__"]
    defaults = [f.default if f.default is not MISSING else f.default_factory for f in flds]
    ns: dict = {}
    exec(_compiled("\n".join(src) + "\n", qualname), ns)
    methods = {"__init__": ns["__create__"](object.__setattr__, _HAS_FACTORY, *defaults),
               "__repr__": _repr, "__eq__": _eq, "__hash__": None}
    if frozen:
        methods.update(__setattr__=_frozen_setattr, __delattr__=_frozen_delattr, __hash__=_hash)
    return methods


def _values(obj) -> tuple:
    return tuple([getattr(obj, name) for name in getattr(obj, _FIELDS)])


def _repr(self) -> str:
    shown = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in getattr(self, _FIELDS).values() if f.repr)
    return f"{self.__class__.__qualname__}({shown})"


def _eq(self, other):
    return _values(self) == _values(other) if other.__class__ is self.__class__ else NotImplemented


def _hash(self) -> int:
    return hash(_values(self))


def _frozen_setattr(self, name, value):
    raise FrozenInstanceError(f"cannot assign to field {name!r}")


def _frozen_delattr(self, name):
    raise FrozenInstanceError(f"cannot delete field {name!r}")


_HAS_FACTORY = MISSING.__class__()  # "no argument given: call the factory"

# The cache: generated source -> code object. Loaded on first use; written
# back once at exit by the process that loaded it, when it compiled anything.
_CACHE_PATH = os.path.join(os.path.dirname(__file__), "__pycache__",
                           f"records.{sys.implementation.cache_tag}.marshal")
_cache: dict[str, object] | None = None
_used: set[str] = set()
_added = False


def _compiled(src: str, qualname: str):
    global _cache, _added
    if _cache is None:
        _cache = _load()
    code = _cache.get(src)
    _used.add(src)
    if code is None:
        code = compile(src, f"<record {qualname}>", "exec")
        _cache[src] = code
        if not _added and not sys.dont_write_bytecode:
            _added = True
            import atexit

            atexit.register(_save, os.getpid())
    return code


def _load() -> dict:
    try:
        with open(_CACHE_PATH, "rb") as f:
            version, table = marshal.load(f)
    except (OSError, EOFError, ValueError, TypeError):
        return {}
    return table if version == sys.version else {}  # marshal's format is one Python build's


def _save(pid: int) -> None:
    """Atomically, so that concurrent runs each leave a whole cache."""
    if os.getpid() != pid:  # a forked child of the restorer, exiting
        return
    tmp = f"{_CACHE_PATH}.{pid}"
    try:
        os.makedirs(os.path.dirname(_CACHE_PATH), exist_ok=True)
        with open(tmp, "wb") as f:
            marshal.dump((sys.version, _cache), f)
        os.replace(tmp, _CACHE_PATH)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass


def prime() -> int:
    """Import every module of procsnap and save the cache even where byte
    code is not written (PYTHONDONTWRITEBYTECODE): `make`'s stamp runs it
    beside compileall. Returns how many classes' methods it holds."""
    import importlib
    import pkgutil

    import procsnap

    for info in pkgutil.walk_packages(procsnap.__path__, "procsnap."):
        if not info.name.endswith("__main__"):
            try:
                importlib.import_module(info.name)
            except ImportError:  # an optional extra not installed: its records compile when used
                pass
    global _cache
    _cache = {src: code for src, code in (_cache or {}).items() if src in _used}  # stale ones out
    _save(os.getpid())
    return len(_cache or ())


if __name__ == "__main__":
    from procsnap import records  # the module the others imported, not this __main__ copy

    print(f"{records._CACHE_PATH}: {records.prime()} records")
