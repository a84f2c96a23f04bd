"""Callback intake: each callback checked, deduplicated and queued per execution (§6).

A node publishes on ``<p>.orchestrator.<requester>.<node>.<Kind>/v1``; a body whose
``SourcePeerID`` is not that node token is forged and dropped. Redeliveries are
recognised by ``Nats-Msg-Id`` (else execution ID and sequence) and counted, not queued.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict, deque
from collections.abc import Iterable

from nats.aio.msg import Msg

from schemas.callbacks import (
    KIND_OF,
    Callback,
    CallbackKind,
    CancelResult,
    ComputeError,
    PublishResult,
    RunResult,
)
from schemas.codec import DecodeError, decode

__all__ = ["AFTER_ACCEPT", "DEDUP_MEMORY", "MSG_ID_HEADER", "TERMINAL_KINDS", "CallbackInbox"]

log = logging.getLogger("worker.requester")  # one logger name for the whole package

MSG_ID_HEADER = "Nats-Msg-Id"
DEDUP_MEMORY = 65_536  # Nats-Msg-Ids remembered (oldest forgotten first)

_CALLBACK_TYPES: dict[str, type[Callback]] = {
    CallbackKind.RUN_COMPLETE: RunResult,
    CallbackKind.PUBLISH_COMPLETE: PublishResult,
    CallbackKind.CANCEL_COMPLETE: CancelResult,
    CallbackKind.COMPUTE_FAILURE: ComputeError,
}
TERMINAL_KINDS = frozenset(
    {CallbackKind.PUBLISH_COMPLETE, CallbackKind.COMPUTE_FAILURE, CallbackKind.CANCEL_COMPLETE}
)
AFTER_ACCEPT = frozenset({CallbackKind.RUN_COMPLETE, *TERMINAL_KINDS})


class CallbackInbox:
    """The callbacks of one requester, queued per execution until someone waits for them."""

    def __init__(self, *, prefix: str, requester_id: str) -> None:
        self.prefix = prefix
        self.requester_id = requester_id
        self.dropped = 0
        self.duplicates = 0
        self._pending: dict[str, deque[Callback]] = {}
        self._received: dict[str, list[Callback]] = {}
        self._msg_ids: OrderedDict[str, None] = OrderedDict()
        self._arrived = asyncio.Condition()

    def _parse(self, msg: Msg) -> Callback | None:
        head = f"{self.prefix}.orchestrator.{self.requester_id}."
        if not msg.subject.startswith(head):
            return None
        node, _, method = msg.subject[len(head) :].partition(".")
        kind, slash, version = method.partition("/")
        cls = _CALLBACK_TYPES.get(kind)
        if cls is None or (slash, version) != ("/", "v1"):
            return None
        try:
            cb = decode(msg.data, cls)
        except DecodeError:
            return None
        # A node may publish only under its own token: a body claiming another is forged.
        return cb if cb.SourcePeerID == node else None

    async def put(self, msg: Msg) -> None:
        """The subscription callback: file ``msg``, or count it as dropped or duplicate."""
        cb = self._parse(msg)
        if cb is None:
            self.dropped += 1
            log.warning("dropped callback on %s", msg.subject)
            return
        msg_id = (msg.headers or {}).get(MSG_ID_HEADER) or f"{cb.ExecutionID}:{cb.Seq}"
        if msg_id in self._msg_ids:
            self.duplicates += 1
            return
        self._msg_ids[msg_id] = None
        if len(self._msg_ids) > DEDUP_MEMORY:
            self._msg_ids.popitem(last=False)
        async with self._arrived:
            self._pending.setdefault(cb.ExecutionID, deque()).append(cb)
            self._received.setdefault(cb.ExecutionID, []).append(cb)
            self._arrived.notify_all()

    def _take(self, execution_id: str, kinds: frozenset[CallbackKind] | None) -> Callback | None:
        queue = self._pending.get(execution_id, deque())
        for i, cb in enumerate(queue):
            if kinds is None or KIND_OF[type(cb)] in kinds:
                del queue[i]
                return cb
        return None

    async def wait(
        self,
        execution_id: str,
        kinds: Iterable[CallbackKind | str] | None = None,
        timeout: float | None = 30.0,
    ) -> Callback:
        """The next callback of ``execution_id`` (of one of ``kinds``), consumed once.

        Callbacks of other kinds stay queued. Raises TimeoutError after ``timeout`` s.
        """
        wanted = None if kinds is None else frozenset(CallbackKind(k) for k in kinds)
        async with asyncio.timeout(timeout), self._arrived:
            while (found := self._take(execution_id, wanted)) is None:
                await self._arrived.wait()
            return found

    def received(self, execution_id: str) -> list[Callback]:
        """Every callback received for ``execution_id``, in arrival order."""
        return list(self._received.get(execution_id, ()))
