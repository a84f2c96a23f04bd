"""JSON codec of the wire protocol (PROTOCOL.md §0): Go ``encoding/json`` semantics on msgspec.

Decoding is two steps. The body is parsed once, untyped, by msgspec; the result is then
*normalised* against the target type and handed to :func:`msgspec.convert`:

* keys of every object that decodes into a Struct are mapped onto field names as Go does:
  an exact match first, else an ASCII case-insensitive one (the first declared field wins
  among fields that fold alike); when several keys land on one field the last one in the
  document wins; unknown keys are dropped. Keys of plain ``dict`` fields are kept as sent;
* ``null`` behaves as in Go: no effect on a string, number, bool or Struct field (it keeps
  its default), an empty list or dict for a list or dict field, ``None`` for an optional one;
* string enum values (``StrEnum`` fields, also inside optionals, lists and dicts) match
  case-insensitively onto the canonical value; an unlisted one is ``unknown <name> "X"``.

The normaliser of each type is compiled once from :func:`msgspec.inspect.type_info` and
cached, so the hot path does no reflection: one dict lookup per key.

Decoding an :class:`~schemas.compute.AskForBidRequest` (or a bare
:class:`~schemas.job.Job`) whose job does not fit the v0.3.25 ``model.Job`` explains which
other Bacalhau job model was sent (v1.x ``tasks[]``, v1.0 ``Spec.EngineSpec``, the legacy
flat spec) instead of msgspec's generic message. That check runs only when the typed
conversion fails: a job that has ``Spec.Engine`` is a v0.3.25 job, whatever else it carries.
:func:`decode_ask` is a shorthand for ``decode(data, AskForBidRequest)``.

Every failure that must become a 400 reply raises :class:`DecodeError`, never anything else:
malformed JSON, invalid UTF-8 in a field that is kept (invalid UTF-8 in a dropped field is
ignored, PROTOCOL.md §3), nesting deeper than :data:`MAX_DEPTH`, a top-level non-object,
wrong types and constraint violations.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta, timezone
from enum import Enum
from typing import Any, Final, TypeVar

import msgspec
import msgspec.inspect as mi

from schemas.compute import AskForBidRequest, ExecutionState
from schemas.job import ENUM_NAMES, Job

__all__ = [
    "MAX_DEPTH",
    "DecodeError",
    "decode",
    "decode_ask",
    "encode",
    "format_time",
    "parse_time",
    "to_builtins",
]

T = TypeVar("T")

#: Deepest nesting of arrays and objects accepted (the top-level object is depth 1).
MAX_DEPTH: Final = 128

# Messages are one line and bounded: they go into the Nats-Service-Error header. Values
# echoed in them are JSON-quoted with ASCII escapes.
_MAX_MESSAGE = 400
_MAX_ECHO = 64

_ENCODER: Final = msgspec.json.Encoder()
_UNTYPED: Final = msgspec.json.Decoder()


class DecodeError(Exception):
    """A body that cannot be decoded into the requested type (a 400 reply)."""

    def __init__(self, message: str) -> None:
        message = " ".join(message.splitlines())
        if len(message) > _MAX_MESSAGE:
            message = message[: _MAX_MESSAGE - 3] + "..."
        super().__init__(message)
        self.message = message


# --------------------------------------------------------------------------- encoding


def encode(obj: Any) -> bytes:
    """JSON bytes of ``obj`` (Structs with their canonical field names)."""
    return _ENCODER.encode(obj)


def to_builtins(obj: Any) -> Any:
    """``obj`` as JSON-compatible builtins (bytes as base64, enums as their values)."""
    return msgspec.to_builtins(obj)


# --------------------------------------------------------------------------- times


def format_time(dt: datetime) -> str:
    """RFC 3339 in UTC with ``Z`` and exactly six fractional digits.

    Naive datetimes are refused (``ValueError``): their zone is unknown.
    """
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise ValueError("format_time needs an aware datetime")
    u = dt.astimezone(UTC)
    return (
        f"{u.year:04d}-{u.month:02d}-{u.day:02d}T"
        f"{u.hour:02d}:{u.minute:02d}:{u.second:02d}.{u.microsecond:06d}Z"
    )


_TIME_RE: Final = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?"
    r"(?:([Zz])|([+-])(\d{2}):(\d{2}))",
    re.ASCII,
)


def parse_time(s: str) -> datetime:
    """An RFC 3339 timestamp as an aware UTC datetime (digits past microseconds are cut)."""
    m = _TIME_RE.fullmatch(s) if isinstance(s, str) else None
    if m is None:
        raise DecodeError(f"invalid time {_echo(s)}: want RFC 3339")
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    micros = int((m.group(7) or "").ljust(6, "0")[:6])
    try:
        if m.group(8):
            tz = UTC
        else:
            oh, om = int(m.group(10)), int(m.group(11))
            if oh > 23 or om > 59:
                raise ValueError("offset out of range")
            sign = -1 if m.group(9) == "-" else 1
            tz = timezone(sign * timedelta(hours=oh, minutes=om))
        return datetime(year, month, day, hour, minute, second, micros, tz).astimezone(UTC)
    except (ValueError, OverflowError):
        raise DecodeError(f"invalid time {_echo(s)}: out of range") from None


# --------------------------------------------------------------------------- normalisers

# A normaliser maps an untyped JSON value onto one msgspec.convert accepts for its type.
# ``ordered`` is False on the fast path, where two keys of one object that land on the
# same field raise _Collision (msgspec's untyped dicts lose the order of repeated keys),
# and True on the slow path, whose dicts are ordered by each key's last occurrence.
_Norm = Callable[[Any, bool], Any]


class _Collision(Exception):
    pass


# What a ``null`` does to a Struct field (Go: no effect, or nil for slices, maps and
# pointers): None when it is dropped, else a factory of the value it stands for.
_NullFactory = Callable[[], Any]
_Entry = tuple[str, "_Norm | None", "_NullFactory | None"]  # (JSON name, normaliser, null)
_UNKNOWN: Final[_Entry] = ("", None, None)
_MAX_LEARNED_KEYS = 256  # per Struct: case variants remembered after a folded match

_type_cache: dict[Any, _Norm | None] = {}
_struct_cache: dict[type, _Norm] = {}
_enum_cache: dict[type, _Norm] = {}

_ENUM_WORDS: Final[dict[type, str]] = {**ENUM_NAMES, ExecutionState: "state"}


def _enum_word(cls: type) -> str:
    word = _ENUM_WORDS.get(cls)
    if word:
        return word
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", cls.__name__).lower()


def _echo(value: object) -> str:
    """A bounded, one-line, ASCII, JSON-quoted rendering of a value for an error message."""
    if isinstance(value, str) and len(value) > _MAX_ECHO:
        value = value[:_MAX_ECHO] + "..."
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return ascii(value)[:_MAX_ECHO]


def _compile_enum(cls: type[Enum]) -> _Norm | None:
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
                raise DecodeError(f"unknown {word} {_echo(v)}")
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


def _struct_normaliser(lookup: dict[str, _Entry], miss: Callable[[str], _Entry]) -> _Norm:
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
                raise _Collision
            out[name] = x
        return out

    return norm_struct


def _compile_struct(st: mi.StructType) -> _Norm:
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


def _compile_items(item: mi.Type) -> _Norm | None:
    sub = _compile(item)
    if sub is None:
        return None

    def norm_list(v: Any, ordered: bool) -> Any:
        if type(v) is not list:
            return v
        return [x if x is None else sub(x, ordered) for x in v]

    return norm_list


def _compile_tuple(items: tuple[mi.Type, ...]) -> _Norm | None:
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


def _compile_dict(value_type: mi.Type) -> _Norm | None:
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


def _compile_union(u: mi.UnionType) -> _Norm | None:
    """Dispatch on the JSON kind of the value, when exactly one member takes that kind."""
    dicts = [t for t in u.types if isinstance(t, mi.StructType | mi.DictType)]
    lists = [
        t
        for t in u.types
        if isinstance(t, mi.ListType | mi.VarTupleType | mi.SetType | mi.FrozenSetType)
    ]
    enums = [t for t in u.types if isinstance(t, mi.EnumType)]
    strs = [t for t in u.types if isinstance(t, _STR_LIKE)]
    by_kind: dict[type, _Norm] = {}
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


def _compile(t: mi.Type) -> _Norm | None:
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


def _normaliser(type_: Any) -> _Norm | None:
    try:
        return _type_cache[type_]
    except KeyError:
        pass
    norm = _compile(mi.type_info(type_))
    _type_cache[type_] = norm
    return norm


# --------------------------------------------------------------------------- parsing

_SENTINEL: Final = "\ufdd0"  # a noncharacter standing in for undecodable bytes
_SENTINEL_UTF8: Final = _SENTINEL.encode()
_SENTINEL_ESCAPE: Final = re.compile(rb"\\u[fF][dD][dD]0")
_SURROGATES_TO_SENTINEL: Final = {c: _SENTINEL for c in range(0xDC80, 0xDD00)}
_INVALID_UTF8 = "invalid UTF-8 in a field the node reads"


def _too_deep(value: Any) -> bool:
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if depth > MAX_DEPTH:
            return True
        children: Iterable[Any] = v.values() if type(v) is dict else v
        stack.extend((c, depth + 1) for c in children if type(c) is dict or type(c) is list)
    return False


def _parse(blob: bytes) -> tuple[Any, str | None]:
    """Untyped JSON; the text with sentinels for bad bytes when the input is not UTF-8."""
    text: str | None = None
    try:
        try:
            raw = _UNTYPED.decode(blob)
        except UnicodeDecodeError:
            # Invalid UTF-8 inside a string: it is an error only if that value is kept.
            if _SENTINEL_UTF8 in blob or _SENTINEL_ESCAPE.search(blob):
                raise DecodeError(_INVALID_UTF8) from None
            text = blob.decode("utf-8", "surrogateescape").translate(_SURROGATES_TO_SENTINEL)
            raw = _UNTYPED.decode(text)
    except RecursionError:
        raise DecodeError(f"JSON nested too deep (limit {MAX_DEPTH})") from None
    except msgspec.DecodeError as e:
        raise DecodeError(f"invalid JSON: {e}") from None
    if type(raw) in (dict, list) and (
        blob.count(b"{") + blob.count(b"[") > MAX_DEPTH and _too_deep(raw)
    ):
        raise DecodeError(f"JSON nested too deep (limit {MAX_DEPTH})")
    return raw, text


def _last_position_dict(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A dict whose order is each key's last occurrence (Go: the last duplicate wins)."""
    d: dict[str, Any] = {}
    for k, v in pairs:
        d.pop(k, None)
        d[k] = v
    return d


