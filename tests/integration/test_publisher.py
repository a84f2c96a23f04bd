"""HeaderPublisher and StreamPublisher against nats-py's own publish and js.publish,
through a real nats-server: the same message arrives or is stored (headers, their order,
body), and the same errors are raised."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import BadHeaderError, BadSubjectError, ConnectionClosedError, MaxPayloadError
from nats.js.client import JetStreamContext

from worker.transport.publisher import HeaderPublisher, StreamPublisher

CONSTANT = {"Compute-Node-ID": "n-1", "Compute-Instance-ID": "0b4e8c3a-1f2e"}
TRACE = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

CASES: list[Mapping[str, str]] = [
    {},
    {"traceparent": TRACE},
    {"traceparent": TRACE, "tracestate": "a=1,b=2"},
    {"Nats-Service-Error-Code": "400", "Nats-Service-Error": "bad\r\nrequest: line two"},
    {" Padded-Name ": "  padded value  ", "": "no name: skipped"},
    {"Compute-Node-ID": "replaced"},  # a constant header replaced: nats-py's own path
    {"X-Unicode": "naïve ✓"},
]


async def _received(nc: Client, sender: Client, send: object, n: int) -> list[Msg]:
    got: list[Msg] = []
    done = asyncio.Event()

    async def on(msg: Msg) -> None:
        got.append(msg)
        if len(got) == n:
            done.set()

    sub = await nc.subscribe("pub.test", cb=on)
    await nc.flush()
    # A round trip of the sender's too: the first messages of a connection just made
    # were sometimes not delivered (nats-py's publish alike, ~1 run in 75 here).
    await sender.flush()
    assert callable(send)
    await send()
    try:
        await asyncio.wait_for(done.wait(), 5)
    except TimeoutError:
        raise AssertionError(f"{n} messages sent, {len(got)} received") from None
    await sub.unsubscribe()
    return got


@pytest.mark.parametrize("extra", CASES)
async def test_the_same_message_as_nats_py(
    nc: Client, nats_url: str, extra: dict[str, str]
) -> None:
    sender = await nats.connect(nats_url)
    try:
        publisher = HeaderPublisher(sender, CONSTANT)
        body = b'{"ExecutionID":"e-1"}'
        before = sender.stats["out_msgs"]

        async def both() -> None:
            await sender.publish("pub.test", body, headers={**CONSTANT, **extra})
            await publisher.publish("pub.test", body, extra)

        theirs, ours = await _received(nc, sender, both, 2)
        assert sender.stats["out_msgs"] == before + 2
    finally:
        await sender.close()
    assert ours.data == theirs.data == body
    assert ours.headers is not None and theirs.headers is not None
    assert list(ours.headers.items()) == list(theirs.headers.items())
    assert ours.headers["Compute-Instance-ID"] == CONSTANT["Compute-Instance-ID"]


async def test_the_same_errors_as_nats_py(nats_url: str) -> None:
    sender = await nats.connect(nats_url)
    publisher = HeaderPublisher(sender, CONSTANT)
    try:
        with pytest.raises(BadHeaderError):
            await publisher.publish("pub.test", b"", {"bad name": "x"})
        with pytest.raises(BadSubjectError):
            await publisher.publish("pub test", b"", {})
        with pytest.raises(BadSubjectError):
            await publisher.publish("", b"", {})
        with pytest.raises(MaxPayloadError):
            await publisher.publish("pub.test", b"x" * (sender.max_payload + 1), {})
    finally:
        await sender.close()
    with pytest.raises(ConnectionClosedError):
        await publisher.publish("pub.test", b"", {})


def test_a_bad_constant_header_is_refused_at_once(nc: Client) -> None:
    with pytest.raises(BadHeaderError):
        HeaderPublisher(nc, {"bad name": "x"})


# --- StreamPublisher: the outbox's JetStream publish ---------------------------------------


async def _stream_pair(
    nats_url: str, name: str, subjects: list[str]
) -> tuple[Client, JetStreamContext, StreamPublisher]:
    client = await nats.connect(nats_url)
    js = client.jetstream()
    with contextlib.suppress(Exception):
        await js.delete_stream(name)
    await js.add_stream(name=name, subjects=subjects, storage="memory")
    publisher = StreamPublisher(client)
    await publisher.start()
    return client, js, publisher


async def test_a_stream_keeps_what_js_publish_would(nats_url: str) -> None:
    client, js, publisher = await _stream_pair(nats_url, "PUBT", ["pubt.>"])
    try:
        headers = {"Nats-Msg-Id": "e-1:1", "traceparent": TRACE}
        await js.publish("pubt.a", b'{"n":1}', timeout=5, headers=dict(headers))
        await publisher.publish(
            "pubt.a", b'{"n":1}', timeout=5, headers={**headers, "Nats-Msg-Id": "e-1:2"}
        )
        # a repeat of a stored message is a success, and the stream keeps one copy
        await publisher.publish(
            "pubt.a", b'{"n":1}', timeout=5, headers={**headers, "Nats-Msg-Id": "e-1:2"}
        )
        info = await js.stream_info("PUBT")
        assert info.state.messages == 2
        theirs, ours = await js.get_msg("PUBT", 1), await js.get_msg("PUBT", 2)
        assert ours.data == theirs.data == b'{"n":1}'
        assert ours.headers is not None and theirs.headers is not None
        assert ours.headers["traceparent"] == theirs.headers["traceparent"] == TRACE
        assert (theirs.headers["Nats-Msg-Id"], ours.headers["Nats-Msg-Id"]) == ("e-1:1", "e-1:2")
    finally:
        await publisher.stop()
        await client.close()


async def test_stream_errors_are_those_of_js_publish(nats_url: str) -> None:
    client, js, publisher = await _stream_pair(nats_url, "PUBE", ["pube.>"])
    silent = await client.subscribe("silent.x")  # a responder that never answers
    try:
        cases: list[tuple[str, dict[str, str], float]] = [
            ("nostream.x", {}, 5),  # no stream takes the subject
            ("pube.x", {"Nats-Expected-Stream": "OTHER"}, 5),  # the stream refuses it
            ("silent.x", {}, 0.3),  # no answer in time
        ]
        for subject, headers, timeout in cases:
            errors: list[BaseException] = []
            for send in (js.publish, publisher.publish):
                with pytest.raises(Exception) as caught:
                    await send(subject, b"{}", timeout=timeout, headers=dict(headers))
                errors.append(caught.value)
            theirs, ours = errors
            assert type(ours) is type(theirs), subject
            assert str(ours) == str(theirs), subject
        assert not publisher._waiting  # nothing left behind by the failures
    finally:
        await silent.unsubscribe()
        await publisher.stop()
        await client.close()
