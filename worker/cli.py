"""The ``worker`` command: ``serve``, ``version`` and the client commands.

No logic lives here. ``serve`` takes one flag per :class:`worker.config.Config` field (the
flags are generated from the Config fields, so a new field cannot lack its flag), hands
the flags actually given to :func:`worker.config.load_config` (environment and TOML fill in
the rest) and runs :func:`worker.node.serve`, whose return value is the exit code.

The client commands live in ``worker/cli_*.py``: ``submit`` (:mod:`worker.cli_submit`),
``executions ls|show|logs|cancel|accept|reject`` (:mod:`worker.cli_executions`), ``nodes
ls`` and ``node info`` (:mod:`worker.cli_nodes`), ``config show`` (:mod:`worker.cli_config`,
with the flags of ``serve``) and ``devstack`` (:mod:`worker.cli_devstack`). They import
the NATS client and the requester only when they run, so ``worker --help`` stays fast.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import os
import sys
import typing
from collections.abc import Callable, Coroutine
from importlib.metadata import PackageNotFoundError, version
from typing import Any, NoReturn

import typer

from worker import cli_config, cli_devstack, cli_executions, cli_nodes, cli_submit
from worker.config import (
    FLAG_FIELDS,
    Config,
    ConfigError,
    describe_default,
    env_name,
    flag_name,
    load_config,
)

_BROKER = "Broker and identity"
_CAPACITY = "Capacity"
_TIMEOUTS = "Timeouts"
_SELECTION = "Job selection"
_CALLBACKS = "Callbacks"
_AUTH = "NATS authentication and TLS"
_IO = "Inputs and outputs"
_OPS = "Pricing, observability, durability"

_DIMENSION_HELP = {
    "cpu": ("CPU", "cores, e.g. 2, 1.5 or 500m"),
    "memory": ("SIZE", "bytes, e.g. 8Gi or 512Mi"),
    "disk": ("SIZE", "bytes, e.g. 100Gi"),
    "gpu": ("N", "whole GPUs"),
}
_SCOPE_HELP = {
    "total": "Total {what} the node runs at once, in {unit}. Unset: 80% of the host's.",
    "job": "Most {what} one job may ask for, in {unit}. Unset: the total.",
    "queue": "{What} the queue may hold on top of the running jobs, in {unit}. Unset: the total.",
}


def _limit_help() -> dict[str, tuple[str, str, str]]:
    out = {}
    for scope, text in _SCOPE_HELP.items():
        for dim, (metavar, unit) in _DIMENSION_HELP.items():
            what = "CPU" if dim == "cpu" else dim if dim != "gpu" else "GPUs"
            help_text = text.format(what=what, What=what[0].upper() + what[1:], unit=unit)
            if (scope, dim) == ("total", "gpu"):
                help_text = help_text.replace("80% of the host's", "the host's GPUs")
            out[f"limit_{scope}_{dim}"] = (_CAPACITY, metavar, help_text)
    return out


# field → (help panel, metavar, help text). Defaults are appended from Config itself.
HELP: dict[str, tuple[str, str, str]] = {
    "nats_url": (
        _BROKER,
        "URL",
        "NATS server(s), comma-separated. Unset: start an embedded nats-server (JetStream, "
        "loopback, port persisted in the data dir) and print NATS_URL=… first.",
    ),
    "node_id": (
        _BROKER,
        "ID",
        "This node's ID ([A-Za-z0-9][A-Za-z0-9_-]{0,127}). Unset: the one persisted in the "
        "data dir, else a generated n-<uuid4>.",
    ),
    "data_dir": (_BROKER, "DIR", "Where the node keeps its state, results and broker."),
    "config": (_BROKER, "FILE", "TOML file; keys are the flag names without --."),
    "subject_prefix": (_BROKER, "PREFIX", "Subject prefix: several markets can share a broker."),
    "labels": (_BROKER, "K=V", "Labels advertised in NodeInfo; comma-separated, repeatable."),
    **_limit_help(),
    "default_job_cpu": (_CAPACITY, "CPU", "CPU for a job that asks for none."),
    "default_job_memory": (_CAPACITY, "SIZE", "Memory for a job that asks for none."),
    "job_timeout_default": (_TIMEOUTS, "DURATION", "Run timeout of a job that sets none."),
    "job_timeout_min": (_TIMEOUTS, "DURATION", "Jobs with a shorter timeout are declined."),
    "job_timeout_max": (_TIMEOUTS, "DURATION", "Jobs with a longer timeout are declined."),
    "timeout_bypass_client": (
        _TIMEOUTS,
        "ID",
        "Client allowed to exceed --job-timeout-max; repeatable or comma-separated.",
    ),
    "bid_ttl": (_TIMEOUTS, "DURATION", "How long a bid waits for BidAccepted/BidRejected."),
    "queue_timeout": (_TIMEOUTS, "DURATION", "Longest wait from BidAccepted to the run's start."),
    "verification_ttl": (
        _TIMEOUTS,
        "DURATION",
        "How long a result waits for ResultAccepted/ResultRejected.",
    ),
    "shutdown_grace": (
        _TIMEOUTS,
        "DURATION",
        "On SIGTERM/SIGINT, how long running jobs may finish before they fail.",
    ),
    "retention": (_TIMEOUTS, "DURATION", "How long finished executions and results are kept."),
    "engines": (
        _SELECTION,
        "LIST",
        "Engines to offer (noop, wasm, language, docker). Unset: every one usable here.",
    ),
    "publishers": (
        _SELECTION,
        "LIST",
        "Publishers to offer (noop, local, s3, objectstore, …). Unset: every one usable here.",
    ),
    "storage_sources": (
        _SELECTION,
        "LIST",
        "Input sources to offer (inline, urldownload, localdirectory, s3, …). "
        "Unset: every one usable here.",
    ),
    "job_selection_accept_networked": (_SELECTION, "", "Bid on jobs that need networking."),
    "job_selection_reject_stateless": (_SELECTION, "", "Decline jobs without inputs."),
    "job_selection_data_locality": (
        _SELECTION,
        "local|anywhere",
        "local: bid only when every input is on this node.",
    ),
    "job_selection_probe_exec": (
        _SELECTION,
        "CMD",
        "Command run per ask with the job on stdin; non-zero exit declines.",
    ),
    "job_selection_probe_http": (
        _SELECTION,
        "URL",
        'URL POSTed per ask; a status ≥ 400 or {"shouldBid": false} declines.',
    ),
    "probe_timeout": (_SELECTION, "DURATION", "A probe taking longer declines."),
    "max_pending_bids_per_requester": (
        _SELECTION,
        "N",
        "Open bids one requester may hold before its asks are declined.",
    ),
    "fanout_silent_declines": (_SELECTION, "", "Answer asks on _all only with bids."),
    "max_request_bytes": (_SELECTION, "SIZE", "Larger request bodies are refused (400)."),
    "callbacks": (
        _CALLBACKS,
        "jetstream|core",
        "jetstream: at least once through a stream; core: at most once.",
    ),
    "create_callback_stream": (
        _CALLBACKS,
        "",
        "Create the callback stream if missing. Default: on with the embedded broker only.",
    ),
    "outbox_max_attempts": (_CALLBACKS, "N", "Failed sends before a callback is parked."),
    "creds": (_AUTH, "FILE", "NATS credentials file (JWT + nkey)."),
    "nkey_seed": (_AUTH, "FILE", "NKey seed file."),
    "user": (
        _AUTH,
        "USER",
        "NATS user; the password comes from WORKER_PASSWORD or --password-file.",
    ),
    "password_file": (_AUTH, "FILE", "File holding the password for --user."),
    "token_file": (_AUTH, "FILE", "File holding a NATS token (or set WORKER_TOKEN)."),
    "tls_ca": (_AUTH, "FILE", "CA bundle to verify the server."),
    "tls_cert": (_AUTH, "FILE", "Client certificate (with --tls-key)."),
    "tls_key": (_AUTH, "FILE", "Client key (with --tls-cert)."),
    "inbox_prefix": (_AUTH, "PREFIX", "Inbox prefix for replies. Unset: _INBOX_<node id>."),
    "connect_timeout": (
        _AUTH,
        "DURATION",
        "Exit 6 if the broker is not reachable within this time at start.",
    ),
    "publisher_local_listen": (_IO, "ADDR", "host:port the Local publisher serves results on."),
    "publisher_local_base_url": (
        _IO,
        "URL",
        "Base URL advertised for Local results. Unset: the listen address.",
    ),
    "url_input_allow_cidr": (
        _IO,
        "CIDR",
        "Networks URL inputs may come from; repeatable or comma-separated.",
    ),
    "url_input_max_bytes": (_IO, "SIZE", "Largest URL input downloaded, e.g. 1Gi."),
    "local_input_roots": (
        _IO,
        "DIR",
        "Folders LocalDirectory inputs may come from; repeatable. Unset: none allowed.",
    ),
    "max_output_bytes": (_IO, "SIZE", "Cap of each of a job's stdout and stderr files."),
    "http_allowlist_proxy": (
        _IO,
        "URL",
        "Proxy enforcing Network.Domains; jobs with Network HTTP are declined without it.",
    ),
    "docker_host": (_IO, "URL", "Docker Engine API address. Unset: DOCKER_HOST or the socket."),
    "language_uid_range": (
        _IO,
        "FIRST-LAST",
        "Unprivileged uids for Language jobs, one per running execution.",
    ),
    "s3_endpoint": (_IO, "URL", "Default S3 endpoint for S3 inputs and the S3 publisher."),
    "secret_env_patterns": (
        _OPS,
        "WORD",
        "Job env names containing one of these (any case) are secret and masked; repeatable.",
    ),
    "price_list": (_OPS, "FILE", "TOML price list (fee, cpu_second, …, currency)."),
    "metrics_listen": (_OPS, "ADDR", "host:port of a metrics endpoint. Unset: none."),
    "otlp_endpoint": (_OPS, "URL", "OTLP/HTTP collector for traces. Unset: none."),
    "log_format": (_OPS, "text|json", "Log format (logs go to stderr)."),
    "log_level": (_OPS, "debug|info|warning|error", "Log level."),
    "sync": (
        _OPS,
        "normal|full",
        "normal: commits survive a node crash; full: also an OS crash or power loss.",
    ),
    "skip_starvation_limit": (
        _OPS,
        "DURATION",
        "A queued job skipped this long can no longer be overtaken by smaller ones.",
    ),
    "nodeinfo_interval": (_OPS, "DURATION", "How often NodeInfo is published."),
}

_TYPES = typing.get_type_hints(Config)


def _option(field: str) -> inspect.Parameter:
    panel, metavar, text = HELP[field]
    default = describe_default(field)
    if default:
        text = f"{text} (default: {default})"
    kind = _TYPES[field]
    decls = [f"--{flag_name(field)}"]
    annotation: Any = str | None
    if kind in (bool, bool | None):
        decls = [f"--{flag_name(field)}/--no-{flag_name(field)}"]
        annotation = bool | None
    elif kind in (list[str], dict[str, str]):
        annotation = list[str] | None
    option = typer.Option(
        None,
        *decls,
        help=text,
        metavar=metavar or None,
        rich_help_panel=panel,
        show_default=False,
    )
    return inspect.Parameter(
        field, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation
    )


def _fail(message: str, code: int) -> NoReturn:
    typer.echo(f"worker: error: {message}", err=True)
    raise typer.Exit(code)


def _serve(**given: Any) -> None:
    flags = {name: value for name, value in given.items() if value is not None}
    try:
        config = load_config(flags, os.environ)
    except ConfigError as exc:
        _fail(str(exc), exc.exit_code)
    # Imported here so that `worker --help` and config errors stay fast and independent of
    # the node's dependencies (and importlib keeps this module checkable on its own).
    node = importlib.import_module("worker.node")
    serve: Callable[[Config], Coroutine[Any, Any, int]] = node.serve
    sys.exit(asyncio.run(serve(config)))


_serve.__signature__ = inspect.Signature([_option(f) for f in FLAG_FIELDS])  # type: ignore[attr-defined]
_serve.__annotations__ = {}  # typer takes the types from the signature above
_serve.__doc__ = f"""Run a compute node until SIGTERM/SIGINT (drain, then exit 0).