def _parse_ordered(blob: bytes, text: str | None) -> Any:
    if text is None:
        text = blob.decode("utf-8")
    try:
        return json.loads(text, object_pairs_hook=_last_position_dict)
    except (ValueError, RecursionError) as e:  # already valid for msgspec: limits only
        raise DecodeError(f"invalid JSON: {e}") from None


# --------------------------------------------------------------------------- job models

_V0325_HINT: Final = "send a v0.3.25 model.Job with Spec.Engine"
_V1_JOB_TYPES: Final = frozenset({"batch", "ops", "service", "daemon"})
_LEGACY_KEYS: Final = frozenset({"engine", "jobspecdocker", "jobspeclanguage", "jobspecwasm"})
_MISSING: Final = object()


def _get_folded(d: dict[str, Any], lower: str) -> Any:
    found: Any = _MISSING
    for k, v in d.items():
        if k == lower or (k.isascii() and k.lower() == lower):
            found = v
    return found


def _job_model_problem(job: Any) -> str | None:
    """Why ``job`` is some other Bacalhau job model than v0.3.25 ``model.Job``, if it is."""
    if type(job) is not dict:
        return None
    spec = _get_folded(job, "spec")
    if type(spec) is dict:
        engine = _get_folded(spec, "engine")
        if engine in (_MISSING, None, "") and _get_folded(spec, "enginespec") not in (
            _MISSING,
            None,
        ):
            return f"unsupported job model: Bacalhau v1.0 Spec.EngineSpec; {_V0325_HINT}"
        if engine not in (_MISSING, None):
            return None
    if _get_folded(job, "tasks") is not _MISSING:
        return f"unsupported job model: Bacalhau v1.x models.Job (tasks[]); {_V0325_HINT}"
    job_type = _get_folded(job, "type")
    if isinstance(job_type, str) and job_type.lower() in _V1_JOB_TYPES:
        return (
            f"unsupported job model: Bacalhau v1.x models.Job (type {_echo(job_type)}); "
            f"{_V0325_HINT}"
        )
    if spec in (_MISSING, None) and any(k.isascii() and k.lower() in _LEGACY_KEYS for k in job):
        return f"unsupported job model: legacy flat job spec (pre-Spec layout); {_V0325_HINT}"
    return None


