"""Bad input fuzz (issue 4, check 4): hypothesis sends thousands of malformed and hostile
requests to every request subject of a node process. PROTOCOL.md §3: each gets its error
reply (400, or 404 for an unknown method / unknown or foreign execution) within a second;
the node never crashes nor answers 500; its store gains nothing (counted from outside,
read-only) and stays intact (``PRAGMA integrity_check``).

Hypothesis runs in a worker thread; its requests are made on the test's event loop.
Each group is bounded by ``max_examples``; the whole test by its timeout.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nats.aio.client import Client
from nats.errors import MaxPayloadError

from tests.reliability.conftest import (
    NodeFactory,
    count_executions,
    final_checks,
    integrity,
    make_job,
    snapshot,
    wait_for,
)
from worker.requester import Requester

REPLY_WITHIN = 1.0
ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
MAX_REQUEST = 256 * 1024
EXEC_METHODS = ("BidAccepted", "BidRejected", "ResultAccepted", "ResultRejected", "CancelExecution")
ROUTED = ("AskForBid", *EXEC_METHODS)
BY_ID = (*EXEC_METHODS, "GetExecution", "ExecutionLogs")
JSON_METHODS = (*ROUTED, "GetExecution", "ListExecutions", "ExecutionLogs")
ALL_METHODS = (*JSON_METHODS, "NodeInfo")
WITH_JUSTIFICATION = ("BidAccepted", "BidRejected", "ResultRejected", "CancelExecution")
REQUESTER = "fz"
NODE = "fuzzed"


def examples(n: int) -> Callable[[Any], Any]:
    return settings(
        max_examples=n,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )


def valid_body(method: str, requester: str = REQUESTER, execution: str = "e-unknown") -> Any:
    """A well-formed body (naming an unknown execution where one is named)."""
    if method == "AskForBid":
        job = {"Metadata": {"ID": "j"}, "Spec": {"Engine": "Noop"}}
        return {"SourcePeerID": requester, "Job": job}
    if method == "ListExecutions":
        return {"SourcePeerID": requester}
    if method == "NodeInfo":
        return {}
    return {"SourcePeerID": requester, "ExecutionID": execution}


def put(body: Any, path: tuple[str, ...], value: Any) -> Any:
    target = body
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return body


def enc(body: Any) -> bytes:
    return json.dumps(body, ensure_ascii=False).encode()


def lenient_json(data: bytes) -> Any:
    try:
        return json.loads(data.decode("utf-8", "surrogateescape"))
    except ValueError:
        return None


# --- strategies ------------------------------------------------------------------------------

ints = st.integers(-(2**70), 2**70)
floats = st.floats(allow_nan=False, allow_infinity=False)
small_lists = st.lists(st.integers(), max_size=3)
small_dicts = st.dictionaries(st.text(max_size=5), st.integers(), max_size=3)
WRONG: dict[str, st.SearchStrategy[Any]] = {
    "str": st.one_of(ints, floats, st.booleans(), small_lists, small_dicts),
    "required": st.one_of(st.none(), ints, floats, st.booleans(), small_lists, small_dicts),
    "object": st.one_of(ints, st.text(max_size=10), st.booleans(), small_lists),
    "required object": st.one_of(st.none(), ints, st.text(max_size=10), st.booleans(), small_lists),
    "int": st.one_of(st.text(max_size=10), st.booleans(), small_lists, small_dicts),
    "bool": st.one_of(st.text(max_size=10), ints, floats, small_lists, small_dicts),
    "list": st.one_of(st.text(max_size=10), ints, st.booleans(), small_dicts),
    "timeout": st.one_of(
        st.text(max_size=10),
        st.booleans(),
        small_lists,
        small_dicts,
        st.floats(max_value=-1e-6, allow_infinity=False, allow_nan=False),
    ),
}
# (methods, field path, kind of wrong value) — every one a 400.
TYPED_FIELDS: list[tuple[tuple[str, ...], tuple[str, ...], str]] = [
    (JSON_METHODS, ("SourcePeerID",), "required"),
    (BY_ID, ("ExecutionID",), "required"),
    (ROUTED, ("TargetPeerID",), "str"),
    (WITH_JUSTIFICATION, ("Justification",), "str"),
    (("AskForBid",), ("Job",), "required object"),
    (("AskForBid",), ("Job", "Metadata"), "required object"),
    (("AskForBid",), ("Job", "Metadata", "ID"), "required"),
    (("AskForBid",), ("Job", "Spec"), "required object"),
    (("AskForBid",), ("Job", "Spec", "Engine"), "required"),
    (("AskForBid",), ("Job", "Spec", "Timeout"), "timeout"),
    (("AskForBid",), ("Job", "Spec", "Resources"), "object"),
    (("AskForBid",), ("Job", "Spec", "Resources", "CPU"), "str"),
    (("AskForBid",), ("Job", "Spec", "inputs"), "list"),
    (("ListExecutions",), ("Limit",), "int"),
    (("ListExecutions",), ("States",), "list"),
    (("ListExecutions",), ("UpdatedSince",), "str"),
    (("ListExecutions",), ("Cursor",), "str"),
    (("ExecutionLogs",), ("Follow",), "bool"),
    (("ExecutionLogs",), ("TailBytes",), "int"),
]


@st.composite
def wrong_types(draw: st.DrawFn) -> tuple[str, bytes]:
    methods, path, kind = draw(st.sampled_from(TYPED_FIELDS))
    method = draw(st.sampled_from(methods))
    body = valid_body(method)
    if path[0] == "Job" and len(path) > 2:
        put(body, ("Job", "Spec"), {"Engine": "Noop", "Resources": {}})
    return method, enc(put(body, path, draw(WRONG[kind])))


@st.composite
def not_json(draw: st.DrawFn) -> tuple[str, bytes]:
    method = draw(st.sampled_from(ALL_METHODS))
    data = draw(
        st.one_of(
            st.binary(max_size=300),
            st.text(max_size=200).map(str.encode),
            st.sampled_from(
                [b"", b"null", b"[]", b"1", b'"x"', b"{", b"{]", b"NaN", b"\xef\xbb\xbf{}"]
            ),
        )
    )
    if method == "NodeInfo" and not data.strip():
        data = b"[]"  # an empty NodeInfo body is valid
    if isinstance(lenient_json(data), dict):
        data = b"[" + data  # keep it not a JSON object
    return method, data


@st.composite
def deep(draw: st.DrawFn) -> tuple[str, bytes]:
    method = draw(st.sampled_from(ALL_METHODS))
    depth = draw(st.integers(130, 50_000))
    opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}"), ('[{"b":', "}]")]))
    nested = opener * depth + "1" + closer * depth
    where = draw(st.sampled_from(["ignored field", "whole body"]))
    if where == "whole body":
        return method, nested.encode()
    body = enc(valid_body(method))
    comma = b", " if body != b"{}" else b""
    return method, body[:-1] + comma + b'"Deep": ' + nested.encode() + b"}"


@st.composite
def huge(draw: st.DrawFn) -> tuple[str, bytes]:
    method = draw(st.sampled_from(ALL_METHODS))
    char = draw(st.sampled_from(["a", "é", "0", "\u4e00"]))
    if draw(st.booleans()) and method != "NodeInfo":
        # A huge ID (under or over the size limit): a bad ID either way.
        n = draw(st.integers(129, 400_000))
        field = "ExecutionID" if method in BY_ID and draw(st.booleans()) else "SourcePeerID"
        return method, enc(put(valid_body(method), (field,), "a" + char * n))
    # Over --max-request-bytes: refused before decoding, whatever it holds.
    n = draw(st.integers(MAX_REQUEST + 1, 1_000_000))
    if draw(st.booleans()):
        return method, b"x" * n
    return method, enc(put(valid_body(method), ("Pad",), "p" * n))


BAD_UTF8 = [
    b"\xff",
    b"\xfe",
    b"\x80",
    b"\xc0\xaf",  # overlong "/"
    b"\xc3\x28",
    b"\xed\xa0\x80",  # a UTF-16 surrogate
    b"\xe2\x82",  # cut short
    b"\xf8\x88\x80\x80\x80",
]


@st.composite
def bad_utf8(draw: st.DrawFn) -> tuple[str, bytes, int]:
    """Invalid UTF-8 in a field the node reads (400) or in one it ignores (ignored)."""
    method = draw(st.sampled_from(JSON_METHODS))
    fields = ["SourcePeerID"]
    if method in BY_ID:
        fields.append("ExecutionID")
    if method == "AskForBid":
        fields.append("Job.Metadata.ID")
    if method in WITH_JUSTIFICATION:
        fields.append("Justification")
    ignored = method in BY_ID and draw(st.booleans())
    field = "Ignored" if ignored else draw(st.sampled_from(fields))
    body = valid_body(method)
    marker = "MARKER0123456789"
    if field == "Job.Metadata.ID":
        put(body, ("Job", "Metadata", "ID"), "j" + marker)
    elif field == "Ignored":
        body["Ignored"] = "i" + marker
    else:
        body[field] = (body.get(field) or "x") + marker
    data = enc(body).replace(marker.encode(), draw(st.sampled_from(BAD_UTF8)))
    return method, data, 404 if ignored else 400


ID_CHARS = st.characters(codec="utf-8", exclude_categories=("Cs",))
HOSTILE = st.one_of(
    st.builds(
        lambda a, c, b: a + c + b,
        st.from_regex(r"[A-Za-z0-9]{1,8}", fullmatch=True),
        st.sampled_from(list(".*> \n\r\t\0/\\$:%é")),
        st.from_regex(r"[A-Za-z0-9_-]{0,8}", fullmatch=True),
    ),
    st.from_regex(r"[_-][A-Za-z0-9_-]{0,10}", fullmatch=True),
    st.from_regex(r"[A-Za-z0-9]{1,8}\n", fullmatch=True),
    st.just(""),
    st.integers(129, 1000).map(lambda n: "a" * n),
    st.text(ID_CHARS, min_size=1, max_size=12),
).filter(lambda v: ID_RE.fullmatch(v) is None)
# A subject token NATS accepts (no whitespace, '.', '*', '>') that is not a valid ID.
TOKEN_CHARS = st.characters(
    codec="utf-8", exclude_categories=("Cs", "Cc", "Zs", "Zl", "Zp"), exclude_characters=".*>"
)
BAD_TOKEN = st.one_of(
    st.text(TOKEN_CHARS, min_size=1, max_size=12),
    st.from_regex(r"[_-][A-Za-z0-9_-]{0,10}", fullmatch=True),
    st.integers(129, 300).map(lambda n: "b" * n),
).filter(lambda v: ID_RE.fullmatch(v) is None and v.strip() == v and v != "_all")
VALID_ID = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,20}", fullmatch=True)


@st.composite
def injection(draw: st.DrawFn) -> tuple[str, str, bytes]:
    """(subject requester token, method, body) with a hostile ID somewhere: all 400."""
    method = draw(st.sampled_from(JSON_METHODS))
    where = draw(st.sampled_from(["SourcePeerID", "ExecutionID", "TargetPeerID", "subject"]))
    if where == "ExecutionID" and method not in BY_ID:
        where = "SourcePeerID"
    if where == "TargetPeerID" and method not in ROUTED:
        where = "SourcePeerID"
    body = valid_body(method)
    token = REQUESTER
    if where == "subject":
        token = draw(BAD_TOKEN)
        body["SourcePeerID"] = token
    elif where == "TargetPeerID":
        # Neither empty nor this node: someone else's ID, or no ID at all.
        others = st.one_of(HOSTILE, VALID_ID).filter(lambda v: v not in ("", NODE))
        body["TargetPeerID"] = draw(others)
    else:
        body[where] = draw(HOSTILE)
    return token, method, enc(body)


class Wire:
    """Requests from the hypothesis thread, made on the test's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, nc: Client, prefix: str) -> None:
        self.loop = loop
        self.nc = nc
        self.prefix = prefix
        self.codes: Counter[int] = Counter()
        self.slowest = 0.0

    def subject(self, method: str, requester: str = REQUESTER, node: str = NODE) -> str:
        return f"{self.prefix}.compute.{node}.{requester}.{method}"

    def expect(self, subject: str, data: bytes, code: int) -> None:
        future = asyncio.run_coroutine_threadsafe(self._request(subject, data), self.loop)
        got, headers, body, took = future.result(timeout=30)
        self.codes[got] += 1
        self.slowest = max(self.slowest, took)
        where = f"{subject} {data[:120]!r}… ({len(data)} bytes)"
        assert took <= REPLY_WITHIN, f"reply after {took:.2f}s: {where}"
        assert got == code, f"got {got} ({body[:200]!r}), want {code}: {where}"
        assert headers.get("Compute-Node-ID") == NODE, headers
        error = json.loads(body)
        assert error["Code"] == code and "\n" not in error["Error"], error
        assert "Traceback" not in error["Error"], error

    async def _request(self, subject: str, data: bytes) -> tuple[int, dict[str, str], bytes, float]:
        started = time.monotonic()
        msg = await self.nc.request(subject, data, timeout=REPLY_WITHIN + 1)
        took = time.monotonic() - started
        headers = dict(msg.headers or {})
        return int(headers.get("Nats-Service-Error-Code", "200")), headers, msg.data, took


