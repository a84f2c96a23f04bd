"""Value parsers: each takes a flag/env string or a TOML value and returns the typed value
of a :class:`~worker.config.model.Config` field, or raises ValueError with a message that
shows the bad value."""

from __future__ import annotations

import ipaddress
import math
import os
import re
import typing
from collections.abc import Callable
from decimal import Decimal
from enum import StrEnum
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from schemas.job import Engine, Publisher, StorageSource
from worker import durations
from worker.capacity.parse import ResourceParseError, parse_bytes, parse_cpu, parse_gpu
from worker.config.model import ID_RE, Config


def _reject_bool(raw: Any, expected: str) -> None:
    if isinstance(raw, bool):
        raise ValueError(f"expected {expected}, got {str(raw).lower()}")


def parse_bool(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str):
        text = raw.strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off"):
            return False
    raise ValueError(f"expected true or false, got {raw!r}")


def _parse_optional_bool(raw: Any) -> bool | None:
    if isinstance(raw, str) and raw.strip().lower() in ("", "auto", "default"):
        return None
    return parse_bool(raw)


def _parse_int(raw: Any) -> int:
    _reject_bool(raw, "a whole number")
    if isinstance(raw, int):
        return raw
    if isinstance(raw, str) and re.fullmatch(r"\s*[+-]?\d+\s*", raw):
        return int(raw)
    raise ValueError(f"expected a whole number, got {raw!r}")


def _parse_size(raw: Any) -> int:
    _reject_bool(raw, "a size such as 256Ki")
    if isinstance(raw, float):
        raise ValueError(f"expected a size such as 256Ki or 262144, got {raw!r}")
    try:
        return parse_bytes(raw, field="size")
    except ResourceParseError as exc:
        raise ValueError(str(exc)) from None


_MAX_DURATION: Final = (2**63 - 1) / 1e9  # Go's time.Duration ends at ~292 years


def _parse_duration(raw: Any) -> float:
    _reject_bool(raw, "a duration such as 30s")
    if not isinstance(raw, str | int | float):
        raise ValueError(f"expected a duration such as 30s, got {raw!r}")
    seconds = durations.parse(raw)
    if not math.isfinite(seconds) or seconds > _MAX_DURATION:
        raise ValueError(f"duration {raw!r} is longer than Go's maximum (2562047h47m16s)")
    return seconds


def _parse_str(raw: Any) -> str:
    if isinstance(raw, str):
        return raw.strip()
    raise ValueError(f"expected a string, got {raw!r}")


def _parse_list(raw: Any) -> list[str]:
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
        raise ValueError(f"expected a comma-separated list or an array of strings, got {raw!r}")
    out: list[str] = []
    for item in items:
        for part in item.split(","):
            part = part.strip()
            if part and part not in out:
                out.append(part)
    return out


def _parse_labels(raw: Any) -> dict[str, str]:
    if isinstance(raw, dict):
        pairs = list(raw.items())
    else:
        pairs = []
        for item in _parse_list(raw):
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"expected key=value, got {item!r}")
            pairs.append((key.strip(), value.strip()))
    labels: dict[str, str] = {}
    for key, value in pairs:
        if not isinstance(value, str):
            raise ValueError(f"label {key!r}: expected a string value, got {value!r}")
        if not key or any(c.isspace() for c in key):
            raise ValueError(f"invalid label key {key!r}")
        labels[key] = value
    return labels


def _enum(*choices: str) -> Callable[[Any], str]:
    def parse(raw: Any) -> str:
        text = _parse_str(raw).lower()
        if text not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {raw!r}")
        return text

    return parse


def _wire_names(enum: type[StrEnum], what: str) -> Callable[[Any], list[str]]:
    """Names matched case-insensitively, stored in the wire's canonical spelling."""
    canonical = {member.value.lower(): member.value for member in enum}

    def parse(raw: Any) -> list[str]:
        out = []
        for name in _parse_list(raw):
            value = canonical.get(name.lower())
            if value is None:
                known = ", ".join(m.value for m in enum)
                raise ValueError(f"unknown {what} {name!r} (known: {known})")
            out.append(value)
        return out

    return parse


