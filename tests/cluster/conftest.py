"""A secure market on loopback, made the way deploy/README.md says: ``deploy/gen-creds``
writes the operator, accounts, creds, TLS certificates and server configurations;
three nats-server processes form a cluster from them; ``deploy/create-stream`` creates
the callback stream at replicas 3 with the admin creds. Nodes and requesters connect
with their own creds over TLS, so every test also proves the permissions of §2.

Ports: client, monitoring and leafnode listeners take random ports (``-1``, read back from
the ports file and /varz). Route ports must be known by the other servers before they
start, so those three are taken from the kernel just before the start, and the start is
retried with fresh ones if one was taken meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.machinery
import importlib.util
import json
import os
import selectors
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import msgspec
import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import ServiceUnavailableError

from schemas.job import Job
from tests.helpers import assert_eventually
from tests.natsproc import nats_server_bin, stop_process
from worker.config import Config
from worker.node import Node
from worker.plugins import Plugins

ROOT = Path(__file__).parents[2]
DEPLOY = ROOT / "deploy"
GEN_CREDS = DEPLOY / "gen-creds"
CREATE_STREAM = DEPLOY / "create-stream"
PREFIX = "market"
START_TIMEOUT = 20.0


def load_script(path: Path) -> ModuleType:
    """A deploy/ script (no .py suffix) as a module, to reuse its renderers."""
    name = "deploy_" + path.name.replace("-", "_")
    if name in sys.modules:
        return sys.modules[name]
    loader = importlib.machinery.SourceFileLoader(name, str(path))
    spec = importlib.util.spec_from_loader(name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    loader.exec_module(module)
    return module


def gen_creds_module() -> ModuleType:
    return load_script(GEN_CREDS)


def run_gen_creds(out: Path, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(GEN_CREDS), "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr + result.stdout
    return result.stdout


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def http_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


@dataclass
class Server:
    """One nats-server process of the market (a cluster member or an edge leaf)."""

    name: str
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None
    url: str = ""
    monitor: str = ""
    leaf_port: int = 0

    @property
    def log(self) -> Path:
        return self.workdir / "server.log"

    def start(self, conf: str) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "nats.conf").write_text(conf)
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    nats_server_bin(),
                    "-c",
                    str(self.workdir / "nats.conf"),
                    "--ports_file_dir",
                    str(self.workdir),
                ],
                stdout=subprocess.DEVNULL,
                stderr=log,
            )

    def wait_ports(self, deadline: float) -> None:
        assert self.proc is not None
        ports = self.workdir / f"nats-server_{self.proc.pid}.ports"
        while True:
            try:
                data = json.loads(ports.read_text())
                self.url, self.monitor = data["nats"][0], data["monitoring"][0]
                break
            except (FileNotFoundError, json.JSONDecodeError, KeyError, IndexError):
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited: {self.log_tail()}") from None
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} did not start: {self.log_tail()}") from None
                time.sleep(0.02)
        leaf = http_json(f"{self.monitor}/varz").get("leaf") or {}
        self.leaf_port = int(leaf.get("port") or 0)

    def healthy(self) -> bool:
        try:
            return bool(http_json(f"{self.monitor}/healthz", timeout=2).get("status") == "ok")
        except OSError:
            return False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: the server dies as in a crash or power loss."""
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        stop_process(self.proc)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def violations(self) -> list[str]:
        try:
            text = self.log.read_text(errors="replace")
        except FileNotFoundError:
            return []
        return [line for line in text.splitlines() if "Violation" in line]

    def client_names(self) -> set[str]:
        """Names of the clients connected to this server now (from /connz)."""
        data = http_json(f"{self.monitor}/connz?limit=1024")
        return {c.get("name", "") for c in data.get("connections", [])}


