"""Shared fixtures: a real nats-server on a random loopback port, per test session."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client

from tests.natsproc import NatsServer


@pytest.fixture(scope="session")
def nats_server() -> Iterator[NatsServer]:
    d = Path(tempfile.mkdtemp(prefix="nats-test-"))
    server = NatsServer(d)
    server.start()
    yield server
    server.stop()
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def nats_url(nats_server: NatsServer) -> str:
    return nats_server.url


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[Client]:
    client = await nats.connect(nats_url, max_reconnect_attempts=2, reconnect_time_wait=0.2)
    yield client
    await client.close()
