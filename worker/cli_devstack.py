"""``worker devstack``: a whole market in one command, to see it work.

An embedded nats-server (JetStream on, loopback), ``--nodes`` in-process compute nodes
(``node-1`` …, each with its own data dir under one temporary folder) and a requester
that submits ``--jobs`` sample jobs (:mod:`worker.samples`: Noop, a Wasm hello world, a
Python job writing an output; the kinds no node offers are skipped) and shows them in a
live table of jobs × state. Afterwards the stack keeps running for the other commands
(``WORKER_NATS_URL`` is printed) until Ctrl-C or SIGTERM, which drains every node, stops
the broker and removes the temporary folder; ``--exit-when-done`` stops once the jobs
have ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from worker import durations
from worker.cli_common import (
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    CommandError,
    fail,
    print_json,
    run,
    stderr_console,
    stdout_console,
)
from worker.cli_devstack_jobs import JobBoard

if TYPE_CHECKING:
    from worker.node import Node
    from worker.requester import Requester

log = logging.getLogger("worker.devstack")


def devstack(
    nodes: Annotated[
        int,
        typer.Option(
            "--nodes",
            show_default=False,
            min=1,
            max=32,
            help="Compute nodes to start (default: 3).",
        ),
    ] = 3,
    jobs: Annotated[
        int,
        typer.Option(
            "--jobs", show_default=False, min=0, help="Sample jobs to submit (default: 10)."
        ),
    ] = 10,
    samples: Annotated[
        str,
        typer.Option(
            "--samples",
            show_default=False,
            metavar="LIST",
            help="Sample kinds to mix: noop, wasm, python (default: all).",
        ),
    ] = "noop,wasm,python",
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir",
            show_default=False,
            metavar="DIR",
            help="Keep the broker's and nodes' state here (default: a temporary folder, "
            "removed at exit).",
        ),
    ] = None,
    subject_prefix: Annotated[
        str,
        typer.Option(
            "--subject-prefix",
            show_default=False,
            metavar="PREFIX",
            help="Subject prefix (default: market).",
        ),
    ] = "market",
    exit_when_done: Annotated[
        bool,
        typer.Option("--exit-when-done", show_default=False, help="Stop once every job has ended."),
    ] = False,
    shutdown_grace: Annotated[
        str,
        typer.Option(
            "--shutdown-grace",
            show_default=False,
            metavar="DURATION",
            help="Drain: time running jobs get (default: 5s).",
        ),
    ] = "5s",
    log_level: Annotated[
        str,
        typer.Option(
            "--log-level",
            show_default=False,
            metavar="LEVEL",
            help="Node log level (default: warning).",
        ),
    ] = "warning",
    json_out: Annotated[
        bool,
        typer.Option(
            "--json",
            show_default=False,
            help='JSON lines on stdout: {"event": "ready"}, {"event": "job"} per state, '
            '{"event": "done"}, {"event": "stopped"}.',
        ),
    ] = False,
) -> None:
    """Run an embedded broker, N compute nodes and a requester submitting sample jobs, with
    a live table of the jobs; keep the stack up until Ctrl-C (which drains every node).

    Exit codes: 0 every job completed, 1 a job failed or got no bid, 2 usage, 130 stopped
    by a signal before the jobs ended.
    """
    from worker.samples import KINDS

    kinds = [k.strip().lower() for k in samples.split(",") if k.strip()]
    if unknown := [k for k in kinds if k not in KINDS]:
        fail(f"--samples: unknown sample {unknown[0]!r} (known: {', '.join(KINDS)})", EXIT_USAGE)
    if log_level.lower() not in ("debug", "info", "warning", "error"):
        fail(f"--log-level: expected debug, info, warning or error, got {log_level!r}", EXIT_USAGE)
    try:
        grace = durations.parse(shutdown_grace)
    except ValueError as exc:
        fail(f"--shutdown-grace: {exc}", EXIT_USAGE)
    stack = _Devstack(nodes, jobs, kinds, data_dir, subject_prefix, grace, json_out)
    run(stack.main(exit_when_done, log_level.lower()))


class _Devstack:
    def __init__(
        self,
        n_nodes: int,
        n_jobs: int,
        kinds: list[str],
        data_dir: Path | None,
        prefix: str,
        grace: float,
        json_out: bool,
    ) -> None:
        self.n_nodes, self.n_jobs, self.kinds, self.prefix = n_nodes, n_jobs, kinds, prefix
        self.grace, self.json = grace, json_out
        self.keep = data_dir is not None
        self.root = data_dir or Path(tempfile.mkdtemp(prefix="worker-devstack-"))
        self.console = stdout_console()
        self.err = stderr_console()
        self.nodes: list[Node] = []
        self.url = ""
        self.stop = asyncio.Event()

    async def main(self, exit_when_done: bool, log_level: str) -> int:
        from worker.embedded import BrokerError, EmbeddedBroker

        self._logging(log_level)
        self._signals()
        broker = EmbeddedBroker(data_dir=self.root)
        code = EXIT_INTERRUPTED
        try:
            with self.err.status("Starting the broker and the nodes…"):
                try:
                    self.url = await broker.start()
                except BrokerError as exc:
                    raise CommandError(str(exc)) from None
                await self._start_nodes()
            code = await self._serve(exit_when_done)
        finally:
            await self._shutdown(broker)
        return code

    def _logging(self, level: str) -> None:
        from rich.logging import RichHandler

        handler: logging.Handler
        if self.console.is_terminal and not self.json:
            handler = RichHandler(console=self.console, show_path=False)  # above the live table
        else:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(
                logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
            )
        root = logging.getLogger()
        root.handlers[:] = [handler]
        root.setLevel(level.upper())
        logging.getLogger("nats").setLevel(logging.WARNING)

    def _signals(self) -> None:
        loop = asyncio.get_running_loop()

        def on_signal(signum: int) -> None:
            if self.stop.is_set():
                os._exit(128 + signum)  # a second signal: now (the broker dies with us)
            self.stop.set()

        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, on_signal, signum)

    async def _start_nodes(self) -> None:
        from worker.config import load_config
        from worker.node import Node

        for i in range(1, self.n_nodes + 1):
            flags = {
                "node_id": f"node-{i}",
                "data_dir": str(self.root / f"node-{i}"),
                "subject_prefix": self.prefix,
                "shutdown_grace": durations.format(self.grace),
            }
            node = Node(
                config=load_config(flags, {}), nats_url=self.url, create_callback_stream=True
            )
            self.nodes.append(node)
        results = await asyncio.gather(*(n.start() for n in self.nodes), return_exceptions=True)
        failed = [
            (n, r) for n, r in zip(self.nodes, results, strict=True) if isinstance(r, BaseException)
        ]
        self.nodes = [
            n for n, r in zip(self.nodes, results, strict=True) if not isinstance(r, BaseException)
        ]
        if failed:
            node, exc = failed[0]
            raise CommandError(f"{node.config.node_id} did not start: {exc}")

    async def _serve(self, exit_when_done: bool) -> int:
        nc, requester = await self._requester()
        try:
            kinds, publisher = await self._offered(requester)
            self._announce(kinds)
            board = JobBoard(
                kinds=kinds,
                count=self.n_jobs,
                publisher=publisher,
                nodes=[n.node_id for n in self.nodes],
                json_out=self.json,
            )
            jobs = asyncio.create_task(board.run(requester))
            stopped = asyncio.create_task(self.stop.wait())
            with board.live():
                await asyncio.wait({jobs, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not self.json and not self.console.is_terminal:
                self.console.line()
            if not jobs.done():
                jobs.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await jobs
                return EXIT_INTERRUPTED
            code = board.summary()
            if not exit_when_done and not self.stop.is_set():
                if not self.json:
                    self.err.print(
                        f"The stack is up: export WORKER_NATS_URL={self.url}, then try "
                        "`worker nodes ls` or `worker submit worker/samples/noop.yaml --wait`. "
                        "Ctrl-C stops it."
                    )
                await self.stop.wait()
            stopped.cancel()
            return code
        finally:
            await requester.close()
            await nc.close()

    async def _requester(self) -> tuple[Any, Requester]:
        import nats

        from worker.requester import Requester

        nc = await nats.connect(self.url, name="devstack-requester", inbox_prefix="_INBOX_devstack")
        requester = Requester(nc=nc, requester_id="devstack", prefix=self.prefix)
        await requester.start("jetstream")
        return nc, requester

    async def _offered(self, requester: Requester) -> tuple[list[str], str]:
        from worker.samples import ENGINE_OF

        engines: set[str] = set()
        publishers: set[str] = set()
        for node in self.nodes:
            info = await requester.node_info(node.node_id)
            engines.update(info.ComputeNodeInfo.ExecutionEngines)
            publishers.update(info.ComputeNodeInfo.Publishers)
        kinds = [k for k in self.kinds if ENGINE_OF[k] in engines]
        for skipped in sorted(set(self.kinds) - set(kinds)):
            message = f"{skipped} sample skipped: no node offers the {ENGINE_OF[skipped]} engine"
            self.err.print(message + (" (it needs root on Linux)" if skipped == "python" else ""))
        if self.n_jobs and not kinds:
            raise CommandError("no node offers the engine of any sample asked for")
        return kinds, "Local" if "Local" in publishers else "Noop"

    def _announce(self, kinds: list[str]) -> None:
        ids = [n.node_id for n in self.nodes]
        if self.json:
            print_json(
                {
                    "event": "ready",
                    "NatsURL": self.url,
                    "SubjectPrefix": self.prefix,
                    "Nodes": ids,
                    "DataDir": str(self.root),
                    "Samples": kinds,
                }
            )
        else:
            self.console.print(f"NATS_URL={self.url}")
            self.console.print(f"{len(ids)} nodes up: {', '.join(ids)} (data in {self.root})")

    # -- shutdown -------------------------------------------------------------------------

    async def _shutdown(self, broker: Any) -> None:
        with self.err.status("Draining the nodes…") if not self.json else contextlib.nullcontext():
            results = await asyncio.gather(*(n.drain() for n in self.nodes), return_exceptions=True)
            for node, result in zip(self.nodes, results, strict=True):
                if isinstance(result, BaseException):
                    log.warning("drain of %s failed: %r", node.node_id, result)
                    await node.close()
            await broker.stop()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        if not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)
        if self.json:
            print_json({"event": "stopped", "Nodes": [n.node_id for n in self.nodes]})
        else:
            self.err.print(f"Stopped: {len(self.nodes)} nodes drained, broker stopped.")
