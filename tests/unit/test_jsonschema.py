"""schemas/jsonschema/*.json are exactly what `python -m schemas.export` writes now."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import msgspec
import pytest

from schemas import callbacks, compute, export, node
from schemas.export import MESSAGE_TYPES, SCHEMA_DIR, drifted, main, render, render_all

REGENERATE = "regenerate with `python -m schemas.export`"


@pytest.mark.parametrize("type_", MESSAGE_TYPES, ids=lambda t: t.__name__)
def test_schema_file_matches_the_code(type_: type[msgspec.Struct]) -> None:
    path = SCHEMA_DIR / f"{type_.__name__}.json"
    assert path.is_file(), f"{path.name} is missing: {REGENERATE}"
    assert path.read_text(encoding="utf-8") == render(type_), f"{path.name} drifted: {REGENERATE}"


def test_no_stale_schema_files() -> None:
    expected = set(render_all())
    stale = sorted(p.name for p in SCHEMA_DIR.glob("*.json") if p.name not in expected)
    assert not stale, f"schema files for no message type: {stale}"
    assert drifted() == []


def _exported_defs() -> set[str]:
    names: set[str] = set()
    for text in render_all().values():
        names.update(json.loads(text)["$defs"])
    return names


@pytest.mark.parametrize("module", [compute, callbacks, node], ids=lambda m: m.__name__)
def test_every_struct_is_exported_or_nested(module: object) -> None:
    """A new top-level message that nobody added to MESSAGE_TYPES fails here."""
    exported = _exported_defs()
    structs = [
        obj
        for _, obj in inspect.getmembers(module, inspect.isclass)
        if issubclass(obj, msgspec.Struct) and obj.__module__ == getattr(module, "__name__", "")
    ]
    assert structs
    missing = [s.__name__ for s in structs if s.__name__ not in exported]
    assert not missing, f"add to schemas.export.MESSAGE_TYPES: {missing}"


def test_files_are_pretty_sorted_and_end_with_a_newline() -> None:
    for name, text in render_all().items():
        assert text.endswith("}\n"), name
        data = json.loads(text)
        assert text == json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        assert data["$ref"] == f"#/$defs/{name.removesuffix('.json')}"


def test_check_reports_drift(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--dir", str(tmp_path)]) == 0
    assert main(["--check", "--dir", str(tmp_path)]) == 0
    (tmp_path / "Job.json").write_text("{}\n", encoding="utf-8")
    (tmp_path / "NodeInfo.json").unlink()
    (tmp_path / "Old.json").write_text("{}\n", encoding="utf-8")
    capsys.readouterr()
    assert main(["--check", "--dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "Job.json: differs from the code" in err
    assert "NodeInfo.json: missing" in err
    assert "Old.json: no such message type" in err
    assert main(["--dir", str(tmp_path)]) == 0
    assert export.drifted(tmp_path) == []
    assert not (tmp_path / "Old.json").exists()
