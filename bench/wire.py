"""Request bodies, headers and reply parsing for the load generator (raw nats-py + msgspec).

The bench talks the wire protocol itself rather than through ``worker.requester`` so the
client side costs as little as it does for the echo baseline: one pre-built body per
request (only the job ID changes), one ``traceparent`` per request, and replies decoded
into tiny Structs.
"""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import Sequence

import msgspec

REQUESTER = "bench"
ERROR_CODE = "Nats-Service-Error-Code"

# A realistic Noop ask (v0.3.25 model.Job, as tests/ and the corpus send it): ~0.6 KB.
_ASK = {
    "SourcePeerID": REQUESTER,
    "TargetPeerID": "",
    "Job": {
        "APIVersion": "V1beta1",
        "Metadata": {
            "ID": "@@JOB@@",
            "ClientID": "bench-client-0123456789abcdef0123456789abcdef",
            "CreatedAt": "2024-01-01T00:00:00.000000Z",
            "Requester": {"RequesterNodeID": REQUESTER, "RequesterPublicKey": ""},
        },
        "Spec": {
            "Engine": "Noop",
            "Verifier": "Noop",
            "Publisher": "Noop",
            "Resources": {"CPU": "100m", "Memory": "64Mi", "Disk": "", "GPU": ""},
            "Network": {"Type": "None"},
            "Timeout": 60,
            "outputs": [{"Name": "outputs", "path": "/outputs"}],
            "Deal": {"Concurrency": 1, "Confidence": 0, "MinBids": 0},
        },
    },
}
_ASK_HEAD, _ASK_TAIL = msgspec.json.encode(_ASK).split(b"@@JOB@@")


def ask_body(job_id: str) -> bytes:
    return b"".join((_ASK_HEAD, job_id.encode(), _ASK_TAIL))


def op_body(execution_id: str, justification: str = "") -> bytes:
    """Body of BidAccepted / BidRejected / ResultAccepted."""
    if justification:
        return b'{"SourcePeerID":"%s","ExecutionID":"%s","Justification":"%s"}' % (
            REQUESTER.encode(),
            execution_id.encode(),
            justification.encode(),
        )
    return b'{"SourcePeerID":"%s","ExecutionID":"%s"}' % (
        REQUESTER.encode(),
        execution_id.encode(),
    )


class JobIds:
    """Unique job IDs for one run (a job ID is never asked twice)."""

    def __init__(self, tag: str) -> None:
        self._prefix = f"j-{tag}-{uuid.uuid4().hex[:8]}-"
        self._n = itertools.count()

    def next(self) -> str:
        return f"{self._prefix}{next(self._n)}"


def traceparent() -> str:
    return f"00-{os.urandom(16).hex()}-{os.urandom(8).hex()}-01"


class Headers:
    """A fresh W3C ``traceparent`` per request, as a tracing requester sends."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled

    def next(self) -> dict[str, str] | None:
        return {"traceparent": traceparent()} if self.enabled else None


class Bid(msgspec.Struct):
    ExecutionID: str = ""
    Accepted: bool = False
    Reason: str = ""
    NodeID: str = ""


class Callback(msgspec.Struct):
    ExecutionID: str = ""
    Seq: int = 0


bid_decoder = msgspec.json.Decoder(Bid)
callback_decoder = msgspec.json.Decoder(Callback)


class ReplyError(Exception):
    def __init__(self, code: str, body: bytes) -> None:
        super().__init__(f"{code}: {body[:300]!r}")
        self.code = code


def check(headers: dict[str, str] | None, data: bytes) -> None:
    if headers and ERROR_CODE in headers:
        raise ReplyError(headers[ERROR_CODE], data)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted sequence."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, round(q / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[k]


def latency_summary(samples: list[float]) -> dict[str, float]:
    """p50/p90/p99/max in milliseconds of samples in seconds."""
    s = sorted(samples)
    return {
        "n": len(s),
        "p50_ms": round(percentile(s, 50) * 1e3, 4),
        "p90_ms": round(percentile(s, 90) * 1e3, 4),
        "p99_ms": round(percentile(s, 99) * 1e3, 4),
        "max_ms": round(s[-1] * 1e3, 4) if s else float("nan"),
    }
