"""Two load shapes, both bounded in count and in time: one operation at a time, and N in
flight (N worker coroutines that each start the next operation as soon as theirs ends).

An operation is an ``async () -> float | None``: it returns the latency it measured
(seconds; it decides what to time) or ``None`` when it did not count (a decline).
Exceptions are counted as errors, never raised: a load always ends by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

Op = Callable[[], Awaitable[float | None]]
INFLIGHT = 64  # requests in flight for every "64 in flight" figure


class Window(Protocol):
    """Told when the measured window opens and closes (after the warm-up, before the
    drain), so that what it measures covers the counted operations only."""

    def open(self) -> None: ...

    def close(self) -> None: ...


class _NoWindow:
    def open(self) -> None:
        pass

    def close(self) -> None:
        pass


class _Timed:
    """Opens ``window`` once ``delay`` seconds have passed (at once on ``close`` if they
    have not: a load that ended during its warm-up has an empty window)."""

    def __init__(self, window: Window, delay: float) -> None:
        self.window = window
        self.opened = False
        self.handle = asyncio.get_running_loop().call_later(delay, self._open)

    def _open(self) -> None:
        self.opened = True
        self.window.open()

    def close(self) -> None:
        self.handle.cancel()
        if not self.opened:
            self._open()
        self.window.close()


@dataclass
class LoadResult:
    ops: int = 0  # operations that counted, completed inside the window
    skipped: int = 0  # operations that returned None (declines)
    errors: int = 0
    elapsed: float = 0.0
    latencies: list[float] = field(default_factory=list)
    first_error: str = ""

    @property
    def rate(self) -> float:
        return self.ops / self.elapsed if self.elapsed else 0.0


async def sequential(
    op: Op, *, n: int, warmup: int, max_s: float, window: Window | None = None
) -> LoadResult:
    """``warmup`` untimed operations, then up to ``n`` timed ones (or ``max_s`` seconds)."""
    window = window or _NoWindow()
    result = LoadResult()
    for _ in range(warmup):
        try:
            await op()
        except Exception:
            result.errors += 1
    result.errors = 0
    window.open()
    t0 = time.perf_counter()
    end = t0 + max_s
    while result.ops + result.skipped + result.errors < n and time.perf_counter() < end:
        try:
            latency = await op()
        except Exception as exc:
            result.errors += 1
            result.first_error = result.first_error or repr(exc)
            continue
        if latency is None:
            result.skipped += 1
        else:
            result.ops += 1
            result.latencies.append(latency)
    result.elapsed = time.perf_counter() - t0
    window.close()
    return result


async def concurrent(
    op: Op,
    *,
    inflight: int,
    duration: float,
    warmup: float,
    max_ops: int,
    drain: float = 15.0,
    window: Window | None = None,
) -> LoadResult:
    """``inflight`` workers for ``warmup`` + ``duration`` seconds (or until ``max_ops``
    operations counted); only operations that end inside the measured window count."""
    result = LoadResult()
    t_start = time.perf_counter() + warmup
    t_end = t_start + duration
    stop = False
    done = asyncio.Event()
    timed = _Timed(window or _NoWindow(), warmup)

    async def worker() -> None:
        nonlocal stop
        while not stop:
            try:
                latency = await op()
            except Exception as exc:
                now = time.perf_counter()
                if t_start <= now <= t_end:
                    result.errors += 1
                    result.first_error = result.first_error or repr(exc)
                continue
            now = time.perf_counter()
            if now < t_start:
                continue
            if now > t_end:
                stop = True
                return
            if latency is None:
                result.skipped += 1
                continue
            result.ops += 1
            result.latencies.append(latency)
            if result.ops >= max_ops:
                stop = True
                result.elapsed = now - t_start
                done.set()

    tasks = [asyncio.create_task(worker()) for _ in range(inflight)]
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(done.wait(), max(0.0, t_end - time.perf_counter()))
    stop = True
    timed.close()
    if not result.elapsed:
        result.elapsed = min(time.perf_counter(), t_end) - t_start
    _, pending = await asyncio.wait(tasks, timeout=drain)
    for task in pending:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return result
