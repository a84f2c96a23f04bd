"""Every corpus job spec sent to a running node gets a bid or a reasoned decline
(v0.3.25 model), or a 400 naming its model (other models) — never a 500 or silence."""

from __future__ import annotations

import json
import uuid

import pytest
import yaml
from nats.aio.client import Client

from tests.integration.conftest import NodeFactory
from tests.unit.test_corpus import CORPUS, MODEL_NEEDLES, _readme_models, _require_corpus


def _load(name: str) -> object:
    text = (CORPUS / name).read_text(encoding="utf-8")
    return json.loads(text) if name.endswith(".json") else yaml.safe_load(text)


async def test_every_corpus_file_gets_an_answer(
    make_node: NodeFactory, nc: Client, prefix: str
) -> None:
    _require_corpus()
    await make_node("n1")
    models = _readme_models()
    assert models, "the corpus README lists no files"
    answered = {"bid": 0, "declined": 0, "refused": 0}
    reasons: set[str] = set()
    for name, model in sorted(models.items()):
        job = _load(name)
        assert isinstance(job, dict)
        job.setdefault("Metadata", {})["ID"] = f"job-{uuid.uuid4()}"
        body = json.dumps({"SourcePeerID": "r1", "Job": job}).encode()
        reply = await nc.request(f"{prefix}.compute.n1.r1.AskForBid/v1", body, timeout=5)
        headers = reply.headers or {}
        needle = MODEL_NEEDLES[model]
        if needle is None:
            assert "Nats-Service-Error-Code" not in headers, (name, reply.data)
            answer = json.loads(reply.data)
            assert answer["NodeID"] == "n1"
            if answer["Accepted"]:
                answered["bid"] += 1
                assert answer["ExecutionID"].startswith("e-")
            else:
                answered["declined"] += 1
                assert answer["Reason"], f"{name}: a decline without a reason"
                reasons.add(answer["Reason"])
        else:
            assert headers.get("Nats-Service-Error-Code") == "400", (name, reply.data)
            assert needle in json.loads(reply.data)["Error"], name
            answered["refused"] += 1
    # A noop-only node without IPFS declines every spec (they all use Docker or IPFS)
    # with the reason of the first check that says no.
    assert answered["declined"] + answered["bid"] == len(models) - 5
    assert answered["refused"] == 5
    assert reasons <= {
        "Docker installed: false",
        "IPFS installed: false",
        "Estuary installed: false",
        "Ipfs installed: false",
        "S3 installed: false",
        "URLDownload installed: false",
    }, reasons


@pytest.mark.parametrize("name", ["v0.3.25__testdata__job.json"])
async def test_docker_spec_declines_with_the_engine_reason(
    make_node: NodeFactory, nc: Client, prefix: str, name: str
) -> None:
    _require_corpus()
    await make_node("n1", engines=["Noop"])
    job = _load(name)
    assert isinstance(job, dict)
    job["Metadata"] = {"ID": "j1"}
    body = json.dumps({"SourcePeerID": "r1", "Job": job}).encode()
    reply = await nc.request(f"{prefix}.compute.n1.r1.AskForBid/v1", body, timeout=5)
    answer = json.loads(reply.data)
    assert answer["Accepted"] is False
    assert answer["Reason"] == "Docker installed: false"
