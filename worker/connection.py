"""Connecting to NATS: auth options, a start-up deadline, reconnect forever.

Reconnect options also govern the first connect in nats-py, so the start-up is bounded
by ``connect_timeout`` from outside (PROTOCOL.md §10, exit 6). After that the client
reconnects forever, and a dead link is noticed by pings within seconds.
"""

from __future__ import annotations

import asyncio
import logging
import math
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from nats.aio.client import Client

from worker.config import Config

log = logging.getLogger(__name__)

PING_INTERVAL = 4  # seconds; with 2 outstanding pings a dead link is noticed in ~8-12 s


class BrokerUnreachable(Exception):
    """The broker did not accept a connection within the start-up deadline."""


def auth_options(config: Config) -> dict[str, Any]:
    """nats-py connect options for the configured credentials and TLS."""
    options: dict[str, Any] = {}
    if config.creds:
        options["user_credentials"] = config.creds
    if config.nkey_seed:
        options["nkeys_seed"] = config.nkey_seed
    if config.user:
        options["user"] = config.user
        options["password"] = config.password
    if config.token:
        options["token"] = config.token
    elif config.token_file:
        options["token"] = Path(config.token_file).read_text().strip()
    if config.tls_ca or config.tls_cert:
        context = ssl.create_default_context(cafile=config.tls_ca or None)
        if config.tls_cert:
            context.load_cert_chain(config.tls_cert, config.tls_key or None)
        options["tls"] = context
    return options


async def connect(
    config: Config,
    *,
    url: str,
    name: str,
    inbox_prefix: str,
    on_reconnect: Callable[[], Awaitable[None]],
) -> Client:
    """Connect within ``config.connect_timeout`` or raise ``BrokerUnreachable``."""
    nc = Client()

    last_error: list[Exception] = []

    async def error_cb(exc: Exception) -> None:
        last_error[:] = [exc]
        log.warning("nats: %r", exc)

    async def disconnected_cb() -> None:
        if nc.is_closed or nc.is_draining:
            return
        log.warning("disconnected from the broker; reconnecting")

    async def reconnected_cb() -> None:
        log.info("reconnected to %s", nc.connected_url.netloc if nc.connected_url else "?")
        await on_reconnect()

    options: dict[str, Any] = {
        "servers": [u.strip() for u in url.split(",") if u.strip()],
        "name": name,
        "inbox_prefix": inbox_prefix,
        "max_reconnect_attempts": -1,  # forever; the start-up is bounded by wait_for
        "reconnect_time_wait": 0.5,
        "connect_timeout": 2,
        "ping_interval": PING_INTERVAL,
        "max_outstanding_pings": 2,
        "pending_size": 32 * 1024 * 1024,
        "drain_timeout": 10,
        "error_cb": error_cb,
        "disconnected_cb": disconnected_cb,
        "reconnected_cb": reconnected_cb,
        **auth_options(config),
    }
    try:
        await asyncio.wait_for(nc.connect(**options), timeout=config.connect_timeout)
    except (TimeoutError, OSError, Exception) as exc:
        try:
            await nc.close()
        except Exception as close_exc:
            log.debug("close after failed connect: %r", close_exc)
        raise BrokerUnreachable(
            f"broker {url} unreachable within {config.connect_timeout:g}s: "
            f"{last_error[0] if last_error else exc!r}"
        ) from exc
    return nc


async def flush_subscriptions(nc: Client, timeout: float) -> None:
    """Return once the server has processed every SUB sent so far on ``nc``.

    nats-py writes a flush's PING straight to the socket, ahead of commands still queued
    for its flusher task (a fresh SUB among them), so one PONG does not prove the server
    has the subscription. The second PING is written after the first PONG, by which time
    the flusher has sent the queue: its PONG does.
    """
    for _ in range(2):
        await nc.flush(timeout=max(1, math.ceil(timeout)))