@dataclass
class Market:
    """gen-creds output and the 3-server cluster (plus edge leaves) started from it."""

    root: Path
    nodes: list[str]
    requesters: list[str]
    leaves: dict[str, list[str]] = field(default_factory=dict)
    servers: list[Server] = field(default_factory=list)
    edge: dict[str, Server] = field(default_factory=dict)

    @property
    def secrets(self) -> Path:
        return self.root / "secrets"

    @property
    def ca(self) -> Path:
        return self.secrets / "ca.pem"

    def creds(self, kind: str, ident: str = "") -> Path:
        return self.secrets / "creds" / (f"{kind}-{ident}.creds" if ident else f"{kind}.creds")

    def url(self, *indexes: int) -> str:
        chosen = indexes or tuple(range(len(self.servers)))
        return ",".join(self.servers[i].url for i in chosen if self.servers[i].alive())

    def generate(self) -> None:
        args = ["--conf-dir", str(self.secrets / "server"), "--store-dir", "unused"]
        for node in self.nodes:
            args += ["--node", node]
        for requester in self.requesters:
            args += ["--requester", requester]
        for site, nodes in self.leaves.items():
            args += ["--leaf", f"{site}:{','.join(nodes)}"]
        run_gen_creds(self.secrets, *args)

    def server_conf(self, index: int, route_ports: list[int]) -> str:
        gen = gen_creds_module()
        name = f"nats-{index + 1}"
        workdir = self.root / name
        state = json.loads((self.secrets / "market.json").read_text())
        conf = gen.ServerConf(
            name=name,
            host="127.0.0.1",
            client_port=-1,
            cluster_port=route_ports[index],
            http="127.0.0.1:-1",
            leaf_port=-1,
            routes=[f"127.0.0.1:{p}" for i, p in enumerate(route_ports) if i != index],
            conf_dir=str(self.secrets / "server"),
            store_dir=str(workdir / "js"),
            max_memory_store="32MB",
            max_file_store="256MB",
            cluster_name=state["cluster"],
            js_domain=state["cluster"],
            accounts_include=os.path.relpath(self.secrets / "server" / "accounts.conf", workdir),
        )
        return str(gen.render_server_conf(conf))

    def start(self) -> None:
        self.generate()
        for attempt in range(3):
            route_ports = free_ports(3)
            self.servers = [Server(f"nats-{i + 1}", self.root / f"nats-{i + 1}") for i in range(3)]
            for i, server in enumerate(self.servers):
                server.start(self.server_conf(i, route_ports))
            try:
                deadline = time.monotonic() + START_TIMEOUT
                for server in self.servers:
                    server.wait_ports(deadline)
                break
            except RuntimeError:
                self.stop()
                if attempt == 2:
                    raise
        deadline = time.monotonic() + START_TIMEOUT
        while not all(s.healthy() for s in self.servers):
            assert time.monotonic() < deadline, [s.log_tail() for s in self.servers]
            time.sleep(0.05)
        self.create_stream()

    def create_stream(self, replicas: int = 3) -> str:
        result = subprocess.run(
            [
                sys.executable,
                str(CREATE_STREAM),
                "--nats-url",
                self.url(),
                "--creds",
                str(self.creds("admin")),
                "--tls-ca",
                str(self.ca),
                "--replicas",
                str(replicas),
                "--timeout",
                "30",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr + result.stdout
        return result.stdout

    def start_leaf(self, site: str, hubs: list[str] | None = None, tag: str = "") -> Server:
        """The edge site's leaf server, connecting out to ``hubs`` (default: the cluster)."""
        gen = gen_creds_module()
        text = (self.secrets / "server" / f"leaf-{site}.conf").read_text()
        account = next(
            line.split(":", 1)[1].split("#")[0].strip()
            for line in text.splitlines()
            if line.strip().startswith("account:")
        )
        workdir = self.root / f"leaf-{site}{tag}"
        conf = gen.LeafConf(
            site=site,
            hubs=hubs or [f"127.0.0.1:{s.leaf_port}" for s in self.servers if s.alive()],
            account=account,
            listen="127.0.0.1:-1",
            http="127.0.0.1:-1",
            conf_dir=str(self.secrets / "server"),
            accounts_include=os.path.relpath(self.secrets / "server" / "accounts.conf", workdir),
        )
        server = Server(f"leaf-{site}{tag}", workdir)
        server.start(gen.render_leaf_conf(conf))
        server.wait_ports(time.monotonic() + START_TIMEOUT)
        self.edge[site + tag] = server
        return server

    def stop(self) -> None:
        for server in [*self.edge.values(), *self.servers]:
            server.stop()

    def violations(self) -> list[str]:
        return [v for s in [*self.servers, *self.edge.values()] for v in s.violations()]

    def tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))

    async def connect(self, kind: str, ident: str, url: str) -> Client:
        """A client with ``kind``/``ident``'s creds (``admin`` has no ident)."""
        errors: list[Exception] = []

        async def on_error(exc: Exception) -> None:
            errors.append(exc)

        options: dict[str, Any] = {
            "servers": url.split(","),
            "user_credentials": str(self.creds(kind, ident)),
            "inbox_prefix": f"_INBOX_{ident or kind}",
            "name": f"{kind}-{ident}",
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": 0.2,
            "connect_timeout": 2,
            "error_cb": on_error,
        }
        if url.startswith("tls://"):
            options["tls"] = self.tls()
        client = await asyncio.wait_for(nats.connect(**options), 15)
        client.errors = errors  # type: ignore[attr-defined]
        return client