def _ask_model_problem(raw: Any) -> str | None:
    return _job_model_problem(_get_folded(raw, "job")) if type(raw) is dict else None


# Per type: explains a failed decode by the job model that was sent.
_MODEL_CHECKS: Final[dict[Any, Callable[[Any], str | None]]] = {
    AskForBidRequest: _ask_model_problem,
    Job: _job_model_problem,
}

# --------------------------------------------------------------------------- decoding

_REGEX_MSG: Final = re.compile(r"Expected `str` matching regex '(?P<p>.*)'(?P<rest> - at .*)?$")


def _message(e: msgspec.DecodeError) -> str:
    msg = str(e)
    m = _REGEX_MSG.match(msg)
    if m and "A-Za-z0-9_-]{0,127}" in m.group("p"):
        return f"Expected an ID matching [A-Za-z0-9][A-Za-z0-9_-]{{0,127}}{m.group('rest') or ''}"
    return msg


def _typed(raw: Any, type_: type[T], norm: _Norm | None, ordered: bool, lossy: bool) -> T:
    value = raw if norm is None else norm(raw, ordered)
    if lossy and _SENTINEL_UTF8 in _ENCODER.encode(value):  # only the kept values are left
        raise DecodeError(_INVALID_UTF8)
    try:
        return msgspec.convert(value, type_)
    except msgspec.DecodeError as e:
        raise DecodeError(_message(e)) from None


def decode(data: bytes | memoryview, type_: type[T]) -> T:
    """Decode a JSON body into ``type_`` with Go ``encoding/json`` semantics.

    Raises :class:`DecodeError` (one-line ``.message``) for anything that is a 400.
    """
    blob = data if type(data) is bytes else bytes(data)
    raw, text = _parse(blob)
    norm = _normaliser(type_)
    lossy = text is not None
    try:
        try:
            return _typed(raw, type_, norm, False, lossy)
        except _Collision:
            # Two keys of one object land on one field: re-parse keeping the key order.
            return _typed(_parse_ordered(blob, text), type_, norm, True, lossy)
    except DecodeError:
        check = _MODEL_CHECKS.get(type_)
        problem = check(raw) if check is not None else None
        if problem is not None:
            raise DecodeError(problem) from None
        raise


def decode_ask(data: bytes | memoryview) -> AskForBidRequest:
    """``decode(data, AskForBidRequest)``: refuses other job models by name."""
    return decode(data, AskForBidRequest)