def input_groups(wire: Wire) -> list[Callable[[], None]]:
    """Malformed bodies on the known methods."""

    @examples(500)
    @given(not_json(), st.booleans())
    def g_not_json(case: tuple[str, bytes], fanout: bool) -> None:
        method, data = case
        node = "_all" if fanout and method == "AskForBid" else NODE
        wire.expect(wire.subject(f"{method}/v1", node=node), data, 400)

    @examples(700)
    @given(wrong_types(), st.booleans())
    def g_wrong_types(case: tuple[str, bytes], fanout: bool) -> None:
        method, data = case
        node = "_all" if fanout and method == "AskForBid" else NODE
        wire.expect(wire.subject(f"{method}/v1", node=node), data, 400)

    @examples(150)
    @given(deep())
    def g_deep(case: tuple[str, bytes]) -> None:
        method, data = case
        wire.expect(wire.subject(f"{method}/v1"), data, 400)

    @examples(150)
    @given(huge())
    def g_huge(case: tuple[str, bytes]) -> None:
        method, data = case
        wire.expect(wire.subject(f"{method}/v1"), data, 400)

    @examples(300)
    @given(bad_utf8())
    def g_bad_utf8(case: tuple[str, bytes, int]) -> None:
        method, data, code = case
        wire.expect(wire.subject(f"{method}/v1"), data, code)

    @examples(700)
    @given(injection())
    def g_injection(case: tuple[str, str, bytes]) -> None:
        token, method, data = case
        wire.expect(wire.subject(f"{method}/v1", requester=token), data, 400)

    return [g_not_json, g_wrong_types, g_deep, g_huge, g_bad_utf8, g_injection]


