"""deploy/: every file is checked by the tool that reads it.

Server configurations by ``nats-server -t`` (with gen-creds' real accounts and TLS files);
the shipped ones are gen-creds' own output; the JWTs carry exactly the permissions of
PROTOCOL.md §2 and verify against their issuers; the systemd unit by
``systemd-analyze verify`` and its settings; compose.yaml and the Kubernetes manifests
as YAML, for the fields that matter; every TOML the node reads by the node's own loader.
"""

from __future__ import annotations

import base64
import configparser
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import nacl.signing
import nkeys
import pytest
import yaml

from tests.natsproc import nats_server_bin
from worker.config import load_config
from worker.durations import parse as parse_duration

ROOT = Path(__file__).parents[2]
DEPLOY = ROOT / "deploy"
FLUSH = 10.0  # the node's outbox flush timeout on drain (worker/node.py)


def _load(path: Path) -> ModuleType:
    from tests.cluster.conftest import load_script

    return load_script(path)


@pytest.fixture(scope="module")
def gen() -> ModuleType:
    return _load(DEPLOY / "gen-creds")


@pytest.fixture(scope="module")
def secrets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """gen-creds for the default topology (nats-1..3), installed under a temp folder."""
    out = tmp_path_factory.mktemp("deploy") / "secrets"
    run = subprocess.run(
        [
            sys.executable,
            str(DEPLOY / "gen-creds"),
            "--out",
            str(out),
            "--node",
            "node-1,node-2,node-3",
            "--requester",
            "r1",
            "--leaf",
            "edge:edge-1",
            "--conf-dir",
            str(out / "server"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    return out


def nats_check(conf: Path, env: dict[str, str] | None = None) -> None:
    result = subprocess.run(
        [nats_server_bin(), "-c", str(conf), "-t"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={**os.environ, **(env or {})},
    )
    assert result.returncode == 0, result.stderr + result.stdout
    assert "is valid" in result.stdout + result.stderr


def creds_jwt(path: Path) -> str:
    text = path.read_text()
    return text.split("-----BEGIN NATS USER JWT-----\n")[1].split("\n")[0]


def verify_jwt(token: str, issuer: str) -> dict[str, Any]:
    """Check the ed25519 signature with the issuer's public nkey; return the claims."""
    header, payload, signature = token.split(".")
    sig = base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))
    raw = base64.b32decode(issuer + "=" * (-len(issuer) % 8))[1:-2]  # prefix, key, crc16
    nacl.signing.VerifyKey(raw).verify(f"{header}.{payload}".encode(), sig)
    assert json.loads(base64.urlsafe_b64decode(header + "==")) == {
        "typ": "JWT",
        "alg": "ed25519-nkey",
    }
    claims = _claims(token)
    assert claims["iss"] == issuer
    return claims


def _claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    data = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    return dict(json.loads(data))


# ---------------------------------------------------------------------------------------
# gen-creds: server configurations, creds, permissions.


@pytest.mark.parametrize("name", ["nats-1", "nats-2", "nats-3", "leaf-edge"])
def test_generated_server_configs_are_valid(secrets: Path, name: str) -> None:
    nats_check(secrets / "server" / f"{name}.conf")


def test_cluster_config_routes_tls_and_jetstream(secrets: Path) -> None:
    text = (secrets / "server" / "nats-1.conf").read_text()
    assert 'routes: ["nats-route://nats-2:6222", "nats-route://nats-3:6222"]' in text
    assert "sync_interval: always" in text
    assert "verify: true" in text  # mutual TLS between the servers
    assert text.count("tls {") == 3  # clients, routes, leafnodes
    accounts = (secrets / "server" / "accounts.conf").read_text()
    assert "resolver: MEMORY" in accounts and "system_account:" in accounts


@pytest.mark.parametrize("name", ["nats-1", "nats-2", "nats-3"])
def test_shipped_cluster_configs_are_gen_creds_output(
    secrets: Path, tmp_path: Path, name: str
) -> None:
    shipped = (DEPLOY / "cluster" / f"{name}.conf").read_text()
    # gen-creds writes exactly this for the default topology and paths ...
    out = tmp_path / "default"
    shutil.copytree(secrets, out)
    default_paths = ["--conf-dir", "/etc/nats", "--store-dir", "/var/lib/nats/jetstream"]
    run = subprocess.run(
        [sys.executable, str(DEPLOY / "gen-creds"), "--out", str(out), *default_paths],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert (out / "server" / f"{name}.conf").read_text() == shipped
    # ... and it is valid with gen-creds' accounts.conf and certificates in its folder.
    conf = secrets / "server" / f"shipped-{name}.conf"
    conf.write_text(shipped.replace("/etc/nats/", f"{secrets / 'server'}/"))
    nats_check(conf)


def test_shipped_leaf_config_is_gen_creds_output(gen: ModuleType, secrets: Path) -> None:
    shipped = (DEPLOY / "leaf" / "edge.conf").read_text()
    hubs = ["nats-1:7422", "nats-2:7422", "nats-3:7422"]
    expected = gen.LeafConf(site="edge", hubs=hubs, account="$SITE_ACCOUNT")
    assert gen.render_leaf_conf(expected) == shipped
    state = json.loads((secrets / "market.json").read_text())
    assert state["leaves"] == {"edge": ["edge-1"]}
    generated = (secrets / "server" / "leaf-edge.conf").read_text()
    account = re.search(r"account: (A[A-Z0-9]{55})", generated)
    assert account is not None
    conf = secrets / "server" / "shipped-leaf.conf"
    conf.write_text(shipped.replace("/etc/nats/", f"{secrets / 'server'}/"))
    nats_check(conf, env={"SITE_ACCOUNT": account.group(1)})


def test_creds_are_signed_by_the_account_and_hold_the_section_2_permissions(
    secrets: Path,
) -> None:
    keys = secrets / "keys"
    operator = nkeys.from_seed((keys / "operator.nk").read_text().strip().encode())
    account = nkeys.from_seed((keys / "account-MARKET.nk").read_text().strip().encode())
    site = nkeys.from_seed((keys / "account-site-edge.nk").read_text().strip().encode())
    accounts = (secrets / "server" / "accounts.conf").read_text()
    account_jwt = re.search(rf"{account.public_key.decode()}: (\S+)", accounts)
    assert account_jwt is not None
    account_claims = verify_jwt(account_jwt.group(1), operator.public_key.decode())
    limits = account_claims["nats"]["limits"]
    assert limits["disk_storage"] > 0 and limits["mem_storage"] > 0  # JetStream on

    node = verify_jwt(
        creds_jwt(secrets / "creds" / "node-node-1.creds"), account.public_key.decode()
    )
    assert node["name"] == "node-1"
    assert node["nats"]["pub"]["allow"] == [
        "market.orchestrator.*.node-1.>",
        "market.logs.*.node-1.>",
        "market.info.node-1",
        "market.compute.node-1.node-1.NodeInfo/v1",
        "$JS.API.STREAM.NAMES",
        "$JS.API.STREAM.INFO.CALLBACKS_market",
    ]
    assert node["nats"]["sub"]["allow"][:3] == [
        "market.compute.node-1.*.>",
        "market.compute._all.*.>",
        "_INBOX_node-1.>",
    ]
    assert node["nats"]["resp"] == {"max": 1, "ttl": 0}  # allow_responses

    requester = verify_jwt(
        creds_jwt(secrets / "creds" / "requester-r1.creds"), account.public_key.decode()
    )
    assert requester["nats"]["pub"]["allow"][0] == "market.compute.*.r1.>"
    assert (
        "$JS.API.CONSUMER.CREATE.CALLBACKS_market.*.market.orchestrator.r1.>"
        in requester["nats"]["pub"]["allow"]
    )
    assert requester["nats"]["sub"]["allow"] == [
        "market.orchestrator.r1.>",
        "market.logs.r1.>",
        "market.info.*",
        "_INBOX_r1.>",
    ]
    assert "resp" not in requester["nats"]

    # An edge node's user belongs to the site's account, whose JetStream API is mapped
    # to the hub's domain; the site's leaf user may only do what its nodes may.
    edge = verify_jwt(creds_jwt(secrets / "creds" / "node-edge-1.creds"), site.public_key.decode())
    assert "$JS.market.API.STREAM.NAMES" in edge["nats"]["pub"]["allow"]
    leaf = verify_jwt(creds_jwt(secrets / "creds" / "leaf-edge.creds"), account.public_key.decode())
    assert "market.compute.node-1.*.>" not in leaf["nats"]["sub"]["allow"]
    assert "market.compute.edge-1.*.>" in leaf["nats"]["sub"]["allow"]
    assert "_INBOX_r1.>" in leaf["nats"]["pub"]["allow"]


def test_config_without_tls_is_valid(tmp_path: Path) -> None:
    """--no-tls (a closed test network only): plain listeners, still valid."""
    out = tmp_path / "plain"
    run = subprocess.run(
        [
            sys.executable,
            str(DEPLOY / "gen-creds"),
            "--out",
            str(out),
            "--node",
            "n1",
            "--leaf",
            "edge:e1",
            "--no-tls",
            "--conf-dir",
            str(out / "server"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    for name in ("nats-1", "leaf-edge"):
        conf = out / "server" / f"{name}.conf"
        assert "tls {" not in conf.read_text()
        nats_check(conf)


def test_secrets_are_private(secrets: Path) -> None:
    for path in [*(secrets / "keys").iterdir(), *(secrets / "creds").iterdir()]:
        assert path.stat().st_mode & 0o077 == 0, path
    assert (secrets / "tls-ca" / "ca-key.pem").stat().st_mode & 0o077 == 0
    assert (secrets / "server" / "tls" / "nats-1-key.pem").stat().st_mode & 0o077 == 0


def test_rerun_is_stable_and_rotation_revokes(secrets: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    shutil.copytree(secrets, out)

    def run(*args: str) -> str:
        result = subprocess.run(
            [sys.executable, str(DEPLOY / "gen-creds"), "--out", str(out), *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    run()
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # a re-run changes nothing (servers reload nothing new)

    old = _claims(creds_jwt(out / "creds" / "node-node-2.creds"))["sub"]
    assert "rotated node-2" in run("--rotate", "node-2")
    new = _claims(creds_jwt(out / "creds" / "node-node-2.creds"))["sub"]
    assert new != old
    accounts = (out / "server" / "accounts.conf").read_text()
    operator_line = next(line for line in accounts.splitlines() if line.startswith("operator:"))
    assert operator_line in (secrets / "server" / "accounts.conf").read_text()  # reloadable
    revoked = [
        _claims(token)["nats"].get("revocations", {})
        for token in re.findall(r"^  A\w+: (\S+)$", accounts, re.M)
    ]
    assert any(old in r for r in revoked)

    assert "removed node-3" in run("--remove", "node-3")
    assert not (out / "creds" / "node-node-3.creds").exists()
    assert "node-3" not in json.loads((out / "market.json").read_text())["nodes"]


def test_gen_creds_refuses_bad_ids_and_changed_markets(secrets: Path, tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(DEPLOY / "gen-creds"), *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    bad = run("--out", str(tmp_path / "a"), "--node", "_all")
    assert bad.returncode == 2 and "invalid node ID" in bad.stderr
    assert run("--out", str(tmp_path / "b"), "--requester", "r.1").returncode == 2
    changed = run("--out", str(secrets), "--prefix", "other")
    assert changed.returncode == 2 and "fixed at the first run" in changed.stderr
    unknown = run("--out", str(secrets), "--rotate", "nobody")
    assert unknown.returncode == 2


def test_create_stream_builds_the_protocol_stream_at_replicas_3() -> None:
    from worker.streams import stream_config
    from worker.transport.subjects import Subjects

    create = _load(DEPLOY / "create-stream")
    template = json.loads((DEPLOY / "callbacks-stream.json").read_text())
    for prefix in ("market", "acme.market"):
        made = create.stream_config(template, prefix, 3)
        code = stream_config(Subjects(prefix=prefix, node_id="n1"))
        assert made.num_replicas == 3
        for field in ("name", "subjects", "storage", "retention", "discard", "deny_delete"):
            assert getattr(made, field) == getattr(code, field), field
        assert made.max_age == code.max_age and made.duplicate_window == code.duplicate_window
        assert create.differences(made, made) == []


# ---------------------------------------------------------------------------------------
# The node's settings: worker.toml, the systemd unit, compose, Kubernetes.


def load_toml_config(text: str, tmp_path: Path, env: dict[str, str] | None = None) -> Any:
    """The node's Config from ``text`` (file paths moved under ``tmp_path``)."""
    for path in re.findall(r'"(/etc/worker/[^"]+)"', text):
        local = tmp_path / path.lstrip("/")
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_text("placeholder")
        text = text.replace(f'"{path}"', f'"{local}"')
    conf = tmp_path / "worker.toml"
    conf.write_text(text)
    return load_config({"config": str(conf)}, env or {})


def test_worker_toml_loads_with_the_nodes_loader(tmp_path: Path) -> None:
    config = load_toml_config((DEPLOY / "worker.toml").read_text(), tmp_path)
    assert config.callbacks == "jetstream" and config.create_callback_stream is False
    assert config.nats_url.count("tls://") == 3
    assert config.tls_ca and config.sync == "full"
    assert config.subject_prefix == "market"
    assert config.shutdown_grace == 30.0


def unit() -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(DEPLOY / "systemd" / "worker@.service")
    return parser


def test_systemd_unit_is_hardened_and_drains(tmp_path: Path) -> None:
    service = unit()["Service"]
    assert service["User"] == "worker" and service["User"] != "root"
    assert service["ProtectSystem"] == "strict"
    assert service["ReadWritePaths"] == "/var/lib/worker/%i"
    assert service["Environment"]  # (last one wins in configparser; checked below)
    text = (DEPLOY / "systemd" / "worker@.service").read_text()
    assert "Environment=WORKER_DATA_DIR=/var/lib/worker/%i" in text
    assert "Environment=WORKER_NODE_ID=%i" in text
    assert service["KillMode"] == "mixed" and service["KillSignal"] == "SIGTERM"
    assert service["NoNewPrivileges"] == "yes"
    assert service["CapabilityBoundingSet"] == ""
    assert "2 3 4 5" in service["RestartPreventExitStatus"]
    # The stop timeout covers the drain: shutdown-grace + outbox flush + margin.
    config = load_toml_config((DEPLOY / "worker.toml").read_text(), tmp_path)
    stop = float(service["TimeoutStopSec"])  # plain seconds
    assert stop >= config.shutdown_grace + FLUSH + 10, stop
    # ExecStart runs `worker serve` with flags the node accepts.
    exec_start = service["ExecStart"].split()
    assert exec_start[1:3] == ["serve", "--config"]


def test_systemd_unit_passes_systemd_analyze(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    text = (DEPLOY / "systemd" / "worker@.service").read_text()
    # The binary does not exist here: point ExecStart at one that does.
    (tmp_path / "worker@.service").write_text(
        text.replace("/opt/worker/.venv/bin/worker", shutil.which("true") or "/bin/true")
    )
    if analyze is None:
        pytest.fail("systemd-analyze not found: install systemd to check the unit")
    result = subprocess.run(
        [analyze, "verify", "--man=no", str(tmp_path / "worker@node-1.service")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 0 and result.stdout + result.stderr == "", result.stderr


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return dict(yaml.safe_load((DEPLOY / "compose.yaml").read_text()))


def test_compose_runs_three_servers_three_nodes_and_the_stream_setup(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    servers = {n: s for n, s in services.items() if n.startswith("nats-")}
    nodes = {n: s for n, s in services.items() if n.startswith("node-")}
    assert sorted(servers) == ["nats-1", "nats-2", "nats-3"]
    assert sorted(nodes) == ["node-1", "node-2", "node-3"]
    for name, server in servers.items():
        mounts = {m.split(":")[1]: m.split(":")[0] for m in server["volumes"]}
        assert mounts["/etc/nats/nats.conf"] == f"./cluster/{name}.conf"
        assert (DEPLOY / "cluster" / f"{name}.conf").exists()
        assert mounts["/etc/nats/accounts.conf"] == "./secrets/server/accounts.conf"
        assert "/var/lib/nats" in mounts  # JetStream store on a volume
    stream = services["stream"]
    assert "--replicas=3" in stream["command"]
    assert stream["entrypoint"][-1] == "/app/deploy/create-stream"
    for name, node in nodes.items():
        env = node["environment"]
        assert env["WORKER_NODE_ID"] == name
        assert env["WORKER_CREDS"].startswith("/run/secrets/")
        assert not any("PASSWORD" in k or "TOKEN" in k for k in env)  # secrets as files
        assert node["depends_on"]["stream"]["condition"] == "service_completed_successfully"
        assert parse_duration(node["stop_grace_period"]) >= 30 + FLUSH + 10
        assert node["stop_signal"] == "SIGTERM"
        assert node["read_only"] is True and node["cap_drop"] == ["ALL"]
        assert any(v.endswith(":/var/lib/worker") for v in node["volumes"])
        assert "nodeinfo-probe" in " ".join(node["healthcheck"]["test"])
        creds = next(s for s in node["secrets"] if isinstance(s, dict))
        assert compose["secrets"][creds["source"]]["file"] == f"./secrets/creds/node-{name}.creds"
    data = {v.split(":")[0] for n in nodes.values() for v in n["volumes"] if "/var/lib/worker" in v}
    assert len(data) == 3  # a data dir per node


def test_compose_node_environment_loads(compose: dict[str, Any], tmp_path: Path) -> None:
    """Each node's settings (worker.toml + its environment) load with the node's loader."""
    text = (DEPLOY / "worker.toml").read_text()
    for node in ("node-1", "node-2", "node-3"):
        env = dict(compose["services"][node]["environment"])
        for key in ("WORKER_CREDS", "WORKER_TLS_CA"):  # container paths: make them here
            local = tmp_path / node / Path(env[key]).name
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_text("placeholder")
            env[key] = str(local)
        config = load_toml_config(text, tmp_path / node, env)
        assert config.node_id == node and config.creds == env["WORKER_CREDS"]


@pytest.fixture(scope="module")
def k8s() -> dict[str, dict[str, Any]]:
    docs: dict[str, dict[str, Any]] = {}
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            docs[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return docs


def test_k8s_statefulset_gives_each_node_its_data_volume_and_probes(
    k8s: dict[str, dict[str, Any]],
) -> None:
    sts = k8s["StatefulSet/worker"]
    spec = sts["spec"]
    assert spec["serviceName"] in {k.split("/")[1] for k in k8s if k.startswith("Service/")}
    assert k8s[f"Service/{spec['serviceName']}"]["spec"]["clusterIP"] == "None"
    claims = spec["volumeClaimTemplates"]
    assert [c["metadata"]["name"] for c in claims] == ["data"]
    assert claims[0]["spec"]["accessModes"] == ["ReadWriteOnce"]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    env = {e["name"]: e for e in container["env"]}
    assert mounts["data"]["mountPath"] == env["WORKER_DATA_DIR"]["value"]
    # The node ID is the pod name: stable across restarts, one per data volume.
    assert env["WORKER_NODE_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["WORKER_CREDS"]["value"] == "/etc/worker/creds/node-$(WORKER_NODE_ID).creds"
    assert mounts["config"]["mountPath"] == "/etc/worker/worker.toml"
    assert container["args"] == ["serve", "--config", "/etc/worker/worker.toml"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["config"]["configMap"]["name"] == "worker-config"
    assert volumes["creds"]["secret"]["defaultMode"] & 0o007 == 0
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = container[probe]["exec"]["command"]
        assert command[:2] == ["python", "/app/deploy/nodeinfo-probe"], probe
    assert "--ready" in container["readinessProbe"]["exec"]["command"]
    assert pod["terminationGracePeriodSeconds"] >= 30 + FLUSH + 10
    # The namespace enforces the "restricted" pod security standard; the pod meets it.
    assert (
        k8s["Namespace/market"]["metadata"]["labels"]["pod-security.kubernetes.io/enforce"]
        == "restricted"
    )
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert security["readOnlyRootFilesystem"] is True
    assert pod["automountServiceAccountToken"] is False
    pdb = k8s["PodDisruptionBudget/worker"]
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"] == spec["selector"]


def test_k8s_configmap_toml_loads(k8s: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    text = k8s["ConfigMap/worker-config"]["data"]["worker.toml"]
    config = load_toml_config(text, tmp_path, {"WORKER_NODE_ID": "worker-0"})
    assert config.callbacks == "jetstream" and config.create_callback_stream is False
    assert config.shutdown_grace == 30.0 and config.nats_url.count("tls://") == 3
    shared = load_toml_config((DEPLOY / "worker.toml").read_text(), tmp_path / "shared")
    for field in ("subject_prefix", "callbacks", "sync", "engines", "limit_total_cpu"):
        assert getattr(config, field) == getattr(shared, field), field


def test_dockerfile_ships_the_tools_and_never_the_secrets() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert "USER 10001" in text
    for tool in ("create-stream", "nodeinfo-probe", "callbacks-stream.json"):
        assert f"deploy/{tool}" in text
    assert "secrets" not in re.sub(r"#.*", "", text)
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    assert ignore[1] == "**"  # everything is excluded unless listed
    assert not any("secrets" in line for line in ignore if line.startswith("!"))
    assert "/secrets/" in (DEPLOY / ".gitignore").read_text()
