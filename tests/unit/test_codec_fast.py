"""The decoder's fast path (``schemas._strict``): taken for bodies with the exact field
names, refused for anything Go would read differently, and never an answer other than
the full path's (parse, normalise, convert)."""

from __future__ import annotations

import json
from typing import Any, Literal

import msgspec
import pytest

from schemas import codec
from schemas._strict import strict_decoder
from schemas.codec import decode, decode_full, encode
from schemas.compute import AskForBidRequest, BidAcceptedRequest, BidRejectedRequest
from schemas.job import Engine
from tests.unit.test_corpus import _ask, _v0325_files

ASK: dict[str, Any] = {
    "SourcePeerID": "r1",
    "TargetPeerID": "",
    "Job": {
        "APIVersion": "V1beta1",
        "Metadata": {"ID": "job-1", "ClientID": "c", "CreatedAt": "2024-01-01T00:00:00.5Z"},
        "Spec": {
            "Engine": "Docker",
            "Verifier": "Noop",
            "Publisher": "Noop",
            "Docker": {"Image": "ubuntu", "Entrypoint": ["echo", "hi"]},
            "Resources": {"CPU": "100m", "Memory": "64Mi"},
            "Timeout": 60,
            "outputs": [{"Name": "outputs", "path": "/outputs"}],
            "Deal": {"Concurrency": 1},
        },
    },
}


def _body(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def _no_full_path(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(blob: bytes, type_: Any) -> Any:
        raise AssertionError("the full path was taken")

    monkeypatch.setattr(codec, "decode_full", refuse)


def test_an_ask_with_exact_names_takes_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    want = decode_full(_body(ASK), AskForBidRequest)
    _no_full_path(monkeypatch)
    got = decode(_body(ASK), AskForBidRequest)
    assert got == want and encode(got) == encode(want)
    assert got.Job.Spec.Engine is Engine.DOCKER
    assert decode(b'{"SourcePeerID":"r1","ExecutionID":"e-1"}', BidRejectedRequest).ExecutionID


@pytest.mark.parametrize("name", _v0325_files())
def test_every_corpus_job_decodes_the_same_on_both_paths(name: str) -> None:
    """As sent, the fast path answers as the full path or not at all; re-encoded (exact
    names, every field), it answers, and the same."""
    blob = _body(_ask(name))
    want = decode_full(blob, AskForBidRequest)
    fast = strict_decoder(AskForBidRequest)
    assert fast is not None
    try:
        got = fast(blob)
    except Exception:
        pass  # a body the full path must read (names in another case, say)
    else:
        assert got == want and encode(got) == encode(want)
    canonical = encode(want)
    again = fast(canonical)
    assert again == want and encode(again) == canonical


# Each body reads differently in Go than in a plain typed decode: the fast path must
# refuse it, and decode() must give Go's reading.
DIFFERENT: list[tuple[str, dict[str, Any], Any]] = [
    ("a key in another case", {**ASK, "sourcepeerid": "r2", "SourcePeerID": None}, "r2"),
    ("null on a string", {**ASK, "TargetPeerID": None}, "r1"),
    ("an unknown key", {**ASK, "Extra": {"SourcePeerID": "x"}}, "r1"),
]


@pytest.mark.parametrize(("what", "doc", "source"), DIFFERENT, ids=[d[0] for d in DIFFERENT])
def test_the_fast_path_refuses_what_go_reads_differently(
    what: str, doc: dict[str, Any], source: str
) -> None:
    fast = strict_decoder(AskForBidRequest)
    assert fast is not None
    with pytest.raises(msgspec.ValidationError):
        fast(_body(doc))
    got = decode(_body(doc), AskForBidRequest)
    assert got == decode_full(_body(doc), AskForBidRequest)
    assert (got.SourcePeerID, got.TargetPeerID) == (source, "")


def test_an_enum_in_another_case_goes_the_full_way() -> None:
    doc = json.loads(_body(ASK))
    doc["Job"]["Spec"]["Engine"] = "docker"
    fast = strict_decoder(AskForBidRequest)
    assert fast is not None
    with pytest.raises(msgspec.ValidationError):
        fast(_body(doc))
    assert decode(_body(doc), AskForBidRequest).Job.Spec.Engine is Engine.DOCKER


@pytest.mark.parametrize("accepted", [None, True, "yes", {"a": [1, None]}])
def test_an_any_field_defaulting_to_none_reads_the_same(accepted: Any) -> None:
    blob = _body({"SourcePeerID": "r1", "ExecutionID": "e-1", "Accepted": accepted})
    fast = strict_decoder(BidAcceptedRequest)
    assert fast is not None
    assert fast(blob) == decode_full(blob, BidAcceptedRequest)


class AnyWithDefault(msgspec.Struct):
    x: Any = 5  # Go keeps 5 on null; a typed decode gives None


class IntKeys(msgspec.Struct):
    x: dict[int, str] = msgspec.field(default_factory=dict)


class Tree(msgspec.Struct):
    children: list[Tree] = msgspec.field(default_factory=list)


class NullLiteral(msgspec.Struct):
    x: Literal["a", None] = "a"


class Outer(msgspec.Struct):
    inner: AnyWithDefault = msgspec.field(default_factory=AnyWithDefault)


@pytest.mark.parametrize("type_", [AnyWithDefault, IntKeys, Tree, NullLiteral, Outer, dict])
def test_types_a_typed_decode_could_read_differently_have_no_fast_path(type_: Any) -> None:
    assert strict_decoder(type_) is None


def test_a_null_any_keeps_its_default_through_decode() -> None:
    assert decode(b'{"x": null}', AnyWithDefault).x == 5
    assert decode(b'{"inner": {"x": null}}', Outer).inner.x == 5
