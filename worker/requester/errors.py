"""What a node's reply says when it is not the answer asked for (PROTOCOL.md §3).

An error reply carries its code in the ``Nats-Service-Error-Code`` header and, leniently
read, an error body; a server status message (``Status: 503``) means no node was
subscribed. Both become :class:`RequestFailed`, as does a body of the wrong type (500).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from msgspec import Struct
from nats.aio.msg import Msg

from schemas.codec import DecodeError, decode
from schemas.compute import AskForBidResponse

__all__ = [
    "ERROR_CODE_HEADER",
    "ERROR_HEADER",
    "NODE_HEADER",
    "STATUS_HEADER",
    "PlacementError",
    "RequestFailed",
    "decode_reply",
    "error_from",
]

T = TypeVar("T")

ERROR_CODE_HEADER = "Nats-Service-Error-Code"
ERROR_HEADER = "Nats-Service-Error"
NODE_HEADER = "Compute-Node-ID"
STATUS_HEADER = "Status"  # nats-py's key for a server status message (no responders)


class RequestFailed(Exception):
    """The node answered with an error reply (§3), or with a body of the wrong type (500)."""

    def __init__(
        self,
        code: int,
        message: str,
        *,
        state: str = "",
        cause: str = "",
        node_id: str = "",
    ) -> None:
        super().__init__(f"{code} {message}" + (f" (node {node_id})" if node_id else ""))
        self.code = code
        self.message = message
        self.state = state
        self.cause = cause
        self.node_id = node_id


class PlacementError(Exception):
    """``place`` could not get any bid accepted (or could not settle a lost accept)."""

    def __init__(self, message: str, *, bids: Sequence[AskForBidResponse] = ()) -> None:
        super().__init__(message)
        self.bids = list(bids)
        self.errors: list[RequestFailed] = list(getattr(bids, "errors", []))


class _ErrorReply(Struct):
    """The error body, read leniently: every field may be missing."""

    Error: str = ""
    Code: int = 0
    NodeID: str = ""
    State: str = ""
    Cause: str = ""


def error_from(msg: Msg, node_id: str) -> RequestFailed:
    """The error an error reply stands for (headers first, then its body)."""
    headers = msg.headers or {}
    try:
        code = int(headers.get(ERROR_CODE_HEADER, "500"))
    except ValueError:
        code = 500
    try:
        body = decode(msg.data, _ErrorReply)
    except DecodeError:
        body = _ErrorReply()
    return RequestFailed(
        code,
        headers.get(ERROR_HEADER) or body.Error,
        state=body.State,
        cause=body.Cause,
        node_id=body.NodeID or headers.get(NODE_HEADER) or node_id,
    )


def decode_reply(msg: Msg, rtype: type[T], node_id: str) -> T:
    """The reply's body as ``rtype``; raise RequestFailed for an error reply or a bad body."""
    if ERROR_CODE_HEADER in (msg.headers or {}):
        raise error_from(msg, node_id)
    try:
        return decode(msg.data, rtype)
    except DecodeError as exc:
        name = getattr(rtype, "__name__", str(rtype))
        raise RequestFailed(500, f"reply is not a {name}: {exc}", node_id=node_id) from exc
