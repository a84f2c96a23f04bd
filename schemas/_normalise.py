"""Normalisers: an untyped JSON value made into one ``msgspec.convert`` takes, Go-style.

What a normaliser does (key folding, ``null``, enum case) is described in
:mod:`schemas.codec`. Each is compiled once per type from :func:`msgspec.inspect.type_info`
and cached, so the hot path does no reflection: one dict lookup per key.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from enum import Enum
from typing import Any, Final

import msgspec.inspect as mi

from schemas._errors import DecodeError, echo
from schemas.compute import ExecutionState
from schemas.job import ENUM_NAMES

__all__ = ["Collision", "Norm", "normaliser"]

# A normaliser maps an untyped JSON value onto one msgspec.convert accepts for its type.
# ``ordered`` is False on the fast path, where two keys of one object that land on the
# same field raise Collision (msgspec's untyped dicts lose the order of repeated keys),
# and True on the slow path, whose dicts are ordered by each key's last occurrence.
Norm = Callable[[Any, bool], Any]


class Collision(Exception):
    """Two keys of one object land on one field (fast path only)."""


# What a ``null`` does to a Struct field (Go: no effect, or nil for slices, maps and
# pointers): None when it is dropped, else a factory of the value it stands for.
_NullFactory = Callable[[], Any]
_Entry = tuple[str, "Norm | None", "_NullFactory | None"]  # (JSON name, normaliser, null)
_UNKNOWN: Final[_Entry] = ("", None, None)
_MAX_LEARNED_KEYS = 256  # per Struct: case variants remembered after a folded match

_type_cache: dict[Any, Norm | None] = {}
_struct_cache: dict[type, Norm] = {}
_enum_cache: dict[type, Norm] = {}

_ENUM_WORDS: Final[dict[type, str]] = {**ENUM_NAMES, ExecutionState: "state"}


def _enum_word(cls: type) -> str:
    word = _ENUM_WORDS.get(cls)
    if word:
        return word
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", cls.__name__).lower()


def _compile_enum(cls: type[Enum]) -> Norm | None:
    if not all(isinstance(m.value, str) for m in cls):
        return None
    cached = _enum_cache.get(cls)
    if cached is not None:
        return cached
    values: dict[str, str] = {}
    for m in cls:
        values[m.value] = m.value
        values.setdefault(m.value.lower(), m.value)
    word = _enum_word(cls)

    def norm_enum(v: Any, ordered: bool) -> Any:
        if type(v) is not str:
            return v  # msgspec reports the wrong type
        canon = values.get(v)
        if canon is None:
            canon = values.get(v.lower()) if v.isascii() else None
            if canon is None:
                raise DecodeError(f"unknown {word} {echo(v)}")
        return canon

    _enum_cache[cls] = norm_enum
    return norm_enum


def _none() -> None:
    return None


def _null_factory(t: mi.Type) -> _NullFactory | None:
    members = t.types if isinstance(t, mi.UnionType) else (t,)
    if any(isinstance(m, mi.NoneType) for m in members):
        return _none
    if isinstance(t, mi.ListType | mi.VarTupleType | mi.SetType | mi.FrozenSetType):
        return list
    if isinstance(t, mi.DictType):
        return dict
    return None


def _struct_normaliser(lookup: dict[str, _Entry], miss: Callable[[str], _Entry]) -> Norm:
    def norm_struct(v: Any, ordered: bool) -> Any:
        if type(v) is not dict:
            return v  # msgspec reports the wrong type
        out: dict[str, Any] = {}
        for k, x in v.items():
            entry = lookup.get(k) or miss(k)
            if entry is _UNKNOWN:
                continue
            name, sub, null = entry
            if x is None:
                if null is None:
                    continue
                x = null()
            elif sub is not None:
                x = sub(x, ordered)
            if not ordered and name in out:
                raise Collision
            out[name] = x
        return out

    return norm_struct


def _compile_struct(st: mi.StructType) -> Norm:
    cached = _struct_cache.get(st.cls)
    if cached is not None:
        return cached
    # Filled below, after registering, so that recursive Structs compile.
    lookup: dict[str, _Entry] = {}
    folded: dict[str, _Entry] = {}
    learned = [0]

    def miss(k: str) -> _Entry:
        """A key that is not a field name: fold it, and remember the answer (bounded)."""
        entry = folded.get(k.lower(), _UNKNOWN) if k.isascii() else _UNKNOWN
        if learned[0] < _MAX_LEARNED_KEYS:
            learned[0] += 1
            lookup[k] = entry
        return entry

    norm = _struct_cache[st.cls] = _struct_normaliser(lookup, miss)
    for f in st.fields:
        entry: _Entry = (f.encode_name, _compile(f.type), _null_factory(f.type))
        lookup[f.encode_name] = entry
        folded.setdefault(f.encode_name.lower(), entry)  # first declared field wins
    return norm


def _compile_items(item: mi.Type) -> Norm | None:
    sub = _compile(item)
    if sub is None:
        return None

    def norm_list(v: Any, ordered: bool) -> Any:
        if type(v) is not list:
            return v
        return [x if x is None else sub(x, ordered) for x in v]

    return norm_list


def _compile_tuple(items: tuple[mi.Type, ...]) -> Norm | None:
    subs = [_compile(t) for t in items]
    if all(s is None for s in subs):
        return None

    def norm_tuple(v: Any, ordered: bool) -> Any:
        if type(v) is not list or len(v) != len(subs):
            return v
        return [
            x if s is None or x is None else s(x, ordered) for s, x in zip(subs, v, strict=True)
        ]

    return norm_tuple


def _compile_dict(value_type: mi.Type) -> Norm | None:
    sub = _compile(value_type)
    if sub is None:
        return None

    def norm_dict(v: Any, ordered: bool) -> Any:
        if type(v) is not dict:
            return v
        return {k: x if x is None else sub(x, ordered) for k, x in v.items()}

    return norm_dict


_STR_TYPES: Final = (mi.StrType, mi.BytesType, mi.ByteArrayType, mi.MemoryViewType)
_STR_LIKE: Final = (
    *_STR_TYPES,
    mi.DateTimeType,
    mi.DateType,
    mi.TimeType,
    mi.TimeDeltaType,
    mi.UUIDType,
    mi.DecimalType,
    mi.LiteralType,
    mi.AnyType,
    mi.CustomType,
)


def _compile_union(u: mi.UnionType) -> Norm | None:
    """Dispatch on the JSON kind of the value, when exactly one member takes that kind."""
    dicts = [t for t in u.types if isinstance(t, mi.StructType | mi.DictType)]
    lists = [
        t
        for t in u.types
        if isinstance(t, mi.ListType | mi.VarTupleType | mi.SetType | mi.FrozenSetType)
    ]
    enums = [t for t in u.types if isinstance(t, mi.EnumType)]
    strs = [t for t in u.types if isinstance(t, _STR_LIKE)]
    by_kind: dict[type, Norm] = {}
    if len(dicts) == 1 and not any(isinstance(t, mi.AnyType) for t in u.types):
        n = _compile(dicts[0])
        if n is not None:
            by_kind[dict] = n
    if len(lists) == 1:
        n = _compile(lists[0])
        if n is not None:
            by_kind[list] = n
    if len(enums) == 1 and not strs:
        n = _compile(enums[0])
        if n is not None:
            by_kind[str] = n
    if not by_kind:
        return None

    def norm_union(v: Any, ordered: bool) -> Any:
        sub = by_kind.get(type(v))
        return v if sub is None else sub(v, ordered)

    return norm_union


def _compile(t: mi.Type) -> Norm | None:
    """The normaliser of an inspected type, or None when values pass unchanged."""
    if isinstance(t, mi.StructType):
        return _compile_struct(t)
    if isinstance(t, mi.EnumType):
        return _compile_enum(t.cls)
    if isinstance(t, mi.ListType | mi.VarTupleType | mi.SetType | mi.FrozenSetType):
        return _compile_items(t.item_type)
    if isinstance(t, mi.TupleType):
        return _compile_tuple(t.item_types)
    if isinstance(t, mi.DictType):
        return _compile_dict(t.value_type)
    if isinstance(t, mi.UnionType):
        return _compile_union(t)
    return None


def normaliser(type_: Any) -> Norm | None:
    """The normaliser of ``type_`` (compiled once), or None when its values pass unchanged."""
    try:
        return _type_cache[type_]
    except KeyError:
        pass
    norm = _compile(mi.type_info(type_))
    _type_cache[type_] = norm
    return norm
