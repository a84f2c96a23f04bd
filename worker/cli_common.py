"""What every client command shares: the connection options, output and errors.

A client command is a plain function with a keyword-only ``client: ClientOptions``
parameter; :func:`client_command` replaces that parameter with the connection options
(``--nats-url``, ``--subject-prefix``, ``--requester-id``, authentication, TLS, timeouts,
``--json``) so every command spells and documents them the same way. The authentication
options are checked as ``worker serve`` checks them (:func:`worker.config.load_config`):
secrets come only from ``WORKER_PASSWORD`` or ``--password-file`` and ``WORKER_TOKEN`` or
``--token-file``.

Output: tables and results go to stdout, progress and errors to stderr; with ``--json``
stdout carries only JSON. An error is one line, ``worker: error: <message>``, and an exit
code from :data:`EXIT_CODES`.
"""

from __future__ import annotations

import asyncio
import functools
import getpass
import inspect
import os
import re
import sys
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Final, NoReturn

import typer
from rich.console import Console

from worker import durations
from worker.config import ID_RE, Config, ConfigError, load_config

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
EXIT_NO_BID: Final = 3
EXIT_CANCELLED: Final = 4
EXIT_BROKER: Final = 6
EXIT_INTERRUPTED: Final = 130
EXIT_CODES: Final = (
    "Exit codes: 0 success, 1 failure (the job failed, a node refused the request, no "
    "reply), 2 usage (bad flag or job spec), 3 no bid, 4 cancelled, 6 broker unreachable, "
    "130 interrupted (Ctrl-C)."
)

PANEL: Final = "Connection"
DEFAULT_URL: Final = "nats://127.0.0.1:4222"
_AUTH_ENV: Final = ("WORKER_PASSWORD", "WORKER_TOKEN")


