"""The composition root: builds and wires every part, owns the tasks, starts and drains.

Start-up order (PROTOCOL.md §1, §5, §10): data-dir lock (exit 3) → node-ID check
(exit 4) → broker (exit 6) → node ID in use (exit 5) → callback stream (exit 7) →
restart policy → subscriptions → first NodeInfo.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from nats import micro
from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.micro.service import Service
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import NoOpTracer

from schemas.job import Engine as EngineName
from schemas.job import Publisher as PublisherName
from worker import durations, results
from worker.assembly import Parts, assemble, resolve_config_limits
from worker.ballast import Ballast, GuardedStore
from worker.capacity.limits import Limits
from worker.config import Config
from worker.connection import connect
from worker.datadir import DataDir
from worker.engines.docker import DockerEngine
from worker.metrics import MetricsSetup, NodeMetrics, make_metrics
from worker.plugins import Plugins, build_plugins
from worker.publishers.local import LocalPublisher
from worker.recovery import Recovery
from worker.states import Cause
from worker.store.sqlite import SqliteStore
from worker.store.types import ExecutionStore
from worker.streams import ensure_callback_stream
from worker.tasks import TaskOwner
from worker.telemetry import make_provider
from worker.transport.info import VERSION
from worker.transport.subjects import Method, Subjects

log = logging.getLogger(__name__)

TOMBSTONE_KEEP = 7 * 24 * 3600.0
RETENTION_SWEEP = 60.0
OUTBOX_FLUSH_TIMEOUT = 10.0


class StartupError(Exception):
    """Start-up failed; ``code`` is the process exit code of PROTOCOL.md §10."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Node:
    """One compute node. ``start`` → (serve) → ``drain`` → ``close``."""

    def __init__(
        self,
        *,
        config: Config,
        nats_url: str,
        plugins: Plugins | None = None,
        tracer_provider: TracerProvider | None = None,
        store: ExecutionStore | None = None,
        create_callback_stream: bool = False,
        datadir: DataDir | None = None,
    ) -> None:
        self.config = config
        self.nats_url = nats_url
        self.datadir = datadir or DataDir(Path(config.data_dir))
        self.instance_id = str(uuid.uuid4())
        self.node_id = ""
        self._plugins = plugins
        self._provider = tracer_provider
        self._own_provider = tracer_provider is None
        self.store: ExecutionStore = store or GuardedStore(
            self.datadir.db_path(),
            ballast=Ballast(self.datadir.path / "ballast"),
            sync="full" if config.sync == "full" else "normal",
        )
        self._create_stream = create_callback_stream
        self._owner = TaskOwner(name="node")
        self._parts: Parts | None = None
        self.draining = False
        self.limits: Limits | None = None
        self._service: Service | None = None
        self._own_lock = False
        self._active_plugins: Plugins | None = None
        self._local: LocalPublisher | None = None
        self._metrics_setup: MetricsSetup | None = None
        self.metrics = NodeMetrics()

    @property
    def parts(self) -> Parts:
        if self._parts is None:
            raise RuntimeError("node not started")
        return self._parts

    # -- start ---------------------------------------------------------------------------
    async def start(self) -> None:
        if not self.datadir.locked:
            self.datadir.lock()  # DataDirLocked → exit 3
            self._own_lock = True
        await self.store.open()
        try:
            await self._start()
        except BaseException:
            await self._close_quietly()
            raise

    async def _start(self) -> None:
        c = self.config
        self.node_id = self.datadir.resolve_node_id(c.node_id or None, await self.store.count() > 0)
        if isinstance(self.store, GuardedStore):
            await self.store.prepare()  # the ballast, now that the data dir is ours
            self._owner.spawn(self.store.maintain(), name="store-guard")
        self.limits, warnings = resolve_config_limits(c, self.datadir.path)
        for warning in warnings:
            log.warning("%s", warning)
        plugins = self._plugins or await build_plugins(
            c,
            connection=lambda: self._parts.nc if self._parts is not None else None,
            node_id=self.node_id,
        )
        self._active_plugins = plugins
        if self._provider is None:
            self._provider = make_provider(node_id=self.node_id, otlp_endpoint=c.otlp_endpoint)
        # Nothing exports: no span is made (no cost); trace context is still passed along.
        tracer = self._provider.get_tracer("worker") if self._provider else NoOpTracer()
        self._metrics_setup = make_metrics(
            node_id=self.node_id, otlp_endpoint=c.otlp_endpoint, metrics_listen=c.metrics_listen
        )
        provider = self._metrics_setup.provider
        self.metrics = NodeMetrics(provider.get_meter("worker") if provider else None)
        subjects = Subjects(prefix=c.subject_prefix, node_id=self.node_id)

        async def on_reconnect() -> None:
            if self._parts is not None:
                await self._parts.dispatcher.resend_all()

        nc = await connect(
            c,
            url=self.nats_url,
            name=f"compute-node-{self.node_id}",
            inbox_prefix=c.inbox_prefix or f"_INBOX_{self.node_id}",
            on_reconnect=on_reconnect,
        )
        await self._check_id_free(nc, subjects)
        if c.callbacks == "jetstream":
            await ensure_callback_stream(
                nc, subjects, create=self._create_stream, wait=c.connect_timeout
            )
        self._parts = assemble(self, nc, subjects, plugins, tracer)
        await self._start_local_publisher(plugins)  # before Recovery re-publishes
        docker = plugins.engines.get(EngineName.DOCKER.value)
        if isinstance(docker, DockerEngine):
            await docker.cleanup_leftovers()  # restart policy: containers of a dead run
        recovery = Recovery(
            store=self.store,
            pool=self._parts.pool,
            buffer=self._parts.buffer,
            executor=self._parts.executor,
            deadlines=self._parts.deadlines,
            queue_timeout=c.queue_timeout,
        )
        # The node is not serving yet: the WAL's RESTART checkpoint, which makes writes wait
        # for the disk, comes after recovery's burst of moves instead of in the middle.
        held = (
            self.store.restarts.held()
            if isinstance(self.store, SqliteStore)
            else contextlib.nullcontext()
        )
        with held:
            await recovery.run()
        self._owner.spawn(self._parts.deadlines.run(), name="deadlines")
        self._owner.spawn(self._retention(), name="retention")
        await self._parts.handler.start()
        self._service = await micro.add_service(
            nc,
            name="compute-node",
            version=VERSION,
            description="compute node of the job market",
            metadata={
                "node_id": self.node_id,
                "instance_id": self.instance_id,
                "subject_prefix": c.subject_prefix,
            },
        )
        self._owner.spawn(self._parts.info.run(), name="nodeinfo")
        await self._parts.info.publish()
        recovery.resume()  # runs and uploads of restored executions start only now
        # Callbacks last: the rows committed so far (thousands after a long stop, all of
        # recovery's failures) go out from here, in the background, while the node serves.
        await self._parts.dispatcher.start()
        log.info("node %s ready (instance %s)", self.node_id, self.instance_id)

    async def _start_local_publisher(self, plugins: Plugins) -> None:
        local = plugins.publishers.get(PublisherName.LOCAL.value)
        if not isinstance(local, LocalPublisher):
            return
        try:
            await local.start()
        except OSError as exc:
            listen = self.config.publisher_local_listen
            raise StartupError(1, f"Local publisher cannot listen on {listen}: {exc}") from exc
        self._local = local

    async def _check_id_free(self, nc: Client, subjects: Subjects) -> None:
        subject = subjects.request(self.node_id, self.node_id, Method.NODE_INFO)
        try:
            await nc.request(subject, b"", timeout=0.5)
        except (NoRespondersError, NatsTimeout, TimeoutError):
            return
        raise StartupError(5, f"node ID {self.node_id} already in use")

    # -- background work -----------------------------------------------------------------
    async def _on_deadline(self, execution_id: str) -> None:
        await Recovery.expire(
            execution_id,
            store=self.store,
            executor=self.parts.executor,
            buffer=self.parts.buffer,
            deadlines=self.parts.deadlines,
            queue_timeout=self.config.queue_timeout,
        )

    async def _retention(self) -> None:
        # Terminal executions go within a minute after --retention has passed.
        interval = min(RETENTION_SWEEP, max(0.05, self.config.retention / 2))
        while True:
            await asyncio.sleep(interval)
            now = datetime.now(UTC)
            try:
                deleted = await self.store.purge(
                    now - timedelta(seconds=self.config.retention),
                    now - timedelta(seconds=TOMBSTONE_KEEP),
                )
            except Exception as exc:
                log.warning("retention sweep failed: %r", exc)
                continue
            for execution_id in deleted:
                results.remove(self.datadir.results_dir(), execution_id)
                if self._local is not None:
                    self._local.remove(execution_id)

    # -- drain and close -----------------------------------------------------------------
    async def drain(self) -> None:
        """PROTOCOL.md §10: announce, decline asks, let Running finish within the grace
        period then fail it, flush the outbox, stop."""
        parts = self.parts
        self.draining = True
        parts.buffer.stop_admission()
        parts.info.draining = True
        await parts.info.publish()
        left = await parts.buffer.wait_running(self.config.shutdown_grace)
        if left:
            log.warning(
                "%d executions still running after %s: failing them",
                len(left),
                durations.format(self.config.shutdown_grace),
            )
            for execution_id in left:
                execution = await self.store.get_execution(execution_id)
                await parts.executor.fail(execution, Cause.NODE_SHUTDOWN, "node shutdown")
            await parts.buffer.stop_running(left)
        if not await parts.dispatcher.flush(OUTBOX_FLUSH_TIMEOUT):
            log.warning("outbox not flushed within %ss", OUTBOX_FLUSH_TIMEOUT)
        await self.close()

    async def close(self) -> None:
        """Stop everything now (no grace); safe to call twice."""
        if self._parts is not None:
            parts, self._parts = self._parts, None
            parts.buffer.stop_admission()
            await parts.handler.stop()
            await parts.logs.stop()
            if self._service is not None:
                await self._service.stop()
                self._service = None
            await self._owner.shutdown()
            await parts.dispatcher.stop()
            try:
                await parts.nc.drain()
            except Exception as exc:
                log.debug("drain: %r", exc)
                await parts.nc.close()
        await self._close_quietly()

    async def _close_quietly(self) -> None:
        await self._owner.shutdown()
        if self._local is not None:
            await self._local.stop()
            self._local = None
        plugins, self._active_plugins = self._active_plugins, None
        for engine in plugins.engines.values() if plugins else ():
            if isinstance(engine, DockerEngine):
                await engine.close()
        if self._metrics_setup is not None:
            self._metrics_setup.shutdown()
            self._metrics_setup = None
        await self.store.close()
        if self._provider is not None and self._own_provider:
            self._provider.shutdown()
            self._provider = None
        if self._own_lock:
            self.datadir.unlock()
            self._own_lock = False


async def serve(config: Config) -> int:
    """The ``worker serve`` process (see :mod:`worker.serve`)."""
    from worker.serve import serve as run

    return await run(config)
