"""schemas.codec: Go encoding/json semantics on msgspec (PROTOCOL.md §0, §3, §4)."""

from __future__ import annotations

import contextlib
import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import codec
from schemas.callbacks import (
    CancelResult,
    ComputeError,
    PublishResult,
    RunCommandResult,
    RunResult,
    Usage,
)
from schemas.codec import DecodeError, decode, decode_ask, encode, format_time, parse_time
from schemas.compute import (
    AskForBidRequest,
    AskForBidResponse,
    BidAcceptedRequest,
    BidRejectedRequest,
    CancelExecutionRequest,
    ErrorBody,
    ExecutionLogsRequest,
    ExecutionLogsResponse,
    ExecutionResponse,
    ExecutionState,
    ExecutionSummary,
    GetExecutionRequest,
    ListExecutionsRequest,
    ListExecutionsResponse,
    Price,
    ResultAcceptedRequest,
    ResultRejectedRequest,
)
from schemas.export import MESSAGE_TYPES
from schemas.job import (
    DockerSpec,
    Engine,
    Job,
    JobRequester,
    Metadata,
    NetworkConfig,
    NetworkType,
    Publisher,
    PublisherSpec,
    ResourcesConfig,
    S3StorageSpec,
    Spec,
    StorageSource,
    StorageSpec,
    Verifier,
)
from schemas.node import (
    CallbackView,
    Capacity,
    ComputeNodeInfo,
    ExecutionDetail,
    ExecutionView,
    HistoryEntry,
    LogChunk,
    NodeInfo,
)

# --------------------------------------------------------------------------- helpers


def job(**spec: Any) -> dict[str, Any]:
    return {"Metadata": {"ID": "job-1"}, "Spec": {"Engine": "Docker", **spec}}


def ask(**fields: Any) -> dict[str, Any]:
    return {"SourcePeerID": "r1", "Job": job(), **fields}


def body(value: Any) -> bytes:
    return json.dumps(value).encode()


def decode_spec(**spec: Any) -> Spec:
    return decode(body(ask(Job=job(**spec))), AskForBidRequest).Job.Spec


def refused(data: bytes, type_: type[Any] = AskForBidRequest) -> str:
    with pytest.raises(DecodeError) as info:
        decode(data, type_)
    message = info.value.message
    assert message == str(info.value)
    assert message and message.isascii() and "\n" not in message
    return message


# --------------------------------------------------------------------------- keys


@pytest.mark.parametrize("key", ["inputs", "Inputs", "INPUTS", "iNpUtS"])
def test_key_case_folds_onto_field(key: str) -> None:
    spec = decode_spec(**{key: [{"StorageSource": "IPFS", "CID": "Qm1", "Path": "/in"}]})
    assert spec.inputs == [StorageSpec(StorageSource=StorageSource.IPFS, CID="Qm1", path="/in")]


def test_every_level_folds() -> None:
    data = {
        "sourcepeerid": "r1",
        "TARGETPEERID": "",
        "job": {
            "metadata": {"id": "j", "REQUESTER": {"requesternodeid": "r1"}},
            "SPEC": {"engine": "docker", "docker": {"IMAGE": "ubuntu", "entryPoint": ["ls"]}},
        },
    }
    got = decode(body(data), AskForBidRequest)
    assert got.SourcePeerID == "r1"
    assert got.Job.Metadata.ID == "j"
    assert got.Job.Metadata.Requester == JobRequester(RequesterNodeID="r1")
    assert got.Job.Spec.Docker == DockerSpec(Image="ubuntu", Entrypoint=["ls"])


class Twin(msgspec.Struct, kw_only=True):
    """Two fields that fold alike: Go maps an exact key to its field, a folded one to the first."""

    Name: str = ""
    name: str = ""


def test_exact_match_wins_over_folded() -> None:
    assert decode(b'{"name": "low"}', Twin) == Twin(name="low")
    assert decode(b'{"Name": "up"}', Twin) == Twin(Name="up")
    assert decode(b'{"Name": "up", "name": "low"}', Twin) == Twin(Name="up", name="low")
    assert decode(b'{"NAME": "x"}', Twin) == Twin(Name="x")  # first declared field


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        (b'{"inputs": [{"path": "a"}], "Inputs": [{"path": "b"}]}', "b"),
        (b'{"Inputs": [{"path": "b"}], "inputs": [{"path": "a"}]}', "a"),
        (b'{"INPUTS": [{"path": "x"}], "Inputs": [{"path": "b"}], "inputs": [{"path": "a"}]}', "a"),
        # a repeated exact key around a case variant: the document's last one wins
        (b'{"inputs": [{"path": "a"}], "Inputs": [{"path": "b"}], "inputs": [{"path": "c"}]}', "c"),
        (b'{"Inputs": [{"path": "b"}], "inputs": [{"path": "a"}], "Inputs": [{"path": "c"}]}', "c"),
        (b'{"inputs": [{"path": "a"}], "inputs": [{"path": "c"}]}', "c"),
        # inside the item too: Path and path are one field
        (b'{"inputs": [{"Path": "p", "path": "q", "PATH": "r"}]}', "r"),
    ],
)
def test_last_duplicate_wins(raw: bytes, want: str) -> None:
    spec_json = raw.decode()[:-1] + ', "Engine": "noop"}'
    data = f'{{"SourcePeerID": "r1", "Job": {{"Metadata": {{"ID": "j"}}, "Spec": {spec_json}}}}}'
    spec = decode(data.encode(), AskForBidRequest).Job.Spec
    assert [s.path for s in spec.inputs] == [want]