def make_market(root: Path, **kwargs: Any) -> Iterator[Market]:
    market = Market(root=root, **kwargs)
    try:
        market.start()
        yield market
    finally:
        market.stop()


@pytest.fixture(scope="module")
def market(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Market]:
    """One market for the module: nodes n1..n3, requesters r1 r2, edge site ``edge``
    with node e1, and 20 nodes f01..f20 for the scale test."""
    yield from make_market(
        tmp_path_factory.mktemp("market"),
        nodes=["n1", "n2", "n3", *(f"f{i:02d}" for i in range(1, 21))],
        requesters=["r1", "r2"],
        leaves={"edge": ["e1"]},
    )


# ---------------------------------------------------------------------------------------
# Nodes.


@dataclass
class NodeProcess:
    """``python -m worker serve`` connected to the market with its own creds."""

    node_id: str
    proc: subprocess.Popen[bytes]
    stderr: Path

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM (drain), then the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"{self.node_id} did not drain: {self.log()[-2000:]}") from None
        finally:
            if self.proc.stdout is not None:
                self.proc.stdout.close()

    async def astop(self, timeout: float = 60) -> int:
        return await asyncio.to_thread(self.stop, timeout)

    def log(self) -> str:
        return self.stderr.read_text(errors="replace")


_SPAWNED: list[NodeProcess] = []


@pytest.fixture(autouse=True)
def _reap_node_processes() -> Iterator[None]:
    """Kill the node processes a test started and left running (a failed test)."""
    before = len(_SPAWNED)
    yield
    for node in _SPAWNED[before:]:
        if node.proc.poll() is None:
            node.proc.kill()
            node.proc.wait(10)
        if node.proc.stdout is not None:
            node.proc.stdout.close()
    del _SPAWNED[before:]


