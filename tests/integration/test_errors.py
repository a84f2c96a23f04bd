"""Malformed requests on every method (PROTOCOL.md §0–§4): each gets the error headers and
the JSON error body of §3 with the right code, the store gains nothing, and the node keeps
serving. Also: requests without a reply subject are dropped and counted, and every
successful reply carries the node's identity headers.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from tests.helpers import assert_eventually
from tests.integration.conftest import NodeFactory
from worker.node import Node

EXEC_METHODS = (
    "BidAccepted",
    "BidRejected",
    "ResultAccepted",
    "ResultRejected",
    "CancelExecution",
)
ROUTED = ("AskForBid", *EXEC_METHODS)  # methods whose body has TargetPeerID
BY_ID = (*EXEC_METHODS, "GetExecution", "ExecutionLogs")  # methods that take an ExecutionID
JSON_METHODS = (*ROUTED, "GetExecution", "ListExecutions", "ExecutionLogs")
ALL_METHODS = (*JSON_METHODS, "NodeInfo")
ERROR_KEYS = {"Error", "Code", "NodeID", "State", "Cause"}


def job(**spec: Any) -> dict[str, Any]:
    return {"Metadata": {"ID": "job-1"}, "Spec": {"Engine": "Noop", **spec}}


def valid_body(method: str, requester: str = "r1") -> dict[str, Any]:
    """A well-formed body of ``method`` (for an unknown execution, where one is named)."""
    if method == "AskForBid":
        return {"SourcePeerID": requester, "Job": job()}
    if method == "ListExecutions":
        return {"SourcePeerID": requester}
    if method == "NodeInfo":
        return {}
    return {"SourcePeerID": requester, "ExecutionID": "e-unknown"}


def encode(body: Any) -> bytes:
    return json.dumps(body).encode()


@dataclass
class Req:
    """One malformed request and the code it must get."""

    method: str
    data: bytes
    code: int = 400
    requester: str = "r1"
    node: str = "n1"
    contains: str = ""  # a text the error message must contain
    subject: str = ""  # overrides the subject built from node/requester/method

    def subject_in(self, prefix: str) -> str:
        if self.subject:
            return f"{prefix}.compute.{self.subject}"
        return f"{prefix}.compute.{self.node}.{self.requester}.{self.method}/v1"


def with_field(method: str, path: tuple[str, ...], value: Any) -> bytes:
    body = valid_body(method)
    target = body
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return encode(body)


def without(method: str, key: str) -> bytes:
    body = valid_body(method)
    del body[key]
    return encode(body)


# ---------------------------------------------------------------------------------------
# cases, grouped; each group runs against one node


def _not_json() -> list[Req]:
    reqs = [Req(m, b"not json") for m in ALL_METHODS]
    reqs += [Req(m, b'{"SourcePeerID": "r1",') for m in ALL_METHODS]
    reqs += [Req(m, b"[]") for m in ALL_METHODS]
    reqs += [Req(m, b'"a string"') for m in ALL_METHODS]
    reqs += [Req(m, b"") for m in JSON_METHODS]  # only NodeInfo takes an empty body
    return reqs


def _invalid_utf8() -> list[Req]:
    reqs = [Req(m, b'{"SourcePeerID": "r1\xff", "ExecutionID": "e-1"}') for m in JSON_METHODS]
    reqs += [Req(m, b'{"SourcePeerID": "r1", "ExecutionID": "e-\xc3\x28"}') for m in BY_ID]
    reqs.append(
        Req(
            "AskForBid",
            b'{"SourcePeerID": "r1", "Job": {"Metadata": {"ID": "j\xe2\x82"},'
            b' "Spec": {"Engine": "Noop"}}}',
        )
    )
    return reqs


def _wrong_types() -> list[Req]:
    reqs = [Req(m, with_field(m, ("SourcePeerID",), 5)) for m in JSON_METHODS]
    reqs += [Req(m, with_field(m, ("SourcePeerID",), ["r1"])) for m in JSON_METHODS]
    reqs += [Req(m, with_field(m, ("ExecutionID",), 7)) for m in BY_ID]
    reqs += [Req(m, with_field(m, ("ExecutionID",), {"id": "e-1"})) for m in BY_ID]
    reqs += [Req(m, with_field(m, ("TargetPeerID",), 1)) for m in ROUTED]
    reqs += [
        Req("AskForBid", with_field("AskForBid", ("Job",), "job-1")),
        Req("AskForBid", with_field("AskForBid", ("Job", "Spec"), [])),
        Req("AskForBid", with_field("AskForBid", ("Job", "Metadata", "ID"), 12)),
        Req("AskForBid", with_field("AskForBid", ("Job", "Spec", "Timeout"), "10")),
        Req("AskForBid", with_field("AskForBid", ("Job", "Spec", "Resources"), {"CPU": 1})),
        Req("AskForBid", with_field("AskForBid", ("Job", "Spec", "inputs"), {"CID": "x"})),
        Req("ListExecutions", with_field("ListExecutions", ("Limit",), "ten")),
        Req("ListExecutions", with_field("ListExecutions", ("Limit",), -1)),
        Req("ListExecutions", with_field("ListExecutions", ("States",), "Created")),
        Req("ListExecutions", with_field("ListExecutions", ("States",), ["Sleeping"])),
        Req("ListExecutions", with_field("ListExecutions", ("UpdatedSince",), "yesterday")),
        Req("ListExecutions", with_field("ListExecutions", ("Cursor",), "not-a-cursor")),
        Req("ExecutionLogs", with_field("ExecutionLogs", ("Follow",), "yes")),
        Req("ExecutionLogs", with_field("ExecutionLogs", ("TailBytes",), -5)),
    ]
    return reqs


def _missing_required() -> list[Req]:
    reqs = [Req(m, without(m, "SourcePeerID")) for m in JSON_METHODS]
    reqs += [Req(m, without(m, "ExecutionID")) for m in BY_ID]
    reqs += [Req(m, b"{}") for m in JSON_METHODS]
    reqs += [
        Req("AskForBid", without("AskForBid", "Job")),
        Req("AskForBid", encode({"SourcePeerID": "r1", "Job": {"Spec": {"Engine": "Noop"}}})),
        Req("AskForBid", encode({"SourcePeerID": "r1", "Job": {"Metadata": {"ID": "j"}}})),
        Req(
            "AskForBid",
            encode({"SourcePeerID": "r1", "Job": {"Metadata": {"ID": "j"}, "Spec": {}}}),
        ),
        Req("AskForBid", with_field("AskForBid", ("Job",), None)),
    ]
    return reqs


def _empty_required() -> list[Req]:
    reqs = [Req(m, with_field(m, ("SourcePeerID",), "")) for m in JSON_METHODS]
    reqs += [Req(m, with_field(m, ("ExecutionID",), "")) for m in BY_ID]
    reqs += [
        Req("AskForBid", with_field("AskForBid", ("Job", "Metadata", "ID"), "")),
        Req("AskForBid", with_field("AskForBid", ("Job", "Spec", "Engine"), "")),
    ]
    return reqs


BAD_IDS = [
    "e-1.x",
    "e-1 x",
    "e-1\n",
    "e-1\t",
    "_e1",
    "-e1",
    "e*",
    "e>",
    "e-1.>",
    "e/1",
    "é1",
    "e" * 129,
]


def _bad_ids_in_body() -> list[Req]:
    return [Req(m, with_field(m, ("ExecutionID",), bad)) for m in BY_ID for bad in BAD_IDS]


BAD_SUBJECT_REQUESTERS = ["_r1", "-r1", "r1!", "r1%", "r$1", "r" * 129, "_all"]


def _bad_ids_in_subject() -> list[Req]:
    reqs = []
    for bad in BAD_SUBJECT_REQUESTERS:
        for m in JSON_METHODS:
            body = valid_body(m, requester=bad)
            reqs.append(Req(m, encode(body), requester=bad))
        reqs.append(Req("NodeInfo", b"", requester=bad))
    return reqs


def _source_mismatch() -> list[Req]:
    reqs = [Req(m, encode(valid_body(m, requester="r2"))) for m in JSON_METHODS]
    # 400 comes before 404: an unknown execution with a bad SourcePeerID is still a 400.
    reqs += [Req(m, with_field(m, ("SourcePeerID",), "r1\n")) for m in JSON_METHODS]
    return reqs


def _target_other_node() -> list[Req]:
    reqs = [Req(m, with_field(m, ("TargetPeerID",), "n2")) for m in ROUTED]
    reqs += [Req(m, with_field(m, ("TargetPeerID",), "n1.x")) for m in ROUTED]
    return reqs


def _negative_timeout() -> list[Req]:
    return [
        Req("AskForBid", with_field("AskForBid", ("Job", "Spec", "Timeout"), -1)),
        Req("AskForBid", with_field("AskForBid", ("Job", "Spec", "Timeout"), -0.001)),
    ]


def _unknown_enum() -> list[Req]:
    def spec(**fields: Any) -> bytes:
        return encode({"SourcePeerID": "r1", "Job": job(**fields)})

    return [
        Req("AskForBid", spec(Engine="X"), contains='unknown engine "X"'),
        Req("AskForBid", spec(Engine="Podman"), contains="unknown engine"),
        Req("AskForBid", spec(Verifier="Magic"), contains="unknown verifier"),
        Req("AskForBid", spec(Publisher="Dropbox"), contains="unknown publisher"),
        Req("AskForBid", spec(Network={"Type": "Mesh"}), contains="unknown network type"),
        Req(
            "AskForBid",
            spec(inputs=[{"StorageSource": "Floppy", "path": "/in"}]),
            contains="unknown storage source",
        ),
    ]


def _other_job_models() -> list[Req]:
    v1 = {
        "ID": "job-1",
        "Name": "job-1",
        "Type": "batch",
        "Count": 1,
        "Tasks": [{"Name": "main", "Engine": {"Type": "docker", "Params": {"Image": "ubuntu"}}}],
    }
    v1_lower = {
        "name": "job-1",
        "type": "batch",
        "tasks": [{"name": "main", "engine": {"type": "docker"}}],
    }
    v10 = {
        "Metadata": {"ID": "job-1"},
        "Spec": {"EngineSpec": {"Type": "docker", "Params": {"Image": "ubuntu"}}},
    }
    return [
        Req("AskForBid", encode({"SourcePeerID": "r1", "Job": v1}), contains="tasks[]"),
        Req("AskForBid", encode({"SourcePeerID": "r1", "Job": v1_lower}), contains="tasks[]"),
        Req("AskForBid", encode({"SourcePeerID": "r1", "Job": v10}), contains="EngineSpec"),
    ]


def _too_deep() -> list[Req]:
    deep = b'{"SourcePeerID": "r1", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    deeper = b'{"SourcePeerID": "r1", "x": ' + b'{"a": ' * 3000 + b"1" + b"}" * 3000 + b"}"
    reqs = [Req(m, deep) for m in ALL_METHODS]
    reqs += [Req(m, deeper) for m in ALL_METHODS]
    return reqs


def _unknown_methods() -> list[Req]:
    body = encode(valid_body("BidAccepted"))
    reqs = [
        Req("Nope", body, code=404),
        Req("askforbid", body, code=404),
        Req("", body, code=404, subject="n1.r1.AskForBid/v2"),
        Req("", body, code=404, subject="n1.r1.AskForBid"),
        Req("", body, code=404, subject="n1.r1.BidAccepted/v1.extra"),
        Req("", body, code=404, subject="n1.r1.x.BidAccepted/v1"),
    ]
    # Only AskForBid exists on _all.
    reqs += [
        Req(m, encode(valid_body(m)), code=404, node="_all")
        for m in (*EXEC_METHODS, "GetExecution", "ListExecutions", "ExecutionLogs", "NodeInfo")
    ]
    return reqs


GROUPS: dict[str, Callable[[], list[Req]]] = {
    "not-json": _not_json,
    "invalid-utf8": _invalid_utf8,
    "wrong-types": _wrong_types,
    "missing-required": _missing_required,
    "empty-required": _empty_required,
    "bad-id-in-body": _bad_ids_in_body,
    "bad-id-in-subject": _bad_ids_in_subject,
    "source-mismatch": _source_mismatch,
    "target-other-node": _target_other_node,
    "negative-timeout": _negative_timeout,
    "unknown-enum": _unknown_enum,
    "other-job-models": _other_job_models,
    "too-deep": _too_deep,
    "unknown-method": _unknown_methods,
}


# ---------------------------------------------------------------------------------------
# checks


def error_problems(msg: Msg, node: Node, code: int, contains: str = "") -> list[str]:
    """What is wrong with ``msg`` as an error reply of ``code`` (§3); [] when it is right."""
    problems = []
    headers = msg.headers or {}
    if headers.get("Nats-Service-Error-Code") != str(code):
        problems.append(
            f"code header {headers.get('Nats-Service-Error-Code')!r}, want {code}"
            f" (body {msg.data[:200]!r})"
        )
    message = headers.get("Nats-Service-Error", "")
    if not message or "\n" in message:
        problems.append(f"Nats-Service-Error header {message!r}")
    if headers.get("Compute-Node-ID") != node.node_id:
        problems.append(f"Compute-Node-ID {headers.get('Compute-Node-ID')!r}")
    if headers.get("Compute-Instance-ID") != node.instance_id:
        problems.append(f"Compute-Instance-ID {headers.get('Compute-Instance-ID')!r}")
    try:
        body = json.loads(msg.data)
    except ValueError:
        return [*problems, f"body is not JSON: {msg.data[:200]!r}"]
    if not isinstance(body, dict) or set(body) != ERROR_KEYS:
        return [*problems, f"body keys {sorted(body) if isinstance(body, dict) else body!r}"]
    if body["Code"] != code:
        problems.append(f"body Code {body['Code']!r}")
    if body["Error"] != message:
        problems.append(f"body Error {body['Error']!r} differs from the header {message!r}")
    if body["NodeID"] != node.node_id:
        problems.append(f"body NodeID {body['NodeID']!r}")
    if code in (400, 404) and (body["State"], body["Cause"]) != ("", ""):
        problems.append(f"State/Cause {body['State']!r}/{body['Cause']!r} on a {code}")
    if contains and contains not in message:
        problems.append(f"message {message!r} lacks {contains!r}")
    return problems


async def ask_still_bids(nc: Client, prefix: str) -> None:
    body = {"SourcePeerID": "r1", "Job": job()}
    body["Job"]["Metadata"]["ID"] = "job-after"
    reply = await nc.request(f"{prefix}.compute.n1.r1.AskForBid/v1", encode(body), timeout=5)
    assert "Nats-Service-Error-Code" not in (reply.headers or {}), reply.data
    assert json.loads(reply.data)["Accepted"] is True, reply.data


@pytest.mark.parametrize("group", list(GROUPS))
async def test_malformed_requests(
    make_node: NodeFactory, nc: Client, prefix: str, group: str
) -> None:
    node = await make_node("n1")
    reqs = GROUPS[group]()
    assert reqs
    failures = []
    for req in reqs:
        subject = req.subject_in(prefix)
        try:
            msg = await nc.request(subject, req.data, timeout=5)
        except Exception as exc:
            failures.append(f"{subject} {req.data[:120]!r}: no reply ({type(exc).__name__})")
            continue
        for problem in error_problems(msg, node, req.code, req.contains):
            failures.append(f"{subject} {req.data[:120]!r}: {problem}")
    assert failures == [], f"{len(failures)} of {len(reqs)} requests:\n" + "\n".join(failures)
    assert await node.store.count() == 0  # nothing written for a refused request
    await ask_still_bids(nc, prefix)
    assert await node.store.count() == 1


async def test_body_over_max_request_bytes(make_node: NodeFactory, nc: Client, prefix: str) -> None:
    node = await make_node("n1", max_request_bytes=1024)
    failures = []
    for method in ALL_METHODS:
        body = valid_body(method)
        body["Padding"] = "x" * 2000  # an unknown field: only the size is wrong
        msg = await nc.request(f"{prefix}.compute.n1.r1.{method}/v1", encode(body), timeout=5)
        failures += [f"{method}: {p}" for p in error_problems(msg, node, 400)]
    assert failures == []
    assert await node.store.count() == 0
    await ask_still_bids(nc, prefix)


async def test_malformed_ask_on_all_is_400(make_node: NodeFactory, nc: Client, prefix: str) -> None:
    node = await make_node("n1")
    msg = await nc.request(f"{prefix}.compute._all.r1.AskForBid/v1", b"{nope", timeout=5)
    assert error_problems(msg, node, 400) == []
    assert await node.store.count() == 0


async def test_ignored_fields_do_not_matter(
    make_node: NodeFactory, nc: Client, prefix: str
) -> None:
    """Unknown fields are ignored, invalid UTF-8 in them too; keys fold as in Go."""
    await make_node("n1")
    data = (
        b'{"sourcepeerid": "r1", "Unknown": "bad \xff bytes", "Extra": {"x": [1, 2]},'
        b' "job": {"metadata": {"id": "job-x"}, "spec": {"engine": "noop",'
        b' "Mystery": "\xfe"}}}'
    )
    reply = await nc.request(f"{prefix}.compute.n1.r1.AskForBid/v1", data, timeout=5)
    assert "Nats-Service-Error-Code" not in (reply.headers or {}), reply.data
    assert json.loads(reply.data)["Accepted"] is True


async def test_request_without_reply_is_dropped_and_counted(
    make_node: NodeFactory, nc: Client, prefix: str
) -> None:
    node = await make_node("n1")
    ask = encode(valid_body("AskForBid"))
    await nc.publish(f"{prefix}.compute.n1.r1.AskForBid/v1", ask)
    await nc.publish(f"{prefix}.compute._all.r1.AskForBid/v1", ask)
    await nc.publish(f"{prefix}.compute.n1.r1.GetExecution/v1", b"not json")
    await nc.flush()

    async def dropped() -> int:
        reply = await nc.request(f"{prefix}.compute.n1.r1.NodeInfo/v1", b"", timeout=5)
        count = json.loads(reply.data)["ComputeNodeInfo"]["DroppedRequests"]
        assert count == 3, count
        return count

    await assert_eventually(dropped, timeout=5, interval=0.05)
    assert await node.store.count() == 0


async def test_successful_replies_carry_identity_headers(
    make_node: NodeFactory, nc: Client, prefix: str
) -> None:
    node = await make_node("n1")

    async def ok(method: str, body: dict[str, Any] | None) -> dict[str, Any]:
        data = b"" if body is None else encode(body)
        msg = await nc.request(f"{prefix}.compute.n1.r1.{method}/v1", data, timeout=5)
        headers = msg.headers or {}
        assert "Nats-Service-Error-Code" not in headers, (method, msg.data)
        assert headers.get("Compute-Node-ID") == "n1", (method, headers)
        assert headers.get("Compute-Instance-ID") == node.instance_id, (method, headers)
        result: dict[str, Any] = json.loads(msg.data)
        return result

    def ask(job_id: str, **spec: Any) -> dict[str, Any]:
        body = job(**spec)
        body["Metadata"]["ID"] = job_id
        return {"SourcePeerID": "r1", "Job": body}

    def op(eid: str, **extra: Any) -> dict[str, Any]:
        return {"SourcePeerID": "r1", "ExecutionID": eid, **extra}

    async def wait_for(eid: str, want: str) -> None:
        async def check() -> bool:
            state = (await ok("GetExecution", op(eid)))["Execution"]["State"]
            assert state == want, state
            return True

        await assert_eventually(check, timeout=10, interval=0.02)

    declined = await ok("AskForBid", ask("job-declined", Network={"Type": "Full"}))
    assert declined["Accepted"] is False
    await ok("NodeInfo", None)
    await ok("NodeInfo", {})
    await ok("ListExecutions", {"SourcePeerID": "r1"})

    one = (await ok("AskForBid", ask("job-1")))["ExecutionID"]
    assert (await ok("AskForBid", ask("job-1")))["ExecutionID"] == one  # the stored bid
    await ok("GetExecution", op(one))
    await ok("BidAccepted", op(one, Accepted="any type is ignored", TargetPeerID="n1"))
    await ok("BidAccepted", op(one))  # a duplicate
    await wait_for(one, "WaitingVerification")
    await ok("ResultAccepted", op(one, TargetPeerID="n1"))
    await ok("ResultAccepted", op(one))  # a duplicate
    await wait_for(one, "Completed")

    two = (await ok("AskForBid", ask("job-2")))["ExecutionID"]
    await ok("BidAccepted", op(two))
    await wait_for(two, "WaitingVerification")
    await ok("ResultRejected", op(two, Justification="wrong"))
    await ok("ResultRejected", op(two))  # a duplicate

    three = (await ok("AskForBid", ask("job-3")))["ExecutionID"]
    await ok("BidRejected", op(three, Justification="no"))
    await ok("BidRejected", op(three))  # a duplicate
    await ok("CancelExecution", op(three))  # Cancel of Cancelled: a duplicate

    four = (await ok("AskForBid", ask("job-4")))["ExecutionID"]
    await ok("CancelExecution", op(four))
    await ok("CancelExecution", op(four))
    listed = await ok("ListExecutions", {"SourcePeerID": "r1", "Limit": 2})
    assert len(listed["Executions"]) == 2 and listed["Next"]
