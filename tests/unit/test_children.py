"""worker.children: signals reach asyncio's children without a poll that could reap them
behind the child watcher (CPython gh-87744: the watcher then reports 255)."""

from __future__ import annotations

import asyncio
import signal
import sys

import pytest

from tests.helpers import record_polls
from worker import children


async def _sleeper(*, session: bool = False) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import time; time.sleep(600)", start_new_session=session
    )


async def test_send_signals_the_child_without_polling_it(monkeypatch: pytest.MonkeyPatch) -> None:
    proc = await _sleeper()
    polled = record_polls(monkeypatch)
    children.send(proc, signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 30) == -signal.SIGTERM
    assert proc.pid not in polled


async def test_send_after_the_exit_leaves_the_status_alone() -> None:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", "raise SystemExit(3)")
    assert await asyncio.wait_for(proc.wait(), 30) == 3
    children.send(proc, signal.SIGKILL)  # nothing to signal any more: no error either
    assert proc.returncode == 3


async def test_kill_group_kills_the_child_without_polling_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    proc = await _sleeper(session=True)
    polled = record_polls(monkeypatch)
    children.kill_group(proc)
    assert await asyncio.wait_for(proc.wait(), 30) == -signal.SIGKILL
    assert proc.pid not in polled
    children.kill_group(proc)  # the group is gone: fine
