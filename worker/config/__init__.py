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

The package is split by concern: :mod:`~worker.config.model` (the struct and the names of
its flags and variables), :mod:`~worker.config.parsing` (one parser per value type) and
:mod:`~worker.config.sources` (the layers and their precedence).
"""

from __future__ import annotations

from worker.config.model import (
    ENV_PREFIX,
    FIELDS,
    FLAG_FIELDS,
    ID_RE,
    SECRETS,
    Config,
    ConfigError,
    env_name,
    flag_name,
)
from worker.config.parsing import DEFAULTS, describe_default, parse_bool, parse_value
from worker.config.sources import load_config, load_config_with_origins

__all__ = [
    "DEFAULTS",
    "ENV_PREFIX",
    "FIELDS",
    "FLAG_FIELDS",
    "ID_RE",
    "SECRETS",
    "Config",
    "ConfigError",
    "describe_default",
    "env_name",
    "flag_name",
    "load_config",
    "load_config_with_origins",
    "parse_bool",
    "parse_value",
]
