"""The layers a Config is read from (flags > environment > TOML file > defaults), and
where each value came from."""

from __future__ import annotations

import difflib
import tomllib
from collections.abc import Mapping
from typing import Any

from worker.config.model import (
    FLAG_FIELDS,
    SECRETS,
    Config,
    ConfigError,
    env_name,
    flag_name,
)
from worker.config.parsing import DEFAULTS, parse_value


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
    return load_config_with_origins(flags, env)[0]


def load_config_with_origins(
    flags: Mapping[str, Any], env: Mapping[str, str]
) -> tuple[Config, dict[str, str]]:
    """:func:`load_config`, and where each field's value came from: ``--bid-ttl``,
    ``WORKER_BID_TTL``, ``<file>: bid-ttl`` or ``default`` (for the secrets:
    ``WORKER_PASSWORD``, ``--password-file`` or ``default``)."""
    layers = [_from_flags(flags), _from_env(env)]
    path_raw = next((s.values["config"] for s in layers if "config" in s.values), None)
    config_path = ""
    origins: dict[str, str] = {"config": "default"}
    if path_raw is not None:
        config_path = _parse_field("config", *path_raw)
        origins["config"] = path_raw[1]
        if config_path:
            layers.append(_from_toml(config_path))
    values: dict[str, Any] = {"config": config_path}
    for name in FLAG_FIELDS:
        if name == "config":
            continue
        found = next((s.values[name] for s in layers if name in s.values), None)
        if found is not None:
            values[name] = _parse_field(name, *found)
            origins[name] = found[1]
        else:
            values[name] = getattr(DEFAULTS, name)
            origins[name] = "default"
    for secret in sorted(SECRETS):
        file_field = f"{secret}_file"
        values[secret] = _read_secret(secret, env, values[file_field])
        origins[secret] = (
            "default"
            if not values[secret]
            else env_name(secret)
            if env.get(env_name(secret))
            else f"--{flag_name(file_field)}"
        )
    _check_combinations(values)
    return Config(**values), origins


def _parse_field(name: str, raw: Any, where: str) -> Any:
    try:
        return parse_value(name, raw)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
