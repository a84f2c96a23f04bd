"""``worker serve`` against brokers that require authentication or mutual TLS.

Each auth kind gets its own nats-server (JetStream on, a small store). The node must
connect and answer NodeInfo with the right credentials, and exit 6 within
``--connect-timeout`` with a clear message on stderr with wrong ones.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import os
import signal
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import nkeys  # type: ignore[import-untyped]
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.natsproc import nats_server_bin, stop_process

WORKER = [sys.executable, "-m", "worker"]
CONNECT_TIMEOUT = "2s"


@dataclass
class Broker:
    url: str
    workdir: Path


def start_broker(workdir: Path, auth: str) -> tuple[subprocess.Popen[bytes], Broker]:
    """A nats-server on a random loopback port with ``auth`` added to its config."""
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "nats.conf"
    conf.write_text(
        'listen: "127.0.0.1:-1"\n'
        f'jetstream {{ store_dir: "{workdir / "js"}", max_memory_store: 16MB, '
        "max_file_store: 64MB }\n" + auth
    )
    proc = subprocess.Popen(
        [nats_server_bin(), "-c", str(conf), "--ports_file_dir", str(workdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ports = workdir / f"nats-server_{proc.pid}.ports"
    deadline = time.monotonic() + 10
    while True:
        try:
            url = str(json.loads(ports.read_text())["nats"][0])
            break
        except (FileNotFoundError, json.JSONDecodeError, KeyError, IndexError):
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("nats-server did not start") from None
            time.sleep(0.01)
    return proc, Broker(url=url, workdir=workdir)


async def spawn(
    broker_url: str, data_dir: Path, *args: str, env: dict[str, str] | None = None
) -> tuple[asyncio.subprocess.Process, str, str]:
    """Start ``worker serve``; returns the process, its node ID and subject prefix."""
    prefix = f"t{uuid.uuid4().hex[:8]}"
    node_id = f"n{uuid.uuid4().hex[:6]}"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("WORKER_")}
    proc = await asyncio.create_subprocess_exec(
        *WORKER,
        "serve",
        "--nats-url",
        broker_url,
        "--subject-prefix",
        prefix,
        "--node-id",
        node_id,
        "--create-callback-stream",
        "--data-dir",
        str(data_dir),
        "--engines",
        "noop",
        "--connect-timeout",
        CONNECT_TIMEOUT,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**clean, **(env or {})},
    )
    return proc, node_id, prefix


async def serves(
    broker_url: str,
    data_dir: Path,
    args: list[str],
    client_options: dict[str, Any],
    env: dict[str, str] | None = None,
) -> None:
    """The node starts, prints NODE_ID=, answers NodeInfo and drains with exit 0."""
    proc, node_id, prefix = await spawn(broker_url, data_dir, *args, env=env)
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode().strip()
        if line != f"NODE_ID={node_id}":
            proc.kill()
            _, err = await proc.communicate()
            raise AssertionError(f"no NODE_ID line ({line!r}): {err.decode()}")
        nc = await nats.connect(broker_url, max_reconnect_attempts=1, **client_options)
        try:
            reply = await nc.request(f"{prefix}.compute.{node_id}.r1.NodeInfo/v1", b"", timeout=5)
            info = json.loads(reply.data)
            assert info["NodeID"] == node_id
            assert info["Draining"] is False
        finally:
            await nc.close()
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err.decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


AUTH_VIOLATION = "Authorization Violation"


async def refused(
    broker_url: str,
    data_dir: Path,
    args: list[str],
    env: dict[str, str] | None = None,
    *,
    reason: str = AUTH_VIOLATION,
) -> str:
    """The node gives up with exit 6 within the connect timeout, saying why on stderr;
    returns its stderr."""
    started = time.monotonic()
    proc, _, _ = await spawn(broker_url, data_dir, *args, env=env)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    elapsed = time.monotonic() - started
    text = err.decode()
    assert proc.returncode == 6, text
    assert b"NODE_ID=" not in out
    assert "unreachable within 2s" in text, text
    assert reason in text, text
    # Python start-up plus the 2 s deadline; never the default 10 s.
    assert elapsed < 8, elapsed
    return text


def assert_secret_not_in(text: str, *secrets: str) -> None:
    for secret in secrets:
        assert secret not in text, f"secret {secret!r} leaked to stderr"


# --------------------------------------------------------------------- user/password


@pytest.fixture(scope="module")
def password_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    proc, broker = start_broker(
        tmp_path_factory.mktemp("pw"),
        'authorization { user: "alice", password: "right-pw-1234" }\n',
    )
    yield broker
    stop_process(proc)


async def test_password_from_env(password_broker: Broker, tmp_path: Path) -> None:
    await serves(
        password_broker.url,
        tmp_path / "d",
        ["--user", "alice"],
        {"user": "alice", "password": "right-pw-1234"},
        env={"WORKER_PASSWORD": "right-pw-1234"},
    )


async def test_password_from_file(password_broker: Broker, tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("right-pw-1234\n")
    await serves(
        password_broker.url,
        tmp_path / "d",
        ["--user", "alice", "--password-file", str(secret)],
        {"user": "alice", "password": "right-pw-1234"},
    )


async def test_wrong_password_exits_6(password_broker: Broker, tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("wrong-pw-5678\n")
    from_env, from_file = await asyncio.gather(
        refused(
            password_broker.url,
            tmp_path / "a",
            ["--user", "alice"],
            env={"WORKER_PASSWORD": "wrong-pw-5678"},
        ),
        refused(
            password_broker.url,
            tmp_path / "b",
            ["--user", "alice", "--password-file", str(secret)],
        ),
    )
    for err in (from_env, from_file):
        assert_secret_not_in(err, "wrong-pw-5678", "right-pw-1234")


async def test_wrong_user_exits_6(password_broker: Broker, tmp_path: Path) -> None:
    err = await refused(
        password_broker.url,
        tmp_path / "d",
        ["--user", "mallory"],
        env={"WORKER_PASSWORD": "right-pw-1234"},
    )
    assert_secret_not_in(err, "right-pw-1234")


# --------------------------------------------------------------------------- token


@pytest.fixture(scope="module")
def token_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    proc, broker = start_broker(
        tmp_path_factory.mktemp("tok"), 'authorization { token: "right-token-abcd" }\n'
    )
    yield broker
    stop_process(proc)


async def test_token_file(token_broker: Broker, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("right-token-abcd\n")
    await serves(
        token_broker.url,
        tmp_path / "d",
        ["--token-file", str(token)],
        {"token": "right-token-abcd"},
    )


async def test_wrong_token_exits_6(token_broker: Broker, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("wrong-token-wxyz\n")
    err = await refused(token_broker.url, tmp_path / "d", ["--token-file", str(token)])
    assert_secret_not_in(err, "wrong-token-wxyz", "right-token-abcd")


async def test_no_credentials_exits_6(token_broker: Broker, tmp_path: Path) -> None:
    await refused(token_broker.url, tmp_path / "d", [])


# ---------------------------------------------------------------------------- nkey


def new_user_seed() -> tuple[bytes, str]:
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    public = nkeys.from_seed(bytearray(seed)).public_key.decode()
    return seed, public


@dataclass
class NkeyBroker(Broker):
    seed: bytes = b""


@pytest.fixture(scope="module")
def nkey_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NkeyBroker]:
    seed, public = new_user_seed()
    proc, broker = start_broker(
        tmp_path_factory.mktemp("nkey"), f'authorization {{ users: [ {{ nkey: "{public}" }} ] }}\n'
    )
    yield NkeyBroker(url=broker.url, workdir=broker.workdir, seed=seed)
    stop_process(proc)


async def test_nkey_seed(nkey_broker: NkeyBroker, tmp_path: Path) -> None:
    seed_file = tmp_path / "user.nk"
    seed_file.write_bytes(nkey_broker.seed + b"\n")
    await serves(
        nkey_broker.url,
        tmp_path / "d",
        ["--nkey-seed", str(seed_file)],
        {"nkeys_seed": str(seed_file)},
    )


async def test_wrong_nkey_seed_exits_6(nkey_broker: NkeyBroker, tmp_path: Path) -> None:
    other, _ = new_user_seed()
    seed_file = tmp_path / "other.nk"
    seed_file.write_bytes(other + b"\n")
    err = await refused(nkey_broker.url, tmp_path / "d", ["--nkey-seed", str(seed_file)])
    assert_secret_not_in(err, other.decode(), nkey_broker.seed.decode())


# ----------------------------------------------------------------------------- TLS


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name | None = None,
    issuer_key: ec.EllipticCurvePrivateKey | None = None,
    *,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    else:
        usage = x509.oid.ExtendedKeyUsageOID
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([usage.SERVER_AUTH if server else usage.CLIENT_AUTH]),
            critical=False,
        )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key or key, hashes.SHA256())


def make_pki(directory: Path, label: str) -> Pki:
    """A CA and a server and a client certificate it signed, as PEM files."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _cert(f"{label} test CA", ca_key, ca=True)
    files: dict[str, bytes] = {"ca.pem": ca_cert.public_bytes(serialization.Encoding.PEM)}
    for role in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(f"{label} {role}", key, ca_cert.subject, ca_key, server=role == "server")
        files[f"{role}.pem"] = cert.public_bytes(serialization.Encoding.PEM)
        files[f"{role}-key.pem"] = _key_pem(key)
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return Pki(
        ca=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server-key.pem",
        client_cert=directory / "client.pem",
        client_key=directory / "client-key.pem",
    )


