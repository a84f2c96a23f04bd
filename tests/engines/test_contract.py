"""One contract, every engine (Noop, Wasm, Language, Docker), through a node on the real
broker: inputs arrive, stdout comes back in RunResult, a non-zero exit is a result, output
folders land in the results, a timeout fails the execution, a cancel stops the run."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
from nats.aio.client import Client

from schemas.callbacks import CancelResult, ComputeError, RunResult
from schemas.job import Job
from tests.engines import wasm_fixtures as wat
from tests.engines.docker_fixtures import IMAGE, docker_host
from tests.engines.test_language import uid_range
from tests.helpers import assert_eventually
from tests.integration.conftest import NodeFactory, make_node, prefix, spans
from worker.engines.docker import DockerEngine
from worker.engines.language import LanguageEngine
from worker.engines.noop import NoopEngine
from worker.engines.wasm import WasmEngine
from worker.node import Node
from worker.plugins import Plugins
from worker.protocols import Engine
from worker.publishers.noop import NoopPublisher
from worker.requester import Requester
from worker.storage.inline import Inline
from worker.verifiers.noop import NoopVerifier

_FIXTURES = (make_node, prefix, spans, docker_host)  # fixtures used by import
WAIT = 60.0
CSV = "a,b\nc,d\n"


def inline(text: str, path: str) -> dict[str, Any]:
    data = base64.b64encode(text.encode()).decode()
    return {"StorageSource": "Inline", "URL": f"data:text/plain;base64,{data}", "path": path}


def job(spec: dict[str, Any]) -> Job:
    return msgspec.convert({"Metadata": {"ID": f"job-{uuid.uuid4().hex[:8]}"}, "Spec": spec}, Job)


@dataclass
class Case:
    """How one engine expresses each job of the contract."""

    name: str
    prints: Callable[[], dict[str, Any]]  # cat /data/in.txt ("contract\n") to stdout
    exits_3: Callable[[], dict[str, Any]]
    first_column: Callable[[], dict[str, Any]]  # /data/in.csv's first column → outputs
    hangs: Callable[[], dict[str, Any]]


def _wasm(module: str, **spec: Any) -> dict[str, Any]:
    entry = {"StorageSource": "Inline", "URL": wat.data_url(module)}
    wasm = {"EntryModule": entry, **spec.pop("Wasm", {})}
    return {"Engine": "Wasm", "Wasm": wasm, **spec}


def _python(command: str, **spec: Any) -> dict[str, Any]:
    return {"Engine": "Language", "Language": {"Language": "python", "Command": command}, **spec}


def _sh(script: str, **spec: Any) -> dict[str, Any]:
    return {
        "Engine": "Docker",
        "Docker": {"Image": IMAGE, "Entrypoint": ["sh", "-c", script]},
        **spec,
    }


OUT = [{"Name": "outputs", "path": "/outputs"}]
CASES = {
    "Wasm": Case(
        "Wasm",
        prints=lambda: _wasm(
            wat.CAT,
            Wasm={"Parameters": ["/data/in.txt"]},
            inputs=[inline("contract\n", "/data/in.txt")],
        ),
        exits_3=lambda: _wasm(wat.EXIT_CODE, Wasm={"EnvironmentVariables": {"EXIT_CODE": "3"}}),
        first_column=lambda: _wasm(
            wat.CSV_FIRST_COLUMN,
            Wasm={"Parameters": ["/data/in.csv", "/outputs/first.csv"]},
            inputs=[inline(CSV, "/data/in.csv")],
            outputs=OUT,
        ),
        hangs=lambda: _wasm(wat.LOOP),
    ),
    "Language": Case(
        "Language",
        prints=lambda: _python(
            "import sys; sys.stdout.write(open('data/in.txt').read())",
            inputs=[inline("contract\n", "/data/in.txt")],
        ),
        exits_3=lambda: _python("raise SystemExit(3)"),
        first_column=lambda: _python(
            "rows = open('data/in.csv').read().splitlines()\n"
            "open('outputs/first.csv', 'w').write(''.join(r.split(',')[0] + '\\n' for r in rows))",
            inputs=[inline(CSV, "/data/in.csv")],
            outputs=OUT,
        ),
        hangs=lambda: _python("while True: pass"),
    ),
    "Docker": Case(
        "Docker",
        prints=lambda: _sh("cat /data/in.txt", inputs=[inline("contract\n", "/data/in.txt")]),
        exits_3=lambda: _sh("exit 3"),
        first_column=lambda: _sh(
            "cut -d, -f1 /data/in.csv > /outputs/first.csv",
            inputs=[inline(CSV, "/data/in.csv")],
            outputs=OUT,
        ),
        hangs=lambda: _sh("sleep 600"),
    ),
}

EngineMaker = Callable[[Path, str], Awaitable[Engine]]


@dataclass
class Subject:
    name: str
    make: EngineMaker


@pytest.fixture
def subject(request: pytest.FixtureRequest) -> Subject:
    name = request.param

    async def make(data_dir: Path, node_id: str) -> Engine:
        if name == "Noop":
            return NoopEngine()
        if name == "Wasm":
            return WasmEngine()
        if name == "Language":
            return LanguageEngine(uid_range=uid_range(500), data_dir=data_dir)
        host = request.getfixturevalue("docker_host")
        return await DockerEngine.create(docker_host=host, node_id=node_id)

    return Subject(name, make)


def engines(*names: str) -> Any:
    return pytest.mark.parametrize("subject", names, indirect=True)


async def start(make_node: NodeFactory, tmp_path: Path, subject: Subject) -> Node:
    node_id = f"c{uuid.uuid4().hex[:8]}"
    engine = await subject.make(tmp_path / node_id, node_id)
    assert engine.is_installed(), f"{subject.name} engine not usable here"
    plugins = Plugins(
        engines={subject.name: engine},
        verifiers={"Noop": NoopVerifier()},
        publishers={"Noop": NoopPublisher()},
        storage={"Inline": Inline()},
    )
    return await make_node(node_id, plugins=plugins, limit_total_memory="8Gi")


async def run(r: Requester, node: Node, spec: dict[str, Any]) -> tuple[str, Any]:
    bid = await r.ask(node.node_id, job(spec))
    assert bid.Accepted, bid.Reason
    await r.accept(node.node_id, bid.ExecutionID)
    return bid.ExecutionID, await r.wait_callback(bid.ExecutionID, timeout=WAIT)


@pytest.fixture
async def requester(nc: Client, prefix: str) -> Any:
    r = Requester(nc=nc, requester_id="r1", prefix=prefix)
    await r.start()
    yield r
    await r.close()


ALL = ("Noop", "Wasm", "Language", "Docker")
RUNNING = ("Wasm", "Language", "Docker")


@engines(*ALL)
async def test_result_files_match_the_run_result(
    make_node: NodeFactory, tmp_path: Path, subject: Subject, requester: Requester
) -> None:
    node = await start(make_node, tmp_path, subject)
    spec = CASES[subject.name].prints() if subject.name in CASES else {"Engine": "Noop"}
    eid, result = await run(requester, node, spec)
    assert isinstance(result, RunResult), result
    assert result.RunCommandResult is not None
    folder = node.datadir.results_dir(eid)
    stdout = (folder / "stdout").read_bytes().decode()
    assert result.RunCommandResult.stdout == stdout
    assert (folder / "exitCode").read_text().strip() == str(result.RunCommandResult.exitCode)
    assert result.Usage.WallSeconds > 0
    if subject.name != "Noop":
        assert stdout == "contract\n"  # the input arrived and the output came back
        assert result.RunCommandResult.exitCode == 0


@engines(*RUNNING)
async def test_a_non_zero_exit_is_a_result(
    make_node: NodeFactory, tmp_path: Path, subject: Subject, requester: Requester
) -> None:
    node = await start(make_node, tmp_path, subject)
    _, result = await run(requester, node, CASES[subject.name].exits_3())
    assert isinstance(result, RunResult), result
    assert result.RunCommandResult is not None and result.RunCommandResult.exitCode == 3


@engines(*RUNNING)
async def test_output_folders_land_in_the_results(
    make_node: NodeFactory, tmp_path: Path, subject: Subject, requester: Requester
) -> None:
    node = await start(make_node, tmp_path, subject)
    eid, result = await run(requester, node, CASES[subject.name].first_column())
    assert isinstance(result, RunResult), result
    first = node.datadir.results_dir(eid) / "outputs" / "first.csv"
    assert first.read_text() == "a\nc\n"


@engines(*RUNNING)
async def test_a_timeout_fails_the_execution(
    make_node: NodeFactory, tmp_path: Path, subject: Subject, requester: Requester
) -> None:
    node = await start(make_node, tmp_path, subject)
    spec = {**CASES[subject.name].hangs(), "Timeout": 1.0}
    _, result = await run(requester, node, spec)
    assert isinstance(result, ComputeError), result
    assert result.Cause == "RunTimeout" and result.Err == "execution timed out after 1s"
    assert node.parts.buffer.running_ids == []


@engines(*RUNNING)
async def test_a_cancel_stops_the_run(
    make_node: NodeFactory, tmp_path: Path, subject: Subject, requester: Requester
) -> None:
    node = await start(make_node, tmp_path, subject)
    bid = await requester.ask(node.node_id, job(CASES[subject.name].hangs()))
    await requester.accept(node.node_id, bid.ExecutionID)
    await assert_eventually(
        lambda: node.parts.buffer.running_ids == [bid.ExecutionID], timeout=WAIT
    )
    await requester.cancel(node.node_id, bid.ExecutionID, "contract")
    result = await requester.wait_callback(bid.ExecutionID, timeout=WAIT)
    assert isinstance(result, CancelResult), result
    # The run really ended: its capacity came back.
    await assert_eventually(lambda: node.parts.buffer.running_ids == [], timeout=WAIT)
    assert node.parts.pool.snapshot().running.CPU == 0
