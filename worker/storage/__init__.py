"""Input sources (PROTOCOL.md §4 StorageSpec), each a ``StorageProvider`` keyed by its
``StorageSource`` wire value."""

from __future__ import annotations

from collections.abc import Callable

from nats.aio.client import Client

from worker.config import Config
from worker.protocols import StorageProvider
from worker.storage.inline import Inline
from worker.storage.local import LocalDirectory
from worker.storage.objectstore import ObjectStore
from worker.storage.s3 import S3
from worker.storage.unsupported import UNSUPPORTED, Unsupported
from worker.storage.url import URLDownload


def build_storage(
    config: Config, connection: Callable[[], Client | None]
) -> dict[str, StorageProvider]:
    """Every input source this node knows; ``build_plugins`` keeps the installed ones."""
    providers: list[StorageProvider] = [
        Inline(max_bytes=config.url_input_max_bytes),
        URLDownload(allow_cidr=config.url_input_allow_cidr, max_bytes=config.url_input_max_bytes),
        LocalDirectory(roots=config.local_input_roots),
        S3(
            default_endpoint=config.s3_endpoint,
            max_bytes=config.url_input_max_bytes,
            allow_cidr=config.url_input_allow_cidr,
        ),
        ObjectStore(connection=connection, max_bytes=config.url_input_max_bytes),
        *(Unsupported(name=n) for n in UNSUPPORTED),
    ]
    return {p.name: p for p in providers}
