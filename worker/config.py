"""The node's configuration: one frozen Struct, loaded from flags > env > TOML > defaults.

Every flag of PROTOCOL.md §10 is a field named after the flag (``--bid-ttl`` → ``bid_ttl``).
The same setting reads ``WORKER_BID_TTL`` from the environment and ``bid-ttl`` from the
TOML file named by ``--config``. Values are parsed once, here, so the rest of the node gets
typed data: durations are float seconds (written in Go syntax, ``"1m30s"``), byte sizes are
ints (``"256Ki"``), lists are lists (comma-separated in flags and env, arrays in TOML).
Resource amounts stay strings (``""`` = unset) because the capacity module turns them into
numbers together with the host's totals; they are still checked here, so a typo is a usage
error (exit 2) and not a surprise at the first bid.

Secrets never come from argv or the TOML file: the NATS password comes from
``WORKER_PASSWORD`` or ``--password-file``, the token from ``WORKER_TOKEN`` or
``--token-file``.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import tomllib
import typing
from collections.abc import Callable, Iterator, Mapping
from decimal import Decimal
from enum import StrEnum
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import msgspec

from schemas.job import Engine, Publisher, StorageSource
from worker import durations
from worker.capacity.parse import ResourceParseError, parse_bytes, parse_cpu, parse_gpu

ID_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
"""Node and requester IDs (PROTOCOL.md §1); use with ``fullmatch`` (no trailing newline)."""

ENV_PREFIX: Final = "WORKER_"


class ConfigError(ValueError):
    """A flag, environment variable or TOML key with a bad value; the CLI exits 2."""

    exit_code = 2


class Config(msgspec.Struct, frozen=True, kw_only=True):
    """Everything a node is told at start. Field = flag name with ``_`` for ``-``."""

    # Broker, identity, files.
    nats_url: str = ""  # "" = start an embedded nats-server (worker.embedded)
    node_id: str = ""  # "" = the persisted one, else a generated n-<uuid4>
    data_dir: Path = Path("./data")
    config: str = ""  # the TOML file the other values were read from, if any
    subject_prefix: str = "market"
    labels: dict[str, str] = msgspec.field(default_factory=dict)

    # Capacity: resource strings as in job specs; "" = unset (see PROTOCOL.md §9 for the
    # defaults: total = 80 % of the host, queue = total, job limit = total).
    limit_total_cpu: str = ""
    limit_total_memory: str = ""
    limit_total_disk: str = ""
    limit_total_gpu: str = ""
    limit_job_cpu: str = ""
    limit_job_memory: str = ""
    limit_job_disk: str = ""
    limit_job_gpu: str = ""
    limit_queue_cpu: str = ""
    limit_queue_memory: str = ""
    limit_queue_disk: str = ""
    limit_queue_gpu: str = ""
    default_job_cpu: str = "0.1"
    default_job_memory: str = "100Mi"

    # Timeouts and lifetimes, in seconds.
    job_timeout_default: float = 600.0
    job_timeout_min: float = 0.5
    job_timeout_max: float = 3600.0
    timeout_bypass_client: list[str] = msgspec.field(default_factory=list)
    bid_ttl: float = 15.0
    queue_timeout: float = 600.0
    verification_ttl: float = 3600.0
    shutdown_grace: float = 30.0
    retention: float = 86400.0

    # What the node offers: canonical wire spellings (Engine/Publisher/StorageSource
    # values); empty = everything that can work on this host.
    engines: list[str] = msgspec.field(default_factory=list)
    publishers: list[str] = msgspec.field(default_factory=list)
    storage_sources: list[str] = msgspec.field(default_factory=list)

    # Job selection (PROTOCOL.md §9).
    job_selection_accept_networked: bool = False
    job_selection_reject_stateless: bool = False
    # "anywhere" by default: Bacalhau's CLI sets Locality=Anywhere even for its default
    # "local" (serve.go getJobSelectionConfig), so real v0.3.25 nodes never declined for
    # locality; only programmatic configs got Local.
    job_selection_data_locality: str = "anywhere"
    job_selection_probe_exec: str = ""
    job_selection_probe_http: str = ""
    probe_timeout: float = 2.0
    max_pending_bids_per_requester: int = 256
    fanout_silent_declines: bool = False
    max_request_bytes: int = 256 * 1024

    # Callbacks (PROTOCOL.md §6).
    callbacks: str = "jetstream"
    # None = the default: create the stream with the embedded broker, never otherwise.
    create_callback_stream: bool | None = None
    outbox_max_attempts: int = 20

    # NATS authentication and TLS (at most one of creds, nkey_seed, user, token).
    creds: str = ""
    nkey_seed: str = ""
    user: str = ""
    password: str = ""  # from WORKER_PASSWORD or password_file only
    password_file: str = ""
    token: str = ""  # from WORKER_TOKEN or token_file only
    token_file: str = ""
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    inbox_prefix: str = ""  # "" = _INBOX_<node id>
    connect_timeout: float = 10.0

    # Inputs and outputs.
    publisher_local_listen: str = "127.0.0.1:0"
    publisher_local_base_url: str = ""  # "" = the address the Local publisher listens on
    url_input_allow_cidr: list[str] = msgspec.field(default_factory=list)
    url_input_max_bytes: int = 1 << 30
    local_input_roots: list[str] = msgspec.field(default_factory=list)  # LocalDirectory roots
    max_output_bytes: int = 1 << 30  # cap of each of stdout and stderr
    http_allowlist_proxy: str = ""  # Network.Type HTTP is declined unless this is set
    docker_host: str = ""  # "" = DOCKER_HOST or unix:///var/run/docker.sock
    language_uid_range: str = "200000-265535"  # one uid per Language execution
    s3_endpoint: str = ""  # default endpoint of S3 inputs/publishers ("" = AWS)

    # Pricing, observability, durability.
    price_list: str = ""
    metrics_listen: str = ""  # "" = no metrics endpoint
    otlp_endpoint: str = ""  # "" = no trace export
    log_format: str = "text"
    log_level: str = "info"
    sync: str = "normal"

    # Knobs beyond §10.
    # A queued job skipped this long (smaller jobs overtook it) can no longer be overtaken:
    # the buffer waits for it to fit. Bacalhau's single-pass queue let big jobs starve.
    skip_starvation_limit: float = 30.0
    nodeinfo_interval: float = 30.0

    def __repr__(self) -> str:
        return f"Config({', '.join(f'{k}={v!r}' for k, v in self._shown())})"

    def __rich_repr__(self) -> list[tuple[str, Any]]:
        return list(self._shown())

    def _shown(self) -> Iterator[tuple[str, Any]]:
        for name in self.__struct_fields__:
            value = getattr(self, name)
            yield name, ("***" if name in SECRETS and value else value)


SECRETS: Final = frozenset({"password", "token"})
"""Fields read only from ``WORKER_<NAME>`` or ``<name>-file``."""

FIELDS: Final[tuple[str, ...]] = Config.__struct_fields__
FLAG_FIELDS: Final[tuple[str, ...]] = tuple(f for f in FIELDS if f not in SECRETS)
"""Fields that have a flag, an environment variable and a TOML key."""


def flag_name(field: str) -> str:
    """``bid_ttl`` → ``bid-ttl`` (the flag without ``--`` and the TOML key)."""
    return field.replace("_", "-")


def env_name(field: str) -> str:
    """``bid_ttl`` → ``WORKER_BID_TTL``."""
    return ENV_PREFIX + field.upper()


# ---------------------------------------------------------------------------------------
# Value parsers: each takes a flag/env string or a TOML value, returns the typed value or
# raises ValueError with a message that shows the bad value.


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
    default = getattr(_DEFAULTS, name)
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


_DEFAULTS = Config()


# ---------------------------------------------------------------------------------------
# Sources.


class _Source:
    """One layer (flags, env or the TOML file): field → (raw value, where it came from)."""

    def __init__(self) -> None:
        self.values: dict[str, tuple[Any, str]] = {}

    def set(self, name: str, raw: Any, where: str) -> None:
        self.values[name] = (raw, where)


def _secret_refusal(name: str) -> str:
    return (
        f"{name} is a secret and is never read from argv or the config file: "
        f"set {env_name(name)} or {flag_name(name)}-file"
    )


def _from_flags(flags: Mapping[str, Any]) -> _Source:
    source = _Source()
    for key, raw in flags.items():
        name = key.lstrip("-").replace("-", "_")
        if name in SECRETS:
            raise ConfigError(_secret_refusal(name))
        if name not in FLAG_FIELDS:
            raise ConfigError(f"unknown flag --{flag_name(name)}")
        if raw is not None:
            source.set(name, raw, f"--{flag_name(name)}")
    return source


def _from_env(env: Mapping[str, str]) -> _Source:
    """An empty variable counts as unset (``WORKER_X=${X:-}`` in compose files)."""
    source = _Source()
    for name in FLAG_FIELDS:
        key = env_name(name)
        if env.get(key):
            source.set(name, env[key], key)
    return source


def _from_toml(path: str) -> _Source:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    keys = [flag_name(f) for f in FLAG_FIELDS if f != "config"]
    source = _Source()
    for key, raw in data.items():
        name = key.replace("-", "_")
        if key in SECRETS:
            raise ConfigError(f"{path}: {_secret_refusal(name)}")
        if key not in keys:
            close = difflib.get_close_matches(key.replace("_", "-"), keys, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{path}: unknown key {key!r}{hint}")
        source.set(name, raw, f"{path}: {key}")
    return source


def _read_secret(name: str, env: Mapping[str, str], file_path: str) -> str:
    from_env = env.get(env_name(name), "")
    if from_env and file_path:
        raise ConfigError(f"both {env_name(name)} and --{flag_name(name)}-file are set: use one")
    if from_env or not file_path:
        return from_env
    try:
        with open(file_path, encoding="utf-8") as f:
            value = f.read().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read --{flag_name(name)}-file {file_path}: {exc}") from None
    if not value:
        raise ConfigError(f"--{flag_name(name)}-file {file_path} is empty")
    return value


def _check_combinations(values: dict[str, Any]) -> None:
    methods = [n for n in ("creds", "nkey_seed", "user", "token") if values[n]]
    if len(methods) > 1:
        shown = " and ".join(
            env_name(n) + "/--token-file" if n == "token" else f"--{flag_name(n)}" for n in methods
        )
        raise ConfigError(f"use one NATS authentication method, got {shown}")
    if values["password"] and not values["user"]:
        raise ConfigError("a password (WORKER_PASSWORD or --password-file) needs --user")
    if bool(values["tls_cert"]) != bool(values["tls_key"]):
        raise ConfigError("--tls-cert and --tls-key must be given together")


def load_config(flags: Mapping[str, Any], env: Mapping[str, str]) -> Config:
    """The node's Config: ``flags`` (field or flag names; None = not given) beat ``env``
    (``WORKER_<FLAG>``), which beats the TOML file named by ``config``, which beats the
    defaults. Raises ConfigError naming the flag, variable or key at fault."""
    layers = [_from_flags(flags), _from_env(env)]
    path_raw = next((s.values["config"] for s in layers if "config" in s.values), None)
    config_path = ""
    if path_raw is not None:
        config_path = _parse_field("config", *path_raw)
        if config_path:
            layers.append(_from_toml(config_path))
    values: dict[str, Any] = {"config": config_path}
    for name in FLAG_FIELDS:
        if name == "config":
            continue
        found = next((s.values[name] for s in layers if name in s.values), None)
        if found is not None:
            values[name] = _parse_field(name, *found)
        else:
            values[name] = getattr(_DEFAULTS, name)
    values["password"] = _read_secret("password", env, values["password_file"])
    values["token"] = _read_secret("token", env, values["token_file"])
    _check_combinations(values)
    return Config(**values)


def _parse_field(name: str, raw: Any, where: str) -> Any:
    try:
        return parse_value(name, raw)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
