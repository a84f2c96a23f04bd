"""LocalDirectory: only paths inside the configured roots, symlinks resolved."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from schemas.job import StorageSource, StorageSpec
from worker.errors import EngineError
from worker.storage.local import LocalDirectory, bounded_size


def spec(path: str | Path) -> StorageSpec:
    return StorageSpec(
        StorageSource=StorageSource.LOCAL_DIRECTORY, SourcePath=str(path), path="/data"
    )


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "set/sub").mkdir(parents=True)
    (root / "set/a.bin").write_bytes(bytes(100))
    (root / "set/sub/b.bin").write_bytes(bytes(23))
    (tmp_path / "root2").mkdir()
    (tmp_path / "root2/secret").write_bytes(b"no")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside/secret").write_bytes(b"no")
    return root


async def test_folder_inside_a_root(root: Path, tmp_path: Path) -> None:
    provider = LocalDirectory(roots=[str(tmp_path / "elsewhere"), str(root)])
    assert provider.is_installed()
    assert provider.is_local(spec(root / "set"))
    assert provider.known_size(spec(root / "set")) == 123
    assert provider.known_size(spec(root / "set/a.bin")) == 100
    assert (
        await provider.prepare(spec(root / "set"), tmp_path / "dest", requester="r") == root / "set"
    )
    assert not (tmp_path / "dest").exists()  # nothing copied


async def test_symlink_inside_resolves_to_its_target(root: Path, tmp_path: Path) -> None:
    (root / "alias").symlink_to(root / "set")
    provider = LocalDirectory(roots=[str(root)])
    assert await provider.prepare(spec(root / "alias"), tmp_path, requester="r") == root / "set"


async def test_root_given_through_a_symlink(root: Path, tmp_path: Path) -> None:
    (tmp_path / "root-link").symlink_to(root)
    provider = LocalDirectory(roots=[str(tmp_path / "root-link")])
    assert await provider.prepare(spec(root / "set"), tmp_path, requester="r") == root / "set"


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("{tmp}/outside/secret", "outside the allowed local input roots"),
        ("{tmp}/root2/secret", "outside the allowed local input roots"),  # prefix, not a folder
        ("/etc/passwd", "outside the allowed local input roots"),
        ("{tmp}/root/escape", r"outside the allowed local input roots \(resolves to"),
        ("{tmp}/root/set/../../outside/secret", "must not contain .."),
        ("{tmp}/root/set/../set", "must not contain .."),
        ("set/a.bin", "must be an absolute path"),
        ("", "must be an absolute path"),
    ],
)
async def test_refusals(root: Path, tmp_path: Path, source: str, message: str) -> None:
    (root / "escape").symlink_to(tmp_path / "outside")
    provider = LocalDirectory(roots=[str(root)])
    bad = spec(source.format(tmp=tmp_path))
    with pytest.raises(EngineError, match=message):
        await provider.prepare(bad, tmp_path, requester="r")
    assert not provider.is_local(bad)
    assert provider.known_size(bad) == 0


async def test_no_roots_refuse_everything(root: Path, tmp_path: Path) -> None:
    provider = LocalDirectory(roots=[])
    assert not provider.is_installed()
    assert not provider.is_local(spec(root / "set"))
    with pytest.raises(EngineError, match="disabled on this node"):
        await provider.prepare(spec(root / "set"), tmp_path, requester="r")


async def test_missing_path(root: Path, tmp_path: Path) -> None:
    provider = LocalDirectory(roots=[str(root)])
    assert not provider.is_local(spec(root / "nope"))
    with pytest.raises(EngineError, match="does not exist"):
        await provider.prepare(spec(root / "nope"), tmp_path, requester="r")


def test_walk_is_bounded_and_does_not_follow_symlinks(tmp_path: Path) -> None:
    for i in range(50):
        (tmp_path / f"f{i}").write_bytes(bytes(10))
    (tmp_path / "big-elsewhere").mkdir()
    os.symlink(tmp_path, tmp_path / "loop")  # would never end if followed
    assert bounded_size(str(tmp_path), max_entries=1000, max_seconds=5) == 500
    assert bounded_size(str(tmp_path), max_entries=10, max_seconds=5) <= 100
    assert bounded_size(str(tmp_path), max_entries=1000, max_seconds=-1) == 0
    assert bounded_size(str(tmp_path / "nope"), max_entries=10, max_seconds=5) == 0