def test_last_duplicate_wins_for_scalars_and_objects() -> None:
    data = b'{"SourcePeerID": "a", "sourcePeerID": "b", "Job": {"Metadata": {"ID": "j"},'
    data += b' "Spec": {"Engine": "noop", "docker": {"Image": "x"}, "Docker": {"Image": "y"}}}}'
    got = decode(data, AskForBidRequest)
    assert got.SourcePeerID == "b"
    assert got.Job.Spec.Docker.Image == "y"


def test_unknown_keys_are_dropped() -> None:
    data = ask(Extra=1, Job={**job(Sharding={"BatchSize": 1}, Annotations=[]), "Status": {}})
    got = decode(body(data), AskForBidRequest)
    assert got == decode(body(ask()), AskForBidRequest)


def test_folding_is_ascii_only() -> None:
    # U+212A KELVIN SIGN lower-cases to "k"; Go folds it, the protocol says ASCII only.
    spec = decode_spec(inputs=[{"S3": {"\u212aey": "k1", "Bucket": "b"}}])
    assert S3StorageSpec(Bucket="b") == spec.inputs[0].S3


def test_keys_of_plain_dicts_are_kept_as_sent() -> None:
    spec = decode_spec(
        inputs=[{"StorageSource": "ObjectStore", "Metadata": {"bucket": 1, "Bucket": 2}}],
        PublisherSpec={"type": "s3", "params": {"bucket": "b", "KEY": "k"}},
    )
    assert spec.inputs[0].Metadata == {"bucket": 1, "Bucket": 2}
    assert spec.PublisherSpec == PublisherSpec(
        Type=Publisher.S3, Params={"bucket": "b", "KEY": "k"}
    )


def test_null_behaves_as_in_go() -> None:
    spec = decode_spec(
        inputs=None, Docker=None, Verifier=None, Resources={"CPU": None}, Timeout=None, Deal=None
    )
    assert spec.inputs == []
    assert spec.Docker == DockerSpec()
    assert spec.Verifier is None
    assert spec.Resources == ResourcesConfig()
    assert spec.Timeout == 0.0
    # null on a slice after a value empties it; on a string it changes nothing
    spec = decode_spec(inputs=[{"path": "a"}], Inputs=None)
    assert spec.inputs == []
    data = b'{"SourcePeerID": "r1", "Job": {"Metadata": {"ID": "j", "id": null}, '
    data += b'"Spec": {"Engine": "noop"}}}'
    assert decode(data, AskForBidRequest).Job.Metadata.ID == "j"
    # a required field that is null is missing
    assert "Engine" in refused(body(ask(Job=job(Engine=None))))
    run = decode(body({**_run_result_json(), "ResultProposal": None}), RunResult)
    assert run.ResultProposal == b""


def _run_result_json() -> dict[str, Any]:
    return {
        "SourcePeerID": "n1",
        "TargetPeerID": "r1",
        "ExecutionID": "e-1",
        "JobID": "j",
        "Seq": 1,
    }


# --------------------------------------------------------------------------- enums


@pytest.mark.parametrize(
    ("field", "value", "want"),
    [
        ("Engine", "docker", Engine.DOCKER),
        ("Engine", "NOOP", Engine.NOOP),
        ("Engine", "wAsM", Engine.WASM),
        ("Engine", "language", Engine.LANGUAGE),
        ("Verifier", "deterministic", Verifier.DETERMINISTIC),
        ("Publisher", "ipfs", Publisher.IPFS),
        ("Publisher", "IPFS", Publisher.IPFS),
        ("Publisher", "estuary", Publisher.ESTUARY),
        ("Publisher", "objectstore", Publisher.OBJECT_STORE),
    ],
)
def test_enum_values_fold(field: str, value: str, want: Any) -> None:
    spec = decode_spec(**{field: value})
    assert getattr(spec, field) is want


@pytest.mark.parametrize(
    ("value", "want"),
    [
        ("ipfs", StorageSource.IPFS),
        ("Ipfs", StorageSource.IPFS),
        ("urlDownload", StorageSource.URL_DOWNLOAD),
        ("urldownload", StorageSource.URL_DOWNLOAD),
        ("URLDOWNLOAD", StorageSource.URL_DOWNLOAD),
        ("inline", StorageSource.INLINE),
        ("s3", StorageSource.S3),
        ("localdirectory", StorageSource.LOCAL_DIRECTORY),
    ],
)
def test_storage_source_folds_everywhere(value: str, want: StorageSource) -> None:
    spec = decode_spec(
        inputs=[{"StorageSource": value}],
        outputs=[{"storagesource": value}],
        Wasm={"EntryModule": {"StorageSource": value}, "ImportModules": [{"StorageSource": value}]},
        Language={"JobContext": {"StorageSource": value}},
    )
    sources = {s.StorageSource for s in spec.all_storage_specs()}
    assert sources == {want}