@dataclass
class TlsBroker(Broker):
    pki: Pki | None = None
    rogue: Pki | None = None


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsBroker]:
    workdir = tmp_path_factory.mktemp("tls")
    pki = make_pki(workdir / "pki", "good")
    rogue = make_pki(workdir / "rogue", "rogue")
    proc, broker = start_broker(
        workdir / "server",
        f'tls {{ cert_file: "{pki.server_cert}", key_file: "{pki.server_key}", '
        f'ca_file: "{pki.ca}", verify: true, timeout: 2 }}\n',
    )
    yield TlsBroker(url=broker.url, workdir=broker.workdir, pki=pki, rogue=rogue)
    stop_process(proc)


def _tls_args(ca: Path, cert: Path, key: Path) -> list[str]:
    return ["--tls-ca", str(ca), "--tls-cert", str(cert), "--tls-key", str(key)]


async def test_tls_client_certificate(tls_broker: TlsBroker, tmp_path: Path) -> None:
    pki = tls_broker.pki
    assert pki is not None
    context = ssl.create_default_context(cafile=str(pki.ca))
    context.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    await serves(
        tls_broker.url,
        tmp_path / "d",
        _tls_args(pki.ca, pki.client_cert, pki.client_key),
        {"tls": context},
    )


async def test_tls_wrong_client_certificate_exits_6(tls_broker: TlsBroker, tmp_path: Path) -> None:
    pki, rogue = tls_broker.pki, tls_broker.rogue
    assert pki is not None and rogue is not None
    # Trusts the server, but presents a client certificate from another CA.
    await refused(
        tls_broker.url,
        tmp_path / "d",
        _tls_args(pki.ca, rogue.client_cert, rogue.client_key),
        reason="SSL",
    )


async def test_tls_untrusted_server_exits_6(tls_broker: TlsBroker, tmp_path: Path) -> None:
    rogue = tls_broker.rogue
    assert rogue is not None
    # The node's CA did not sign the server's certificate.
    await refused(
        tls_broker.url,
        tmp_path / "d",
        _tls_args(rogue.ca, rogue.client_cert, rogue.client_key),
        reason="CERTIFICATE_VERIFY_FAILED",
    )


async def test_tls_without_client_certificate_exits_6(
    tls_broker: TlsBroker, tmp_path: Path
) -> None:
    pki = tls_broker.pki
    assert pki is not None
    await refused(
        tls_broker.url, tmp_path / "d", ["--tls-ca", str(pki.ca)], reason="CERTIFICATE_REQUIRED"
    )
