"""Config loading (flags > env > TOML > defaults) and the ``worker`` command's error paths."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import msgspec
import pytest
from typer.testing import CliRunner

from worker import cli
from worker.config import (
    FIELDS,
    FLAG_FIELDS,
    SECRETS,
    Config,
    ConfigError,
    describe_default,
    env_name,
    flag_name,
    load_config,
)


def write_toml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "worker.toml"
    path.write_text(text)
    return str(path)


def load(flags: dict[str, Any] | None = None, **env: str) -> Config:
    return load_config(flags or {}, env)


def error(flags: dict[str, Any] | None = None, **env: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(flags, **env)
    assert info.value.exit_code == 2
    return str(info.value)


# --- defaults and precedence ----------------------------------------------------------


def test_defaults() -> None:
    config = load()
    assert config == Config()
    assert config.subject_prefix == "market"
    assert config.data_dir == Path("./data")
    assert config.bid_ttl == 15.0
    assert config.job_timeout_default == 600.0
    assert config.job_timeout_min == 0.5
    assert config.job_timeout_max == 3600.0
    assert config.queue_timeout == 600.0
    assert config.verification_ttl == 3600.0
    assert config.shutdown_grace == 30.0
    assert config.retention == 86400.0
    assert config.probe_timeout == 2.0
    assert config.connect_timeout == 10.0
    assert config.max_request_bytes == 256 * 1024
    assert config.max_pending_bids_per_requester == 256
    assert config.outbox_max_attempts == 20
    assert config.callbacks == "jetstream"
    assert config.create_callback_stream is None
    assert config.job_selection_data_locality == "anywhere"
    assert config.default_job_cpu == "0.1"
    assert config.default_job_memory == "100Mi"
    assert config.engines == [] and config.labels == {}
    assert (config.log_format, config.sync) == ("text", "normal")
    assert config.skip_starvation_limit == 30.0 and config.nodeinfo_interval == 30.0


def test_flag_beats_env_beats_toml_beats_default(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path,
        'bid-ttl = "1s"\nqueue-timeout = "1m"\nverification-ttl = "2h"\nsubject-prefix = "toml"\n',
    )
    config = load(
        {"config": path, "bid_ttl": "3s"},
        WORKER_BID_TTL="2s",
        WORKER_QUEUE_TIMEOUT="2m",
    )
    assert config.bid_ttl == 3.0  # flag
    assert config.queue_timeout == 120.0  # env over TOML
    assert config.verification_ttl == 7200.0  # TOML
    assert config.subject_prefix == "toml"
    assert config.shutdown_grace == 30.0  # default
    assert config.config == path


def test_config_file_from_env_and_flag_wins(tmp_path: Path) -> None:
    from_env = write_toml(tmp_path, 'node-id = "from-env-file"\n')
    other = tmp_path / "other.toml"
    other.write_text('node-id = "from-flag-file"\n')
    assert load(WORKER_CONFIG=from_env).node_id == "from-env-file"
    assert load({"config": str(other)}, WORKER_CONFIG=from_env).node_id == "from-flag-file"


def test_flag_names_with_dashes_and_none_values_are_accepted() -> None:
    config = load({"--bid-ttl": "4s", "queue-timeout": "5s", "retention": None})
    assert (config.bid_ttl, config.queue_timeout, config.retention) == (4.0, 5.0, 86400.0)


def test_empty_env_value_counts_as_unset() -> None:
    assert load(WORKER_BID_TTL="", WORKER_SUBJECT_PREFIX="").bid_ttl == 15.0


def test_env_bool_false_overrides_toml_true(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "fanout-silent-declines = true\n")
    assert load({"config": path}).fanout_silent_declines is True
    assert load({"config": path}, WORKER_FANOUT_SILENT_DECLINES="false").fanout_silent_declines is (
        False
    )


# --- parse paths ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [("1h30m", 5400.0), ("500ms", 0.5), ("1m30s", 90.0), ("2.5s", 2.5), ("10m", 600.0)],
)
def test_durations_in_go_syntax(raw: str, seconds: float) -> None:
    assert load(WORKER_JOB_TIMEOUT_MAX=raw).job_timeout_max == seconds
    assert load({"job_timeout_max": raw}).job_timeout_max == seconds


def test_toml_duration_as_number_of_seconds_or_string(tmp_path: Path) -> None:
    path = write_toml(tmp_path, 'bid-ttl = 90\nprobe-timeout = 0.25\nretention = "48h"\n')
    config = load({"config": path})
    assert (config.bid_ttl, config.probe_timeout, config.retention) == (90.0, 0.25, 172800.0)


@pytest.mark.parametrize("value", ["inf", "nan", "1e300"])
def test_toml_durations_must_be_finite_go_durations(tmp_path: Path, value: str) -> None:
    path = write_toml(tmp_path, f"retention = {value}\n")
    assert "longer than Go's maximum" in error({"config": path})


def test_zero_allowed_where_it_means_something() -> None:
    config = load({"job_timeout_min": "0", "shutdown_grace": "0s", "skip_starvation_limit": "0"})
    assert (config.job_timeout_min, config.shutdown_grace, config.skip_starvation_limit) == (
        0.0,
        0.0,
        0.0,
    )


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ({"WORKER_BID_TTL": "15"}, "WORKER_BID_TTL: invalid duration '15'"),
        ({"WORKER_BID_TTL": "fast"}, "WORKER_BID_TTL: invalid duration 'fast'"),
        ({"WORKER_BID_TTL": "-5s"}, "WORKER_BID_TTL: negative duration '-5s'"),
        ({"WORKER_BID_TTL": "0s"}, "WORKER_BID_TTL: must be longer than 0s"),
        ({"WORKER_CONNECT_TIMEOUT": "0"}, "WORKER_CONNECT_TIMEOUT: must be longer than 0s"),
    ],
)
def test_bad_durations(env: dict[str, str], problem: str) -> None:
    assert problem in error(None, **env)


def test_bad_duration_message_names_the_flag_and_the_toml_key(tmp_path: Path) -> None:
    assert error({"bid_ttl": "soon"}).startswith("--bid-ttl: invalid duration 'soon'")
    path = write_toml(tmp_path, 'bid-ttl = "soon"\n')
    assert error({"config": path}).startswith(f"{path}: bid-ttl: invalid duration 'soon'")
    path = write_toml(tmp_path, "bid-ttl = true\n")
    assert "expected a duration such as 30s, got true" in error({"config": path})


def test_lists_from_env_flags_and_toml(tmp_path: Path) -> None:
    assert load(WORKER_ENGINES="noop, WASM,docker").engines == ["Noop", "Wasm", "Docker"]
    assert load({"engines": ["noop,language", "noop"]}).engines == ["Noop", "Language"]
    path = write_toml(
        tmp_path,
        'publishers = ["local", "objectstore"]\nstorage-sources = ["inline", "URLDownload"]\n'
        'timeout-bypass-client = ["c1", "c2"]\n',
    )
    config = load({"config": path})
    assert config.publishers == ["Local", "ObjectStore"]
    assert config.storage_sources == ["Inline", "URLDownload"]
    assert config.timeout_bypass_client == ["c1", "c2"]
    assert load({"timeout_bypass_client": ["a", "b,c"]}).timeout_bypass_client == ["a", "b", "c"]


def test_unknown_list_member_is_named() -> None:
    message = error(WORKER_ENGINES="noop,kubernetes")
    assert "WORKER_ENGINES: unknown engine 'kubernetes'" in message
    assert "Noop, Docker, Wasm, Language" in message
    assert "unknown storage source 'ftp'" in error({"storage_sources": ["ftp"]})


def test_toml_list_of_non_strings_is_refused(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "engines = [1, 2]\n")
    assert "engines: expected a comma-separated list or an array of strings" in error(
        {"config": path}
    )


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("true", True), ("TRUE", True), ("1", True), ("yes", True), ("false", False), ("0", False)],
)
def test_booleans(raw: str, expected: bool) -> None:
    assert load(WORKER_JOB_SELECTION_ACCEPT_NETWORKED=raw).job_selection_accept_networked is (
        expected
    )


def test_bad_boolean() -> None:
    message = error(WORKER_JOB_SELECTION_REJECT_STATELESS="maybe")
    assert message == "WORKER_JOB_SELECTION_REJECT_STATELESS: expected true or false, got 'maybe'"


def test_create_callback_stream_is_tri_state(tmp_path: Path) -> None:
    assert load().create_callback_stream is None
    assert load(WORKER_CREATE_CALLBACK_STREAM="false").create_callback_stream is False
    assert load({"create_callback_stream": True}).create_callback_stream is True
    assert load(WORKER_CREATE_CALLBACK_STREAM="auto").create_callback_stream is None
    path = write_toml(tmp_path, "create-callback-stream = false\n")
    assert load({"config": path}).create_callback_stream is False


@pytest.mark.parametrize(
    ("raw", "size"),
    [("256Ki", 262144), ("1Mi", 1048576), ("1mb", 1048576), ("1.5Ki", 1536), ("1000", 1000)],
)
def test_request_bytes_with_suffixes(raw: str, size: int) -> None:
    assert load(WORKER_MAX_REQUEST_BYTES=raw).max_request_bytes == size


def test_request_bytes_from_toml_int(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "max-request-bytes = 4096\n")
    assert load({"config": path}).max_request_bytes == 4096


@pytest.mark.parametrize("raw", ["12 parsecs", "-1Ki", "0", "lots"])
def test_bad_request_bytes(raw: str) -> None:
    assert error({"max_request_bytes": raw}).startswith("--max-request-bytes: ")


@pytest.mark.parametrize(
    ("flags", "problem"),
    [
        ({"max_pending_bids_per_requester": "-1"}, "must be at least 1, got '-1'"),
        ({"max_pending_bids_per_requester": "0"}, "must be at least 1, got '0'"),
        ({"outbox_max_attempts": "many"}, "expected a whole number, got 'many'"),
        ({"outbox_max_attempts": "2.5"}, "expected a whole number, got '2.5'"),
    ],
)
def test_bad_integers(flags: dict[str, str], problem: str) -> None:
    assert problem in error(flags)


def test_integers_from_env_and_toml(tmp_path: Path) -> None:
    assert load(WORKER_OUTBOX_MAX_ATTEMPTS="5").outbox_max_attempts == 5
    path = write_toml(tmp_path, "max-pending-bids-per-requester = 8\n")
    assert load({"config": path}).max_pending_bids_per_requester == 8
    path = write_toml(tmp_path, "outbox-max-attempts = true\n")
    assert "expected a whole number, got true" in error({"config": path})


@pytest.mark.parametrize(
    ("name", "raw", "problem"),
    [
        ("callbacks", "kafka", "--callbacks: expected one of jetstream, core, got 'kafka'"),
        ("log_format", "xml", "--log-format: expected one of text, json, got 'xml'"),
        ("sync", "paranoid", "--sync: expected one of normal, full, got 'paranoid'"),
        (
            "job_selection_data_locality",
            "nearby",
            "--job-selection-data-locality: expected one of local, anywhere, got 'nearby'",
        ),
    ],
)
def test_bad_enum_values(name: str, raw: str, problem: str) -> None:
    assert error({name: raw}) == problem


def test_enums_are_case_insensitive() -> None:
    config = load({"callbacks": "CORE", "log_format": "Json", "sync": "FULL"})
    assert (config.callbacks, config.log_format, config.sync) == ("core", "json", "full")


@pytest.mark.parametrize("node_id", ["n1", "A", "n-1_x", "a" * 128, "0abc"])
def test_valid_node_ids(node_id: str) -> None:
    assert load({"node_id": node_id}).node_id == node_id


@pytest.mark.parametrize(
    "node_id", ["_all", "-x", "a" * 129, "n1\n", "n 1", "n.1", "n*", "n>", "é", " n1"]
)
def test_invalid_node_ids(node_id: str) -> None:
    assert error(WORKER_NODE_ID=node_id).startswith("WORKER_NODE_ID: invalid node ID")


@pytest.mark.parametrize("prefix", ["a.*", "a..b", "a b", ".a", "a>", " "])
def test_invalid_subject_prefix(prefix: str) -> None:
    assert "--subject-prefix: " in error({"subject_prefix": prefix})


def test_labels(tmp_path: Path) -> None:
    assert load(WORKER_LABELS="zone=a, gpu=none").labels == {"zone": "a", "gpu": "none"}
    assert load({"labels": ["a=1", "b=2,c=3"]}).labels == {"a": "1", "b": "2", "c": "3"}
    path = write_toml(tmp_path, '[labels]\nzone = "eu"\n')
    assert load({"config": path}).labels == {"zone": "eu"}
    assert "expected key=value, got 'zone'" in error({"labels": ["zone"]})
    path = write_toml(tmp_path, "[labels]\nzone = 1\n")
    assert "label 'zone': expected a string value" in error({"config": path})


def test_resources(tmp_path: Path) -> None:
    config = load({"limit_total_cpu": "1500m", "limit_total_memory": "8Gi", "limit_job_gpu": "1"})
    assert (config.limit_total_cpu, config.limit_total_memory) == ("1500m", "8Gi")
    assert config.limit_job_gpu == "1" and config.limit_queue_disk == ""
    path = write_toml(tmp_path, "limit-total-cpu = 2\nlimit-job-cpu = 0.5\n")
    config = load({"config": path})
    assert (config.limit_total_cpu, config.limit_job_cpu) == ("2", "0.5")


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("limit_total_cpu", "two"),
        ("limit_total_memory", "8 parsecs"),
        ("limit_queue_disk", "-1Gi"),
        ("limit_job_gpu", "1.0"),
        ("default_job_memory", "lots"),
    ],
)
def test_bad_resources(name: str, raw: str) -> None:
    message = error({name: raw})
    assert message.startswith(f"--{flag_name(name)}: ") and raw in message


def test_cidrs_listen_addresses_and_urls() -> None:
    config = load(
        {
            "url_input_allow_cidr": ["10.1.2.3/8", "::1/128"],
            "metrics_listen": "127.0.0.1:9464",
            "publisher_local_listen": "[::1]:0",
            "publisher_local_base_url": "http://results.example:8080",
            "otlp_endpoint": "https://otel.example",
            "nats_url": "nats://a:4222,tls://b:4222",
        }
    )
    assert config.url_input_allow_cidr == ["10.0.0.0/8", "::1/128"]
    assert "invalid CIDR 'ten'" in error({"url_input_allow_cidr": ["ten"]})
    assert "expected host:port" in error({"metrics_listen": "9464"})
    assert "expected host:port" in error({"publisher_local_listen": "a:99999"})
    assert "expected an http:// or https:// URL" in error({"job_selection_probe_http": "ftp://x"})
    assert "expected nats://host:port" in error({"nats_url": "http://x:4222"})


# --- the TOML file --------------------------------------------------------------------


def test_unknown_toml_key_is_named_with_a_suggestion(tmp_path: Path) -> None:
    path = write_toml(tmp_path, 'bid_ttl = "5s"\n')
    assert error({"config": path}) == f"{path}: unknown key 'bid_ttl' (did you mean 'bid-ttl'?)"
    path = write_toml(tmp_path, "frobnicate = 1\n")
    assert error({"config": path}) == f"{path}: unknown key 'frobnicate'"
    path = write_toml(tmp_path, 'config = "other.toml"\n')
    assert "unknown key 'config'" in error({"config": path})


def test_toml_file_problems(tmp_path: Path) -> None:
    assert "cannot read config file" in error({"config": str(tmp_path / "missing.toml")})
    path = write_toml(tmp_path, "bid-ttl = \n")
    assert "is not valid TOML" in error({"config": path})


def test_every_flag_field_is_a_toml_key_and_an_env_var(tmp_path: Path) -> None:
    assert set(FIELDS) - set(FLAG_FIELDS) == SECRETS
    path = write_toml(tmp_path, 'nodeinfo-interval = "5s"\nskip-starvation-limit = "1m"\n')
    config = load({"config": path})
    assert (config.nodeinfo_interval, config.skip_starvation_limit) == (5.0, 60.0)
    assert env_name("job_timeout_min") == "WORKER_JOB_TIMEOUT_MIN"
    assert describe_default("bid_ttl") == "15s"
    assert describe_default("max_request_bytes") == "256Ki"
    assert describe_default("data_dir") == "./data"


# --- secrets --------------------------------------------------------------------------


def test_password_from_env_or_file_only(tmp_path: Path) -> None:
    config = load({"user": "alice"}, WORKER_PASSWORD="s3cret")
    assert (config.user, config.password) == ("alice", "s3cret")
    secret = tmp_path / "pw"
    secret.write_text("from-file\n")
    assert load({"user": "alice", "password_file": str(secret)}).password == "from-file"
    assert "secret" in error({"password": "x"})
    assert "secret" in error({"token": "x"})
    path = write_toml(tmp_path, 'password = "x"\n')
    assert "never read from argv or the config file: set WORKER_PASSWORD" in error({"config": path})


def test_password_problems(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("pw")
    assert "both WORKER_PASSWORD and --password-file" in error(
        {"user": "u", "password_file": str(secret)}, WORKER_PASSWORD="x"
    )
    assert "needs --user" in error(WORKER_PASSWORD="x")
    assert "no such file" in error({"password_file": str(tmp_path / "nope")})
    secret.write_text("\n")
    assert "is empty" in error({"user": "u", "password_file": str(secret)})


def test_token_from_env_or_file(tmp_path: Path) -> None:
    assert load(WORKER_TOKEN="t0k").token == "t0k"
    token = tmp_path / "token"
    token.write_text("t1k\n")
    assert load({"token_file": str(token)}).token == "t1k"


def test_secrets_are_redacted_in_repr() -> None:
    config = load({"user": "alice"}, WORKER_PASSWORD="s3cret")
    assert "s3cret" not in repr(config)
    assert "password='***'" in repr(config)
    assert ("password", "***") in config.__rich_repr__()


def test_one_auth_method_and_tls_pairs(tmp_path: Path) -> None:
    creds = tmp_path / "x.creds"
    creds.write_text("creds")
    assert "use one NATS authentication method, got --creds and --user" in error(
        {"creds": str(creds), "user": "u"}
    )
    assert "WORKER_TOKEN/--token-file" in error({"nkey_seed": str(creds)}, WORKER_TOKEN="t")
    assert "--tls-cert and --tls-key must be given together" in error({"tls_cert": str(creds)})
    config = load({"tls_cert": str(creds), "tls_key": str(creds), "tls_ca": str(creds)})
    assert config.tls_key == str(creds)


def test_config_is_frozen() -> None:
    with pytest.raises(AttributeError):
        Config().bid_ttl = 1.0  # type: ignore[misc]
    assert msgspec.structs.replace(Config(), bid_ttl=1.0).bid_ttl == 1.0


# --- the command line -----------------------------------------------------------------


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    for key in [k for k in os.environ if k.startswith("WORKER_")]:
        monkeypatch.delenv(key)
    return CliRunner()


def test_serve_help_lists_every_flag(runner: CliRunner) -> None:
    result = runner.invoke(cli.app, ["serve", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for field in FLAG_FIELDS:
        assert f"--{flag_name(field)}" in result.output
    assert "--password " not in result.output and "--token " not in result.output
    assert "(default: 15s)" in result.output and "(default: 256Ki)" in result.output
    assert "--no-fanout-silent-declines" in result.output
    assert set(cli.HELP) == set(FLAG_FIELDS)


@pytest.mark.parametrize(
    ("args", "stderr"),
    [
        (["serve", "--bogus"], "No such option: --bogus"),
        (["serve", "--password", "x"], "No such option: --password"),
        (["serve", "--bid-ttl", "5x"], "worker: error: --bid-ttl: invalid duration '5x'"),
        (["serve", "--node-id", "bad id"], "worker: error: --node-id: invalid node ID"),
        (["serve", "--callbacks", "kafka"], "expected one of jetstream, core"),
        (["serve", "--max-request-bytes", "huge"], "--max-request-bytes"),
        (["serve", "--config", "/nonexistent/worker.toml"], "cannot read config file"),
        (["bogus-command"], "No such command"),
    ],
)
def test_usage_errors_exit_2(runner: CliRunner, args: list[str], stderr: str) -> None:
    result = runner.invoke(cli.app, args)
    assert result.exit_code == 2, result.output
    assert stderr in result.stderr


def test_bad_env_value_exits_2(runner: CliRunner) -> None:
    result = runner.invoke(cli.app, ["serve"], env={"WORKER_SYNC": "never"})
    assert result.exit_code == 2
    assert "WORKER_SYNC: expected one of normal, full, got 'never'" in result.stderr


def test_serve_passes_only_given_flags_and_returns_the_exit_code(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    seen: list[Config] = []

    async def serve(config: Config) -> int:
        seen.append(config)
        return 5

    monkeypatch.setitem(sys.modules, "worker.node", types.SimpleNamespace(serve=serve))
    result = runner.invoke(
        cli.app,
        ["serve", "--bid-ttl", "3s", "--no-fanout-silent-declines", "--labels", "a=1"],
        env={"WORKER_QUEUE_TIMEOUT": "1m", "WORKER_FANOUT_SILENT_DECLINES": "true"},
    )
    assert result.exit_code == 5, result.output
    [config] = seen
    assert (config.bid_ttl, config.queue_timeout, config.retention) == (3.0, 60.0, 86400.0)
    assert config.fanout_silent_declines is False and config.labels == {"a": "1"}


def test_version(runner: CliRunner) -> None:
    result = runner.invoke(cli.app, ["version"])
    assert result.exit_code == 0 and result.output.startswith("worker ")


def test_python_dash_m_worker() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "worker", "version"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0 and result.stdout.startswith("worker "), result.stderr