def test_other_enums_fold() -> None:
    assert decode_spec(Network={"type": "http"}).Network == NetworkConfig(Type=NetworkType.HTTP)
    assert decode_spec(PublisherSpec={"Type": "local"}).publisher is Publisher.LOCAL
    listing = decode(
        b'{"SourcePeerID": "r1", "States": ["bidaccepted", "FAILED"]}', ListExecutionsRequest
    )
    assert listing.States == [ExecutionState.BID_ACCEPTED, ExecutionState.FAILED]
    reply = decode(b'{"ExecutionID": "e", "JobID": "j", "State": "running"}', ExecutionResponse)
    assert reply.State is ExecutionState.RUNNING


def test_encoding_writes_canonical_spellings() -> None:
    got = decode(
        body(ask(Job=job(Engine="docker", Publisher="ipfs", Inputs=[{"Path": "/i"}]))),
        AskForBidRequest,
    )
    out = json.loads(encode(got))
    assert out["Job"]["Spec"]["Engine"] == "Docker"
    assert out["Job"]["Spec"]["Publisher"] == "Ipfs"
    assert out["Job"]["Spec"]["inputs"][0]["path"] == "/i"


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ({"Engine": "PythonWasm"}, 'unknown engine "PythonWasm"'),
        ({"Engine": ""}, 'unknown engine ""'),
        ({"Engine": "d\u043ecker"}, 'unknown engine "d\\u043ecker"'),  # Cyrillic o
        ({"Verifier": "magic"}, 'unknown verifier "magic"'),
        ({"Publisher": "gdrive"}, 'unknown publisher "gdrive"'),
        ({"PublisherSpec": {"Type": "ftp"}}, 'unknown publisher "ftp"'),
        ({"inputs": [{"StorageSource": "torrent"}]}, 'unknown storage source "torrent"'),
        ({"Network": {"Type": "tor"}}, 'unknown network type "tor"'),
    ],
)
def test_unknown_enum_value(where: dict[str, Any], message: str) -> None:
    assert refused(body(ask(Job=job(**where)))) == message


def test_unknown_state() -> None:
    data = b'{"SourcePeerID": "r1", "States": ["Bogus"]}'
    assert refused(data, ListExecutionsRequest) == 'unknown state "Bogus"'


def test_unknown_enum_message_is_one_bounded_line() -> None:
    message = refused(body(ask(Job=job(Engine="a\nb" + "x" * 10_000))))
    assert message.startswith('unknown engine "a\\nb')
    assert len(message) < 200


def test_enum_of_wrong_type() -> None:
    assert "Expected `str`" in refused(body(ask(Job=job(Engine=1))))


# --------------------------------------------------------------------------- required fields


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"Job": job()}, "SourcePeerID"),
        (ask(SourcePeerID=""), "SourcePeerID"),
        ({"SourcePeerID": "r1"}, "Job"),
        (ask(Job={"Spec": {"Engine": "noop"}}), "Metadata"),
        (ask(Job={"Metadata": {}, "Spec": {"Engine": "noop"}}), "ID"),
        (ask(Job={"Metadata": {"ID": ""}, "Spec": {"Engine": "noop"}}), "$.Job.Metadata.ID"),
        (ask(Job={"Metadata": {"ID": "j"}}), "Spec"),
        (ask(Job={"Metadata": {"ID": "j"}, "Spec": {}}), "Engine"),
    ],
)
def test_required_fields(data: dict[str, Any], needle: str) -> None:
    assert needle in refused(body(data))


def test_missing_engine_message_names_the_path() -> None:
    message = refused(body(ask(Job={"Metadata": {"ID": "j"}, "Spec": {"Publisher": "noop"}})))
    assert message == "Object missing required field `Engine` - at `$.Job.Spec`"


@pytest.mark.parametrize(
    "type_",
    [
        BidAcceptedRequest,
        BidRejectedRequest,
        ResultAcceptedRequest,
        ResultRejectedRequest,
        CancelExecutionRequest,
        GetExecutionRequest,
        ExecutionLogsRequest,
    ],
)
def test_execution_requests_need_both_ids(type_: type[Any]) -> None:
    assert decode(b'{"SourcePeerID": "r1", "ExecutionID": "e-1"}', type_).ExecutionID == "e-1"
    assert "ExecutionID" in refused(b'{"SourcePeerID": "r1"}', type_)
    assert "ExecutionID" in refused(b'{"SourcePeerID": "r1", "ExecutionID": ""}', type_)
    assert "SourcePeerID" in refused(b'{"ExecutionID": "e-1"}', type_)


