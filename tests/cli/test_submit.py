"""``worker submit`` against in-process nodes on the session's nats-server: bids table,
pick, accept/reject, status, logs, download, exit codes."""

from __future__ import annotations

import asyncio
import json
import signal
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from nats.js.errors import NotFoundError

from schemas.compute import ExecutionState as S
from tests.cli import (
    REQUESTER,
    TICKER_WAT,
    TRAP_WAT,
    client_args,
    finish,
    invoke,
    json_lines,
    kill,
    read_line,
    spawn,
    wasm_spec,
    write_spec,
)
from tests.engines.docker_fixtures import docker_host
from tests.helpers import assert_eventually
from tests.integration.conftest import NodeFactory, make_node, prefix, spans
from worker.config import Config
from worker.engines.language import LanguageEngine
from worker.engines.noop import NoopEngine
from worker.engines.wasm import WasmEngine
from worker.node import Node
from worker.plugins import Plugins
from worker.publishers.local import LocalPublisher
from worker.publishers.noop import NoopPublisher
from worker.publishers.objectstore import ObjectStorePublisher
from worker.requester import Requester
from worker.samples import sample_spec
from worker.storage import build_storage
from worker.verifiers.noop import NoopVerifier

_FIXTURES = (make_node, prefix, spans, docker_host)

SAMPLES = Path(__file__).resolve().parents[2] / "worker" / "samples"
CORPUS = Path(__file__).resolve().parents[3] / "shared" / "corpus" / "bacalhau-jobspecs"


@pytest.fixture
async def requester(nc: Client, prefix: str) -> AsyncIterator[Requester]:
    """The CLI's requester ID, seen from the test (to check what the CLI did)."""
    r = Requester(nc=nc, requester_id=REQUESTER, prefix=prefix)
    yield r
    await r.close()


async def three(make_node: NodeFactory) -> list[Node]:
    return [await make_node(name) for name in ("n1", "n2", "n3")]


async def test_fanout_accepts_one_rejects_the_rest_and_completes(
    make_node: NodeFactory, nats_url: str, prefix: str, requester: Requester
) -> None:
    await three(make_node)
    result = await invoke(
        "submit", str(SAMPLES / "noop.yaml"), "--wait", "--json", *client_args(nats_url, prefix)
    )
    assert result.exit_code == 0, result.output
    events = json_lines(result.stdout)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "bids" and kinds[1] == "accepted" and kinds[-1] == "result", kinds
    bids = events[0]["Bids"]
    assert sorted(b["NodeID"] for b in bids) == ["n1", "n2", "n3"]
    assert sorted(b["Decision"] for b in bids) == ["accepted", "rejected", "rejected"]
    result_event = events[-1]
    assert result_event["State"] == "Completed" and result_event["ExitCode"] == 0
    chosen = next(b for b in bids if b["Decision"] == "accepted")
    assert result_event["ExecutionID"] == chosen["ExecutionID"] == events[1]["ExecutionID"]
    assert result_event["JobID"] and all(b["JobID"] == result_event["JobID"] for b in bids)
    for bid in bids:
        view = await requester.get_execution(bid["NodeID"], bid["ExecutionID"])
        expected = S.COMPLETED if bid is chosen else S.CANCELLED
        assert view.Execution.State is expected
        if bid is not chosen:
            assert view.History[-1].Cause == "BidRejected"


async def test_corpus_spec_declined_everywhere_prints_the_reasons_and_exits_3(
    make_node: NodeFactory, nats_url: str, prefix: str
) -> None:
    await three(make_node)
    spec = CORPUS / "v0.3.25__testdata__job-noop.yaml"  # outputs on IPFS, which no node has
    result = await invoke("submit", str(spec), *client_args(nats_url, prefix))
    assert result.exit_code == 3, result.output
    for node in ("n1", "n2", "n3"):
        assert any(
            line.split("│")[1].strip() == node and "IPFS installed: false" in line
            for line in result.stdout.splitlines()
            if line.count("│") > 2
        ), result.stdout
    assert result.stderr.strip().splitlines()[-1] == (
        "worker: error: no bid: 3 declined, 0 refused the job"
    )


