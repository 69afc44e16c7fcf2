"""Frozen dataclass records to and from JSON: the one mechanism behind every ``to_json``/``from_json``.

A record's JSON is its fields, in declaration order, under their names:

- an enum is its value; a tuple or list is a list; ``None`` stays ``null``;
- a mapping is an object; int keys (ranks) become strings, in numeric order; other keys keep
  their order;
- a nested record is its own ``to_json()`` if it has one (a record may have a shape of its own,
  e.g. a list), else its fields by the same rules.

Where a JSON contract differs from the fields, the field says so once, with ``field(metadata=json_as(...))``:
another key, an encoder/decoder of its own, or left out; a class may give the key order
(``JSON_ORDER``) and a schema tag written first (``JSON_SCHEMA``).

Decoding reads the field types (``int``, ``float``, ``str``, ``bool``, enums, ``X | None``,
``tuple[X, ...]``, ``tuple[A, B]``, ``list[X]``, mappings, nested records), fills a missing key
from the field's default, ignores keys it does not know, and raises ``ValueError`` naming the
record and key on anything else, so a damaged file is one precise line.

Standard library only: the analyzer's records use it and the analyzer stays cheap to import. It
lives in ``collectors`` because the ledger records (``GraphKey``, ``Header``) use it too, and
``collectors`` imports nothing from ``watchdog``.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any, Self, TypeVar

R = TypeVar("R")

_META = "json"


@dataclasses.dataclass(frozen=True)
class _Spec:
    key: str | None = None  # None: the field's name
    encode: Callable[[Any], Any] | None = None  # called on values that are not None
    decode: Callable[[Any], Any] | None = None
    omit: bool = False


def json_as(
    *,
    key: str | None = None,
    encode: Callable[[Any], Any] | None = None,
    decode: Callable[[Any], Any] | None = None,
    omit: bool = False,
) -> dict[str, Any]:
    """Field metadata saying how a field differs in JSON: ``field(metadata=json_as(key="from"))``."""
    return {_META: _Spec(key, encode, decode, omit)}


def _spec(f: dataclasses.Field[Any]) -> _Spec:
    spec = f.metadata.get(_META)
    return spec if isinstance(spec, _Spec) else _Spec()


_PLAIN = frozenset((int, float, str, bool, type(None)))  # exact types: an IntEnum or StrEnum is not one
_SCALARS = (int, float, str, bool)


def encode(value: Any) -> Any:
    """The JSON value of ``value`` (a record, enum, collection or scalar) by the rules above."""
    if type(value) in _PLAIN:  # most values: checked first (evidence holds thousands of stack frames)
        return value
    if isinstance(value, enum.Enum):  # before str and int: a StrEnum is a str
        return value.value
    if isinstance(value, (bool, int, float, str)):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        own = getattr(value, "to_json", None)
        return own() if own is not None else fields_json(value)
    if isinstance(value, Mapping):
        items = list(value.items())
        if items and all(isinstance(k, int) and not isinstance(k, bool) for k, _ in items):
            items.sort(key=lambda kv: kv[0])
        return {str(k): encode(v) for k, v in items}
    if isinstance(value, (list, tuple)):
        return [encode(v) for v in value]
    raise TypeError(f"no JSON form for {type(value).__name__}")


def fields_json(record: Any) -> dict[str, Any]:
    """A record's fields as a JSON object (its ``to_json`` is not consulted: this is what it calls)."""
    cls = type(record)
    shape = _SHAPES.get(cls)
    if shape is None:
        shape = _SHAPES[cls] = (
            getattr(cls, "JSON_SCHEMA", None),
            tuple((f.name, spec.key or f.name, spec.encode) for f, spec in _fields(cls)),
            getattr(cls, "JSON_ORDER", ()),
        )
    schema, fields, order = shape
    out: dict[str, Any] = {}
    if schema is not None:
        out["schema"] = schema
    for name, key, own in fields:
        value = getattr(record, name)
        out[key] = own(value) if value is not None and own is not None else encode(value)
    if order:
        out = {k: out[k] for k in ("schema", *order) if k in out}
    return out


# class -> (JSON_SCHEMA, (field name, key, encoder) per field, JSON_ORDER): read once per class
_SHAPES: dict[type, tuple[str | None, tuple[tuple[str, str, Callable[[Any], Any] | None], ...], tuple[str, ...]]] = {}