def default_requester_id() -> str:
    """``cli-<user>`` with the user name cut down to ID characters (PROTOCOL.md §1)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry for this uid (containers)
        user = str(os.getuid())
    user = re.sub(r"[^A-Za-z0-9_-]", "-", user).strip("-_") or "user"
    return f"cli-{user}"[:128]


@dataclass(frozen=True)
class ClientOptions:
    """The connection and output options of a client command, checked."""

    nats_url: str
    prefix: str
    requester_id: str
    timeout: float
    discover_timeout: float
    json: bool
    config: Config  # authentication, TLS and the connect timeout, parsed as for serve

    @property
    def inbox_prefix(self) -> str:
        return f"_INBOX_{self.requester_id}"


def _opt(default: Any, decl: str, help_text: str, metavar: str = "", env: str = "") -> Any:
    return typer.Option(
        default,
        decl,
        help=help_text,
        metavar=metavar or None,
        envvar=env or None,
        rich_help_panel=PANEL,
        show_default=False,
    )


# name → (annotation, typer.Option); the order is the order in --help.
_OPTIONS: Final[dict[str, tuple[Any, Any]]] = {
    "nats_url": (
        str,
        _opt(
            DEFAULT_URL,
            "--nats-url",
            f"NATS server(s), comma-separated (default: {DEFAULT_URL}).",
            "URL",
            "WORKER_NATS_URL",
        ),
    ),
    "subject_prefix": (
        str,
        _opt(
            "market",
            "--subject-prefix",
            "Subject prefix of the market (default: market).",
            "PREFIX",
            "WORKER_SUBJECT_PREFIX",
        ),
    ),
    "requester_id": (
        str,
        _opt(
            "",
            "--requester-id",
            "Requester ID this client acts as (default: cli-<user>).",
            "ID",
            "WORKER_REQUESTER_ID",
        ),
    ),
    "creds": (str, _opt("", "--creds", "NATS credentials file (JWT + nkey).", "FILE")),
    "nkey_seed": (str, _opt("", "--nkey-seed", "NKey seed file.", "FILE")),
    "user": (
        str,
        _opt("", "--user", "NATS user; password from WORKER_PASSWORD or --password-file.", "USER"),
    ),
    "password_file": (str, _opt("", "--password-file", "File holding the password.", "FILE")),
    "token_file": (
        str,
        _opt("", "--token-file", "File holding a NATS token (or set WORKER_TOKEN).", "FILE"),
    ),
    "tls_ca": (str, _opt("", "--tls-ca", "CA bundle to verify the server.", "FILE")),
    "tls_cert": (str, _opt("", "--tls-cert", "Client certificate (with --tls-key).", "FILE")),
    "tls_key": (str, _opt("", "--tls-key", "Client key (with --tls-cert).", "FILE")),
    "connect_timeout": (
        str,
        _opt("5s", "--connect-timeout", "Give up connecting after this (default: 5s).", "DURATION"),
    ),
    "request_timeout": (
        str,
        _opt("5s", "--request-timeout", "Wait this long for each reply (default: 5s).", "DURATION"),
    ),
    "discover_timeout": (
        str,
        _opt(
            "1s",
            "--discover-timeout",
            "Longest wait for nodes to answer discovery ($SRV.INFO; default: 1s).",
            "DURATION",
        ),
    ),
    "json": (
        bool,
        _opt(False, "--json", "Print JSON on stdout instead of tables (errors stay on stderr)."),
    ),
}
_AUTH_FIELDS: Final = (
    "creds",
    "nkey_seed",
    "user",
    "password_file",
    "token_file",
    "tls_ca",
    "tls_cert",
    "tls_key",
)


def _duration(flag: str, raw: str) -> float:
    try:
        seconds = durations.parse(raw)
    except ValueError as exc:
        fail(f"{flag}: {exc}", EXIT_USAGE)
    if seconds <= 0:
        fail(f"{flag}: must be longer than 0s, got {raw!r}", EXIT_USAGE)
    return seconds


def parse_client_options(given: dict[str, Any]) -> ClientOptions:
    """Check the connection options; a bad one exits 2 with a one-line message."""
    flags: dict[str, Any] = {f: given[f] for f in _AUTH_FIELDS if given[f]}
    flags["nats_url"] = given["nats_url"]
    flags["subject_prefix"] = given["subject_prefix"]
    flags["connect_timeout"] = given["connect_timeout"]
    env = {k: os.environ[k] for k in _AUTH_ENV if os.environ.get(k)}
    try:
        config = load_config(flags, env)
    except ConfigError as exc:
        fail(str(exc), EXIT_USAGE)
    if not config.nats_url:
        fail("--nats-url cannot be empty", EXIT_USAGE)
    requester = given["requester_id"] or default_requester_id()
    if ID_RE.fullmatch(requester) is None:
        fail(
            f"--requester-id: invalid requester ID {requester!r}: use 1-128 letters, digits, "
            "'_' or '-', starting with a letter or digit",
            EXIT_USAGE,
        )
    return ClientOptions(
        nats_url=config.nats_url,
        prefix=config.subject_prefix,
        requester_id=requester,
        timeout=_duration("--request-timeout", given["request_timeout"]),
        discover_timeout=_duration("--discover-timeout", given["discover_timeout"]),
        json=bool(given["json"]),
        config=config,
    )


def client_command(func: Callable[..., None]) -> Callable[..., None]:
    """Give ``func`` (which takes a keyword-only ``client: ClientOptions``) the connection
    options as flags, documented in its ``--help`` under "Connection"."""
    own = [
        p for p in inspect.signature(func, eval_str=True).parameters.values() if p.name != "client"
    ]

    @functools.wraps(func)
    def wrapper(**kwargs: Any) -> None:
        given = {name: kwargs.pop(name) for name in _OPTIONS}
        func(client=parse_client_options(given), **kwargs)

    extra = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind)
        for name, (kind, option) in _OPTIONS.items()
    ]
    wrapper.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own] + extra
    )
    wrapper.__annotations__ = {}
    del wrapper.__wrapped__  # typer must read the signature above, not func's
    return wrapper


# -- output ---------------------------------------------------------------------------------


def stdout_console() -> Console:
    """Tables on stdout; wide when not a terminal, so IDs are never cut in pipes."""
    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=max(console.width, 200))
    return console


def stderr_console() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


def print_json(data: Any) -> None:
    """One JSON document (Structs as builtins) on one line of stdout."""
    from schemas.codec import encode

    sys.stdout.write(encode(data).decode() + "\n")
    sys.stdout.flush()


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    """Print ``worker: error: <message>`` (one line) on stderr and exit with ``code``."""
    line = " ".join(str(message).split())
    typer.echo(f"worker: error: {line}", err=True)
    raise typer.Exit(code)


class CommandError(Exception):
    """Raised inside a command's coroutine: print the message, exit with ``code``."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


def run(main: Coroutine[Any, Any, int | None]) -> None:
    """Run a command's coroutine; map what it raises to one error line and an exit code."""
    from nats.errors import NoRespondersError
    from nats.errors import TimeoutError as NatsTimeout

    from worker.connection import BrokerUnreachable
    from worker.requester import PlacementError, RequestFailed

    try:
        code = asyncio.run(main)
    except KeyboardInterrupt:
        fail("interrupted", EXIT_INTERRUPTED)
    except CommandError as exc:
        fail(str(exc), exc.code)
    except BrokerUnreachable as exc:
        fail(str(exc), EXIT_BROKER)
    except RequestFailed as exc:
        fail(f"node {exc.node_id or '?'} answered {exc.code}: {exc.message}", EXIT_FAILED)
    except PlacementError as exc:
        fail(str(exc), EXIT_NO_BID)
    except NoRespondersError:
        fail("no node is listening on that subject (is the node up? is --node right?)")
    except (NatsTimeout, TimeoutError):
        fail("no reply in time (the node may be down or overloaded; see --request-timeout)")
    if code:
        raise typer.Exit(code)
