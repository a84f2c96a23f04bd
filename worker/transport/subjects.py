"""The subjects of PROTOCOL.md §2 and the parsing of request subjects."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from schemas.callbacks import CallbackKind

ALL = "_all"
PARSED_MAX = 4096
ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")


def valid_id(value: str) -> bool:
    """A node or requester ID: one subject token, nothing else (no trailing newline)."""
    return ID_RE.fullmatch(value) is not None


class Method(StrEnum):
    ASK_FOR_BID = "AskForBid/v1"
    BID_ACCEPTED = "BidAccepted/v1"
    BID_REJECTED = "BidRejected/v1"
    RESULT_ACCEPTED = "ResultAccepted/v1"
    RESULT_REJECTED = "ResultRejected/v1"
    CANCEL_EXECUTION = "CancelExecution/v1"
    GET_EXECUTION = "GetExecution/v1"
    LIST_EXECUTIONS = "ListExecutions/v1"
    NODE_INFO = "NodeInfo/v1"
    EXECUTION_LOGS = "ExecutionLogs/v1"


@dataclass(frozen=True, slots=True)
class RequestSubject:
    """A parsed ``<p>.compute.<n>.<r>.<Method>`` subject; ``method`` None when unknown."""

    node: str
    requester: str
    method: Method | None
    raw_method: str


class Subjects:
    """Subject names for one prefix and node."""

    def __init__(self, *, prefix: str, node_id: str) -> None:
        self.prefix = prefix
        self.node_id = node_id
        self._compute = f"{prefix}.compute."
        self._parsed: dict[str, RequestSubject | None] = {}

    # -- what the node subscribes
    def direct(self) -> str:
        return f"{self.prefix}.compute.{self.node_id}.*.>"

    def fanout(self) -> str:
        return f"{self.prefix}.compute.{ALL}.*.>"

    # -- what the node publishes
    def request(self, node: str, requester: str, method: Method) -> str:
        return f"{self.prefix}.compute.{node}.{requester}.{method.value}"

    def callback(self, requester: str, kind: CallbackKind) -> str:
        return f"{self.prefix}.orchestrator.{requester}.{self.node_id}.{kind.value}/v1"

    def callbacks_wildcard(self) -> str:
        return f"{self.prefix}.orchestrator.>"

    def info(self, node: str | None = None) -> str:
        return f"{self.prefix}.info.{node or self.node_id}"

    def logs(self, requester: str, execution_id: str) -> str:
        return f"{self.prefix}.logs.{requester}.{self.node_id}.{execution_id}"

    def stream_name(self) -> str:
        return "CALLBACKS_" + self.prefix.replace(".", "_")

    def parse(self, subject: str) -> RequestSubject | None:
        """Split a request subject; None when it is not under ``<p>.compute.``.

        A node sees the same few subjects again and again (one per requester and method):
        they are remembered, up to ``PARSED_MAX`` of them."""
        try:
            return self._parsed[subject]
        except KeyError:
            pass
        parsed = self._parse(subject)
        if len(self._parsed) >= PARSED_MAX:  # only a bound: a miss costs one split
            self._parsed.clear()
        self._parsed[subject] = parsed
        return parsed

    def _parse(self, subject: str) -> RequestSubject | None:
        if not subject.startswith(self._compute):
            return None
        parts = subject[len(self._compute) :].split(".")
        if len(parts) != 3:
            return RequestSubject(node="", requester="", method=None, raw_method=subject)
        node, requester, raw = parts
        method = _METHODS.get(raw)
        return RequestSubject(node=node, requester=requester, method=method, raw_method=raw)


_METHODS: dict[str, Method] = {m.value: m for m in Method}
