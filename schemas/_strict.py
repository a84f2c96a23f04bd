"""The decoder's fast path: a typed decode that refuses whatever it might read unlike Go.

:func:`schemas.codec.decode` parses untyped, normalises (key case, ``null``, enum case) and
converts: ~10 µs for an AskForBid, most of it the normaliser's walk in Python. A body
written with the exact field names (what every requester sends in practice) needs none
of that, and msgspec's typed decoder reads it in ~2 µs. Whether a body is such a one is
left to msgspec too: the fast path decodes into *mirrors* of the target Structs that
forbid unknown fields, so a key in another case, like any key the target lacks, fails it;
so do a ``null`` where Go would keep the default and an enum value in another case. Then
the full path decodes the body, and it alone gives the answer or the error.

A mirror has the original's fields, names, defaults and constraints. Once the mirror has
read a body, the body is decoded a second time, typed, into the original types, which runs
their own checks and ``__post_init__``: the same fields, read by the same rules, so the
same values. Two typed decodes cost less than one and a conversion of the mirror
(``msgspec.convert``, ``from_attributes``): ~6 µs less per ask and reject on the node.
:func:`strict_decoder` gives no fast path (None) for a type where a decode that succeeds
could still differ from the full path's:

* an ``Any`` field whose default is not None (typed, ``null`` is None; Go keeps the default);
* a dict whose keys are not ``str`` (typed decoding parses keys, conversion does not);
* a tagged, array-like or recursive Struct, or a custom or ``Raw`` type.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable
from typing import Annotated, Any, Union

import msgspec
import msgspec.inspect as mi

__all__ = ["strict_decoder"]


class _Refused(Exception):
    """The type has something the fast path would read unlike the full one."""


_cache: dict[Any, Callable[[bytes], Any] | None] = {}


def _mirror(tp: Any, made: dict[type, Any], building: set[type]) -> Any:
    """``tp`` with every Struct replaced by its strict mirror."""
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        return _mirror_struct(tp, made, building)
    origin = typing.get_origin(tp)
    if origin is None:
        if tp is msgspec.Raw:
            raise _Refused("Raw")
        return tp
    args = typing.get_args(tp)
    if origin is Annotated:
        return Annotated[(_mirror(args[0], made, building), *args[1:])]
    if origin is Union or origin is types.UnionType:
        return Union[tuple(_mirror(a, made, building) for a in args)]  # noqa: UP007
    if origin is dict and args and args[0] is not str:
        raise _Refused("a dict with keys that are not str")
    if origin is typing.Literal:
        if None in args:  # typed, null is None; the normaliser drops the key
            raise _Refused("a Literal with None")
        return tp
    return origin[tuple(_mirror(a, made, building) for a in args)]


def _mirror_struct(cls: type[msgspec.Struct], made: dict[type, Any], building: set[type]) -> Any:
    if cls in made:
        return made[cls]
    if cls in building:
        raise _Refused(f"{cls.__name__} is recursive")
    config = cls.__struct_config__
    if config.tag is not None or config.array_like:
        raise _Refused(f"{cls.__name__} is tagged or array-like")
    building.add(cls)
    hints = typing.get_type_hints(cls, include_extras=True)
    fields: list[tuple[str, Any, Any]] = []
    for f in msgspec.structs.fields(cls):
        hint = hints[f.name]
        if _is_any(hint) and f.default is not None:
            raise _Refused(f"{cls.__name__}.{f.name}: Any with a default other than None")
        if f.default is not msgspec.NODEFAULT:
            spec = msgspec.field(default=f.default, name=f.encode_name)
        elif f.default_factory is not msgspec.NODEFAULT:
            spec = msgspec.field(default_factory=f.default_factory, name=f.encode_name)
        else:
            spec = msgspec.field(name=f.encode_name)
        fields.append((f.name, _mirror(hint, made, building), spec))
    building.discard(cls)
    mirror = msgspec.defstruct(
        f"Strict{cls.__name__}",
        fields,
        forbid_unknown_fields=True,
        kw_only=True,
        module=__name__,
    )
    made[cls] = mirror
    return mirror


def _is_any(hint: Any) -> bool:
    if typing.get_origin(hint) is Annotated:
        hint = typing.get_args(hint)[0]
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    return (origin is Union or origin is types.UnionType) and Any in typing.get_args(hint)


def _has_custom(t: mi.Type, seen: set[type]) -> bool:
    """Whether msgspec would need a hook for some part of ``t``."""
    if isinstance(t, mi.CustomType):
        return True
    if isinstance(t, mi.StructType):
        if t.cls in seen:
            return False
        seen.add(t.cls)
        return any(_has_custom(f.type, seen) for f in t.fields)
    if isinstance(t, mi.Metadata):
        return _has_custom(t.type, seen)
    children: list[mi.Type] = []
    if isinstance(t, mi.UnionType):
        children = list(t.types)
    elif isinstance(t, mi.ListType | mi.VarTupleType | mi.SetType | mi.FrozenSetType):
        children = [t.item_type]
    elif isinstance(t, mi.TupleType):
        children = list(t.item_types)
    elif isinstance(t, mi.DictType):
        children = [t.key_type, t.value_type]
    return any(_has_custom(c, seen) for c in children)


def strict_decoder(type_: Any) -> Callable[[bytes], Any] | None:
    """The fast path for ``type_`` (a Struct), or None when it has none. The function
    raises on any body it does not read as the full path would."""
    try:
        return _cache[type_]
    except KeyError:
        pass
    fast: Callable[[bytes], Any] | None = None
    if isinstance(type_, type) and issubclass(type_, msgspec.Struct):
        try:
            if _has_custom(mi.type_info(type_), set()):
                raise _Refused("custom type")
            mirror = _mirror(type_, {}, set())
        except _Refused:
            pass
        else:
            fast = _fast(msgspec.json.Decoder(mirror), type_)
    _cache[type_] = fast
    return fast


def _fast(decoder: msgspec.json.Decoder[Any], type_: Any) -> Callable[[bytes], Any]:
    typed = msgspec.json.Decoder(type_)

    def decode(blob: bytes) -> Any:
        decoder.decode(blob)  # raises on anything the full path might read otherwise
        return typed.decode(blob)

    return decode