async def test_corpus_docker_spec_gets_a_bid_and_exits_0(
    make_node: NodeFactory, nats_url: str, prefix: str, docker_host: str, requester: Requester
) -> None:
    node = await make_node("dock", docker_host=docker_host)
    spec = CORPUS / "v0.3.25__testdata__job_cancel.json"  # Docker, sleep 1000, Noop publisher
    result = await invoke("submit", str(spec), *client_args(nats_url, prefix))
    assert result.exit_code == 0, result.output
    rows = [line for line in result.stdout.splitlines() if "dock" in line]
    assert len(rows) == 1 and "accepted" in rows[0], result.stdout
    execution_id = rows[0].split("│")[5].strip()
    assert execution_id.startswith("e-")
    assert f"Accepted {execution_id} on dock" in result.stderr
    # Placed, not waited for: stop it as a user would.
    cancel = await invoke("executions", "cancel", execution_id, *client_args(nats_url, prefix))
    assert cancel.exit_code in (0, 1), cancel.output  # 1: it failed first (no registry here)
    view = await requester.get_execution(node.node_id, execution_id)
    assert view.Execution.State in (S.CANCELLED, S.FAILED)


async def test_node_flag_asks_one_node_and_prints_the_output(
    make_node: NodeFactory, nats_url: str, prefix: str
) -> None:
    await three(make_node)
    args = client_args(nats_url, prefix)
    result = await invoke(
        "submit", str(SAMPLES / "hello-wasm.yaml"), "--node", "n2", "--wait", *args
    )
    assert result.exit_code == 0, result.output
    table = [line for line in result.stdout.splitlines() if line.count("│") > 2]
    assert len(table) == 1 and "n2" in table[0] and "accepted" in table[0], result.stdout
    assert result.stdout.endswith("Hello, world!\n")
    assert "Completed after" in result.stderr and "exit code 0" in result.stderr


async def test_pick_cheapest(
    make_node: NodeFactory, nats_url: str, prefix: str, tmp_path: Path
) -> None:
    for name, fee in (("dear", 5.0), ("cheap", 0.5), ("mid", 1.0)):
        prices = tmp_path / f"{name}.toml"
        prices.write_text(f'fee = {fee}\ncurrency = "EUR"\n')
        await make_node(name, price_list=str(prices))
    result = await invoke(
        "submit",
        str(SAMPLES / "noop.yaml"),
        "--pick",
        "cheapest",
        "--json",
        *client_args(nats_url, prefix),
    )
    assert result.exit_code == 0, result.output
    bids = json_lines(result.stdout)[0]["Bids"]
    [chosen] = [b for b in bids if b["Decision"] == "accepted"]
    assert chosen["NodeID"] == "cheap" and chosen["Price"] == {"Amount": 0.5, "Unit": "EUR"}
    human = await invoke(
        "submit",
        str(SAMPLES / "noop.yaml"),
        "--pick",
        "cheapest",
        *client_args(nats_url, prefix),
    )
    assert "0.5 EUR" in human.stdout and "5 EUR" in human.stdout


async def test_failed_job_exits_1_with_the_error(
    make_node: NodeFactory, nats_url: str, prefix: str, tmp_path: Path
) -> None:
    await make_node("n1")
    spec = write_spec(tmp_path / "trap.json", wasm_spec(TRAP_WAT))
    result = await invoke("submit", str(spec), "--wait", *client_args(nats_url, prefix))
    assert result.exit_code == 1, result.output
    assert "Failed" in result.stderr and "unreachable" in result.stderr.lower(), result.stderr


async def test_cancelled_job_exits_4(
    make_node: NodeFactory, nats_url: str, prefix: str, tmp_path: Path, requester: Requester
) -> None:
    node = await make_node("n1")
    spec = write_spec(tmp_path / "ticker.yaml", wasm_spec(TICKER_WAT, Timeout=60))
    args = ["--wait", "--json", "--wait-timeout", "30s", *client_args(nats_url, prefix)]
    submit = asyncio.create_task(invoke("submit", str(spec), *args))

    async def running() -> str:
        async for e in requester.list_executions(node.node_id, states=[S.RUNNING]):
            return e.ExecutionID
        return ""

    execution_id = await assert_eventually(running, timeout=20)
    await requester.cancel(node.node_id, execution_id, "test")
    result = await asyncio.wait_for(submit, 30)
    assert result.exit_code == 4, result.output
    events = json_lines(result.stdout)
    assert [e["State"] for e in events if e["event"] == "state"][-1] == "Cancelled", events
    assert events[-1]["State"] == "Cancelled" and events[-1]["ExecutionID"] == execution_id


