"""Test helpers: wait for a condition instead of sleeping; a loopback HTTP server base;
a record of the child processes polled behind asyncio's child watcher."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from http.server import ThreadingHTTPServer
from typing import Any, TypeVar

import pytest

T = TypeVar("T")


async def assert_eventually(
    check: Callable[[], Awaitable[T] | T], *, timeout: float = 10.0, interval: float = 0.01
) -> T:
    """Poll ``check`` until it returns a truthy value without raising; return that value.

    Raises the last AssertionError (or a timeout AssertionError) once ``timeout`` passes.
    """
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            value = check()
            if asyncio.iscoroutine(value) or isinstance(value, asyncio.Future):
                value = await value
            if value:
                return value  # type: ignore[return-value]
            last = None
        except AssertionError as exc:
            last = exc
        if time.monotonic() > deadline:
            if last is not None:
                raise last
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


class LoopbackHTTPServer(ThreadingHTTPServer):
    """A test HTTP server whose handler threads never keep the test process alive
    (daemon threads), and which does not print a traceback when a client hangs up early
    (what the size-limit and timeout tests make the node do); any other handler error is
    printed as usual."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def record_polls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The pids ``subprocess.Popen.poll`` runs for from now on. asyncio's ``Process.kill``
    / ``terminate`` / ``send_signal`` poll first (Python 3.11), and a poll of a child that
    has just died reaps it behind asyncio's child watcher, which then reports exit status
    255 (CPython gh-87744; ``worker.children``)."""
    polled: list[int] = []
    original = subprocess.Popen.poll

    def poll(self: subprocess.Popen[Any]) -> int | None:
        polled.append(self.pid)
        return original(self)

    monkeypatch.setattr(subprocess.Popen, "poll", poll)
    return polled