BAD_IDS = [
    "a.b",
    "*",
    ">",
    "_all",
    "x\n",
    "a" * 129,
    "\u00e9t\u00e9",
    "a\u0660",  # Arabic-Indic digit
    "",
    " a",
    "a b",
    "-a",
    "a/b",
    "$SRV",
]
GOOD_IDS = ["a", "A", "0", "a" * 128, "n-0b6a0c2c-7a4f-4c39-9c1f-2f1f4bd3e0a1", "A_b-9"]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_bad_ids_are_refused(bad: str) -> None:
    assert "SourcePeerID" in refused(body(ask(SourcePeerID=bad)))
    exec_body = {"SourcePeerID": "r1", "ExecutionID": bad}
    assert "ExecutionID" in refused(body(exec_body), BidAcceptedRequest)
    if bad:
        assert "TargetPeerID" in refused(body(ask(TargetPeerID=bad)))


def test_bad_id_message() -> None:
    assert refused(body(ask(SourcePeerID="a.b"))) == (
        "Expected an ID matching [A-Za-z0-9][A-Za-z0-9_-]{0,127} - at `$.SourcePeerID`"
    )


@pytest.mark.parametrize("good", GOOD_IDS)
def test_good_ids_are_accepted(good: str) -> None:
    got = decode(body(ask(SourcePeerID=good, TargetPeerID=good)), AskForBidRequest)
    assert got.SourcePeerID == got.TargetPeerID == good
    assert decode(body({"SourcePeerID": "r", "ExecutionID": good}), CancelExecutionRequest)


@pytest.mark.parametrize("timeout", [-1, -0.001, -1e300])
def test_negative_timeout(timeout: float) -> None:
    assert "$.Job.Spec.Timeout" in refused(body(ask(Job=job(Timeout=timeout))))


@pytest.mark.parametrize("timeout", [0, 0.5, 10, 3600.25, 9223372037])
def test_timeout_accepted(timeout: float) -> None:
    assert decode_spec(Timeout=timeout).Timeout == timeout


@pytest.mark.parametrize("value", ['"10"', "true", "[]", "1e999"])
def test_timeout_of_wrong_type_or_range(value: str) -> None:
    data = '{"SourcePeerID": "r1", "Job": {"Metadata": {"ID": "j"}, "Spec": {"Engine": "noop",'
    refused(f'{data} "Timeout": {value}}}}}}}'.encode())


def test_other_constraints() -> None:
    assert "Limit" in refused(b'{"SourcePeerID": "r1", "Limit": -1}', ListExecutionsRequest)
    assert "Limit" in refused(b'{"SourcePeerID": "r1", "Limit": 10001}', ListExecutionsRequest)
    refused(b'{"SourcePeerID": "r1", "ExecutionID": "e", "TailBytes": -1}', ExecutionLogsRequest)
    refused(body(ask(Job={"Metadata": {"ID": "x" * 257}, "Spec": {"Engine": "noop"}})))
    refused(body(ask(Job=job(Docker={"Entrypoint": "ls"}))))


# --------------------------------------------------------------------------- malformed input


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b" ",
        b"{",
        b"nope",
        b'{"SourcePeerID": "r1"} x',
        b"{'SourcePeerID': 'r1'}",
        b'{"a": NaN}',
        b'{"a": Infinity}',
        b"\xef\xbb\xbf{}",
        b'{"a": "\\ud800"}',
        b"\x00",
    ],
)
def test_not_json(data: bytes) -> None:
    refused(data)


@pytest.mark.parametrize("data", [b"[]", b"[{}]", b"1", b"-2.5", b'"s"', b"null", b"true"])
@pytest.mark.parametrize("type_", [AskForBidRequest, ResultAcceptedRequest, ListExecutionsRequest])
def test_top_level_must_be_an_object(data: bytes, type_: type[Any]) -> None:
    assert "Expected `object`" in refused(data, type_)


def test_invalid_utf8_in_a_read_field() -> None:
    assert "UTF-8" in refused(b'{"SourcePeerID": "r\xff1", "Job": {}}')
    data = b'{"SourcePeerID": "r1", "Job": {"Metadata": {"ID": "j"}, "Spec": {"Engine": "noop",'
    assert "UTF-8" in refused(data + b' "Docker": {"Image": "ub\xc3\x28untu"}}}}')
    assert "UTF-8" in refused(data + b' "inputs": [{"Metadata": {"k": "\xed\xa0\x80"}}]}}}')
    assert "UTF-8" in refused(data + b' "inputs": [{"Metadata": {"\xff": 1}}]}}}')
    exec_body = b'{"SourcePeerID": "r1", "ExecutionID": "e", "Justification": "bad \xfe"}'
    assert "UTF-8" in refused(exec_body, BidRejectedRequest)


def test_invalid_utf8_in_an_ignored_field_is_ignored() -> None:
    data = b'{"SourcePeerID": "r1", "Note": "\xff\xfe", "\xff": 1, "Job": {"Metadata": {"ID": "j"},'
    data += b' "Spec": {"Engine": "noop", "Annotations": ["\xc0\xaf"]}}}'
    got = decode(data, AskForBidRequest)
    assert got == decode(
        body(ask(Job={"Metadata": {"ID": "j"}, "Spec": {"Engine": "noop"}})), AskForBidRequest
    )


def test_invalid_utf8_with_duplicate_keys_takes_the_ordered_path() -> None:
    data = b'{"SourcePeerID": "r1", "Note": "\xff", "Job": {"Metadata": {"ID": "j"},'
    data += b' "Spec": {"Engine": "noop", "inputs": [], "Inputs": [{"path": "b"}]}}}'
    assert [s.path for s in decode(data, AskForBidRequest).Job.Spec.inputs] == ["b"]


