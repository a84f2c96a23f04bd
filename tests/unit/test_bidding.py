"""The bid chain of PROTOCOL.md §9 and the strategy cases of Bacalhau's tests (ref §9.3)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from schemas.job import (
    Engine,
    Job,
    Metadata,
    NetworkConfig,
    NetworkType,
    Publisher,
    PublisherSpec,
    ResourcesConfig,
    Spec,
    StorageSource,
    StorageSpec,
    Verifier,
    WasmSpec,
)
from worker.bidding import BidDecision, Bidder, BidRequest
from worker.bidding.resource import MaxPerJobStrategy, calculate_usage
from worker.bidding.semantic import (
    InstalledStrategy,
    LocalityStrategy,
    NetworkingStrategy,
    StatelessStrategy,
    TimeoutStrategy,
)
from worker.capacity.limits import DEFAULT_JOB_USAGE, Limits
from worker.capacity.pool import CapacityPool
from worker.capacity.usage import ZERO, ResourceUsage

GI, MI = 1024**3, 1024**2
ALL_ENGINES = [e.value for e in Engine]
ALL_VERIFIERS = [v.value for v in Verifier]
ALL_PUBLISHERS = [p.value for p in Publisher]
ALL_SOURCES = [s.value for s in StorageSource]


def make_job(
    *,
    engine: Engine = Engine.NOOP,
    client_id: str = "",
    timeout: float = 0.0,
    network: NetworkType = NetworkType.NONE,
    inputs: list[StorageSpec] | None = None,
    resources: ResourcesConfig | None = None,
    **spec: Any,
) -> Job:
    return Job(
        Metadata=Metadata(ID="job-id", ClientID=client_id),
        Spec=Spec(
            Engine=engine,
            Timeout=timeout,
            Network=NetworkConfig(Type=network),
            inputs=inputs or [],
            Resources=resources or ResourcesConfig(),
            **spec,
        ),
    )


def ipfs(cid: str = "volume-id") -> StorageSpec:
    return StorageSpec(StorageSource=StorageSource.IPFS, CID=cid, path="/in")


def make_req(job: Job | None = None, *, eid: str = "e-1", requester: str = "r1") -> BidRequest:
    return BidRequest(
        node_id="node-id", execution_id=eid, requester=requester, job=job or make_job()
    )


def make_limits(job: ResourceUsage | None = None, **kw: Any) -> Limits:
    total = ResourceUsage(CPU=8, Memory=16 * GI, Disk=100 * GI, GPU=1)
    return Limits(
        total=total,
        queue=total,
        job=job or total,
        default_job=DEFAULT_JOB_USAGE,
        **kw,
    )


def make_bidder(
    *, limits: Limits | None = None, pool: CapacityPool | None = None, **kw: Any
) -> Bidder:
    limits = limits or make_limits()
    kw.setdefault("engines", ALL_ENGINES)
    kw.setdefault("verifiers", ALL_VERIFIERS)
    kw.setdefault("publishers", ALL_PUBLISHERS)
    kw.setdefault("storage_sources", ALL_SOURCES)
    if pool is None:
        pool = CapacityPool(total=limits.total, queue=limits.queue, max_pending_per_requester=256)
    return Bidder(pool=pool, limits=limits, **kw)


class FakeProbe:
    """A semantic strategy that answers as told and counts its calls."""

    def __init__(
        self, decision: BidDecision | Exception, on_call: Callable[[], None] | None = None
    ):
        self.decision = decision
        self.calls = 0
        self.on_call = on_call

    async def should_bid(self, req: BidRequest) -> BidDecision:
        self.calls += 1
        if self.on_call:
            self.on_call()
        if isinstance(self.decision, Exception):
            raise self.decision
        return self.decision


class FakeResource:
    def __init__(self, decision: BidDecision | Exception):
        self.decision = decision
        self.seen: list[ResourceUsage] = []

    async def should_bid_on_usage(self, req: BidRequest, usage: ResourceUsage) -> BidDecision:
        self.seen.append(usage)
        if isinstance(self.decision, Exception):
            raise self.decision
        return self.decision


# -- networking ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("accept", "proxy", "kind", "reason"),
    [
        (False, False, NetworkType.NONE, ""),
        (False, False, NetworkType.FULL, "networking is enabled: false"),
        (True, False, NetworkType.NONE, ""),
        (True, False, NetworkType.FULL, ""),
        (False, False, NetworkType.HTTP, "networking is enabled: false"),
        (False, True, NetworkType.HTTP, "networking is enabled: false"),
        (True, False, NetworkType.HTTP, "networking type HTTP not supported"),
        (True, True, NetworkType.HTTP, ""),
        (True, True, NetworkType.FULL, ""),
    ],
)
async def test_networking(accept: bool, proxy: bool, kind: NetworkType, reason: str) -> None:
    strategy = NetworkingStrategy(accept_networked=accept, http_proxy=proxy)
    decision = await strategy.should_bid(make_req(make_job(network=kind)))
    assert decision == BidDecision(reason == "", reason)
    bidder = make_bidder(accept_networked=accept, http_proxy=proxy)
    decision, _ = await bidder.decide(make_req(make_job(network=kind)))
    assert (decision.bid, decision.reason) == (reason == "", reason)


# -- stateless -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reject", "inputs", "bid"),
    [(True, False, False), (True, True, True), (False, False, True), (False, True, True)],
)
async def test_stateless(reject: bool, inputs: bool, bid: bool) -> None:
    job = make_job(inputs=[ipfs()] if inputs else [])
    decision = await StatelessStrategy(reject=reject).should_bid(make_req(job))
    assert decision.bid is bid
    assert decision.reason == ("" if bid else "stateless jobs not accepted")


# -- installed providers -------------------------------------------------------------------


def installed(
    engines: list[str] | None = None,
    verifiers: list[str] | None = None,
    publishers: list[str] | None = None,
    sources: list[str] | None = None,
) -> InstalledStrategy:
    return InstalledStrategy(
        engines=ALL_ENGINES if engines is None else engines,
        verifiers=ALL_VERIFIERS if verifiers is None else verifiers,
        publishers=ALL_PUBLISHERS if publishers is None else publishers,
        storage_sources=ALL_SOURCES if sources is None else sources,
    )


@pytest.mark.parametrize(
    ("strategy", "job", "reason"),
    [
        (installed(engines=["Noop"]), make_job(engine=Engine.DOCKER), "Docker installed: false"),
        (installed(engines=["Noop", "Docker"]), make_job(engine=Engine.DOCKER), ""),
        (
            installed(verifiers=["Noop"]),
            make_job(Verifier=Verifier.DETERMINISTIC),
            "Deterministic installed: false",
        ),
        (installed(verifiers=["Noop"]), make_job(), ""),  # absent verifier means Noop
        (installed(verifiers=[]), make_job(), "Noop installed: false"),
        (
            installed(publishers=["Noop"]),
            make_job(Publisher=Publisher.ESTUARY),
            "Estuary installed: false",
        ),
        (
            installed(publishers=["Noop"]),
            make_job(Publisher=Publisher.IPFS),
            "Ipfs installed: false",
        ),
        (
            installed(publishers=["Noop", "Estuary"]),
            make_job(Publisher=Publisher.ESTUARY, PublisherSpec=PublisherSpec(Type=Publisher.S3)),
            "S3 installed: false",  # PublisherSpec.Type wins
        ),
        (
            # engine first, then verifier, then publisher
            installed(engines=["Noop"], verifiers=["Noop"], publishers=["Noop"]),
            make_job(
                engine=Engine.WASM, Verifier=Verifier.DETERMINISTIC, Publisher=Publisher.ESTUARY
            ),
            "Wasm installed: false",
        ),
        (
            installed(verifiers=["Noop"], publishers=["Noop"]),
            make_job(Verifier=Verifier.DETERMINISTIC, Publisher=Publisher.ESTUARY),
            "Deterministic installed: false",
        ),
    ],
)
async def test_provider_installed(strategy: InstalledStrategy, job: Job, reason: str) -> None:
    decision = await strategy.should_bid(make_req(job))
    assert (decision.bid, decision.reason) == (reason == "", reason)


@pytest.mark.parametrize(
    "job",
    [
        make_job(inputs=[ipfs()]),
        make_job(outputs=[StorageSpec(StorageSource=StorageSource.IPFS, Name="out")]),
        make_job(engine=Engine.WASM, Wasm=WasmSpec(EntryModule=ipfs())),
    ],
    ids=["inputs", "outputs", "wasm-entry-module"],
)
async def test_storage_installed(job: Job) -> None:
    assert await installed(sources=[]).should_bid(make_req(job)) == BidDecision(
        False, "IPFS installed: false"
    )
    assert await installed(sources=["IPFS"]).should_bid(make_req(job)) == BidDecision(True)


async def test_no_storage_bids_whatever_is_installed() -> None:
    job = make_job(outputs=[StorageSpec(Name="out", path="/out")])  # no StorageSource: skipped
    assert (await installed(sources=[]).should_bid(make_req(job))).bid
    assert (await installed().should_bid(make_req(job))).bid


# -- locality ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("locality", "inputs", "bid"),
    [
        ("local", ["present"], True),
        ("local", ["missing"], False),
        ("local", ["present", "missing"], False),
        ("local", [], True),
        ("anywhere", ["present"], True),
        ("anywhere", ["missing"], True),
        ("anywhere", [], True),
    ],
)
async def test_locality(locality: Any, inputs: list[str], bid: bool) -> None:
    strategy = LocalityStrategy(locality=locality, is_local=lambda s: s.CID == "present")
    decision = await strategy.should_bid(make_req(make_job(inputs=[ipfs(c) for c in inputs])))
    assert decision == (
        BidDecision(True) if bid else BidDecision(False, "not all inputs are local")
    )


async def test_locality_default_check(tmp_path: Path) -> None:
    strategy = LocalityStrategy(locality="local")
    inline = StorageSpec(StorageSource=StorageSource.INLINE, URL="data:,hi")
    here = StorageSpec(StorageSource=StorageSource.LOCAL_DIRECTORY, SourcePath=str(tmp_path))
    gone = StorageSpec(
        StorageSource=StorageSource.LOCAL_DIRECTORY, SourcePath=str(tmp_path / "gone")
    )
    assert (await strategy.should_bid(make_req(make_job(inputs=[inline, here])))).bid
    for missing in (gone, ipfs()):
        decision = await strategy.should_bid(make_req(make_job(inputs=[inline, missing])))
        assert decision.reason == "not all inputs are local"


def test_locality_validation() -> None:
    with pytest.raises(ValueError):
        LocalityStrategy(locality="nearby")  # type: ignore[arg-type]


# -- timeout -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("timeout", "client", "max_s", "min_s", "reason"),
    [
        (
            9223372036.1,
            "client",
            3600,
            0.5,
            "job timeout 9223372036.1 exceeds maximum possible value",
        ),
        (
            9223372036.1,
            "other",
            3600,
            0.5,
            "job timeout 9223372036.1 exceeds maximum possible value",
        ),
        (9223372036, "client", 3600, 0.5, ""),
        (
            1e20,
            "client",
            3600,
            0.5,
            "job timeout 100000000000000000000 exceeds maximum possible value",
        ),
        (float("inf"), "client", 3600, 0.5, "job timeout +Inf exceeds maximum possible value"),
        (120, "other", 60, 0.5, "job timeout 2m0s exceeds maximum allowed 1m0s"),
        (120, "client", 60, 0.5, ""),  # bypass skips the maximum
        (120, "other", 3600, 300, "job timeout 2m0s below minimum allowed 5m0s"),
        (120, "client", 3600, 300, ""),  # and the minimum
        (0.1, "other", 3600, 0.5, "job timeout 100ms below minimum allowed 500ms"),
        (0, "other", 60, 300, ""),  # 0 = the node's default
        (7200, "other", 0, 0.5, ""),  # no maximum
        (3600, "other", 3600, 0.5, ""),  # boundary
        (
            9223372036,
            "other",
            3600,
            0.5,
            "job timeout 2562047h47m16s exceeds maximum allowed 1h0m0s",
        ),
    ],
)
async def test_timeout(
    timeout: float, client: str, max_s: float, min_s: float, reason: str
) -> None:
    strategy = TimeoutStrategy(max_seconds=max_s, min_seconds=min_s, bypass=["client"])
    decision = await strategy.should_bid(make_req(make_job(timeout=timeout, client_id=client)))
    assert decision == BidDecision(reason == "", reason)


async def test_timeout_through_bidder_uses_limits() -> None:
    bidder = make_bidder(
        limits=make_limits(job_timeout_max=60, job_timeout_min=0.5), timeout_bypass=["vip"]
    )
    decision, usage = await bidder.decide(make_req(make_job(timeout=120)))
    assert decision.reason == "job timeout 2m0s exceeds maximum allowed 1m0s"
    assert usage is None
    decision, usage = await bidder.decide(make_req(make_job(timeout=120, client_id="vip")))
    assert decision.bid and usage is not None


# -- usage and per-job limit ---------------------------------------------------------------


async def test_usage_defaults_for_empty_job() -> None:
    bidder = make_bidder()
    decision, usage = await bidder.decide(make_req())
    assert decision == BidDecision(True)
    assert usage == ResourceUsage(CPU=0.1, Memory=104857600)
    assert bidder.pool.where("e-1") == "pending"
    assert bidder.pool.usage_of("e-1") == usage


async def test_usage_exact_request() -> None:
    bidder = make_bidder()
    res = ResourcesConfig(CPU="1.000000", Memory="2", Disk="3", GPU="0")
    decision, usage = await bidder.decide(make_req(make_job(resources=res)))
    assert decision.bid
    assert usage == ResourceUsage(CPU=1, Memory=2, Disk=3, GPU=0)


async def test_usage_disk_at_least_input_sizes() -> None:
    sizes = {"a": 600 * MI, "b": 400 * MI}
    bidder = make_bidder(input_size=lambda s: sizes.get(s.CID, 0))
    job = make_job(inputs=[ipfs("a"), ipfs("b"), ipfs("unknown")])
    _, usage = await bidder.decide(make_req(job))
    assert usage == ResourceUsage(CPU=0.1, Memory=100 * MI, Disk=1000 * MI)
    job = make_job(inputs=[ipfs("a")], resources=ResourcesConfig(Disk="1Gi"))
    _, usage = await bidder.decide(make_req(job, eid="e-2"))
    assert usage is not None and usage.Disk == GI


def test_calculate_usage_defaults_fill_only_unset() -> None:
    job = make_job()
    got = calculate_usage(job, ResourceUsage(Memory=5), defaults=ResourceUsage(CPU=0.5, Memory=9))
    assert got == ResourceUsage(CPU=0.5, Memory=5)


@pytest.mark.parametrize(("cpu", "bid"), [("1", True), ("2", True), ("2.01", False)])
async def test_job_limit_cpu_2(cpu: str, bid: bool) -> None:
    limits = make_limits(job=ResourceUsage(CPU=2, Memory=16 * GI, Disk=100 * GI, GPU=1))
    bidder = make_bidder(limits=limits)
    decision, usage = await bidder.decide(make_req(make_job(resources=ResourcesConfig(CPU=cpu))))
    assert decision.bid is bid
    if not bid:
        assert decision.reason.startswith("job requirements exceed max allowed per job")
        assert not decision.retryable
        assert usage is None
        assert "e-1" not in bidder.pool


def test_max_per_job_detail() -> None:
    strategy = MaxPerJobStrategy(job_limit=ResourceUsage(CPU=2, Memory=10))
    decision = strategy.check(ResourceUsage(CPU=2.01, Memory=11))
    assert decision.reason == (
        "job requirements exceed max allowed per job: CPU 2.01 > 2, Memory 11 > 10"
    )


async def test_gpu_request_on_node_without_gpus() -> None:
    limits = make_limits(job=ResourceUsage(CPU=8, Memory=16 * GI, Disk=100 * GI, GPU=0))
    decision, _ = await make_bidder(limits=limits).decide(
        make_req(make_job(resources=ResourcesConfig(GPU="1")))
    )
    assert decision.reason == "job requirements exceed max allowed per job: GPU 1 > 0"


# -- capacity and requester share ----------------------------------------------------------


async def test_capacity_is_reserved_and_declines_are_retryable() -> None:
    total = ResourceUsage(CPU=1, Memory=GI, Disk=GI)
    limits = Limits(total=total, queue=ZERO, job=total, default_job=DEFAULT_JOB_USAGE)
    bidder = make_bidder(limits=limits)
    one_cpu = make_job(resources=ResourcesConfig(CPU="0.6"))
    decision, usage = await bidder.decide(make_req(one_cpu, eid="a"))
    assert decision.bid and usage is not None
    decision, usage = await bidder.decide(make_req(one_cpu, eid="b"))
    assert not decision.bid and decision.retryable
    assert decision.reason.startswith("not enough capacity available")
    assert usage is None and "b" not in bidder.pool
    bidder.pool.release("a")
    decision, _ = await bidder.decide(make_req(one_cpu, eid="b"))
    assert decision.bid


async def test_requester_share() -> None:
    limits = make_limits()
    pool = CapacityPool(total=limits.total, queue=limits.queue, max_pending_per_requester=2)
    bidder = make_bidder(limits=limits, pool=pool)
    for eid in ("a", "b"):
        assert (await bidder.decide(make_req(eid=eid, requester="greedy")))[0].bid
    decision, _ = await bidder.decide(make_req(eid="c", requester="greedy"))
    assert decision == BidDecision(False, "too many pending bids from greedy", True)
    assert (await bidder.decide(make_req(eid="d", requester="polite")))[0].bid


# -- node state ----------------------------------------------------------------------------


async def test_draining_and_store_unavailable() -> None:
    state = {"draining": False, "store": True}
    bidder = make_bidder(
        is_draining=lambda: state["draining"], store_available=lambda: state["store"]
    )
    state["store"] = False
    bad = make_job(resources=ResourcesConfig(CPU="lots"))  # draining/store win over everything
    assert (await bidder.decide(make_req(bad)))[0] == BidDecision(False, "store unavailable", True)
    state["draining"] = True
    assert (await bidder.decide(make_req(bad)))[0] == BidDecision(False, "node is draining", True)
    state.update(draining=False, store=True)
    assert (await bidder.decide(make_req()))[0].bid


async def test_draining_checked_again_after_probes() -> None:
    state = {"draining": False}
    probe = FakeProbe(BidDecision(True), on_call=lambda: state.update(draining=True))
    bidder = make_bidder(is_draining=lambda: state["draining"], probes=[probe])
    decision, usage = await bidder.decide(make_req())
    assert decision == BidDecision(False, "node is draining", True)
    assert usage is None and len(bidder.pool) == 0


# -- order: the first no wins --------------------------------------------------------------


async def test_chain_order_first_no_wins() -> None:
    probe = FakeProbe(BidDecision(False, "url `http://x` returned 500 status code"))
    limits = make_limits(
        job=ResourceUsage(CPU=1, Memory=GI, Disk=GI), job_timeout_max=60, job_timeout_min=1
    )
    bidder = make_bidder(
        limits=limits,
        engines=["Noop"],
        storage_sources=["Inline"],
        reject_stateless=True,
        locality="local",
        is_local=lambda s: s.CID != "remote",
        probes=[probe],
    )
    # A job that fails every check; each round fixes the cause the chain reported, so the
    # reasons must come out in the table's order.
    job_kw: dict[str, Any] = {
        "resources": ResourcesConfig(Memory="x"),
        "network": NetworkType.FULL,
        "inputs": [],
        "engine": Engine.DOCKER,
        "timeout": 120,
    }
    remote_inline = StorageSpec(StorageSource=StorageSource.INLINE, CID="remote")
    rounds: list[tuple[str, dict[str, Any]]] = [
        ('invalid resource request: Memory "x"', {"resources": ResourcesConfig(CPU="2")}),
        ("networking is enabled: false", {"network": NetworkType.NONE}),
        ("stateless jobs not accepted", {"inputs": [ipfs("remote")]}),
        ("Docker installed: false", {"engine": Engine.NOOP}),
        ("IPFS installed: false", {"inputs": [remote_inline]}),
        ("not all inputs are local", {"inputs": [StorageSpec(StorageSource=StorageSource.INLINE)]}),
        ("job timeout 2m0s exceeds maximum allowed 1m0s", {"timeout": 30}),
        ("url `http://x` returned 500 status code", {}),
    ]
    for i, (reason, fix) in enumerate(rounds):
        decision, usage = await bidder.decide(make_req(make_job(**job_kw), eid=f"e{i}"))
        assert decision.reason.startswith(reason), (i, decision.reason)
        assert not decision.bid and usage is None
        assert probe.calls == (1 if reason.startswith("url") else 0)
        job_kw.update(fix)
    probe.decision = BidDecision(True)
    decision, _ = await bidder.decide(make_req(make_job(**job_kw), eid="max"))
    assert decision.reason == "job requirements exceed max allowed per job: CPU 2 > 1"
    job_kw["resources"] = ResourcesConfig(CPU="1")
    decision, usage = await bidder.decide(make_req(make_job(**job_kw), eid="ok"))
    assert decision == BidDecision(True) and usage is not None
    assert len(bidder.pool) == 1


async def test_probes_run_in_order_and_stop_at_first_no() -> None:
    first = FakeProbe(BidDecision(False, "first"))
    second = FakeProbe(BidDecision(False, "second"))
    decision, _ = await make_bidder(probes=[first, second]).decide(make_req())
    assert decision.reason == "first"
    assert (first.calls, second.calls) == (1, 0)


async def test_resource_strategies_run_after_max_per_job() -> None:
    extra = FakeResource(BidDecision(False, "too hot"))
    bidder = make_bidder(resource_strategies=[extra])
    decision, usage = await bidder.decide(make_req())
    assert decision.reason == "too hot" and usage is None
    assert extra.seen == [DEFAULT_JOB_USAGE]
    limits = make_limits(job=ResourceUsage(CPU=0.05, Memory=GI, Disk=GI))
    extra.seen.clear()
    decision, _ = await make_bidder(limits=limits, resource_strategies=[extra]).decide(make_req())
    assert decision.reason.startswith("job requirements exceed max allowed per job")
    assert extra.seen == []


async def test_executor_strategy_only_for_its_engine() -> None:
    wasm_check = FakeProbe(BidDecision(False, "Language version 2.7 not available"))
    bidder = make_bidder(executor_strategies={"Wasm": wasm_check})
    assert (await bidder.decide(make_req(make_job(engine=Engine.NOOP), eid="a")))[0].bid
    decision, _ = await bidder.decide(make_req(make_job(engine=Engine.WASM), eid="b"))
    assert decision.reason == "Language version 2.7 not available"


# -- strategies that raise -----------------------------------------------------------------


async def test_raising_strategies_become_declines() -> None:
    boom = FakeProbe(RuntimeError("probe exploded"))
    decision, usage = await make_bidder(probes=[boom]).decide(make_req())
    assert decision == BidDecision(False, "bid strategy FakeProbe failed: probe exploded")
    assert usage is None

    def broken_is_local(spec: StorageSpec) -> bool:
        raise OSError("disk gone")

    bidder = make_bidder(locality="local", is_local=broken_is_local)
    decision, _ = await bidder.decide(make_req(make_job(inputs=[ipfs()])))
    assert decision.reason == "bid strategy LocalityStrategy failed: disk gone"

    def broken_size(spec: StorageSpec) -> int:
        raise ValueError("no size")

    bidder = make_bidder(input_size=broken_size)
    decision, _ = await bidder.decide(make_req(make_job(inputs=[ipfs()])))
    assert decision.reason == "error getting job disk space requirements: no size"

    bidder = make_bidder(resource_strategies=[FakeResource(KeyError("k"))])
    decision, _ = await bidder.decide(make_req())
    assert decision.reason.startswith("bid strategy FakeResource failed")
    assert len(bidder.pool) == 0


async def test_invalid_resource_request_reason() -> None:
    for res, detail in [
        (ResourcesConfig(CPU="-1"), 'CPU "-1": negative'),
        (ResourcesConfig(GPU="1.0"), 'GPU "1.0"'),
        (ResourcesConfig(Disk="1.5.5Gi"), 'Disk "1.5.5Gi"'),
    ]:
        decision, _ = await make_bidder().decide(make_req(make_job(resources=res)))
        assert decision.reason.startswith(f"invalid resource request: {detail}")
        assert not decision.retryable
