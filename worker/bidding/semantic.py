"""Semantic bid strategies: checks on the job alone (Bacalhau ``pkg/bidstrategy``).

Each strategy has a synchronous ``check`` (what the :class:`~worker.bidding.chain.Bidder`
calls, so the static part of a bid costs no task switch) and the async ``should_bid`` of
the :class:`~worker.bidding.types.SemanticStrategy` protocol. Reasons are Bacalhau's texts.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Collection
from typing import Literal

from schemas.job import NetworkType, StorageSource, StorageSpec
from worker import durations
from worker.bidding.types import BID, BidDecision, BidRequest, decline

Locality = Literal["local", "anywhere"]

MAX_TIMEOUT_SECONDS = 9223372036
"""``math.MaxInt64 / int64(time.Second)``: the longest timeout a Go Duration can hold."""


class _Sync:
    def check(self, req: BidRequest) -> BidDecision:
        raise NotImplementedError

    async def should_bid(self, req: BidRequest) -> BidDecision:
        return self.check(req)


class NetworkingStrategy(_Sync):
    """``Network.Type`` None always; Full and HTTP only when networked jobs are accepted,
    and HTTP only with a domain-allowlist proxy to enforce ``Domains``."""

    def __init__(self, *, accept_networked: bool, http_proxy: bool = False) -> None:
        self.accept_networked = accept_networked
        self.http_proxy = http_proxy

    def check(self, req: BidRequest) -> BidDecision:
        kind = req.job.Spec.Network.Type
        if kind == NetworkType.NONE:
            return BID
        if not self.accept_networked:
            return decline("networking is enabled: false")
        if kind == NetworkType.HTTP and not self.http_proxy:
            return decline("networking type HTTP not supported")
        return BID


class StatelessStrategy(_Sync):
    """When ``reject`` is set, a job with no inputs is declined."""

    def __init__(self, *, reject: bool) -> None:
        self.reject = reject

    def check(self, req: BidRequest) -> BidDecision:
        if self.reject and not req.job.Spec.inputs:
            return decline("stateless jobs not accepted")
        return BID


class InstalledStrategy(_Sync):
    """The engine, verifier, publisher and every storage source the job names must be
    installed, checked in that order (``<Name> installed: false``)."""

    def __init__(
        self,
        *,
        engines: Collection[str],
        verifiers: Collection[str],
        publishers: Collection[str],
        storage_sources: Collection[str],
    ) -> None:
        self.engines = frozenset(engines)
        self.verifiers = frozenset(verifiers)
        self.publishers = frozenset(publishers)
        self.storage_sources = frozenset(storage_sources)

    def check(self, req: BidRequest) -> BidDecision:
        spec = req.job.Spec
        pairs: list[tuple[str, frozenset[str]]] = [
            (str(spec.Engine), self.engines),
            (str(spec.verifier), self.verifiers),
            (str(spec.publisher), self.publishers),
        ]
        pairs += [
            (str(s.StorageSource), self.storage_sources)
            for s in spec.all_storage_specs()
            if s.StorageSource is not None
        ]
        for name, installed in pairs:
            if name not in installed:
                return decline(f"{name} installed: false")
        return BID


def inputs_on_node(spec: StorageSpec) -> bool:
    """The default locality test, without network I/O: inline data travels in the spec,
    and a local directory is here when its path exists; anything else must be fetched."""
    if spec.StorageSource == StorageSource.INLINE:
        return True
    if spec.StorageSource == StorageSource.LOCAL_DIRECTORY:
        return bool(spec.SourcePath) and os.path.exists(spec.SourcePath)
    return False


class LocalityStrategy(_Sync):
    """With locality ``local``, every input must already be on the node (``is_local``,
    by default :func:`inputs_on_node`)."""

    def __init__(
        self, *, locality: Locality, is_local: Callable[[StorageSpec], bool] | None = None
    ) -> None:
        if locality not in ("local", "anywhere"):
            raise ValueError(f"locality must be local or anywhere, not {locality!r}")
        self.locality = locality
        self.is_local = is_local or inputs_on_node

    def check(self, req: BidRequest) -> BidDecision:
        if self.locality == "anywhere":
            return BID
        if all(self.is_local(spec) for spec in req.job.Spec.inputs):
            return BID
        return decline("not all inputs are local")


class TimeoutStrategy(_Sync):
    """Bacalhau's ``TimeoutStrategy``: 0 means the node's default; past what a Go Duration
    holds is refused for everyone; then bypass clients skip the max and min checks."""

    def __init__(
        self, *, max_seconds: float, min_seconds: float, bypass: Collection[str] = ()
    ) -> None:
        self.max_ns = round(max_seconds * 1e9)
        self.min_ns = round(min_seconds * 1e9)
        self.bypass = frozenset(bypass)

    def check(self, req: BidRequest) -> BidDecision:
        timeout = req.job.Spec.Timeout
        if timeout <= 0:
            return BID
        if timeout > MAX_TIMEOUT_SECONDS:
            text = "+Inf" if math.isinf(timeout) else durations.format_float(timeout)
            return decline(f"job timeout {text} exceeds maximum possible value")
        if req.job.Metadata.ClientID in self.bypass:
            return BID
        ns = int(timeout * 1e9)  # Go: time.Duration(float64 seconds * 1e9), truncated
        if self.max_ns > 0 and ns > self.max_ns:
            return decline(f"job timeout {_go(ns)} exceeds maximum allowed {_go(self.max_ns)}")
        if ns < self.min_ns:
            return decline(f"job timeout {_go(ns)} below minimum allowed {_go(self.min_ns)}")
        return BID


def _go(ns: int) -> str:
    return durations.format(ns / 1e9)