def test_invalid_utf8_outside_strings() -> None:
    refused(b'{"SourcePeerID": "r1"\xff}')


def test_noncharacter_sentinel_is_an_ordinary_character() -> None:
    # U+FDD0 is how the codec marks bad bytes: valid input holding it still decodes...
    got = decode(
        '{"SourcePeerID": "r1", "ExecutionID": "e", "Justification": "\ufdd0"}'.encode(),
        BidRejectedRequest,
    )
    assert got.Justification == "\ufdd0"
    # ...and together with invalid UTF-8 it is refused rather than misread.
    refused('{"SourcePeerID": "r1", "J": "\ufdd0\udcff"}'.encode("utf-8", "surrogatepass"))


def _nested(depth: int, kind: str = "[") -> bytes:
    if kind == "[":
        return b"[" * depth + b"]" * depth
    return b'{"a":' * depth + b"1" + b"}" * depth


@pytest.mark.parametrize("depth", [codec.MAX_DEPTH + 1, 900, 5_000, 100_000])
@pytest.mark.parametrize("kind", ["[", "{"])
def test_deep_nesting_is_refused(depth: int, kind: str) -> None:
    assert "too deep" in refused(_nested(depth, kind))
    # anywhere in the body, even in a field the node ignores
    data = b'{"SourcePeerID": "r1", "Ignored": ' + _nested(depth, kind) + b"}"
    assert "too deep" in refused(data)


def test_nesting_up_to_the_limit_is_fine() -> None:
    inner = _nested(codec.MAX_DEPTH - 6)  # under {}, Job, Spec, inputs, item, Metadata
    data = b'{"SourcePeerID": "r1", "Job": {"Metadata": {"ID": "j"}, "Spec": {"Engine": "noop",'
    data += b' "inputs": [{"Metadata": {"deep": ' + inner + b"}}]}}}"
    got = decode(data, AskForBidRequest)
    assert "deep" in got.Job.Spec.inputs[0].Metadata
    refused(data.replace(inner, _nested(codec.MAX_DEPTH - 5)))


def test_deep_nesting_does_not_depend_on_the_call_stack() -> None:
    def recurse(n: int) -> str:
        if n == 0:
            return refused(_nested(100_000))
        return recurse(n - 1)

    assert "too deep" in recurse(800)


def test_many_brackets_inside_strings_are_not_nesting() -> None:
    text = "[" * 10_000 + "{" * 10_000
    got = decode(
        body({"SourcePeerID": "r1", "ExecutionID": "e", "Justification": text}), BidRejectedRequest
    )
    assert got.Justification == text


def test_huge_strings_under_the_size_limit() -> None:
    big = "x" * 200_000
    got = decode(
        body({"SourcePeerID": "r1", "ExecutionID": "e", "Justification": big}), BidRejectedRequest
    )
    assert got.Justification == big
    url = "data:application/wasm;base64," + "A" * 150_000
    spec = decode_spec(Engine="wasm", Wasm={"EntryModule": {"StorageSource": "inline", "URL": url}})
    assert url == spec.Wasm.EntryModule.URL


def test_memoryview_and_bytearray() -> None:
    data = body(ask())
    assert decode(memoryview(data), AskForBidRequest) == decode(data, AskForBidRequest)
    assert decode(memoryview(bytearray(data)), AskForBidRequest) == decode(data, AskForBidRequest)


def test_many_distinct_unknown_keys() -> None:
    keys = {f"Unknown{i}": i for i in range(2_000)}
    keys.update({f"sOURCEpEERid{i}": i for i in range(500)})
    got = decode(body(ask(**keys)), AskForBidRequest)
    assert got.SourcePeerID == "r1"
    assert decode(body({"sourcepeerid": "r2", "JOB": job()}), AskForBidRequest).SourcePeerID == "r2"


def test_big_integers() -> None:
    refused(body(ask(Job=job(Timeout=10**400))))
    assert decode_spec(Deal={"Concurrency": 3}).Deal.Concurrency == 3


# --------------------------------------------------------------------------- other job models


@pytest.mark.parametrize(
    ("the_job", "needle"),
    [
        ({"Metadata": {"ID": "j"}, "Tasks": [{"Name": "main"}]}, "v1.x models.Job (tasks[])"),
        ({"Metadata": {"ID": "j"}, "tasks": [], "type": "batch"}, "v1.x models.Job (tasks[])"),
        (
            {"Metadata": {"ID": "j"}, "Type": "Service", "Name": "x"},
            'v1.x models.Job (type "Service")',
        ),
        (
            {"Metadata": {"ID": "j"}, "Spec": {"EngineSpec": {"Type": "docker"}}},
            "v1.0 Spec.EngineSpec",
        ),
        (
            {"Metadata": {"ID": "j"}, "spec": {"enginespec": {"Type": "wasm"}, "Engine": ""}},
            "v1.0 Spec.EngineSpec",
        ),
        (
            {"Metadata": {"ID": "j"}, "Engine": "Docker", "JobSpecDocker": {}},
            "legacy flat job spec",
        ),
        ({"Metadata": {"ID": "j"}, "jobspecdocker": {"Image": "u"}}, "legacy flat job spec"),
    ],
)
def test_other_job_models_are_named(the_job: dict[str, Any], needle: str) -> None:
    with pytest.raises(DecodeError) as info:
        decode_ask(body({"SourcePeerID": "r1", "Job": the_job}))
    assert info.value.message.startswith("unsupported job model: ")
    assert needle in info.value.message
    assert info.value.message.endswith("send a v0.3.25 model.Job with Spec.Engine")
    assert needle in refused(body(the_job), Job)


