"""The callback stream (PROTOCOL.md §6): checked at start, created only when asked."""

from __future__ import annotations

import logging

from nats.aio.client import Client
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

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


async def ensure_callback_stream(nc: Client, subjects: Subjects, *, create: bool) -> str:
    """The name of the stream covering this node's callbacks; created when ``create``."""
    jsm = nc.jetstream()
    probe = f"{subjects.prefix}.orchestrator.r.{subjects.node_id}.OnRunComplete/v1"
    try:
        return str(await jsm.find_stream_name_by_subject(probe))
    except NotFoundError:
        pass
    if not create:
        raise CallbackStreamMissing(
            f"no JetStream stream covers {subjects.callbacks_wildcard()}: create "
            f"{subjects.stream_name()} (see deploy/) or run with --create-callback-stream"
        )
    info = await jsm.add_stream(stream_config(subjects))
    log.info("created callback stream %s", info.config.name)
    return str(info.config.name)