def _plugins(config: Config, publisher: Any) -> Plugins:
    return Plugins(
        engines={"Noop": NoopEngine(), "Wasm": WasmEngine(), "Language": _language(config)},
        verifiers={"Noop": NoopVerifier()},
        publishers={"Noop": NoopPublisher(), publisher.name: publisher},
        storage=build_storage(config, lambda: None),
    )


def _language(config: Config) -> LanguageEngine:
    return LanguageEngine(uid_range=config.language_uid_range, data_dir=config.data_dir)


async def _download(tmp_path: Path, nats_url: str, prefix: str, publisher: str) -> Path:
    spec = write_spec(tmp_path / "python.yaml", sample_spec("python", publisher=publisher))
    if publisher == "ObjectStore":
        doc = sample_spec("python", publisher="Local")
        doc["Spec"]["PublisherSpec"] = {"Type": "ObjectStore", "Params": {"Bucket": "results"}}
        spec = write_spec(tmp_path / "python.json", doc)
    out = tmp_path / "downloads"
    result = await invoke(
        "submit", str(spec), "--download", str(out), "--json", *client_args(nats_url, prefix)
    )
    assert result.exit_code == 0, result.output
    final = json_lines(result.stdout)[-1]
    assert final["State"] == "Completed" and final["Downloaded"], final
    folder = Path(final["Downloaded"])
    assert folder == out / final["ExecutionID"]
    text = (folder / "outputs" / "hello.txt").read_text()
    assert text.startswith("Hello from Python 3.") and (folder / "stdout").read_text() == text
    return folder


async def test_download_of_a_local_result(
    make_node: NodeFactory, nats_url: str, prefix: str, tmp_path: Path
) -> None:
    local = LocalPublisher(directory=tmp_path / "published", listen="127.0.0.1:0")
    await local.start()
    try:
        config = Config(data_dir=tmp_path / "n1")
        await make_node("n1", plugins=_plugins(config, local))
        folder = await _download(tmp_path, nats_url, prefix, "Local")
        archive = tmp_path / "published" / f"{folder.name}.tar.gz"
        with tarfile.open(archive) as tar:
            assert "outputs/hello.txt" in tar.getnames()
    finally:
        await local.stop()


async def test_download_of_an_object_store_result(
    make_node: NodeFactory, nats_url: str, prefix: str, tmp_path: Path
) -> None:
    nc = await nats.connect(nats_url)
    try:
        bucket_owner = nc.jetstream()
        await bucket_owner.create_object_store("results")
        holder: dict[str, Node] = {}
        publisher = ObjectStorePublisher(connection=lambda: holder["node"].parts.nc)
        config = Config(data_dir=tmp_path / "n1")
        holder["node"] = await make_node("n1", plugins=_plugins(config, publisher))
        folder = await _download(tmp_path, nats_url, prefix, "ObjectStore")
        info = await (await bucket_owner.object_store("results")).get_info(
            f"{REQUESTER}/{folder.name}.tar.gz"
        )
        assert info.size > 0
    finally:
        await nc.jetstream().delete_object_store("results")
        await nc.close()