def test_a_job_with_spec_engine_is_v0325_whatever_else_it_has() -> None:
    the_job = {**job(EngineSpec={"Type": "wasm"}), "Tasks": [{}], "Type": "batch"}
    got = decode_ask(body(ask(Job=the_job)))
    assert got.Job.Spec.Engine is Engine.DOCKER


def test_a_plain_v0325_error_is_not_blamed_on_the_model() -> None:
    assert refused(body(ask(Job=job(Engine="nope")))) == 'unknown engine "nope"'
    assert "Metadata" in refused(body(ask(Job={"Spec": {"Engine": "noop"}})))


# --------------------------------------------------------------------------- round trips

_JOB = Job(
    APIVersion="V1beta1",
    Metadata=Metadata(
        ID="job-1",
        ClientID="c",
        CreatedAt="2026-11-29T10:12:11.123456Z",
        Requester=JobRequester(RequesterNodeID="r1", RequesterPublicKey="CAAS"),
    ),
    Spec=Spec(
        Engine=Engine.DOCKER,
        Verifier=Verifier.DETERMINISTIC,
        Publisher=Publisher.IPFS,
        PublisherSpec=PublisherSpec(Type=Publisher.OBJECT_STORE, Params={"Bucket": "b"}),
        Docker=DockerSpec(Image="ubuntu", Entrypoint=["ls", "-l"], EnvironmentVariables=["A=1"]),
        Resources=ResourcesConfig(CPU="500m", Memory="1Gb", Disk="1Gi", GPU="1"),
        Network=NetworkConfig(Type=NetworkType.HTTP, Domains=["example.com"]),
        Timeout=12.5,
        inputs=[
            StorageSpec(StorageSource=StorageSource.URL_DOWNLOAD, URL="https://x", path="/in"),
            StorageSpec(
                StorageSource=StorageSource.S3,
                S3=S3StorageSpec(Bucket="b", Key="k"),
                Metadata={"n": [1, 2.5, None, True]},
            ),
        ],
        outputs=[StorageSpec(StorageSource=StorageSource.IPFS, Name="outputs", path="/outputs")],
    ),
)
_CAP = Capacity(CPU=1.5, Memory=1 << 30, Disk=1 << 32, GPU=1)
_RCR = RunCommandResult(stdout="out\u00e9", stdouttruncated=True, stderr="err", exitCode=3)

