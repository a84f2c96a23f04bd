"""Registries of engines, verifiers, publishers and storage sources, keyed by wire enum.

By default every one that can work on this host is on; ``--engines`` etc. narrow them.
Only installed ones are listed in NodeInfo and bid on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from nats.aio.client import Client

from schemas.job import Engine as EngineName
from schemas.job import Publisher as PublisherName
from schemas.job import StorageSpec
from schemas.job import Verifier as VerifierName
from worker.config import Config
from worker.engines.docker import DockerEngine
from worker.engines.language import LanguageEngine
from worker.engines.noop import NoopEngine
from worker.engines.wasm import WasmEngine
from worker.protocols import Engine, Publisher, StorageProvider, Verifier
from worker.publishers.local import LocalPublisher
from worker.publishers.noop import NoopPublisher
from worker.publishers.objectstore import ObjectStorePublisher
from worker.publishers.s3 import S3Publisher
from worker.storage import build_storage
from worker.verifiers.deterministic import DeterministicVerifier
from worker.verifiers.noop import NoopVerifier

log = logging.getLogger(__name__)

T = TypeVar("T", Engine, Verifier, Publisher, StorageProvider)


@dataclass(slots=True)
class Plugins:
    engines: dict[str, Engine] = field(default_factory=dict)
    verifiers: dict[str, Verifier] = field(default_factory=dict)
    publishers: dict[str, Publisher] = field(default_factory=dict)
    storage: dict[str, StorageProvider] = field(default_factory=dict)

    @property
    def storage_sources(self) -> list[str]:
        return list(self.storage)

    def _provider(self, spec: StorageSpec) -> StorageProvider | None:
        source = spec.StorageSource
        return self.storage.get(source.value) if source is not None else None

    def is_local(self, spec: StorageSpec) -> bool:
        """Whether an input is on this node already (for locality ``local``)."""
        provider = self._provider(spec)
        return provider is not None and provider.is_local(spec)

    def known_size(self, spec: StorageSpec) -> int:
        """An input's size as known at bid time (0 when unknown)."""
        provider = self._provider(spec)
        return provider.known_size(spec) if provider is not None else 0


def _select(available: dict[str, T], wanted: list[str], what: str) -> dict[str, T]:
    chosen: dict[str, T] = {}
    for name, plugin in available.items():
        if wanted and name.lower() not in {w.lower() for w in wanted}:
            continue
        if not plugin.is_installed():
            log.info("%s %s is not usable on this host", what, name)
            continue
        chosen[name] = plugin
    return chosen


def _wanted(wanted: list[str], name: str) -> bool:
    return not wanted or name.lower() in {w.lower() for w in wanted}


async def build_plugins(
    config: Config,
    connection: Callable[[], Client | None] = lambda: None,
    *,
    node_id: str,
) -> Plugins:
    """Everything usable here, narrowed by the configuration."""
    engines: dict[str, Engine] = {
        EngineName.NOOP.value: NoopEngine(),
        EngineName.WASM.value: WasmEngine(),
        EngineName.LANGUAGE.value: LanguageEngine(
            uid_range=config.language_uid_range,
            data_dir=Path(config.data_dir).expanduser().absolute(),  # as DataDir resolves it
            accept_networked=config.job_selection_accept_networked,
        ),
    }
    if _wanted(config.engines, EngineName.DOCKER.value):  # probe the daemon only if wanted
        engines[EngineName.DOCKER.value] = await DockerEngine.create(
            docker_host=config.docker_host,
            node_id=node_id,
            accept_networked=config.job_selection_accept_networked,
        )
    data = Path(config.data_dir).expanduser().absolute()
    scratch = data / "work"  # on the results' disk
    verifiers: dict[str, Verifier] = {
        VerifierName.NOOP.value: NoopVerifier(),
        VerifierName.DETERMINISTIC.value: DeterministicVerifier(),
    }
    publishers: dict[str, Publisher] = {
        PublisherName.NOOP.value: NoopPublisher(),
        PublisherName.LOCAL.value: LocalPublisher(
            directory=data / "published",
            listen=config.publisher_local_listen or "127.0.0.1:0",
            base_url=config.publisher_local_base_url,
        ),
        PublisherName.S3.value: S3Publisher(
            default_endpoint=config.s3_endpoint,
            allow_cidr=config.url_input_allow_cidr,
            scratch_dir=scratch,
        ),
        PublisherName.OBJECT_STORE.value: ObjectStorePublisher(
            connection=connection, scratch_dir=scratch
        ),
    }
    return Plugins(
        engines=_select(engines, config.engines, "engine"),
        verifiers=_select(verifiers, [], "verifier"),
        publishers=_select(publishers, config.publishers, "publisher"),
        storage=_select(
            build_storage(config, connection), config.storage_sources, "storage source"
        ),
    )
