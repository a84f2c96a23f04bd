"""Logging to stderr, as text or JSON lines (stdout carries only NATS_URL= and NODE_ID=).

Every record carries the execution and job it is about (set by the executor for the
duration of a run or an upload) and the current trace and span IDs.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime

from opentelemetry import trace

_SUBJECT: ContextVar[tuple[str, str]] = ContextVar("worker_log_subject", default=("", ""))


@contextmanager
def about(execution_id: str, job_id: str) -> Iterator[None]:
    """Records logged inside carry this execution and job."""
    token = _SUBJECT.set((execution_id, job_id))
    try:
        yield
    finally:
        _SUBJECT.reset(token)


class ContextFilter(logging.Filter):
    """Adds ``execution_id``, ``job_id``, ``trace_id`` and ``span_id`` to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.execution_id, record.job_id = _SUBJECT.get()
        ctx = trace.get_current_span().get_span_context()
        record.trace_id = format(ctx.trace_id, "032x") if ctx.is_valid else ""
        record.span_id = format(ctx.span_id, "016x") if ctx.is_valid else ""
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in ("execution_id", "job_id", "trace_id", "span_id"):
            value = getattr(record, key, "")
            if value:
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = " ".join(
            f"{key}={value}"
            for key in ("execution_id", "job_id", "trace_id")
            if (value := getattr(record, key, ""))
        )
        return f"{line} [{extra}]" if extra else line


def setup_logging(fmt: str = "text", level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ContextFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("nats").setLevel(logging.WARNING)
