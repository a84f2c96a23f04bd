"""Wiring: builds every part of a node from its configuration (the composition root's
body; ``worker.node`` owns the lifecycle)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from nats.aio.client import Client
from opentelemetry.trace import Tracer

from schemas.job import Engine as EngineName
from schemas.job import Verifier as VerifierName
from worker.ballast import GuardedStore
from worker.bidding.chain import Bidder
from worker.bidding.probes import make_probes
from worker.bidding.types import SemanticStrategy
from worker.buffer import ExecutorBuffer
from worker.callbacks import CallbackFactory
from worker.capacity.host import probe_host
from worker.capacity.limits import Limits, resolve_limits
from worker.capacity.parse import parse_bytes, parse_cpu, parse_gpu
from worker.capacity.pool import CapacityPool
from worker.capacity.usage import ResourceUsage
from worker.config import Config
from worker.endpoint import BaseEndpoint
from worker.engines.docker import DockerEngine
from worker.engines.docker_bid import DockerBidStrategy
from worker.engines.language import LanguageEngine
from worker.executor import BaseExecutor
from worker.plugins import Plugins
from worker.pricing import load_price_list
from worker.timers import Deadlines
from worker.transport.callbacks import OutboxDispatcher
from worker.transport.handler import RequestHandler
from worker.transport.info import NodeInfoService
from worker.transport.logs import LogStreamer
from worker.transport.subjects import Subjects
from worker.verifiers.deterministic import DeterministicVerifier, RequesterKeyStrategy

if TYPE_CHECKING:
    from worker.node import Node


def _usage(cpu: str, memory: str, disk: str, gpu: str) -> ResourceUsage:
    return ResourceUsage(
        CPU=parse_cpu(cpu), Memory=parse_bytes(memory), Disk=parse_bytes(disk), GPU=parse_gpu(gpu)
    )


def resolve_config_limits(config: Config, data_dir: Path) -> tuple[Limits, list[str]]:
    """The node's limits from its flags and the host (PROTOCOL.md §9)."""
    c = config
    return resolve_limits(
        host=probe_host(data_dir),
        total=_usage(
            c.limit_total_cpu, c.limit_total_memory, c.limit_total_disk, c.limit_total_gpu
        ),
        job=_usage(c.limit_job_cpu, c.limit_job_memory, c.limit_job_disk, c.limit_job_gpu),
        queue=_usage(
            c.limit_queue_cpu, c.limit_queue_memory, c.limit_queue_disk, c.limit_queue_gpu
        ),
        default_job=_usage(c.default_job_cpu, c.default_job_memory, "", ""),
        job_timeout_default=c.job_timeout_default,
        job_timeout_min=c.job_timeout_min,
        job_timeout_max=c.job_timeout_max,
    )


@dataclass(slots=True)
class Parts:
    nc: Client
    pool: CapacityPool
    executor: BaseExecutor
    buffer: ExecutorBuffer
    endpoint: BaseEndpoint
    dispatcher: OutboxDispatcher
    handler: RequestHandler
    info: NodeInfoService
    deadlines: Deadlines
    bidder: Bidder
    logs: LogStreamer


