"""Builders of callback bodies and headers, run inside the store's transaction.

A callback is written to the outbox with its exact body and headers, so a re-send after
a restart is byte-identical and carries the same ``Nats-Msg-Id``.
"""

from __future__ import annotations

from schemas.callbacks import (
    CallbackKind,
    CancelResult,
    ComputeError,
    PublishResult,
    RunResult,
    Usage,
)
from schemas.codec import encode
from schemas.job import StorageSpec
from worker import telemetry
from worker.store.types import CallbackBuilder, Execution, OutboxMessage
from worker.transport.subjects import Subjects


class CallbackFactory:
    """Makes the ``CallbackBuilder`` for each kind of callback of this node."""

    def __init__(self, *, node_id: str, subjects: Subjects, verification_ttl: float) -> None:
        self.node_id = node_id
        self.subjects = subjects
        self.verification_ttl = verification_ttl

    def _message(
        self, execution: Execution, seq: int, kind: CallbackKind, body: bytes
    ) -> OutboxMessage:
        headers = {"Nats-Msg-Id": f"{execution.id}:{seq}"}
        # Continue the trace of the BidAccepted request: its context is the parent. The
        # stored headers were written by ``telemetry.inject`` (valid, normalised W3C), so
        # they are copied as they are; extracting and injecting them gives the same bytes.
        headers.update(telemetry.trace_headers(execution.trace or execution.ask_trace))
        subject = self.subjects.callback(execution.requester, kind)
        link = execution.ask_trace if execution.trace and execution.ask_trace else {}
        return OutboxMessage(
            subject=subject, kind=kind.value, body=body, headers=headers, link=link
        )

    def run_result(self) -> CallbackBuilder:
        def build(ex: Execution, seq: int) -> OutboxMessage:
            body = RunResult(
                SourcePeerID=self.node_id,
                TargetPeerID=ex.requester,
                ExecutionID=ex.id,
                JobID=ex.job_id,
                Seq=seq,
                ResultProposal=ex.proposal or b"",
                RunCommandResult=ex.run_result,
                VerificationTTLSeconds=self.verification_ttl,
                Usage=ex.run_usage or Usage(),
            )
            return self._message(ex, seq, CallbackKind.RUN_COMPLETE, encode(body))

        return build

    def publish_result(self) -> CallbackBuilder:
        def build(ex: Execution, seq: int) -> OutboxMessage:
            body = PublishResult(
                SourcePeerID=self.node_id,
                TargetPeerID=ex.requester,
                ExecutionID=ex.id,
                JobID=ex.job_id,
                Seq=seq,
                PublishResult=ex.publish_result or StorageSpec(),
            )
            return self._message(ex, seq, CallbackKind.PUBLISH_COMPLETE, encode(body))

        return build

    def cancel_result(self) -> CallbackBuilder:
        def build(ex: Execution, seq: int) -> OutboxMessage:
            body = CancelResult(
                SourcePeerID=self.node_id,
                TargetPeerID=ex.requester,
                ExecutionID=ex.id,
                JobID=ex.job_id,
                Seq=seq,
            )
            return self._message(ex, seq, CallbackKind.CANCEL_COMPLETE, encode(body))

        return build

    def compute_error(self, err: str, cause: str) -> CallbackBuilder:
        def build(ex: Execution, seq: int) -> OutboxMessage:
            body = ComputeError(
                SourcePeerID=self.node_id,
                TargetPeerID=ex.requester,
                ExecutionID=ex.id,
                JobID=ex.job_id,
                Seq=seq,
                Err=err,
                Cause=cause,
            )
            return self._message(ex, seq, CallbackKind.COMPUTE_FAILURE, encode(body))

        return build

    def for_kind(
        self, kind: CallbackKind | None, *, err: str, cause: str
    ) -> CallbackBuilder | None:
        """The builder of the callback a transition announces (``None`` for none)."""
        if kind is None:
            return None
        if kind is CallbackKind.COMPUTE_FAILURE:
            return self.compute_error(err, cause)
        if kind is CallbackKind.CANCEL_COMPLETE:
            return self.cancel_result()
        if kind is CallbackKind.RUN_COMPLETE:
            return self.run_result()
        return self.publish_result()
