"""The Deterministic verifier, compute side (Bacalhau ``verifier/deterministic``).

The proposal is the RSA-OAEP encryption (SHA-512 for both the hash and MGF1, no label) of
the results folder's Go ``dirhash`` ``h1:`` string (:mod:`worker.verifiers.dirhash`, prefix
``results``) under the requester's key, as Bacalhau's ``verifier/encrypter.go`` does. The
requester decrypts every node's proposal and groups the executions by hash.

``Job.Metadata.Requester.RequesterPublicKey`` is the standard base64 of libp2p's protobuf
``PublicKey {Type = 1: KeyType, Data = 2: bytes}`` with ``Type`` RSA (0) and ``Data`` a PKIX
DER RSA key of 2048 to 8192 bits (go-libp2p's ``MinRsaKeyBits``/``maxRsaKeyBits``).
:meth:`DeterministicVerifier.check_key` lets the bid chain decline jobs whose key would
fail here, so they never get as far as running; :class:`RequesterKeyStrategy` is that check
as a bid strategy.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from schemas.job import Job
from schemas.job import Verifier as VerifierName
from worker.bidding.types import BID, BidDecision, BidRequest, decline
from worker.errors import EngineError
from worker.store.types import Execution
from worker.verifiers.dirhash import hash_dir

RESULTS_PREFIX = "results"
MIN_RSA_BITS = 2048
MAX_RSA_BITS = 8192
MAX_KEY_CHARS = 8192  # base64 of an 8192-bit key wrapped in protobuf is about 1.4 KB
KEY_TYPES = {0: "RSA", 1: "Ed25519", 2: "Secp256k1", 3: "ECDSA"}
MISSING = "no RequesterPublicKey found in the job"  # Bacalhau's text


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while pos < len(data) and shift < 64:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    raise EngineError("RequesterPublicKey is not a libp2p PublicKey: truncated varint")


def parse_libp2p_public_key(data: bytes) -> tuple[int, bytes]:
    """``(Type, Data)`` of a protobuf-encoded libp2p ``PublicKey`` (both fields required)."""
    key_type: int | None = None
    key_data: bytes | None = None
    pos = 0
    while pos < len(data):
        tag, pos = _varint(data, pos)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(data, pos)
            if field == 1:
                key_type = value
        elif wire == 2:
            length, pos = _varint(data, pos)
            if pos + length > len(data):
                raise EngineError("RequesterPublicKey is not a libp2p PublicKey: truncated field")
            if field == 2:
                key_data = data[pos : pos + length]
            pos += length
        else:
            raise EngineError(
                f"RequesterPublicKey is not a libp2p PublicKey: unexpected wire type {wire}"
            )
    if key_type is None or key_data is None:
        raise EngineError("RequesterPublicKey is not a libp2p PublicKey: Type or Data missing")
    return key_type, key_data


def load_requester_key(encoded: str) -> rsa.RSAPublicKey:
    """The requester's RSA key, or ``EngineError`` saying why it is unusable."""
    if not encoded:
        raise EngineError(MISSING)
    if len(encoded) > MAX_KEY_CHARS:
        raise EngineError(f"RequesterPublicKey is longer than {MAX_KEY_CHARS} characters")
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise EngineError("RequesterPublicKey is not valid base64") from None
    key_type, der = parse_libp2p_public_key(raw)
    if key_type != 0:
        kind = KEY_TYPES.get(key_type, f"type {key_type}")
        raise EngineError(f"RequesterPublicKey is a {kind} key, not RSA")
    try:
        key = serialization.load_der_public_key(der)
    except (ValueError, TypeError) as exc:
        raise EngineError(f"RequesterPublicKey holds no PKIX DER public key: {exc}") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise EngineError("RequesterPublicKey is marked RSA but holds another kind of key")
    if not MIN_RSA_BITS <= key.key_size <= MAX_RSA_BITS:
        raise EngineError(
            f"RequesterPublicKey is a {key.key_size}-bit RSA key, "
            f"need {MIN_RSA_BITS} to {MAX_RSA_BITS} bits"
        )
    return key


def encode_requester_key(key: rsa.RSAPublicKey) -> str:
    """The ``RequesterPublicKey`` text of ``key`` (what a requester puts in its jobs)."""
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    length = len(der)
    varint = bytearray()
    while True:
        byte = length & 0x7F
        length >>= 7
        if length:
            varint.append(byte | 0x80)
        else:
            varint.append(byte)
            break
    return base64.b64encode(b"\x08\x00\x12" + bytes(varint) + der).decode()


OAEP = padding.OAEP(
    mgf=padding.MGF1(algorithm=hashes.SHA512()), algorithm=hashes.SHA512(), label=None
)


def encrypt(key: rsa.RSAPublicKey, message: bytes) -> bytes:
    """Go's ``rsa.EncryptOAEP(sha512.New(), rand.Reader, key, message, nil)``."""
    return key.encrypt(message, OAEP)


class DeterministicVerifier:
    name = VerifierName.DETERMINISTIC.value

    def is_installed(self) -> bool:
        return True

    def check_key(self, job: Job) -> str | None:
        """Why this node cannot verify ``job`` deterministically (a decline reason), or
        ``None`` when it can or the job does not use the Deterministic verifier."""
        if job.Spec.verifier is not VerifierName.DETERMINISTIC:
            return None
        try:
            load_requester_key(job.Metadata.Requester.RequesterPublicKey)
        except EngineError as exc:
            return f"Deterministic verifier needs a usable RequesterPublicKey: {exc.message}"
        return None

    async def proposal(self, execution: Execution, results_dir: Path) -> bytes:
        key = load_requester_key(execution.job.Metadata.Requester.RequesterPublicKey)
        digest = await asyncio.to_thread(hash_dir, results_dir, RESULTS_PREFIX)
        return encrypt(key, digest.encode())


class RequesterKeyStrategy:
    """The bid check of :meth:`DeterministicVerifier.check_key` (a ``SemanticStrategy``)."""

    def __init__(self, verifier: DeterministicVerifier) -> None:
        self.verifier = verifier

    async def should_bid(self, req: BidRequest) -> BidDecision:
        reason = self.verifier.check_key(req.job)
        return BID if reason is None else decline(reason)
