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

The normaliser of each type is compiled once (``schemas._normalise``) and cached, so the
hot path does no reflection: one dict lookup per key.

Most bodies need neither step: every key is an exact field name and nothing in them reads
differently in Go. Those are decoded typed, at once, into strict mirrors of the target
Structs (``schemas._strict``, ~2.5× faster for an AskForBid); any other body fails there
and takes the two steps, which alone word the errors.

Decoding an :class:`~schemas.compute.AskForBidRequest` (or a bare
:class:`~schemas.job.Job`) whose job does not fit the v0.3.25 ``model.Job`` explains which
other Bacalhau job model was sent (v1.x ``tasks[]``, v1.0 ``Spec.EngineSpec``, the legacy
flat spec) instead of msgspec's generic message. That check runs only when the typed
conversion fails: a job that has ``Spec.Engine`` is a v0.3.25 job, whatever else it carries.
:func:`decode_ask` is a shorthand for ``decode(data, AskForBidRequest)``; the job-model
checks live in ``schemas._models``.

Every failure that must become a 400 reply raises :class:`DecodeError`, never anything else:
malformed JSON, invalid UTF-8 in a field that is kept (invalid UTF-8 in a dropped field is
ignored, PROTOCOL.md §3), nesting deeper than :data:`MAX_DEPTH`, a top-level non-object,
wrong types and constraint violations.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Final, TypeVar

import msgspec

from schemas._errors import DecodeError, echo
from schemas._models import MODEL_CHECKS
from schemas._normalise import Collision, Norm, normaliser
from schemas._strict import strict_decoder
from schemas.compute import AskForBidRequest

__all__ = [
    "MAX_DEPTH",
    "DecodeError",
    "decode",
    "decode_ask",
    "decode_full",
    "encode",
    "format_time",
    "parse_time",
    "to_builtins",
]

T = TypeVar("T")

#: Deepest nesting of arrays and objects accepted (the top-level object is depth 1).
MAX_DEPTH: Final = 128

_ENCODER: Final = msgspec.json.Encoder()
_UNTYPED: Final = msgspec.json.Decoder()


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
        raise DecodeError(f"invalid time {echo(s)}: want RFC 3339")
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
        raise DecodeError(f"invalid time {echo(s)}: out of range") from None


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


# --------------------------------------------------------------------------- decoding

_REGEX_MSG: Final = re.compile(r"Expected `str` matching regex '(?P<p>.*)'(?P<rest> - at .*)?$")


def _message(e: msgspec.DecodeError) -> str:
    msg = str(e)
    m = _REGEX_MSG.match(msg)
    if m and "A-Za-z0-9_-]{0,127}" in m.group("p"):
        return f"Expected an ID matching [A-Za-z0-9][A-Za-z0-9_-]{{0,127}}{m.group('rest') or ''}"
    return msg


def _typed(raw: Any, type_: type[T], norm: Norm | None, ordered: bool, lossy: bool) -> T:
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
    fast = strict_decoder(type_)
    if fast is not None and blob.count(b"{") + blob.count(b"[") <= MAX_DEPTH:
        try:
            value: T = fast(blob)  # exact names, nothing Go reads differently (_strict)
            return value
        except Exception:
            pass  # the full path decides, and words the error
    return decode_full(blob, type_)


def decode_full(blob: bytes, type_: type[T]) -> T:
    """``decode`` without the fast path: parse, normalise, convert."""
    raw, text = _parse(blob)
    norm = normaliser(type_)
    lossy = text is not None
    try:
        try:
            return _typed(raw, type_, norm, False, lossy)
        except Collision:
            # Two keys of one object land on one field: re-parse keeping the key order.
            return _typed(_parse_ordered(blob, text), type_, norm, True, lossy)
    except DecodeError:
        check = MODEL_CHECKS.get(type_)
        problem = check(raw) if check is not None else None
        if problem is not None:
            raise DecodeError(problem) from None
        raise


def decode_ask(data: bytes | memoryview) -> AskForBidRequest:
    """``decode(data, AskForBidRequest)``: refuses other job models by name."""
    return decode(data, AskForBidRequest)
