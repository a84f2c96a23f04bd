"""The embedded nats-server: start, serve core NATS and JetStream, stop, restart on the
same port, refuse a taken port, die with its parent."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import nats
import pytest
from nats.aio.msg import Msg

from tests.helpers import assert_eventually
from worker.embedded import BrokerError, EmbeddedBroker

START_AND_HOLD = textwrap.dedent(
    """
    import asyncio, sys
    from worker.embedded import EmbeddedBroker

    async def main():
        broker = EmbeddedBroker(data_dir=sys.argv[1])
        await broker.start()
        print(broker.pid, flush=True)
        await asyncio.Event().wait()  # until killed

    asyncio.run(main())
    """
)


def is_gone(pid: int) -> bool:
    """True once ``pid`` no longer runs (reaped, or a zombie awaiting its new parent)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return True
    return fields[0] in ("Z", "X")


async def test_start_serve_stop_restart_same_port(tmp_path: Path) -> None:
    broker = EmbeddedBroker(data_dir=tmp_path)
    url = await broker.start()
    assert url.startswith("nats://127.0.0.1:")
    assert broker.port is not None and url.endswith(f":{broker.port}")
    assert broker.port_path.read_text() == f"{broker.port}\n"
    pid = broker.pid
    assert pid is not None

    nc = await nats.connect(url, max_reconnect_attempts=2, reconnect_time_wait=0.2)
    try:

        async def echo(msg: Msg) -> None:
            await nc.publish(msg.reply, b"echo:" + msg.data)

        await nc.subscribe("test.echo", cb=echo)
        reply = await nc.request("test.echo", b"hi", timeout=5)
        assert reply.data == b"echo:hi"
        assert nc.max_payload == 8 * 1024 * 1024

        js = nc.jetstream()
        info = await js.account_info()
        assert info.limits is not None
        await js.add_stream(name="KEEP", subjects=["keep.>"])
        ack = await js.publish("keep.one", b"1")
        assert ack.stream == "KEEP" and ack.seq == 1
    finally:
        await nc.close()

    await broker.stop()
    assert broker.pid is None
    assert is_gone(pid)
    assert not list(broker.dir.glob("*.ports"))
    await broker.stop()  # idempotent

    again = EmbeddedBroker(data_dir=tmp_path)
    assert await again.start() == url
    try:
        nc = await nats.connect(url, max_reconnect_attempts=2, reconnect_time_wait=0.2)
        try:
            stream = await nc.jetstream().stream_info("KEEP")  # the store is in the data dir
            assert stream.state.messages == 1
        finally:
            await nc.close()
    finally:
        await again.stop()
    assert (tmp_path / "broker" / "jetstream").is_dir()
    assert "Server is ready" in again.log_path.read_text()


async def test_persisted_port_taken_fails_clearly(tmp_path: Path) -> None:
    broker = EmbeddedBroker(data_dir=tmp_path)
    await broker.start()
    port = broker.port
    await broker.stop()

    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        second = EmbeddedBroker(data_dir=tmp_path)
        with pytest.raises(BrokerError) as info:
            await second.start()
    message = str(info.value)
    assert f"127.0.0.1:{port}" in message
    assert "address already in use" in message
    assert str(second.port_path) in message
    assert second.pid is None
    assert second.port_path.read_text() == f"{port}\n"  # not silently moved


async def test_child_dies_with_its_parent(tmp_path: Path) -> None:
    parent = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        START_AND_HOLD,
        str(tmp_path),
        stdout=subprocess.PIPE,
    )
    try:
        assert parent.stdout is not None
        line = await asyncio.wait_for(parent.stdout.readline(), 15)
        broker_pid = int(line)
        assert not is_gone(broker_pid)
    finally:
        parent.send_signal(signal.SIGKILL)
        await parent.wait()
    await assert_eventually(lambda: is_gone(broker_pid), timeout=10)


async def test_invalid_port_file(tmp_path: Path) -> None:
    (tmp_path / "broker").mkdir()
    (tmp_path / "broker" / "port").write_text("http\n")
    with pytest.raises(BrokerError, match="not a port"):
        await EmbeddedBroker(data_dir=tmp_path).start()


async def test_bad_extra_config_reports_the_server_error(tmp_path: Path) -> None:
    broker = EmbeddedBroker(data_dir=tmp_path, extra_config="this is { not valid")
    with pytest.raises(BrokerError, match="exited with code"):
        await broker.start()
    assert broker.pid is None


async def test_extra_config_is_applied(tmp_path: Path) -> None:
    # Appended after the generated settings, so it overrides them.
    async with EmbeddedBroker(data_dir=tmp_path, extra_config="max_payload: 1MB") as broker:
        assert broker.config_path.read_text().endswith("max_payload: 1MB\n")
        nc = await nats.connect(broker.url, max_reconnect_attempts=2, reconnect_time_wait=0.2)
        try:
            assert nc.max_payload == 1024 * 1024
        finally:
            await nc.close()


async def test_missing_binary(tmp_path: Path) -> None:
    broker = EmbeddedBroker(data_dir=tmp_path, binary=str(tmp_path / "no-such-server"))
    with pytest.raises(BrokerError, match="cannot run"):
        await broker.start()
    assert broker.pid is None