def _resource(dimension: str) -> Callable[[Any], str]:
    parsers: dict[str, Callable[..., float | int]] = {
        "cpu": parse_cpu,
        "memory": parse_bytes,
        "disk": parse_bytes,
        "gpu": parse_gpu,
    }

    def parse(raw: Any) -> str:
        try:
            parsers[dimension](raw, field=dimension.upper() if dimension == "cpu" else dimension)
        except ResourceParseError as exc:
            raise ValueError(str(exc)) from None
        if isinstance(raw, str):
            return raw.strip()
        return format(Decimal(repr(raw)), "f")

    return parse


def _parse_node_id(raw: Any) -> str:
    if not isinstance(raw, str):
        raise ValueError(f"expected a string, got {raw!r}")
    text = raw  # not stripped: "n1\n" is not a valid ID (PROTOCOL.md §1)
    if text and ID_RE.fullmatch(text) is None:
        raise ValueError(
            f"invalid node ID {text!r}: use 1-128 letters, digits, '_' or '-', "
            "starting with a letter or digit"
        )
    return text


_SUBJECT_RE = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*")


def _parse_subject(raw: Any) -> str:
    text = _parse_str(raw)
    if text and _SUBJECT_RE.fullmatch(text) is None:
        raise ValueError(
            f"invalid subject prefix {text!r}: use dot-separated tokens of letters, digits, "
            "'_' or '-' (no wildcards)"
        )
    return text


def _parse_subject_prefix(raw: Any) -> str:
    text = _parse_subject(raw)
    if not text:
        raise ValueError("the subject prefix cannot be empty")
    return text


def _parse_uid_range(raw: Any) -> str:
    """``FIRST-LAST`` unprivileged uids (checked as the Language engine reads them)."""
    from worker.engines.uids import UidRange

    text = _parse_str(raw)
    UidRange.parse(text)  # ValueError names the range and the rule
    return text


def _parse_url(raw: Any) -> str:
    text = _parse_str(raw)
    if text:
        parts = urlsplit(text)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"expected an http:// or https:// URL, got {text!r}")
    return text


def _parse_nats_url(raw: Any) -> str:
    text = _parse_str(raw)
    for server in filter(None, (s.strip() for s in text.split(","))):
        scheme = server.split("://", 1)[0] if "://" in server else "nats"
        if scheme not in ("nats", "tls", "ws", "wss") or any(c.isspace() for c in server):
            raise ValueError(
                f"expected nats://host:port (or tls://, ws://, wss://), got {server!r}"
            )
    return text


def _parse_listen(raw: Any) -> str:
    text = _parse_str(raw)
    if not text:
        return text
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535 or any(c.isspace() for c in host):
        raise ValueError(f"expected host:port (port 0-65535), got {text!r}")
    return text


def _parse_cidrs(raw: Any) -> list[str]:
    out = []
    for item in _parse_list(raw):
        try:
            out.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError:
            raise ValueError(f"invalid CIDR {item!r} (e.g. 10.0.0.0/8 or 127.0.0.1/32)") from None
    return out


def _parse_file(raw: Any) -> str:
    text = _parse_str(raw)
    if text and not os.path.isfile(text):
        raise ValueError(f"no such file: {text!r}")
    return text


def _parse_data_dir(raw: Any) -> Path:
    if isinstance(raw, Path):
        return raw
    text = _parse_str(raw)
    if not text:
        raise ValueError("the data dir cannot be empty")
    return Path(text).expanduser()


