"""Price and EstimatedStartSeconds on bids (PROTOCOL.md §4)."""

from __future__ import annotations

import asyncio
import re
import urllib.request
from pathlib import Path

import pytest
from nats.aio.client import Client

from schemas.job import Engine, Job, Metadata, Spec
from tests.helpers import assert_eventually
from tests.integration.conftest import NodeFactory
from worker.engines.noop import NoopEngine
from worker.plugins import Plugins
from worker.pricing import PriceListError, load_price_list
from worker.publishers.noop import NoopPublisher
from worker.requester import Requester
from worker.store.types import Execution
from worker.verifiers.noop import NoopVerifier


def cpu_job(job_id: str, cpu: str, timeout: float) -> Job:
    spec = Spec(Engine=Engine.NOOP, Timeout=timeout)
    spec.Resources.CPU = cpu
    spec.Resources.Memory = "1Gi"
    return Job(Metadata=Metadata(ID=job_id), Spec=spec)


async def test_price_and_estimated_start(
    make_node: NodeFactory, nc: Client, prefix: str, tmp_path: Path
) -> None:
    prices = tmp_path / "prices.toml"
    prices.write_text(
        "fee = 0.5\ncpu_second = 0.01\nmemory_gib_second = 0.002\n"
        'gpu_second = 1\ncurrency = "EUR"\n'
    )
    gate, started = asyncio.Event(), []

    async def handler(execution: Execution, results_dir: Path) -> None:
        started.append(execution.id)
        await gate.wait()

    plugins = Plugins(
        engines={"Noop": NoopEngine(handler=handler)},
        verifiers={"Noop": NoopVerifier()},
        publishers={"Noop": NoopPublisher()},
    )
    await make_node("n1", plugins=plugins, price_list=str(prices), limit_total_cpu="2")
    requester = Requester(nc=nc, requester_id="r1", prefix=prefix)
    await requester.start()
    try:
        first = await requester.ask("n1", cpu_job("a", "2", 100))
        assert first.Accepted and first.EstimatedStartSeconds == 0
        assert first.Price is not None and first.Price.Unit == "EUR"  # type: ignore[union-attr]
        # 0.5 + 100 s × (2 CPU × 0.01 + 1 GiB × 0.002)
        assert first.Price.Amount == pytest.approx(0.5 + 100 * (0.02 + 0.002))  # type: ignore[union-attr]
        await requester.accept("n1", first.ExecutionID)
        await assert_eventually(lambda: started == [first.ExecutionID])
        # The node is full until the running job's 100 s timeout at the latest.
        second = await requester.ask("n1", cpu_job("b", "1", 10))
        assert second.Accepted
        assert 90 < second.EstimatedStartSeconds <= 100  # type: ignore[operator]
    finally:
        gate.set()
        await requester.close()


def test_price_list_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("fee = 1\nsurcharge = 2\n")
    with pytest.raises(PriceListError, match="surcharge"):
        load_price_list(bad)
    bad.write_text("cpu_second = -1\n")
    with pytest.raises(PriceListError, match="must not be negative"):
        load_price_list(bad)


async def test_prometheus_metrics(make_node: NodeFactory, nc: Client, prefix: str) -> None:
    node = await make_node("n1", metrics_listen="127.0.0.1:0")
    assert node._metrics_setup is not None and node._metrics_setup.port > 0
    requester = Requester(nc=nc, requester_id="r1", prefix=prefix)
    await requester.start()
    try:
        bid = await requester.ask("n1", cpu_job("a", "1", 10))
        await requester.accept("n1", bid.ExecutionID)
        await requester.run_to_completion("n1", bid.ExecutionID, timeout=10)
        await requester.ask("n1", cpu_job("b", "1000", 10))  # declined: over the job limit
    finally:
        await requester.close()
    url = f"http://127.0.0.1:{node._metrics_setup.port}/metrics"

    def scrape() -> str:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.read().decode()

    text = await asyncio.to_thread(scrape)
    assert re.search(r"^worker_asks_total\S* 2\.0$", text, re.M), text
    assert re.search(r"^worker_bids_total\S* 1\.0$", text, re.M), text
    assert re.search(r'^worker_declines_total\{.*reason="job requirements exceed', text, re.M)
    assert re.search(r"^worker_executions_completed_total\S* 1\.0$", text, re.M), text
    assert "worker_bid_duration_seconds_bucket" in text or "worker_bid_duration_bucket" in text
    assert re.search(r'^worker_capacity_used\{.*dimension="cpu"', text, re.M), text
