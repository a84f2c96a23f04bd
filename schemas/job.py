"""Bacalhau v0.3.25 ``model.Job`` as msgspec Structs (PROTOCOL.md §4).

Field names are the Go field names, so a Bacalhau job spec decodes unchanged once
its keys have been normalised (see :mod:`schemas.codec`). Enums are ``StrEnum``s whose
values are the canonical spellings; the codec maps any casing onto them.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

import msgspec
from msgspec import Meta, Struct

# Go reads these as int64: anything wider is a 400, never a 500 further down.
Int64 = Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)]


class Engine(StrEnum):
    NOOP = "Noop"
    DOCKER = "Docker"
    WASM = "Wasm"
    LANGUAGE = "Language"


class Verifier(StrEnum):
    NOOP = "Noop"
    DETERMINISTIC = "Deterministic"


class Publisher(StrEnum):
    """Publisher names: v0.3.25 ``Spec.Publisher`` plus the v1.0 ``PublisherSpec.Type``s."""

    NOOP = "Noop"
    IPFS = "Ipfs"
    FILECOIN = "Filecoin"
    ESTUARY = "Estuary"
    S3 = "S3"
    LOCAL = "Local"
    OBJECT_STORE = "ObjectStore"


class StorageSource(StrEnum):
    IPFS = "IPFS"
    URL_DOWNLOAD = "URLDownload"
    INLINE = "Inline"
    LOCAL_DIRECTORY = "LocalDirectory"
    S3 = "S3"
    OBJECT_STORE = "ObjectStore"
    FILECOIN = "Filecoin"
    ESTUARY = "Estuary"


class NetworkType(StrEnum):
    NONE = "None"
    FULL = "Full"
    HTTP = "HTTP"


# Aliases for annotations inside Structs whose fields shadow the enum names.
EngineT = Engine
VerifierT = Verifier
PublisherT = Publisher

# Names used in "unknown <name> \"X\"" errors, per enum type.
ENUM_NAMES: dict[type[StrEnum], str] = {
    Engine: "engine",
    Verifier: "verifier",
    Publisher: "publisher",
    StorageSource: "storage source",
    NetworkType: "network type",
}


class S3StorageSpec(Struct, kw_only=True):
    Bucket: str = ""
    Key: str = ""
    Region: str = ""
    Endpoint: str = ""
    VersionID: str = ""
    ChecksumSHA256: str = ""


class StorageSpec(Struct, kw_only=True):
    """Where an input comes from, or where an output goes (``path`` is lowercase in Go)."""

    StorageSource: StorageSource | None = None
    Name: str = ""
    CID: str = ""
    URL: str = ""
    SourcePath: str = ""
    path: str = ""
    Metadata: dict[str, Any] = msgspec.field(default_factory=dict)
    S3: S3StorageSpec | None = None


class JobRequester(Struct, kw_only=True):
    RequesterNodeID: str = ""
    RequesterPublicKey: str = ""


class Metadata(Struct, kw_only=True):
    ID: Annotated[str, Meta(min_length=1, max_length=256)]
    ClientID: str = ""
    CreatedAt: str = ""
    Requester: JobRequester = msgspec.field(default_factory=JobRequester)


class DockerSpec(Struct, kw_only=True):
    Image: str = ""
    Entrypoint: list[str] = msgspec.field(default_factory=list)
    EnvironmentVariables: list[str] = msgspec.field(default_factory=list)
    WorkingDirectory: str = ""


class WasmSpec(Struct, kw_only=True):
    EntryModule: StorageSpec = msgspec.field(default_factory=StorageSpec)
    EntryPoint: str = ""
    Parameters: list[str] = msgspec.field(default_factory=list)
    EnvironmentVariables: dict[str, str] = msgspec.field(default_factory=dict)
    ImportModules: list[StorageSpec] = msgspec.field(default_factory=list)


class LanguageSpec(Struct, kw_only=True):
    Language: str = ""
    LanguageVersion: str = ""
    DeterministicExecution: bool = False
    JobContext: StorageSpec = msgspec.field(default_factory=StorageSpec)
    Command: str = ""
    ProgramPath: str = ""
    RequirementsPath: str = ""


class ResourcesConfig(Struct, kw_only=True):
    """Resource request strings as the job writes them (parsed by ``worker.capacity``)."""

    CPU: str = ""
    Memory: str = ""
    Disk: str = ""
    GPU: str = ""


class NetworkConfig(Struct, kw_only=True):
    Type: NetworkType = NetworkType.NONE
    Domains: list[str] = msgspec.field(default_factory=list)


class Deal(Struct, kw_only=True):
    Concurrency: Int64 = 0
    Confidence: Int64 = 0
    MinBids: Int64 = 0


class PublisherSpec(Struct, kw_only=True):
    """v1.0-style publisher; ``Type`` wins over ``Spec.Publisher`` when set."""

    Type: Publisher | None = None
    Params: dict[str, Any] = msgspec.field(default_factory=dict)


class Spec(Struct, kw_only=True):
    Engine: Engine
    Verifier: Verifier | None = None
    Publisher: Publisher | None = None
    PublisherSpec: PublisherSpec | None = None
    Docker: DockerSpec = msgspec.field(default_factory=DockerSpec)
    Wasm: WasmSpec = msgspec.field(default_factory=WasmSpec)
    Language: LanguageSpec = msgspec.field(default_factory=LanguageSpec)
    Resources: ResourcesConfig = msgspec.field(default_factory=ResourcesConfig)
    Network: NetworkConfig = msgspec.field(default_factory=NetworkConfig)
    Timeout: Annotated[float, Meta(ge=0)] = 0.0
    inputs: list[StorageSpec] = msgspec.field(default_factory=list)
    outputs: list[StorageSpec] = msgspec.field(default_factory=list)
    Deal: Deal = msgspec.field(default_factory=Deal)

    @property
    def verifier(self) -> VerifierT:
        """The verifier to use: an absent one (v1.0.4 specs dropped the field) means Noop."""
        return self.Verifier or Verifier.NOOP

    @property
    def publisher(self) -> PublisherT:
        """``PublisherSpec.Type`` when set, else ``Publisher``, else Noop."""
        if self.PublisherSpec is not None and self.PublisherSpec.Type is not None:
            return self.PublisherSpec.Type
        return self.Publisher or Publisher.NOOP

    def all_storage_specs(self) -> list[StorageSpec]:
        """Every StorageSpec the job names (Go ``Spec.AllStorageSpecs``)."""
        specs = [self.Language.JobContext, self.Wasm.EntryModule, *self.Wasm.ImportModules]
        return [*specs, *self.inputs, *self.outputs]


class Job(Struct, kw_only=True):
    APIVersion: str = ""
    Metadata: Metadata
    Spec: Spec
