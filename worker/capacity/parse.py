"""Resource strings → numbers (PROTOCOL.md §0, Bacalhau ``capacity/parser.go``).

Bacalhau turns an unparsable string into 0, which the defaults then silently replace: a
job asking for ``"1.5Gb"`` of memory ran with 100 MiB. Here anything unparsable raises
:class:`ResourceParseError`, and the bidder declines with ``invalid resource request``.

- CPU: ``"500m"`` (millicores), ``"1.5"``, ``"2"``, ``"1.000000"``; stored as whole
  millicores rounded up, as Kubernetes' quantity does (``"0.0001"`` → 0.001).
- Memory and Disk: an integer or decimal with an optional case-insensitive suffix
  ``b, k, kb, ki, kib, m, …, e…``, every suffix 1024-based (``1Gb`` = 1 GiB); a
  fractional byte count is rounded up.
- GPU: a whole number (``"1.0"`` is invalid).

``""`` means "not set" (0) everywhere; spaces are ignored as Bacalhau's ``sanitize`` does.
"""

from __future__ import annotations

import json
import math
import re
from decimal import Decimal, InvalidOperation

from schemas.job import ResourcesConfig
from worker.capacity.usage import ResourceUsage

MAX_CPU = 1_000_000.0
"""Cores; more is a typo, not a machine."""
MAX_BYTES = 2**63 - 1
"""Go's int64 and SQLite's INTEGER both end here."""
MAX_GPU = 1_000_000
MAX_TEXT = 64
"""Longer strings are refused before any number is built from them."""

_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)"
_CPU_RE = re.compile(_NUMBER + r"(m?)")
_BYTES_RE = re.compile(_NUMBER + r"([a-z]*)")
_GPU_RE = re.compile(r"\d+")

_PREFIXES = "kmgtpe"
_BYTE_SUFFIXES: dict[str, int] = {"": 1, "b": 1}
for _power, _p in enumerate(_PREFIXES, start=1):
    for _suffix in (_p, _p + "b", _p + "i", _p + "ib"):
        _BYTE_SUFFIXES[_suffix] = 1024**_power

Number = str | int | float


class ResourceParseError(ValueError):
    """A resource string that is not a valid amount; the message names field and value."""

    def __init__(self, field: str, value: object, why: str) -> None:
        shown = value if isinstance(value, str) else repr(value)
        if isinstance(shown, str) and len(shown) > MAX_TEXT:
            shown = shown[:MAX_TEXT] + "…"
        super().__init__(f"{field} {json.dumps(shown, ensure_ascii=False)}: {why}")
        self.field = field
        self.value = value
        self.why = why


def _text(value: Number, field: str) -> str:
    """The sanitised text of a flag, TOML or job value: numbers become plain decimals."""
    if isinstance(value, bool):
        raise ResourceParseError(field, value, "not a number")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ResourceParseError(field, value, "not a finite number")
        if value < 0:
            raise ResourceParseError(field, value, "negative")
        return format(Decimal(repr(value)), "f")
    if not isinstance(value, str):
        raise ResourceParseError(field, value, "not a string")
    if len(value) > MAX_TEXT:
        raise ResourceParseError(field, value, f"longer than {MAX_TEXT} characters")
    return "".join(value.split()).lower()


def _decimal(text: str, value: Number, field: str) -> Decimal:
    try:
        return Decimal(text)
    except InvalidOperation:  # pragma: no cover - the regexes only let digits through
        raise ResourceParseError(field, value, "not a number") from None


def _negative(text: str) -> bool:
    return text.startswith("-")


def parse_cpu(value: Number, *, field: str = "CPU") -> float:
    """Cores from ``"500m"``, ``"1.5"``, ``"2"``; ``""`` → 0.0."""
    text = _text(value, field)
    if text == "":
        return 0.0
    m = _CPU_RE.fullmatch(text)
    if m is None:
        why = "negative" if _negative(text) else "expected cores such as 2, 1.5 or 500m"
        raise ResourceParseError(field, value, why)
    amount = _decimal(m.group(1), value, field)
    millicores = amount if m.group(2) else amount * 1000
    cores = math.ceil(millicores) / 1000
    if cores > MAX_CPU:
        raise ResourceParseError(field, value, f"more than {MAX_CPU:g} cores")
    return cores


def parse_bytes(value: Number, *, field: str = "Memory") -> int:
    """Bytes from ``"100Mi"``, ``"1Gb"``, ``"1.5Gi"``, ``"2"``; ``""`` → 0."""
    text = _text(value, field)
    if text == "":
        return 0
    m = _BYTES_RE.fullmatch(text)
    if m is None:
        why = "negative" if _negative(text) else "expected a size such as 512Mi, 2Gb or 1024"
        raise ResourceParseError(field, value, why)
    multiplier = _BYTE_SUFFIXES.get(m.group(2))
    if multiplier is None:
        raise ResourceParseError(field, value, f"unknown suffix {json.dumps(m.group(2))}")
    amount = math.ceil(_decimal(m.group(1), value, field) * multiplier)
    if amount > MAX_BYTES:
        raise ResourceParseError(field, value, "more than 8 EiB")
    return amount


def parse_gpu(value: Number, *, field: str = "GPU") -> int:
    """Whole GPUs from ``"1"``; ``""`` → 0; ``"1.0"`` is invalid."""
    if isinstance(value, float):
        raise ResourceParseError(field, value, "expected a whole number of GPUs")
    text = _text(value, field)
    if text == "":
        return 0
    if _GPU_RE.fullmatch(text) is None:
        why = "negative" if _negative(text) else "expected a whole number of GPUs"
        raise ResourceParseError(field, value, why)
    count = int(text)
    if count > MAX_GPU:
        raise ResourceParseError(field, value, f"more than {MAX_GPU} GPUs")
    return count


_PARSED_MAX = 1024
_parsed: dict[tuple[str, str, str, str], ResourceUsage] = {}


def parse_resources(config: ResourcesConfig) -> ResourceUsage:
    """A job's ``Resources`` strings as amounts; unset fields are 0 (defaults come later).

    Jobs repeat a handful of requests (``"100m"``, ``"64Mi"``…): the answers for the last
    ``_PARSED_MAX`` distinct ones are kept (``ResourceUsage`` is frozen); errors are not.
    """
    key = (config.CPU, config.Memory, config.Disk, config.GPU)
    found = _parsed.get(key)
    if found is not None:
        return found
    usage = ResourceUsage(
        CPU=parse_cpu(config.CPU, field="CPU"),
        Memory=parse_bytes(config.Memory, field="Memory"),
        Disk=parse_bytes(config.Disk, field="Disk"),
        GPU=parse_gpu(config.GPU, field="GPU"),
    )
    if len(_parsed) >= _PARSED_MAX:
        _parsed.clear()
    _parsed[key] = usage
    return usage