_FIELDS: dict[type, tuple[tuple[dataclasses.Field[Any], _Spec], ...]] = {}
_HINTS: dict[type, dict[str, Any]] = {}


def _fields(cls: type) -> tuple[tuple[dataclasses.Field[Any], _Spec], ...]:
    if cls not in _FIELDS:  # once per class: every incident writes its records
        _FIELDS[cls] = tuple((f, _spec(f)) for f in dataclasses.fields(cls) if not _spec(f).omit)
    return _FIELDS[cls]


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def decode_record(cls: type[R], data: Any, where: str) -> R:
    """A ``cls`` from its JSON object (``fields_json``'s inverse); ValueError naming ``where`` if damaged."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: expected an object, got {type(data).__name__}")
    hints = _hints(cls)
    values: dict[str, Any] = {}
    for f, spec in _fields(cls):
        key = spec.key or f.name
        if key not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ValueError(f"{where}: missing {key!r}")
            continue
        raw = data[key]
        if raw is not None and spec.decode is not None:
            values[f.name] = spec.decode(raw)
        else:
            values[f.name] = decode(hints[f.name], raw, f"{where}.{key}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:  # a record's own checks (__post_init__)
        raise ValueError(f"{where}: {exc}") from None


def decode(kind: Any, value: Any, where: str) -> Any:
    """``value`` read as a ``kind`` (a type hint); ValueError naming ``where`` if it is not one."""
    if kind in _SCALARS:  # most values: checked first
        return _scalar(kind, value, where)
    parts = _PARTS.get(kind)
    if parts is None:
        parts = _PARTS[kind] = (typing.get_origin(kind), typing.get_args(kind))
    origin, args = parts
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return decode(inner, value, where)
    if kind is Any:
        return value
    if isinstance(origin, type) and issubclass(origin, Mapping):
        if not isinstance(value, Mapping):
            raise ValueError(f"{where}: expected an object, got {type(value).__name__}")
        key_kind: Any
        item_kind: Any
        if issubclass(origin, Counter):
            key_kind, item_kind = (args[0] if args else str), int
        else:
            key_kind, item_kind = args if len(args) == 2 else (str, Any)
        out = {_key(key_kind, k, where): decode(item_kind, v, f"{where}.{k}") for k, v in value.items()}
        return Counter(out) if issubclass(origin, Counter) else out
    if origin in (tuple, list):
        if not isinstance(value, list):
            raise ValueError(f"{where}: expected a list, got {type(value).__name__}")
        if origin is list:
            return [decode(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(decode(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ValueError(f"{where}: expected {len(args)} items, got {len(value)}")
        return tuple(decode(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
    if isinstance(kind, type) and dataclasses.is_dataclass(kind):
        own = getattr(kind, "from_json", None)
        return own(value) if own is not None else decode_record(kind, value, where)
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        try:
            return kind(value)
        except ValueError:
            raise ValueError(f"{where}: {value!r} is not a {kind.__name__}") from None
    return _scalar(kind, value, where)


_PARTS: dict[Any, tuple[Any, tuple[Any, ...]]] = {}  # type hint -> (origin, args): typing's are slow


def _key(kind: Any, key: str, where: str) -> Any:
    """An object's key: JSON writes an int key (a rank) as a string."""
    if kind is int:
        try:
            return int(key)
        except ValueError:
            raise ValueError(f"{where}: key {key!r} is not an int") from None
    return decode(kind, key, where)


def _scalar(kind: Any, value: Any, where: str) -> Any:
    # bool is no int (JSON true is not a line number); an int is a float
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind in (int, float, str, bool) and isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    name = getattr(kind, "__name__", str(kind))
    raise ValueError(f"{where}: expected {name}, got {type(value).__name__} {value!r}")


class JsonRecord:
    """A record whose JSON is ``fields_json`` and which ``from_json`` reads back (``JSON_NAME``
    names it in errors). Slot-less, so a ``slots=True`` dataclass stays one."""

    __slots__ = ()

    def to_json(self) -> dict[str, Any]:
        return fields_json(self)

    @classmethod
    def from_json(cls, data: Any) -> Self:
        return decode_record(cls, data, getattr(cls, "JSON_NAME", cls.__name__))