_RESOURCE_FIELDS = {
    f"limit_{scope}_{dim}": dim
    for scope in ("total", "job", "queue")
    for dim in ("cpu", "memory", "disk", "gpu")
}
_PARSERS: dict[str, Callable[[Any], Any]] = {
    "nats_url": _parse_nats_url,
    "node_id": _parse_node_id,
    "data_dir": _parse_data_dir,
    "subject_prefix": _parse_subject_prefix,
    "inbox_prefix": _parse_subject,
    "labels": _parse_labels,
    **{name: _resource(dim) for name, dim in _RESOURCE_FIELDS.items()},
    "default_job_cpu": _resource("cpu"),
    "default_job_memory": _resource("memory"),
    "engines": _wire_names(Engine, "engine"),
    "publishers": _wire_names(Publisher, "publisher"),
    "storage_sources": _wire_names(StorageSource, "storage source"),
    "job_selection_data_locality": _enum("local", "anywhere"),
    "job_selection_probe_http": _parse_url,
    "publisher_local_base_url": _parse_url,
    "otlp_endpoint": _parse_url,
    "publisher_local_listen": _parse_listen,
    "metrics_listen": _parse_listen,
    "url_input_allow_cidr": _parse_cidrs,
    "url_input_max_bytes": _parse_size,
    "max_output_bytes": _parse_size,
    "http_allowlist_proxy": _parse_url,
    "s3_endpoint": _parse_url,
    "language_uid_range": _parse_uid_range,
    "max_request_bytes": _parse_size,
    "callbacks": _enum("jetstream", "core"),
    "create_callback_stream": _parse_optional_bool,
    "log_format": _enum("text", "json"),
    "log_level": _enum("debug", "info", "warning", "error"),
    "sync": _enum("normal", "full"),
    **{
        name: _parse_file
        for name in (
            "creds",
            "nkey_seed",
            "password_file",
            "token_file",
            "tls_ca",
            "tls_cert",
            "tls_key",
            "price_list",
        )
    },
}
_BY_TYPE: dict[object, Callable[[Any], Any]] = {
    float: _parse_duration,  # every float field is a duration in seconds
    int: _parse_int,
    bool: parse_bool,
    str: _parse_str,
    list[str]: _parse_list,
}
_MIN: dict[str, float] = {
    "max_pending_bids_per_requester": 1,
    "outbox_max_attempts": 1,
    "max_request_bytes": 1,
    "url_input_max_bytes": 1,
    "max_output_bytes": 1,
}
_POSITIVE_DURATIONS = frozenset(
    {
        "job_timeout_default",
        "job_timeout_max",
        "bid_ttl",
        "queue_timeout",
        "verification_ttl",
        "probe_timeout",
        "connect_timeout",
        "nodeinfo_interval",
    }
)
_TYPES = typing.get_type_hints(Config)


def _parser(name: str) -> Callable[[Any], Any]:
    return _PARSERS.get(name) or _BY_TYPE[_TYPES[name]]


def parse_value(name: str, raw: Any) -> Any:
    """The typed value of field ``name`` from a flag/env string or a TOML value.

    Raises ValueError with a message showing the bad value."""
    value = _parser(name)(raw)
    if name in _MIN and value < _MIN[name]:
        raise ValueError(f"must be at least {_MIN[name]:g}, got {raw!r}")
    if name in _POSITIVE_DURATIONS and value <= 0:
        raise ValueError(f"must be longer than 0s, got {raw!r}")
    return value


def describe_default(name: str) -> str:
    """The default of a field as an operator would type it (``15s``, ``256Ki``, ``a,b``)."""
    default = getattr(DEFAULTS, name)
    if isinstance(default, bool):
        return str(default).lower()
    if isinstance(default, float):
        return durations.format(default)
    if name == "max_request_bytes":
        return "256Ki" if default == 256 * 1024 else str(default)
    if isinstance(default, list):
        return ",".join(default)
    if isinstance(default, dict):
        return ",".join(f"{k}={v}" for k, v in default.items())
    if isinstance(default, Path) and not default.is_absolute():
        return f"./{default}"
    return "" if default is None else str(default)


DEFAULTS = Config()