def identity_groups(wire: Wire, owned: str) -> list[Callable[[], None]]:
    """Forged requesters, someone else's execution, unknown methods."""

    @examples(400)
    @given(st.sampled_from(JSON_METHODS), VALID_ID, VALID_ID, st.booleans())
    def g_forged(method: str, token: str, other: str, own: bool) -> None:
        if own and method in BY_ID and token != "owner":
            # Someone else's execution, asked for consistently: as if unknown (404).
            body = valid_body(method, requester=token, execution=owned)
            wire.expect(wire.subject(f"{method}/v1", requester=token), enc(body), 404)
            return
        if token == other:
            other = other + "x" if len(other) < 128 else "y"
        # The body names another requester than the subject: 400.
        body = enc(valid_body(method, other))
        wire.expect(wire.subject(f"{method}/v1", requester=token), body, 400)

    methods = st.text(TOKEN_CHARS, min_size=1, max_size=20).filter(
        lambda m: f"{m}" not in {f"{x}/v1" for x in ALL_METHODS} and m.strip() == m
    )

    @examples(300)
    @given(methods, st.sampled_from(["", ".x", ".x.y"]), st.binary(max_size=50), st.booleans())
    def g_unknown_method(method: str, tail: str, data: bytes, fanout: bool) -> None:
        if fanout:
            # On _all only AskForBid exists: any other method is unknown there.
            known = [m for m in ALL_METHODS if m != "AskForBid"]
            pick = known[len(method) % len(known)]
            wire.expect(wire.subject(f"{pick}/v1", node="_all"), data, 404)
            return
        wire.expect(wire.subject(method + tail), data, 404)

    return [g_forged, g_unknown_method]


