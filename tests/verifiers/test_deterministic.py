"""The Deterministic verifier: Go-compatible dirhash, requester key checks, the proposal."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from schemas.job import Verifier as VerifierName
from tests.publishers import make_execution
from worker.bidding.types import BidRequest
from worker.errors import EngineError
from worker.verifiers.deterministic import (
    DeterministicVerifier,
    RequesterKeyStrategy,
    encode_requester_key,
    load_requester_key,
)
from worker.verifiers.dirhash import hash_dir

FIXTURE = json.loads((Path(__file__).with_name("dirhash_fixture.json")).read_text("utf-8"))
EMPTY_H1 = "h1:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="


def build_tree(root: Path, case: dict[str, Any]) -> Path:
    root.mkdir(parents=True)
    for folder in case["dirs"]:
        (root / folder).mkdir(parents=True, exist_ok=True)
    for entry in case["files"]:
        path = root / entry["path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        if "text" in entry:
            path.write_bytes(entry["text"].encode())
        else:
            path.write_bytes(base64.b64decode(entry["base64"]))
    return root


@pytest.fixture(scope="module")
def private_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def public_key_text(private_key: rsa.RSAPrivateKey) -> str:
    return encode_requester_key(private_key.public_key())


def decrypt(key: rsa.RSAPrivateKey, ciphertext: bytes) -> str:
    oaep = padding.OAEP(
        mgf=padding.MGF1(algorithm=hashes.SHA512()), algorithm=hashes.SHA512(), label=None
    )
    return key.decrypt(ciphertext, oaep).decode()


def libp2p(key_type: int, data: bytes) -> str:
    assert len(data) < 128  # one-byte length varint in these hand-made keys
    return base64.b64encode(bytes([0x08, key_type, 0x12, len(data)]) + data).decode()


# -- dirhash ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", FIXTURE["cases"], ids=[c["name"] for c in FIXTURE["cases"]])
def test_dirhash_matches_go(tmp_path: Path, case: dict[str, Any]) -> None:
    root = build_tree(tmp_path / "tree", case)
    assert hash_dir(root, FIXTURE["prefix"]) == case["h1"]


def test_dirhash_depends_on_content_names_and_prefix(tmp_path: Path) -> None:
    case = FIXTURE["cases"][0]
    root = build_tree(tmp_path / "tree", case)
    (root / "stdout").write_text("hello world!\n")
    assert hash_dir(root, "results") != case["h1"]
    (root / "stdout").write_text("hello world\n")
    assert hash_dir(root, "results") == case["h1"]
    assert hash_dir(root, "other") != case["h1"]
    (root / "outputs" / "z").rename(root / "outputs" / "zz")
    assert hash_dir(root, "results") != case["h1"]


def test_dirhash_of_empty_folder(tmp_path: Path) -> None:
    assert hash_dir(tmp_path) == EMPTY_H1


def test_dirhash_symlink_inside_hashes_its_target(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    linked = tmp_path / "linked"
    for root in (plain, linked):
        root.mkdir()
        (root / "data").write_text("payload")
    (plain / "copy").write_text("payload")
    (linked / "copy").symlink_to("data")
    assert hash_dir(linked) == hash_dir(plain)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root: (root / "leak").symlink_to("/etc/hostname"), "leaves the results folder"),
        (lambda root: (root / "dangling").symlink_to(root / "missing"), "dangling"),
        (lambda root: (root / "dirlink").symlink_to(root / "sub"), "is a folder"),
        (lambda root: os.mkfifo(root / "fifo"), "not a regular file"),
        (lambda root: (root / "new\nline").write_text("x"), "newlines"),
    ],
    ids=["symlink-out", "dangling", "symlink-dir", "fifo", "newline"],
)
def test_dirhash_refuses_what_go_cannot_hash(tmp_path: Path, make: Any, message: str) -> None:
    (tmp_path / "sub").mkdir()
    make(tmp_path)
    with pytest.raises(EngineError, match=message):
        hash_dir(tmp_path)


# -- requester key ---------------------------------------------------------------------


def test_key_encoding_is_libp2p(public_key_text: str, private_key: rsa.RSAPrivateKey) -> None:
    # Every libp2p-marshalled 2048-bit RSA public key starts so (Type RSA, then the
    # PKIX SubjectPublicKeyInfo header), e.g. the keys behind "Qm…" peer IDs.
    assert public_key_text.startswith("CAASpgIwggEiMA0GCSqGSIb3DQEBAQUAA4IBDwAwggEKAoIBAQ")
    loaded = load_requester_key(public_key_text)
    assert loaded.public_numbers() == private_key.public_key().public_numbers()


def _der(key: Any) -> bytes:
    return bytes(
        key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def bad_keys() -> list[tuple[str, str]]:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    ed = ed25519.Ed25519PrivateKey.generate().public_key()
    ec_key = ec.generate_private_key(ec.SECP256R1()).public_key()
    ed_raw = ed.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return [
        ("", "no RequesterPublicKey found in the job"),
        ("not base64!", "not valid base64"),
        (base64.b64encode(b"\xff\xff\xff").decode(), "truncated varint"),
        (base64.b64encode(b"\x08\x00").decode(), "Type or Data missing"),
        (base64.b64encode(b"\x08\x00\x12\x40abc").decode(), "truncated field"),
        (base64.b64encode(b"\x0d\x00\x00\x00\x00").decode(), "unexpected wire type 5"),
        (libp2p(1, ed_raw), "is a Ed25519 key, not RSA"),
        (libp2p(9, b"x"), "is a type 9 key, not RSA"),
        (libp2p(0, b"garbage"), "holds no PKIX DER public key"),
        (libp2p(0, _der(ec_key)), "holds another kind of key"),
        (encode_requester_key(small), "1024-bit RSA key, need 2048 to 8192 bits"),
        ("A" * 9000, "longer than 8192 characters"),
    ]


@pytest.mark.parametrize(("text", "why"), bad_keys())
async def test_unusable_keys_are_refused(tmp_path: Path, text: str, why: str) -> None:
    verifier = DeterministicVerifier()
    execution = make_execution(public_key=text, verifier=VerifierName.DETERMINISTIC)
    reason = verifier.check_key(execution.job)
    assert reason is not None
    assert reason.startswith("Deterministic verifier needs a usable RequesterPublicKey: ")
    assert why in reason
    with pytest.raises(EngineError, match=why):
        await verifier.proposal(execution, tmp_path)


def test_check_key_ignores_other_verifiers() -> None:
    verifier = DeterministicVerifier()
    assert verifier.check_key(make_execution(public_key="", verifier=VerifierName.NOOP).job) is None


async def test_bid_strategy(public_key_text: str) -> None:
    strategy = RequesterKeyStrategy(DeterministicVerifier())

    def request(key: str) -> BidRequest:
        job = make_execution(public_key=key, verifier=VerifierName.DETERMINISTIC).job
        return BidRequest(node_id="n", execution_id="e-1", requester="req-a", job=job)

    assert (await strategy.should_bid(request(public_key_text))).bid
    declined = await strategy.should_bid(request(""))
    assert not declined.bid
    assert declined.reason == (
        "Deterministic verifier needs a usable RequesterPublicKey: "
        "no RequesterPublicKey found in the job"
    )
    assert not declined.retryable


# -- proposal --------------------------------------------------------------------------


async def test_proposal_decrypts_to_the_dirhash(
    tmp_path: Path, private_key: rsa.RSAPrivateKey, public_key_text: str
) -> None:
    case = FIXTURE["cases"][0]
    root = build_tree(tmp_path / "results", case)
    verifier = DeterministicVerifier()
    assert verifier.is_installed()
    assert verifier.name == "Deterministic"
    execution = make_execution(public_key=public_key_text, verifier=VerifierName.DETERMINISTIC)
    assert verifier.check_key(execution.job) is None
    first = await verifier.proposal(execution, root)
    second = await verifier.proposal(execution, root)
    assert len(first) == 256  # one RSA-2048 block
    assert first != second  # OAEP is randomised
    assert decrypt(private_key, first) == case["h1"]
    assert decrypt(private_key, second) == case["h1"]


async def test_proposal_of_a_bad_results_folder_fails(tmp_path: Path, public_key_text: str) -> None:
    (tmp_path / "leak").symlink_to("/etc/hostname")
    execution = make_execution(public_key=public_key_text, verifier=VerifierName.DETERMINISTIC)
    with pytest.raises(EngineError, match="leaves the results folder"):
        await DeterministicVerifier().proposal(execution, tmp_path)
