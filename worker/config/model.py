"""The Config struct, its field names and how they map to flags and variables."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import msgspec

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
    # A job's environment variable whose name contains one of these (any case) is secret:
    # its value is masked in every message the node logs, stores or sends.
    secret_env_patterns: list[str] = msgspec.field(
        default_factory=lambda: ["TOKEN", "SECRET", "PASSWORD", "KEY"]
    )

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