SAMPLES: list[msgspec.Struct] = [
    AskForBidRequest(SourcePeerID="r1", TargetPeerID="n1", Job=_JOB),
    BidAcceptedRequest(
        SourcePeerID="r1", ExecutionID="e-1", Accepted={"any": [1]}, Justification="ok"
    ),
    BidRejectedRequest(SourcePeerID="r1", TargetPeerID="n1", ExecutionID="e-1", Justification="no"),
    ResultAcceptedRequest(SourcePeerID="r1", ExecutionID="e-1"),
    ResultRejectedRequest(SourcePeerID="r1", ExecutionID="e-1", Justification="bad"),
    CancelExecutionRequest(SourcePeerID="r1", ExecutionID="e-1", Justification="stop"),
    GetExecutionRequest(SourcePeerID="r1", ExecutionID="e-1"),
    ListExecutionsRequest(
        SourcePeerID="r1",
        UpdatedSince="2026-11-29T10:12:11.123456Z",
        States=[ExecutionState.RUNNING, ExecutionState.CANCELLED],
        Limit=10,
        Cursor="c1",
    ),
    ExecutionLogsRequest(SourcePeerID="r1", ExecutionID="e-1", Follow=True, TailBytes=100),
    AskForBidResponse(
        ExecutionID="e-1",
        JobID="job-1",
        Accepted=True,
        NodeID="n1",
        BidTTLSeconds=15.0,
        Price=Price(Amount=0.25, Unit="USD"),
        EstimatedStartSeconds=3.5,
    ),
    ExecutionResponse(ExecutionID="e-1", JobID="job-1", State=ExecutionState.BID_ACCEPTED),
    ListExecutionsResponse(
        Executions=[ExecutionSummary(ExecutionID="e-1", JobID="j", State=ExecutionState.FAILED)],
        Next="n",
    ),
    ExecutionLogsResponse(Subject="market.logs.r1.n1.e-1"),
    ExecutionView(
        Execution=ExecutionDetail(
            ExecutionID="e-1",
            JobID="j",
            State=ExecutionState.COMPLETED,
            ResourceUsage=_CAP,
            Version=7,
            CreateTime="2026-11-29T10:12:11.123456Z",
            UpdateTime="2026-11-29T10:12:12.000000Z",
            LatestComment="done",
            RunCommandResult=_RCR,
            ResultProposal=b"\x00\x01proposal",
            PublishResult=StorageSpec(
                StorageSource=StorageSource.URL_DOWNLOAD, URL="http://x/e-1.tar.gz"
            ),
        ),
        History=[
            HistoryEntry(
                PreviousState=ExecutionState.UNDEFINED,
                NewState=ExecutionState.CREATED,
                NewVersion=1,
                Cause="AskForBid",
                Comment="",
                Time="2026-11-29T10:12:11.123456Z",
            )
        ],
        Callbacks=[
            CallbackView(
                Seq=1,
                Kind="OnRunComplete",
                Body={"Seq": 1, "JobID": "j"},
                CreatedAt="2026-11-29T10:12:11.123456Z",
                Delivered=True,
            )
        ],
    ),
    NodeInfo(
        NodeID="n1",
        InstanceID="0b6a0c2c-7a4f-4c39-9c1f-2f1f4bd3e0a1",
        Labels={"zone": "a"},
        Draining=True,
        ComputeNodeInfo=ComputeNodeInfo(
            ExecutionEngines=["Noop", "Docker"],
            MaxCapacity=_CAP,
            RunningExecutions=2,
            OutboxOldestAgeSeconds=1.5,
        ),
    ),
    ErrorBody(Error="bad", Code=400, NodeID="n1", State="Running", Cause="BidExpired"),
    RunResult(
        SourcePeerID="n1",
        TargetPeerID="r1",
        ExecutionID="e-1",
        JobID="j",
        Seq=1,
        ResultProposal=b"\xff\x00",
        RunCommandResult=_RCR,
        VerificationTTLSeconds=3600.0,
        Usage=Usage(WallSeconds=1.0, CPUSeconds=0.5, PeakMemoryBytes=1 << 20),
    ),
    PublishResult(
        SourcePeerID="n1",
        TargetPeerID="r1",
        ExecutionID="e-1",
        JobID="j",
        Seq=2,
        PublishResult=StorageSpec(
            StorageSource=StorageSource.OBJECT_STORE, Metadata={"Bucket": "b", "Size": 3}
        ),
    ),
    CancelResult(SourcePeerID="n1", TargetPeerID="r1", ExecutionID="e-1", JobID="j", Seq=3),
    ComputeError(
        SourcePeerID="n1",
        TargetPeerID="r1",
        ExecutionID="e-1",
        JobID="j",
        Seq=4,
        Err="boom",
        Cause="RunTimeout",
    ),
    LogChunk(Stream="stdout", Offset=10, Data="hello\n"),
    LogChunk(EOF=True, ExitCode=0),
    _JOB,
    AskForBidResponse(Reason="not enough capacity available", Retryable=True, NodeID="n1"),
]


def test_every_message_type_has_a_round_trip_sample() -> None:
    assert set(MESSAGE_TYPES) <= {type(s) for s in SAMPLES}


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda s: type(s).__name__)
def test_round_trip(sample: msgspec.Struct) -> None:
    data = encode(sample)
    assert decode(data, type(sample)) == sample
    assert decode(memoryview(data), type(sample)) == sample
    assert encode(decode(data, type(sample))) == data


def test_round_trip_after_recasing_keys() -> None:
    data = encode(SAMPLES[0]).replace(b'"inputs"', b'"Inputs"').replace(b'"path"', b'"PATH"')
    assert decode(data, AskForBidRequest) == SAMPLES[0]


def test_unset_optional_fields_are_not_written() -> None:
    out = json.loads(encode(AskForBidResponse(NodeID="n1")))
    assert "Price" not in out
    assert "EstimatedStartSeconds" not in out
    assert json.loads(encode(LogChunk(Stream="stderr", Data="x"))) == {
        "Stream": "stderr",
        "Data": "x",
    }


def test_bytes_are_base64() -> None:
    run = next(s for s in SAMPLES if isinstance(s, RunResult))
    assert json.loads(encode(run))["ResultProposal"] == "/wA="
    assert codec.to_builtins(run)["ResultProposal"] == "/wA="
    assert (
        decode(body({**_run_result_json(), "ResultProposal": ""}), RunResult).ResultProposal == b""
    )
    refused(body({**_run_result_json(), "ResultProposal": "not base64!"}), RunResult)


def test_to_builtins_is_json_compatible() -> None:
    for sample in SAMPLES:
        assert json.loads(json.dumps(codec.to_builtins(sample))) == json.loads(encode(sample))


# --------------------------------------------------------------------------- times


