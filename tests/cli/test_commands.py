"""The command line itself: every command and flag documented, usage errors as one line
with exit 2, job spec loading, the samples, ``config show``, ``version --json``."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml

from schemas.codec import decode
from schemas.job import Job
from tests.cli import clean_env, invoke
from tests.helpers import assert_eventually
from tests.natsproc import nats_server_bin
from worker import cli
from worker.cli_common import CommandError, default_requester_id
from worker.cli_jobs import Pick, chooser, load_job
from worker.samples import KINDS, hello_wasm, sample_job, sample_spec

SAMPLES = Path(__file__).resolve().parents[2] / "worker" / "samples"
CORPUS = Path(__file__).resolve().parents[3] / "shared" / "corpus" / "bacalhau-jobspecs"


def _commands(command: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    found = [(path, command)]
    for name, sub in getattr(command, "commands", {}).items():
        found += _commands(sub, (*path, name))
    return found


COMMANDS = _commands(typer.main.get_command(cli.app))


def test_every_command_and_flag_is_documented() -> None:
    names = {" ".join(path) for path, _ in COMMANDS}
    for expected in (
        "serve", "version", "submit", "devstack", "executions ls", "executions show",
        "executions logs", "executions cancel", "executions accept", "executions reject",
        "nodes ls", "node info", "config show",
    ):  # fmt: skip
        assert expected in names
    for path, command in COMMANDS:
        assert (command.help or "").strip(), f"{path} has no help"
        for param in command.params:
            assert (getattr(param, "help", "") or "").strip(), f"{path}: {param.name} undocumented"


@pytest.mark.parametrize("path", [p for p, _ in COMMANDS], ids=lambda p: " ".join(p) or "worker")
async def test_help_exits_0_and_lists_the_flags(path: tuple[str, ...]) -> None:
    command = dict(COMMANDS)[path]
    result = await invoke(*path, "--help", env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for param in command.params:
        for flag in getattr(param, "opts", []):
            if flag.startswith("--") and param.param_type_name == "option":
                assert flag in result.stdout, f"{path}: {flag} missing from --help"
    if "submit" in path:
        assert "0 placed (without --wait) or Completed, 1 Failed" in result.stdout
        assert "3 no bid, 4 Cancelled" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["submit", "/nonexistent.yaml"], "cannot read /nonexistent.yaml"),
        (["submit", "x.yaml", "--node", "n1", "--fanout"], "--node and --fanout exclude"),
        (["submit", "x.yaml", "--callbacks", "kafka"], "--callbacks: expected jetstream or core"),
        (["submit", "x.yaml", "--bid-timeout", "soon"], "invalid duration"),
        (["submit", "x.yaml", "--pick", "best"], "Invalid value for '--pick'"),
        (["nodes", "ls", "--requester-id", "bad id"], "--requester-id: invalid requester ID"),
        (["nodes", "ls", "--subject-prefix", "a.*"], "invalid subject prefix"),
        (["nodes", "ls", "--creds", "/nonexistent"], "--creds: no such file"),
        (["nodes", "ls", "--tls-cert", __file__], "--tls-cert and --tls-key must be given"),
        (["nodes", "ls", "--request-timeout", "0s"], "--request-timeout: must be longer"),
        (["executions", "ls", "--state", "Done"], "--state: unknown state 'Done'"),
        (["config", "show", "--bid-ttl", "5x"], "--bid-ttl: invalid duration '5x'"),
    ],
)
async def test_usage_errors_exit_2_with_one_line(args: list[str], message: str) -> None:
    result = await invoke(*args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr, result.stderr
    if not message.startswith("Invalid value"):  # click's own usage errors have a header
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


async def test_other_job_models_are_usage_errors(tmp_path: Path) -> None:
    result = await invoke("submit", str(CORPUS / "v1.0.4__testdata__jobs__noop.yaml"))
    assert result.exit_code == 2
    assert "unsupported job model: Bacalhau v1.x models.Job" in result.stderr
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    invalid = await invoke("submit", str(bad))
    assert invalid.exit_code == 2 and "is not valid JSON" in invalid.stderr


async def test_unreachable_broker_exits_6() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    result = await invoke(
        "nodes", "ls", "--nats-url", f"nats://127.0.0.1:{port}", "--connect-timeout", "500ms"
    )
    assert result.exit_code == 6, result.output
    assert result.stderr.startswith(f"worker: error: broker nats://127.0.0.1:{port} unreachable")
    assert len(result.stderr.strip().splitlines()) == 1
    assert time.monotonic() - started < 10


async def test_token_auth_reaches_the_broker(tmp_path: Path) -> None:
    conf = tmp_path / "nats.conf"
    conf.write_text('listen: "127.0.0.1:-1"\nauthorization { token: "s3cret" }\n')
    server = subprocess.Popen(
        [nats_server_bin(), "-c", str(conf), "--ports_file_dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        ports = tmp_path / f"nats-server_{server.pid}.ports"

        def listening() -> str:
            try:
                return str(json.loads(ports.read_text())["nats"][0])
            except (OSError, ValueError, KeyError, IndexError):
                return ""

        url = await assert_eventually(listening)
        token = tmp_path / "token"
        token.write_text("s3cret\n")
        base = ["nodes", "ls", "--nats-url", url, "--connect-timeout", "1s"]
        denied = await invoke(*base)
        assert denied.exit_code == 6, denied.output
        with_file = await invoke(*base, "--token-file", str(token), "--discover-timeout", "200ms")
        assert with_file.exit_code == 1, with_file.output  # connected: no node there
        assert "no compute node answered" in with_file.stderr
        with_env = await invoke(
            *base, "--discover-timeout", "200ms", env={"WORKER_TOKEN": "s3cret"}
        )
        assert with_env.exit_code == 1 and "no compute node answered" in with_env.stderr
    finally:
        server.terminate()
        server.wait(10)


async def test_nats_url_from_the_environment() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"nats://127.0.0.1:{port}"
    result = await invoke(
        "node", "info", "--connect-timeout", "200ms", env={"WORKER_NATS_URL": url}
    )
    assert result.exit_code == 6 and url in result.stderr


def test_load_job_adds_an_id_only_when_missing(tmp_path: Path) -> None:
    job = load_job(SAMPLES / "noop.yaml", "cli-me")
    assert len(job.Metadata.ID) == 36 and job.Metadata.ClientID == "cli-me"
    assert job.Metadata.CreatedAt.endswith("Z")
    other = load_job(SAMPLES / "noop.yaml", "cli-me")
    assert other.Metadata.ID != job.Metadata.ID
    doc = yaml.safe_load((SAMPLES / "noop.yaml").read_text())
    doc["METADATA"] = {"Id": "kept", "clientid": "someone"}
    spec = tmp_path / "named.yaml"
    spec.write_text(yaml.safe_dump(doc))
    named = load_job(spec, "cli-me")
    assert (named.Metadata.ID, named.Metadata.ClientID) == ("kept", "someone")
    corpus = load_job(CORPUS / "v0.3.25__testdata__job.json", "cli-me")  # lowercase enums
    assert corpus.Spec.Engine.value == "Docker" and corpus.Metadata.ID
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just text\n")
    with pytest.raises(CommandError, match="a job spec is a mapping"):
        load_job(scalar, "cli-me")


def test_choosers() -> None:
    from schemas.compute import AskForBidResponse, Price

    def bid(node: str, price: float, start: float) -> AskForBidResponse:
        return AskForBidResponse(
            ExecutionID=f"e-{node}",
            Accepted=True,
            NodeID=node,
            Price=Price(Amount=price, Unit="USD"),
            EstimatedStartSeconds=start,
        )

    declined = AskForBidResponse(NodeID="d", Reason="no")
    bids = [declined, bid("a", 3, 0), bid("b", 1, 5), bid("c", 1, 2), bid("e", 9, 0)]
    assert chooser(Pick.FIRST)(bids).NodeID == "a"  # type: ignore[union-attr]
    assert chooser(Pick.CHEAPEST)(bids).NodeID == "c"  # type: ignore[union-attr]
    assert chooser(Pick.FASTEST)(bids).NodeID == "a"  # type: ignore[union-attr]
    assert chooser(Pick.FASTEST)([declined]) is None


def test_samples_match_their_yaml_files() -> None:
    files = {"noop": "noop.yaml", "wasm": "hello-wasm.yaml", "python": "python.yaml"}
    assert set(files) == set(KINDS)
    for kind, name in files.items():
        publisher = "Local" if kind == "python" else "Noop"
        assert yaml.safe_load((SAMPLES / name).read_text()) == sample_spec(
            kind, publisher=publisher
        )
        job = sample_job(kind, f"j-{kind}", publisher=publisher)
        assert job == decode(json.dumps({**sample_spec(kind, publisher=publisher), "Metadata": {
            "ID": f"j-{kind}", "ClientID": "devstack"}}).encode(), Job)  # fmt: skip
    assert hello_wasm()[:4] == b"\0asm"
    assert sample_job("python", "j", publisher="Noop").Spec.publisher.value == "Noop"


def test_default_requester_id_is_a_valid_id() -> None:
    rid = default_requester_id()
    assert rid.startswith("cli-") and all(c.isalnum() or c in "-_" for c in rid)


async def test_config_show_says_where_each_value_came_from(tmp_path: Path) -> None:
    toml = tmp_path / "worker.toml"
    toml.write_text('bid-ttl = "20s"\nretention = "2h"\nqueue-timeout = "5m"\n')
    secret = tmp_path / "token"
    secret.write_text("s3cret\n")
    result = await invoke(
        "config", "show", "--json", "--config", str(toml), "--retention", "3h",
        "--token-file", str(secret),
        env={"WORKER_QUEUE_TIMEOUT": "7m"},
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert shown["bid_ttl"] == {"Value": "20s", "Source": f"{toml}: bid-ttl"}
    assert shown["retention"] == {"Value": "3h0m0s", "Source": "--retention"}
    assert shown["queue_timeout"] == {"Value": "7m0s", "Source": "WORKER_QUEUE_TIMEOUT"}
    assert shown["shutdown_grace"] == {"Value": "30s", "Source": "default"}
    assert shown["token"] == {"Value": "***", "Source": "--token-file"}
    assert "s3cret" not in result.stdout
    human = await invoke("config", "show", "--labels", "a=1", env={"COLUMNS": "200"})
    row = next(line for line in human.stdout.splitlines() if "--labels" in line)
    assert "a=1" in row and row.rstrip().rstrip("│").strip().endswith("--labels")


async def test_version_json() -> None:
    result = await invoke("version", "--json")
    assert result.exit_code == 0
    info = json.loads(result.stdout)
    assert info["ProtocolVersions"] == ["v1"] and info["Version"]
    plain = await invoke("version")
    assert plain.stdout == f"worker {info['Version']} (protocol v1)\n"


def test_clean_env_unsets_worker_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKER_NATS_URL", "nats://elsewhere:4222")
    assert clean_env()["WORKER_NATS_URL"] is None