def spawn_node(
    market: Market, node_id: str, url: str, data_dir: Path, *extra: str, ca: bool = True
) -> NodeProcess:
    """Start a node process and wait for its ``NODE_ID=`` line (ready and subscribed)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    stderr = data_dir.parent / f"{node_id}.stderr"
    args = [
        "serve",
        "--nats-url",
        url,
        "--node-id",
        node_id,
        "--data-dir",
        str(data_dir),
        "--subject-prefix",
        PREFIX,
        "--creds",
        str(market.creds("node", node_id)),
        "--engines",
        "noop",
        "--limit-total-cpu",
        "2",
        "--limit-total-memory",
        "4Gi",
        "--limit-total-disk",
        "10Gi",
        "--shutdown-grace",
        "5s",
        *extra,
    ]
    if ca:
        args += ["--tls-ca", str(market.ca)]
    with stderr.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker", *args],
            stdout=subprocess.PIPE,
            stderr=err,
            cwd=str(ROOT),
        )
    node = NodeProcess(node_id=node_id, proc=proc, stderr=stderr)
    _SPAWNED.append(node)
    assert proc.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        if not selector.select(timeout=60):
            proc.kill()
            proc.wait(10)
            proc.stdout.close()
            raise AssertionError(f"{node_id} did not start: {node.log()[-3000:]}")
    line = proc.stdout.readline().decode().strip()
    if line != f"NODE_ID={node_id}":
        proc.wait(30)
        proc.stdout.close()
        raise AssertionError(f"{node_id} exited {proc.returncode}: {node.log()[-3000:]}")
    return node


def node_config(market: Market, node_id: str, data_dir: Path, **settings: Any) -> Config:
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "node_id": node_id,
        "subject_prefix": PREFIX,
        "creds": str(market.creds("node", node_id)),
        "tls_ca": str(market.ca),
        "limit_total_cpu": "2",
        "limit_total_memory": "4Gi",
        "limit_total_disk": "10Gi",
        "shutdown_grace": 5.0,
        "connect_timeout": 15.0,
    }
    values.update(settings)
    return msgspec.convert(values, Config, from_attributes=False, strict=False)


@contextlib.asynccontextmanager
async def in_process_nodes(
    market: Market, placements: dict[str, str], root: Path, plugins: Plugins | None = None
) -> AsyncIterator[dict[str, Node]]:
    """In-process nodes (``node ID → URL``), started concurrently, closed at the end."""
    nodes: dict[str, Node] = {}

    async def start(node_id: str, url: str) -> None:
        node = Node(
            config=node_config(market, node_id, root / node_id),
            nats_url=url,
            plugins=plugins,
        )
        await node.start()
        nodes[node_id] = node

    try:
        results = await asyncio.gather(
            *(start(n, u) for n, u in placements.items()), return_exceptions=True
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            raise failures[0]
        yield nodes
    finally:
        await asyncio.gather(*(n.close() for n in nodes.values()), return_exceptions=True)


# ---------------------------------------------------------------------------------------
# Jobs and the requester's view of the callback stream.

STREAM = "CALLBACKS_market"


def make_job(job_id: str | None = None) -> Job:
    spec = {"Engine": "Noop", "Verifier": "Noop", "Publisher": "Noop"}
    meta = {"ID": job_id or f"job-{uuid.uuid4().hex[:12]}"}
    return msgspec.convert({"Metadata": meta, "Spec": spec}, Job)


@dataclass(frozen=True)
class StoredCallback:
    subject: str
    kind: str  # OnRunComplete, OnPublishComplete, ...
    node: str
    execution_id: str
    seq: int
    msg_id: str
    stream_seq: int


async def read_callbacks(nc: Client, requester: str) -> list[StoredCallback]:
    """Every callback the stream holds for ``requester``, read the way its permissions
    allow (PROTOCOL.md §6): a consumer named on create and filtered on its own subjects,
    pulled from its inbox, acknowledged."""
    js = nc.jetstream(timeout=5)
    name = f"{requester}-{uuid.uuid4().hex[:10]}"
    await js.add_consumer(
        STREAM,
        ConsumerConfig(
            name=name,
            filter_subject=f"{PREFIX}.orchestrator.{requester}.>",
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            inactive_threshold=30.0,
            mem_storage=True,
        ),
    )
    psub = await js.pull_subscribe_bind(durable=name, stream=STREAM)

    async def fetch() -> tuple[list[Msg] | None]:
        """(the next messages,), or (None,) when there are no more."""
        try:
            return (await psub.fetch(256, timeout=1),)
        except (NatsTimeout, TimeoutError):  # nats-py raises either: nothing more
            return (None,)
        except ServiceUnavailableError as exc:
            # A consumer just made on a replicated stream answers 503 until its own
            # leader is elected, which takes longer on a loaded machine: ask again.
            raise AssertionError(f"consumer {name} not ready: {exc!r}") from exc

    out: list[StoredCallback] = []
    try:
        while True:
            batch: tuple[list[Msg] | None] = await assert_eventually(fetch, timeout=15)
            msgs = batch[0]
            if msgs is None:
                break
            for msg in msgs:
                _, _, _, node, method = msg.subject.split(".", 4)
                body = msgspec.json.decode(msg.data)
                out.append(
                    StoredCallback(
                        subject=msg.subject,
                        kind=method.removesuffix("/v1"),
                        node=node,
                        execution_id=body["ExecutionID"],
                        seq=body["Seq"],
                        msg_id=(msg.headers or {}).get("Nats-Msg-Id", ""),
                        stream_seq=msg.metadata.sequence.stream,
                    )
                )
                await msg.ack()
    finally:
        await psub.unsubscribe()
    return out


def by_execution(callbacks: Iterable[StoredCallback]) -> dict[str, list[StoredCallback]]:
    out: dict[str, list[StoredCallback]] = {}
    for cb in callbacks:
        out.setdefault(cb.execution_id, []).append(cb)
    return out


def check_complete(
    callbacks: Iterable[StoredCallback], executions: Iterable[str]
) -> dict[str, list[str]]:
    """Each execution's stored callbacks, checked: Seq 1, 2, … without gap or repeat, in
    stream order, ending with exactly one terminal callback (RunResult then
    PublishResult for an accepted Noop job)."""
    grouped = by_execution(callbacks)
    kinds: dict[str, list[str]] = {}
    for execution_id in executions:
        stored = sorted(grouped.get(execution_id, []), key=lambda c: c.stream_seq)
        seqs = [c.seq for c in stored]
        assert seqs == list(range(1, len(seqs) + 1)), (execution_id, seqs)
        assert [c.msg_id for c in stored] == [f"{execution_id}:{s}" for s in seqs]
        kinds[execution_id] = [c.kind for c in stored]
        assert kinds[execution_id] == ["OnRunComplete", "OnPublishComplete"], (
            execution_id,
            kinds[execution_id],
        )
    return kinds