def test_format_time() -> None:
    dt = datetime(2026, 11, 29, 10, 12, 11, 123456, tzinfo=UTC)
    assert format_time(dt) == "2026-11-29T10:12:11.123456Z"
    assert format_time(dt.replace(microsecond=0)) == "2026-11-29T10:12:11.000000Z"
    plus2 = timezone(timedelta(hours=2))
    assert (
        format_time(datetime(2026, 11, 29, 12, 12, 11, 5, tzinfo=plus2))
        == "2026-11-29T10:12:11.000005Z"
    )
    assert format_time(datetime(5, 1, 2, tzinfo=UTC)) == "0005-01-02T00:00:00.000000Z"
    with pytest.raises(ValueError, match="aware"):
        format_time(datetime(2026, 11, 29))


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("2026-11-29T10:12:11.123456Z", datetime(2026, 11, 29, 10, 12, 11, 123456, tzinfo=UTC)),
        ("2026-11-29T10:12:11Z", datetime(2026, 11, 29, 10, 12, 11, tzinfo=UTC)),
        ("2026-11-29t10:12:11.5z", datetime(2026, 11, 29, 10, 12, 11, 500000, tzinfo=UTC)),
        ("2026-11-29T10:12:11.123456789Z", datetime(2026, 11, 29, 10, 12, 11, 123456, tzinfo=UTC)),
        ("2026-11-29T12:12:11.1+02:00", datetime(2026, 11, 29, 10, 12, 11, 100000, tzinfo=UTC)),
        ("2026-11-29T00:00:00-00:30", datetime(2026, 11, 29, 0, 30, tzinfo=UTC)),
    ],
)
def test_parse_time(text: str, want: datetime) -> None:
    got = parse_time(text)
    assert got == want
    assert got.tzinfo is UTC


@pytest.mark.parametrize(
    "text",
    [
        "",
        "now",
        "2026-11-29",
        "2026-11-29T10:12:11",
        "2026-11-29 10:12:11Z",
        "2026-13-01T00:00:00Z",
        "2026-02-30T00:00:00Z",
        "2026-11-29T24:00:00Z",
        "2026-11-29T10:12:60Z",
        "2026-11-29T10:12:11.Z",
        "2026-11-29T10:12:11.1234567890Z",
        "2026-11-29T10:12:11+24:00",
        "2026-11-29T10:12:11+0200",
        "0000-01-01T00:00:00Z",
        "0001-01-01T00:00:00+01:00",
        "\u0662\u0660\u0662\u0666-11-29T10:12:11Z",
        " 2026-11-29T10:12:11Z",
        "2026-11-29T10:12:11Z\n",
    ],
)
def test_parse_time_refuses(text: str) -> None:
    with pytest.raises(DecodeError) as info:
        parse_time(text)
    assert "\n" not in info.value.message


def test_parse_time_refuses_non_strings() -> None:
    with pytest.raises(DecodeError):
        parse_time(123)  # type: ignore[arg-type]


@settings(max_examples=50, database=None)
@given(st.datetimes(timezones=st.timezones()))
def test_time_round_trip(dt: datetime) -> None:
    try:
        text = format_time(dt)
    except OverflowError:  # beyond year 1..9999 once shifted to UTC
        return
    assert parse_time(text) == dt.astimezone(UTC)
    assert len(text) == 27


# --------------------------------------------------------------------------- fuzzing

_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
    | st.sampled_from(["docker", "IPFS", "urlDownload", "r1", "", "Inputs", "e-1"]),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                ["Engine", "engine", "Inputs", "path", "Path", "ID", "Spec", "x", "Tasks"]
            )
            | st.text(max_size=8),
            children,
            max_size=4,
        )
    ),
    max_leaves=20,
)
_PLACES = [
    (),
    ("SourcePeerID",),
    ("TargetPeerID",),
    ("Job",),
    ("Job", "Metadata"),
    ("Job", "Metadata", "ID"),
    ("Job", "Spec"),
    ("Job", "Spec", "Engine"),
    ("Job", "Spec", "Timeout"),
    ("Job", "Spec", "inputs"),
    ("Job", "Spec", "Inputs"),
    ("Job", "Spec", "Docker"),
    ("Job", "Spec", "Network"),
    ("Job", "Spec", "PublisherSpec"),
    ("Job", "Spec", "Wasm", "EntryModule"),
    ("Job", "tasks"),
]


@settings(max_examples=150, database=None)
@given(value=_JSON, place=st.sampled_from(_PLACES))
def test_any_json_decodes_or_is_a_decode_error(value: Any, place: tuple[str, ...]) -> None:
    doc: Any = ask(Job=job(Publisher="noop"))
    if place:
        target = doc
        for key in place[:-1]:
            target = target.setdefault(key, {})
        target[place[-1]] = value
    else:
        doc = value
    try:
        got = decode(body(doc), AskForBidRequest)
    except DecodeError as e:
        assert e.message and e.message.isascii() and "\n" not in e.message
    else:
        assert decode(encode(got), AskForBidRequest) == got


@settings(max_examples=150, database=None)
@given(prefix=st.binary(max_size=64), cut=st.integers(min_value=0, max_value=400))
def test_any_bytes_decode_or_are_a_decode_error(prefix: bytes, cut: int) -> None:
    valid = body(ask(Job=job(Inputs=[{"Path": "/i", "StorageSource": "ipfs"}])))
    for data in (prefix, valid[:cut] + prefix + valid[cut:], valid[:cut]):
        for type_ in (AskForBidRequest, BidAcceptedRequest, ListExecutionsRequest):
            with contextlib.suppress(DecodeError):
                decode(data, type_)
