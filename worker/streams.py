"""The callback stream (PROTOCOL.md §6): checked at start, created only when asked."""

from __future__ import annotations

import asyncio
import logging

from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError, ServiceUnavailableError

from worker.transport.subjects import Subjects

log = logging.getLogger(__name__)

SEVEN_DAYS = 7 * 24 * 3600.0
DUPLICATE_WINDOW = 600.0


class CallbackStreamMissing(Exception):
    """No stream covers the callback subjects (exit 7)."""


def stream_config(subjects: Subjects) -> StreamConfig:
    """Exactly the configuration of PROTOCOL.md §6 (also shipped in deploy/)."""
    return StreamConfig(
        name=subjects.stream_name(),
        subjects=[subjects.callbacks_wildcard()],
        storage=StorageType.FILE,
        retention=RetentionPolicy.LIMITS,
        max_age=SEVEN_DAYS,
        duplicate_window=DUPLICATE_WINDOW,
        discard=DiscardPolicy.NEW,
        deny_delete=True,
    )


async def _lookup(nc: Client, subjects: Subjects, subject: str, wait: float) -> str | None:
    """The stream covering ``subject``; None when none does. Retries while JetStream does
    not answer (a cluster forming, an edge link down), up to ``wait`` seconds."""
    jsm = nc.jetstream(timeout=2)
    deadline = asyncio.get_running_loop().time() + wait
    while True:
        try:
            return str(await jsm.find_stream_name_by_subject(subject))
        except NotFoundError:
            return None
        except (ServiceUnavailableError, NoRespondersError, NatsTimeout, TimeoutError) as exc:
            if asyncio.get_running_loop().time() >= deadline:
                raise CallbackStreamMissing(
                    f"JetStream did not answer the lookup of the callback stream "
                    f"{subjects.stream_name()} for {subject!r} "
                    f"within {wait:g}s ({type(exc).__name__}): is JetStream reachable and "
                    "does this node's user have $JS.API.STREAM.NAMES?"
                ) from exc
            await asyncio.sleep(0.5)


async def ensure_callback_stream(
    nc: Client, subjects: Subjects, *, create: bool, wait: float = 10.0
) -> str:
    """The name of the stream covering this node's callbacks; created when ``create``."""
    jsm = nc.jetstream()
    probe = f"{subjects.prefix}.orchestrator.r.{subjects.node_id}.OnRunComplete/v1"
    found = await _lookup(nc, subjects, probe, wait)
    if found is not None:
        return found
    if not create:
        raise CallbackStreamMissing(
            f"no JetStream stream covers {subjects.callbacks_wildcard()}: create "
            f"{subjects.stream_name()} (see deploy/) or run with --create-callback-stream"
        )
    info = await jsm.add_stream(stream_config(subjects))
    log.info("created callback stream %s", info.config.name)
    return str(info.config.name)