async def test_logs_flag_prints_the_output_once(
    make_node: NodeFactory, nats_url: str, prefix: str
) -> None:
    await make_node("n1")
    result = await invoke(
        "submit", str(SAMPLES / "hello-wasm.yaml"), "--logs", *client_args(nats_url, prefix)
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.count("Hello, world!") == 1, result.stdout
    for state in ("WaitingVerification", "Completed"):
        assert f"  {state} (" in result.stderr, result.stderr


async def test_job_spec_without_metadata_gets_an_id_and_keeps_a_given_one(
    make_node: NodeFactory, nats_url: str, prefix: str, tmp_path: Path
) -> None:
    await make_node("n1")
    doc = sample_spec("noop")
    doc["metadata"] = {"id": "my-job-1"}  # Go folds the keys: this is Metadata.ID
    spec = write_spec(tmp_path / "named.json", doc)
    named = await invoke("submit", str(spec), "--json", *client_args(nats_url, prefix))
    assert named.exit_code == 0, named.output
    assert json.loads(named.stdout.splitlines()[1])["JobID"] == "my-job-1"
    fresh = await invoke(
        "submit", str(SAMPLES / "noop.yaml"), "--json", *client_args(nats_url, prefix)
    )
    job_id = json.loads(fresh.stdout.splitlines()[1])["JobID"]
    assert len(job_id) == 36 and job_id != "my-job-1"


async def test_core_callbacks_need_the_flag(
    make_node: NodeFactory, nats_url: str, prefix: str, nc: Client
) -> None:
    await make_node("n1", callbacks="core")  # no callback stream: core mode needs none
    with pytest.raises(NotFoundError):
        await nc.jetstream().stream_info(f"CALLBACKS_{prefix}")
    noop = str(SAMPLES / "noop.yaml")
    args = client_args(nats_url, prefix)
    missing = await invoke("submit", noop, "--wait", *args)
    assert missing.exit_code == 1
    assert f"no callback stream CALLBACKS_{prefix}" in missing.stderr
    assert "pass --callbacks core" in missing.stderr
    core = await invoke("submit", noop, "--wait", "--callbacks", "core", "--json", *args)
    assert core.exit_code == 0, core.output
    assert json_lines(core.stdout)[-1]["State"] == "Completed"


async def test_download_needs_a_published_result(
    make_node: NodeFactory, nats_url: str, prefix: str, tmp_path: Path
) -> None:
    await make_node("n1")
    result = await invoke(
        "submit", str(SAMPLES / "hello-wasm.yaml"), "--download", str(tmp_path / "d"),
        *client_args(nats_url, prefix),
    )  # fmt: skip
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1] == (
        "worker: error: the job published nothing to download (publisher Noop?)"
    )


async def test_ctrl_c_stops_waiting_and_says_how_to_cancel(
    make_node: NodeFactory, nats_url: str, prefix: str, tmp_path: Path, requester: Requester
) -> None:
    node = await make_node("n1")
    spec = write_spec(tmp_path / "ticker.yaml", wasm_spec(TICKER_WAT, Timeout=60))
    proc = await spawn("submit", str(spec), "--wait", *client_args(nats_url, prefix))
    try:
        while "Running" not in (line := await read_line(proc.stderr)):
            assert line and "error" not in line, line
        proc.send_signal(signal.SIGINT)
        code, _, err = await finish(proc)
    finally:
        await kill(proc)
    assert code == 130, err
    [execution_id] = [e.ExecutionID async for e in requester.list_executions(node.node_id)]
    assert f"worker executions cancel {execution_id} --node n1" in err
    assert err.strip().splitlines()[-1] == "worker: error: interrupted"
    view = await requester.get_execution(node.node_id, execution_id)
    assert view.Execution.State is S.RUNNING  # Ctrl-C stops the waiting, not the job


async def test_error_replies_are_shown_beside_the_bids(
    make_node: NodeFactory, nats_url: str, prefix: str, tmp_path: Path
) -> None:
    await make_node("small", max_request_bytes=1024)  # refuses the request: 400 too large
    await make_node("n2")
    doc = sample_spec("noop")
    doc["Spec"]["Docker"] = {"EnvironmentVariables": ["PAD=" + "x" * 2048]}  # Noop ignores it
    spec = write_spec(tmp_path / "big.yaml", doc)
    result = await invoke("submit", str(spec), *client_args(nats_url, prefix))
    assert result.exit_code == 0, result.output
    rows = {r.split("│")[1].strip(): r for r in result.stdout.splitlines() if r.startswith("│")}
    assert set(rows) == {"small", "n2"}, result.stdout
    assert "error 400" in rows["small"] and "accepted" in rows["n2"]
