"""Real Bacalhau job specs (shared/corpus/bacalhau-jobspecs) through the codec.

Every v0.3.25-model file, sent as the Job of an AskForBidRequest, decodes; every file of
another model is refused with a DecodeError naming that model (PROTOCOL.md §4).
"""

from __future__ import annotations

import copy
import functools
import json
import random
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import msgspec.inspect as mi
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.codec import DecodeError, decode, decode_ask
from schemas.compute import AskForBidRequest
from schemas.job import Engine, Publisher, StorageSource
from worker.asking import same_spec
from worker.capacity.usage import ResourceUsage
from worker.store.sqlite_rows import decode_doc, encode_doc, encode_job
from worker.store.types import Execution

CORPUS = Path(__file__).resolve().parents[2].parent / "shared/corpus/bacalhau-jobspecs"

# README "model" column → the words the refusal must contain (None: it must decode).
MODEL_NEEDLES: dict[str, str | None] = {
    "v0.3.25": None,
    "v0.3.25 + v1.0 PublisherSpec": None,
    "legacy flat": "legacy flat job spec",
    "v1.0 EngineSpec": "v1.0 Spec.EngineSpec",
    "v1.x models.Job": "v1.x models.Job",
}


def _require_corpus() -> Path:
    if not (CORPUS / "README.md").is_file():
        pytest.fail(f"job spec corpus not found at {CORPUS} (expected beside the repo in shared/)")
    return CORPUS


def _readme_models() -> dict[str, str]:
    rows: dict[str, str] = {}
    for line in (_require_corpus() / "README.md").read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and re.fullmatch(r"v[\d.]+__\S+\.(ya?ml|json)", cells[0]):
            rows[cells[0]] = cells[2]
    return rows


def _files() -> list[str]:
    if not CORPUS.is_dir():
        return ["<corpus missing>"]
    return sorted(p.name for p in CORPUS.iterdir() if p.name != "README.md")


@functools.cache
def _parsed(name: str) -> Any:
    text = (_require_corpus() / name).read_text(encoding="utf-8")
    return json.loads(text) if name.endswith(".json") else yaml.safe_load(text)


def _load(name: str) -> Any:
    return copy.deepcopy(_parsed(name))


def _ask(name: str) -> dict[str, Any]:
    job = _load(name)
    job.setdefault("Metadata", {})["ID"] = "job-" + re.sub(r"[^A-Za-z0-9_-]", "-", name)
    return {"SourcePeerID": "r1", "Job": job}


def _is_v0325(doc: Any) -> bool:
    spec = doc.get("Spec") if isinstance(doc, dict) else None
    return isinstance(spec, dict) and "Engine" in spec


def test_readme_lists_every_file() -> None:
    models = _readme_models()
    assert sorted(models) == _files()
    assert set(models.values()) <= set(MODEL_NEEDLES), set(models.values()) - set(MODEL_NEEDLES)


@pytest.mark.parametrize("name", _files())
def test_corpus_file(name: str) -> None:
    model = _readme_models().get(name)
    assert model is not None, f"{name} is not in the corpus README"
    needle = MODEL_NEEDLES[model]
    assert _is_v0325(_load(name)) == (needle is None), f"{name}: README model {model!r}"
    data = json.dumps(_ask(name)).encode()
    if needle is None:
        got = decode_ask(data)
        assert got.Job.Spec.Engine in set(Engine)
        assert decode(data, AskForBidRequest) == got
    else:
        with pytest.raises(DecodeError) as info:
            decode_ask(data)
        assert info.value.message.startswith("unsupported job model: ")
        assert needle in info.value.message


