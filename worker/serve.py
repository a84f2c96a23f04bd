"""``worker serve``: the process around a Node — embedded broker, stdout lines, signals,
exit codes (PROTOCOL.md §10)."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys

from worker.config import Config
from worker.connection import BrokerUnreachable
from worker.datadir import DataDir, DataDirLocked, NodeIDMismatch
from worker.embedded import BrokerError, EmbeddedBroker
from worker.logconfig import setup_logging
from worker.node import Node, StartupError
from worker.pricing import PriceListError
from worker.streams import CallbackStreamMissing

log = logging.getLogger("worker")

EXIT_USAGE = 2
EXIT_LOCKED, EXIT_ID_MISMATCH, EXIT_ID_IN_USE, EXIT_BROKER, EXIT_STREAM = 3, 4, 5, 6, 7


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def serve(config: Config) -> int:
    """Run a node until SIGTERM/SIGINT drains it; return the exit code."""
    setup_logging(config.log_format, config.log_level)
    # From the start: a signal during start-up (a supervisor stopping a node that is still
    # coming up) drains the node as soon as it is up, and the exit code is still 0.
    stop = _on_signals()
    broker: EmbeddedBroker | None = None
    url = config.nats_url
    node: Node | None = None
    datadir = DataDir(config.data_dir)
    try:
        datadir.lock()  # before the embedded broker, which lives in the data dir too
    except DataDirLocked as exc:
        log.error("%s", exc)
        return EXIT_LOCKED
    try:
        if not url:
            broker = EmbeddedBroker(data_dir=config.data_dir)
            try:
                url = await broker.start()
            except BrokerError as exc:
                log.error("%s", exc)
                return EXIT_BROKER
            _say(f"NATS_URL={url}")
        create = config.create_callback_stream
        if create is None:
            create = broker is not None
        node = Node(config=config, nats_url=url, create_callback_stream=create, datadir=datadir)
        tune_gc()  # for the start-up too: recovery makes an execution per live one
        code = await _start(node)
        if code:
            return code
        tune_gc()  # and what the start-up kept (the restored executions), out of sight
        _say(f"NODE_ID={node.node_id}")
        if stop.is_set():
            log.info("a signal came during start-up")
        await stop.wait()
        log.info("draining")
        await node.drain()
        return 0
    finally:
        if node is not None:
            await node.close()
        if broker is not None:
            await broker.stop()
        datadir.unlock()


# The cyclic garbage collector's thresholds once the node runs (CPython's are 700, 10, 10).
# Every request allocates a few hundred objects, nearly all freed by reference counting,
# yet each 700 allocations started a collection: at the default the collector took ~20 %
# of the node's CPU under load (bench: AskForBid c64 +28 %, noop e2e +14 % with these).
# Start-up runs with them too: recovering 5,000 live executions of 100,000, every deadline
# past, took 0.60 s in-process at the default and 0.40 s with them (bench, recovery late).
GC_THRESHOLDS = (50_000, 50, 100)


def tune_gc() -> None:
    """Before the start-up and again after it: move what is alive (modules, config, then
    the restored executions) out of the collector's sight for good (``gc.freeze``) and
    collect less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


async def _start(node: Node) -> int:
    try:
        await node.start()
    except DataDirLocked as exc:
        log.error("%s", exc)
        return EXIT_LOCKED
    except NodeIDMismatch as exc:
        log.error("%s", exc)
        return EXIT_ID_MISMATCH
    except BrokerUnreachable as exc:
        log.error("%s", exc)
        return EXIT_BROKER
    except CallbackStreamMissing as exc:
        log.error("%s", exc)
        return EXIT_STREAM
    except StartupError as exc:
        log.error("%s", exc.message)
        return exc.code
    except PriceListError as exc:
        log.error("%s", exc)
        return EXIT_USAGE
    return 0


def _on_signals() -> asyncio.Event:
    """Handle SIGTERM/SIGINT from now on: the first sets the event returned (the node
    drains, once it is up), a second one exits at once."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("second signal: exiting now")
            os._exit(128 + signum)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    return stop