Every flag can also be set as an environment variable ({env_name("bid_ttl")} for
--bid-ttl; lists comma-separated, booleans true/false) or as a key in the --config TOML
file (bid-ttl = "15s"). Flags beat the environment, which beats the file. Durations use
Go syntax (500ms, 30s, 1h30m). Secrets never come from argv: the NATS password is read
from WORKER_PASSWORD or --password-file, a token from WORKER_TOKEN or --token-file.

Exit codes: 0 drained, 2 usage, 3 data dir locked, 4 node ID mismatch, 5 node ID in use,
6 broker unreachable, 7 callback stream missing.
"""

app = typer.Typer(
    name="worker",
    help="A compute node for an open job marketplace over NATS.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,  # plain click help: rich truncates long flag names
    pretty_exceptions_enable=False,  # rich tracebacks would print locals, secrets included
)
app.command("serve")(_serve)


def _version() -> str:
    try:
        return version("worker")
    except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "0.0.0+unknown"


@app.command("version")
def version_command(
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of text."),
) -> None:
    """Print the version of the node and of its wire protocol."""
    if json_out:
        typer.echo(json.dumps({"Version": _version(), "ProtocolVersions": ["v1"]}))
        return
    typer.echo(f"worker {_version()} (protocol v1)")


app.command("submit")(cli_submit.submit)
app.add_typer(cli_executions.app, name="executions")
app.add_typer(cli_nodes.nodes_app, name="nodes")
app.add_typer(cli_nodes.node_app, name="node")
app.add_typer(cli_config.make_app(_option, FLAG_FIELDS), name="config")
app.command("devstack")(cli_devstack.devstack)


def main() -> None:
    """Entry point of the ``worker`` script."""
    app(prog_name="worker")