def test_capitalised_keys_and_lowercase_enums_mean_the_same() -> None:
    """testdata/job.json writes Inputs/Outputs/Path and lowercase enums; Go accepts both."""
    got = decode_ask(json.dumps(_ask("v0.3.25__testdata__job.json")).encode()).Job.Spec
    assert got.Engine is Engine.DOCKER
    assert got.publisher is Publisher.IPFS
    assert [(o.StorageSource, o.Name, o.path) for o in got.outputs] == [
        (StorageSource.IPFS, "output_custom", "/output_custom")
    ]
    noop = decode_ask(json.dumps(_ask("v1.0.4__testdata__job-noop.json")).encode()).Job.Spec
    assert [(i.StorageSource, i.CID, i.path) for i in noop.inputs] == [
        (StorageSource.IPFS, "QmeeEB1YMrG6K8z43VdsdoYmQV46gAPQCHotZs9pwusCm9", "/input")
    ]
    url = decode_ask(json.dumps(_ask("v1.0.4__testdata__job-noop-url.yaml")).encode()).Job.Spec
    assert url.inputs[0].StorageSource is StorageSource.URL_DOWNLOAD
    assert url.inputs[0].path == "/app/foo_data_1.txt"
    s3 = decode_ask(json.dumps(_ask("v1.0.4__testdata__job-s3.yaml")).encode()).Job.Spec
    assert s3.publisher is Publisher.S3
    assert s3.inputs[0].S3 is not None
    assert s3.inputs[0].S3.Bucket == "bacalhau-test-datasets"


# --------------------------------------------------------------------------- re-casing


def _recase(s: str, rnd: random.Random) -> str:
    return "".join(c.upper() if rnd.random() < 0.5 else c.lower() for c in s)


def _recase_value(value: Any, t: mi.Type, rnd: random.Random) -> Any:
    """Re-case Struct keys and enum values at random; leave everything else as it is."""
    if isinstance(t, mi.UnionType):
        for member in t.types:
            if isinstance(member, mi.StructType | mi.DictType) and isinstance(value, dict):
                return _recase_value(value, member, rnd)
            if isinstance(member, mi.EnumType) and isinstance(value, str):
                return _recase_value(value, member, rnd)
        return value
    if isinstance(t, mi.StructType) and isinstance(value, dict):
        fields = {f.encode_name.lower(): f.type for f in t.fields}
        out = {}
        for k, v in value.items():
            ft = fields.get(k.lower())
            out[_recase(k, rnd)] = v if ft is None else _recase_value(v, ft, rnd)
        return out
    if isinstance(t, mi.ListType) and isinstance(value, list):
        return [_recase_value(v, t.item_type, rnd) for v in value]
    if isinstance(t, mi.DictType) and isinstance(value, dict):
        return {k: _recase_value(v, t.value_type, rnd) for k, v in value.items()}
    if isinstance(t, mi.EnumType) and isinstance(value, str):
        return _recase(value, rnd)
    return value


def _v0325_files() -> list[str]:
    if not CORPUS.is_dir():
        return ["<corpus missing>"]
    return [n for n in _files() if _is_v0325(_load(n))]


_ASK_TYPE = mi.type_info(AskForBidRequest)


@pytest.mark.parametrize("name", _v0325_files())
@settings(max_examples=50, database=None, deadline=None)
@given(seed=st.integers(min_value=0, max_value=2**32 - 1))
def test_recased_keys_and_enums_decode_the_same(name: str, seed: int) -> None:
    rnd = random.Random(seed)
    doc = _ask(name)
    want = decode_ask(json.dumps(doc).encode())
    recased = _recase_value(doc, _ASK_TYPE, rnd)
    got = decode_ask(json.dumps(recased).encode())
    assert got == want
    assert msgspec.json.encode(got) == msgspec.json.encode(want)


@pytest.mark.parametrize("name", _v0325_files())
def test_a_stored_spec_is_the_same_spec_when_asked_again(name: str) -> None:
    """A repeated ask is compared with the Spec as the store gave it back: every real Spec
    must come back from its stored document encoding to the same bytes."""
    request = decode_ask(json.dumps(_ask(name)).encode())
    now = datetime.now(UTC)
    execution = Execution(
        id="e-1",
        job=request.Job,
        requester="r1",
        usage=ResourceUsage(CPU=1, Memory=2),
        create_time=now,
        update_time=now,
    )
    stored = decode_doc(encode_doc(execution), encode_job(execution.job))
    again = decode_ask(json.dumps(_ask(name)).encode())
    assert same_spec(stored, again)
    changed = decode_ask(json.dumps(_ask(name)).encode())
    changed.Job.Spec.Timeout = (changed.Job.Spec.Timeout or 0) + 1
    assert not same_spec(stored, changed)
