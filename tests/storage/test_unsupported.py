"""IPFS, Filecoin and Estuary are declared but never installed."""

from __future__ import annotations

from pathlib import Path

import pytest

from schemas.job import StorageSource, StorageSpec
from worker.errors import EngineError
from worker.storage.unsupported import UNSUPPORTED, Unsupported


@pytest.mark.parametrize("name", UNSUPPORTED)
async def test_not_installed(name: str, tmp_path: Path) -> None:
    assert name in {s.value for s in StorageSource}
    provider = Unsupported(name=name)
    s = StorageSpec(StorageSource=StorageSource(name), CID="Qm...")
    assert provider.name == name
    assert not provider.is_installed()
    assert not provider.is_local(s)
    assert provider.known_size(s) == 0
    with pytest.raises(EngineError, match=f"storage source {name} installed: false"):
        await provider.prepare(s, tmp_path, requester="r")