def run_groups(wire: Wire, owned: str) -> None:
    """Every group, in the hypothesis thread."""
    for group in (*input_groups(wire), *identity_groups(wire, owned)):
        started = time.monotonic()
        before = sum(wire.codes.values())
        group()
        print(
            f"{group.__name__}: {sum(wire.codes.values()) - before} requests "
            f"in {time.monotonic() - started:.1f}s"
        )


@pytest.mark.timeout(300)
async def test_fuzz_every_request_subject(
    make_node: NodeFactory, requester: Requester, client: Client
) -> None:
    node = make_node(NODE)
    await node.start("--create-callback-stream")
    # One real execution, owned by "owner": operations by anyone else must be 404.
    owner = Requester(nc=client, requester_id="owner", prefix=node.prefix)
    bid = await owner.ask(NODE, make_job("owned"))
    assert bid.Accepted
    await owner.accept(NODE, bid.ExecutionID)
    await owner.close()
    await wait_for(
        lambda: snapshot(node.db_path)[bid.ExecutionID].state == "WaitingVerification",
        timeout=10,
        what="the owned execution ran",
    )
    before = snapshot(node.db_path)
    executions = count_executions(node.db_path)
    assert executions == 1

    wire = Wire(asyncio.get_running_loop(), client, node.prefix)
    await asyncio.to_thread(run_groups, wire, bid.ExecutionID)
    print(f"replies: {dict(wire.codes)}; slowest {wire.slowest * 1000:.0f} ms")
    assert sum(wire.codes.values()) >= 2500

    # Over the broker's max_payload: the sender's own client refuses it (§0).
    with pytest.raises(MaxPayloadError):
        await client.publish(wire.subject("AskForBid/v1"), b"x" * (9 * 1024 * 1024))

    assert node.alive, node.current_log()
    assert count_executions(node.db_path) == executions, "a refused request wrote to the store"
    after = snapshot(node.db_path)
    assert after[bid.ExecutionID].history == before[bid.ExecutionID].history
    assert integrity(node.db_path) == "ok"
    log = node.current_log()
    assert "Traceback" not in log and "unexpected failure" not in log, log[-3000:]
    # Still fully working: a well-formed ask bids.
    ok = await requester.ask(NODE, make_job("after"))
    assert ok.Accepted, ok.Reason
    assert count_executions(node.db_path) == executions + 1
    assert await node.sigterm() == 0, node.current_log()
    await final_checks(node, client, require_terminal=False)
