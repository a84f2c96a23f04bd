"""Secret-looking environment values of a job never leave the job (the issue: "Environment
values of a job whose names look secret (``*TOKEN*``, ``*SECRET*``, ``*PASSWORD*``,
``*KEY*``) never appear in logs, span attributes, error replies or GetExecution").

An in-process node gets Wasm and Docker jobs carrying such values: a Wasm job that fails
(a missing import), a Docker job on a node without the Docker engine (declined), and
malformed variants (400). Everything observable is collected - log records at DEBUG,
finished spans, every reply body and header, every message the node publishes under the
test's prefix, GetExecution, ListExecutions and ExecutionLogs - and searched for the
secret values.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.engines import wasm_fixtures as wat
from tests.integration.conftest import NodeFactory, make_node, prefix, spans
from worker.redact import MASK, SECRET_PATTERNS, is_secret, redact_env

_FIXTURES = (make_node, prefix, spans)

SECRETS = {
    "API_TOKEN": "s3cr3t-value-123",
    "db_password": "hunter2-pw-456",
    "ClientSecret": "client-sec-789",
    "SSH_KEY": "ssh-key-value-000",
}
PLAIN = ("GREETING", "hello-plain-value")  # not secret: allowed to appear anywhere


def docker_env() -> list[str]:
    return [f"{k}={v}" for k, v in SECRETS.items()] + ["=".join(PLAIN)]


def wasm_env() -> dict[str, str]:
    return {**SECRETS, PLAIN[0]: PLAIN[1]}


# ------------------------------------------------------------------------- redact.py


@pytest.mark.parametrize(
    ("name", "secret"),
    [
        ("API_TOKEN", True),
        ("token", True),
        ("MySecretThing", True),
        ("DB_PASSWORD", True),
        ("ssh_key", True),
        ("KEYRING_PATH", True),
        ("GREETING", False),
        ("PATH", False),
        ("", False),
    ],
)
def test_is_secret(name: str, secret: bool) -> None:
    assert is_secret(name) is secret


def test_is_secret_configurable_patterns() -> None:
    assert is_secret("AWS_CREDENTIALS", ("credential",))
    assert not is_secret("API_TOKEN", ("CREDENTIAL",))
    assert SECRET_PATTERNS == ("TOKEN", "SECRET", "PASSWORD", "KEY")


def test_redact_env_list_and_dict() -> None:
    assert redact_env(["API_TOKEN=abc", "HOME=/root", "A=b=c", "X_KEY=", "BARE"]) == [
        f"API_TOKEN={MASK}",
        "HOME=/root",
        "A=b=c",
        f"X_KEY={MASK}",
        "BARE",
    ]
    assert redact_env(["NO_EQUALS_TOKEN"]) == [MASK]
    env = {"db_password": "pw", "HOME": "/root"}
    assert redact_env(env) == {"db_password": MASK, "HOME": "/root"}
    assert env == {"db_password": "pw", "HOME": "/root"}  # a copy, the input is untouched
    assert redact_env({"CREDS": "x"}, ("creds",)) == {"CREDS": MASK}


# ---------------------------------------------------------------------- end to end


class Collector:
    """Everything a requester or an onlooker can see of the node."""

    def __init__(self, nc: Client, prefix: str) -> None:
        self.nc = nc
        self.prefix = prefix
        self.seen: list[tuple[str, str]] = []  # (where, text)

    async def start(self) -> None:
        async def tap(msg: Msg) -> None:
            if msg.subject.startswith(f"{self.prefix}.compute."):
                return  # the requests this test sent: they carry the secrets by design
            self.add(f"published {msg.subject}", msg)

        await self.nc.subscribe(f"{self.prefix}.>", cb=tap)

    def add(self, where: str, msg: Msg) -> None:
        self.seen.append((where, msg.data.decode(errors="replace")))
        self.seen.append((f"{where} headers", json.dumps(dict(msg.headers or {}))))

    async def request(self, node: str, method: str, body: Any) -> Msg:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        msg = await self.nc.request(
            f"{self.prefix}.compute.{node}.r1.{method}/v1", data, timeout=10
        )
        self.add(f"reply to {method}", msg)
        return msg


def job(job_id: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"Metadata": {"ID": job_id}, "Spec": {"Verifier": "Noop", "Publisher": "Noop", **spec}}


def wasm_spec(env: Any) -> dict[str, Any]:
    return {
        "Engine": "Wasm",
        "Wasm": {
            "EntryModule": {"StorageSource": "Inline", "URL": wat.data_url(wat.MISSING_IMPORT)},
            "EnvironmentVariables": env,
        },
    }


def docker_spec(env: Any) -> dict[str, Any]:
    return {
        "Engine": "Docker",
        "Docker": {"Image": "ubuntu:latest", "Entrypoint": ["env"], "EnvironmentVariables": env},
    }


def malformed_asks() -> list[tuple[str, bytes]]:
    """Requests the node must refuse (400, or a decline), each carrying the secrets."""
    listed = [f"{k}={v}" for k, v in SECRETS.items()]
    asks: list[tuple[str, Any]] = [
        ("docker env as a map", docker_spec(dict(SECRETS))),
        ("docker env with a number", docker_spec([*listed, 5])),
        ("wasm env as a list", wasm_spec(listed)),
        ("wasm env with a non-string value", wasm_spec({k: [v] for k, v in SECRETS.items()})),
        ("wasm env with a bad resource", {**wasm_spec(wasm_env()), "Resources": {"CPU": "x"}}),
        (
            "docker env with a bad resource",
            {**docker_spec(docker_env()), "Resources": {"CPU": "x"}},
        ),
        ("unknown engine", {**wasm_spec(wasm_env()), **docker_spec(docker_env()), "Engine": "Zz"}),
    ]
    out = [
        (label, json.dumps({"SourcePeerID": "r1", "Job": job(f"bad-{i}", spec)}).encode())
        for i, (label, spec) in enumerate(asks)
    ]
    # Not JSON at all: a truncated body that still contains the secrets.
    whole = json.dumps({"SourcePeerID": "r1", "Job": job("cut", wasm_spec(wasm_env()))})
    out.append(("truncated JSON", whole[: whole.rindex("}") - 2].encode()))
    return out


async def test_secret_env_values_never_leak(
    make_node: NodeFactory,
    nc: Client,
    prefix: str,
    spans: InMemorySpanExporter,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    await make_node("n1", engines=["noop", "wasm"])
    seen = Collector(nc, prefix)
    await seen.start()

    # A Wasm job that is accepted, runs and fails on its missing import.
    wasm_ask = {"SourcePeerID": "r1", "Job": job("wasm-fails", wasm_spec(wasm_env()))}
    reply = json.loads((await seen.request("n1", "AskForBid", wasm_ask)).data)
    assert reply["Accepted"] is True, reply
    wasm_id = reply["ExecutionID"]
    accept = {"SourcePeerID": "r1", "ExecutionID": wasm_id, "Accepted": True}
    await seen.request("n1", "BidAccepted", accept)

    state = ""
    async with asyncio.timeout(20):
        while state != "Failed":
            await asyncio.sleep(0.05)
            get = {"SourcePeerID": "r1", "ExecutionID": wasm_id}
            state = json.loads((await seen.request("n1", "GetExecution", get)).data)["Execution"][
                "State"
            ]

    # A Docker job on a node without the Docker engine: declined.
    docker_ask = {"SourcePeerID": "r1", "Job": job("docker-declined", docker_spec(docker_env()))}
    declined = json.loads((await seen.request("n1", "AskForBid", docker_ask)).data)
    assert declined["Accepted"] is False, declined
    if declined.get("ExecutionID"):
        await seen.request(
            "n1", "GetExecution", {"SourcePeerID": "r1", "ExecutionID": declined["ExecutionID"]}
        )

    # Malformed variants: 400 with the error headers and body (a bad resource request is
    # a decline with a reason instead).
    for label, data in malformed_asks():
        msg = await seen.request("n1", "AskForBid", data)
        body = json.loads(msg.data)
        assert body.get("Code") == 400 or body.get("Accepted") is False, (label, body)

    # Everything else a requester can read back.
    await seen.request("n1", "ListExecutions", {"SourcePeerID": "r1"})
    await seen.request("n1", "ExecutionLogs", {"SourcePeerID": "r1", "ExecutionID": wasm_id})
    await seen.request("n1", "NodeInfo", b"")
    await nc.flush(timeout=5)
    await asyncio.sleep(0.2)  # let the tap's callbacks run

    # The failure callback reached the wire, so the tap saw something of the node.
    assert any(wasm_id in text for where, text in seen.seen if where.startswith("published"))

    places = list(seen.seen)
    for record in caplog.records:
        places.append((f"log {record.name}", record.getMessage()))
        places.append((f"log {record.name} record", repr(record.__dict__)))
        if record.exc_info:
            places.append(
                (f"log {record.name} exc", logging.Formatter().formatException(record.exc_info))
            )
    places.append(("caplog text", caplog.text))
    finished = spans.get_finished_spans()
    assert finished, "no spans were recorded"
    for span in finished:
        places.append((f"span {span.name}", span.to_json()))

    leaks = [
        (where, name) for where, text in places for name, value in SECRETS.items() if value in text
    ]
    assert not leaks, leaks
    # The collection is not blind: the failure, the 400s and the node's logs are in it.
    everything = "\n".join(t for _, t in places)
    assert "env::missing" in everything
    assert sum('"Code": 400' in t or '"Code":400' in t for _, t in seen.seen) >= 4
    assert any(r.name.startswith("worker.") for r in caplog.records)


def test_error_messages_are_scrubbed_of_secret_values() -> None:
    """An engine error echoing a secret value reaches the ComputeError masked."""
    import msgspec

    from schemas.job import Job
    from worker.redact import scrub, secret_values

    job = msgspec.convert(
        {
            "Metadata": {"ID": "j"},
            "Spec": {
                "Engine": "Docker",
                "Docker": {"EnvironmentVariables": ["API_TOKEN=s3cr3t-value-123", "MODE=fast"]},
                "Wasm": {"EnvironmentVariables": {"db_password": "hunter2", "LANG": "C"}},
            },
        },
        Job,
    )
    assert secret_values(job) == ["s3cr3t-value-123", "hunter2"]
    text = "boom: API_TOKEN=s3cr3t-value-123 and hunter2 in MODE=fast"
    assert scrub(text, job) == "boom: API_TOKEN=*** and *** in MODE=fast"