def assemble(self: Node, nc: Client, subjects: Subjects, plugins: Plugins, tracer: Tracer) -> Parts:
    c = self.config
    limits = self.limits
    assert limits is not None
    pool = CapacityPool(
        total=limits.total,
        queue=limits.queue,
        max_pending_per_requester=c.max_pending_bids_per_requester,
    )
    dispatcher = OutboxDispatcher(
        nc=nc,
        store=self.store,
        mode=c.callbacks,
        max_attempts=c.outbox_max_attempts,
        tracer=tracer,
    )
    deadlines = Deadlines(fire=self._on_deadline)
    factory = CallbackFactory(
        node_id=self.node_id, subjects=subjects, verification_ttl=c.verification_ttl
    )
    executor = BaseExecutor(
        store=self.store,
        callbacks=factory,
        engines=plugins.engines,
        storage=plugins.storage,
        verifiers=plugins.verifiers,
        publishers=plugins.publishers,
        results_root=self.datadir.results_dir(),
        default_timeout=limits.job_timeout_default,
        verification_ttl=c.verification_ttl,
        notify=dispatcher.notify,
        schedule=deadlines.schedule,
        metrics=self.metrics,
        tracer=tracer,
        secret_patterns=c.secret_env_patterns,
    )
    buffer = ExecutorBuffer(
        executor=executor, pool=pool, owner=self._owner, skip_limit=c.skip_starvation_limit
    )
    bidder = Bidder(
        pool=pool,
        limits=limits,
        engines=list(plugins.engines),
        verifiers=list(plugins.verifiers),
        publishers=list(plugins.publishers),
        storage_sources=list(plugins.storage_sources),
        accept_networked=c.job_selection_accept_networked,
        http_proxy=bool(c.http_allowlist_proxy),
        reject_stateless=c.job_selection_reject_stateless,
        locality="local" if c.job_selection_data_locality == "local" else "anywhere",
        timeout_bypass=c.timeout_bypass_client,
        executor_strategies=_executor_strategies(plugins),
        is_local=plugins.is_local,
        input_size=plugins.known_size,
        probes=[
            *_verifier_checks(plugins),
            *make_probes(
                exec_command=c.job_selection_probe_exec,
                http_url=c.job_selection_probe_http,
                timeout=c.probe_timeout,
            ),
        ],
        is_draining=lambda: self.draining,
        store_available=(
            self.store.available if isinstance(self.store, GuardedStore) else lambda: True
        ),
    )
    endpoint = BaseEndpoint(
        node_id=self.node_id,
        store=self.store,
        bidder=bidder,
        pool=pool,
        buffer=buffer,
        callbacks=factory,
        deadlines=deadlines,
        notify=dispatcher.notify,
        bid_ttl=c.bid_ttl,
        queue_timeout=c.queue_timeout,
        prices=load_price_list(c.price_list) if c.price_list else None,
        metrics=self.metrics,
        tracer=tracer,
    )
    handler: RequestHandler
    logs = LogStreamer(
        nc=nc,
        subjects=subjects,
        endpoint=endpoint,
        store=self.store,
        results_root=self.datadir.results_dir(),
    )
    info = NodeInfoService(
        nc=nc,
        subjects=subjects,
        instance_id=self.instance_id,
        labels=dict(c.labels),
        pool=pool,
        store=self.store,
        max_job=limits.job,
        engines=list(plugins.engines),
        verifiers=list(plugins.verifiers),
        publishers=list(plugins.publishers),
        storage_sources=list(plugins.storage_sources),
        interval=c.nodeinfo_interval,
        counters=lambda: (len(buffer.running_ids), len(buffer.queued_ids), handler.dropped),
    )
    pool.on_change = info.changed
    info.gauges = self.metrics.gauges
    self.metrics.gauges.queue_depth = lambda: len(buffer.queued_ids)
    self.metrics.gauges.running = lambda: len(buffer.running_ids)
    self.metrics.gauges.used = lambda: _used(pool)
    handler = RequestHandler(
        nc=nc,
        subjects=subjects,
        endpoint=endpoint,
        instance_id=self.instance_id,
        tracer=tracer,
        max_request_bytes=c.max_request_bytes,
        fanout_silent_declines=c.fanout_silent_declines,
        node_info=info.encoded,
        logs=logs.serve,
    )
    return Parts(
        nc=nc,
        pool=pool,
        executor=executor,
        buffer=buffer,
        endpoint=endpoint,
        dispatcher=dispatcher,
        handler=handler,
        info=info,
        deadlines=deadlines,
        bidder=bidder,
        logs=logs,
    )


def _verifier_checks(plugins: Plugins) -> list[SemanticStrategy]:
    """A Deterministic job without a usable requester key is declined at bid time."""
    verifier = plugins.verifiers.get(VerifierName.DETERMINISTIC.value)
    return [RequesterKeyStrategy(verifier)] if isinstance(verifier, DeterministicVerifier) else []


def _executor_strategies(plugins: Plugins) -> dict[str, SemanticStrategy]:
    """Engine-specific bid checks (Bacalhau's ``executor.GetBidStrategy``)."""
    strategies: dict[str, SemanticStrategy] = {}
    docker = plugins.engines.get(EngineName.DOCKER.value)
    if isinstance(docker, DockerEngine):
        strategies[EngineName.DOCKER.value] = DockerBidStrategy(docker)
    language = plugins.engines.get(EngineName.LANGUAGE.value)
    if isinstance(language, LanguageEngine):
        strategies[EngineName.LANGUAGE.value] = language.bid_strategy
    return strategies


def _used(pool: CapacityPool) -> dict[str, float]:
    snap = pool.snapshot()
    used = snap.running.add(snap.queued).add(snap.pending)
    return {"cpu": used.CPU, "memory": used.Memory, "disk": used.Disk, "gpu": used.GPU}
