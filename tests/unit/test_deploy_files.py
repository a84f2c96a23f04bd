"""The shipped broker files: nats.conf parses, and the stream file matches the code."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from tests.natsproc import nats_server_bin
from worker.streams import stream_config
from worker.transport.subjects import Subjects

ROOT = Path(__file__).parents[2]


def test_nats_conf_is_valid() -> None:
    env = {**os.environ, "NODE_N1_PASSWORD": "x", "REQUESTER_R1_PASSWORD": "y"}
    result = subprocess.run(
        [nats_server_bin(), "-c", str(ROOT / "nats.conf"), "-t"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr + result.stdout
    assert "valid" in result.stdout + result.stderr


def test_nats_conf_grants_the_protocol_subjects() -> None:
    text = (ROOT / "nats.conf").read_text()
    for subject in (
        "market.compute.n1.*.>",
        "market.compute._all.*.>",
        "market.orchestrator.*.n1.>",
        "market.info.n1",
        "market.compute.*.r1.>",
        "market.orchestrator.r1.>",
        "_INBOX_n1.>",
    ):
        assert f'"{subject}"' in text, subject
    assert "allow_responses: true" in text


def test_stream_file_matches_the_code() -> None:
    shipped = json.loads((ROOT / "deploy/callbacks-stream.json").read_text())
    config = stream_config(Subjects(prefix="market", node_id="n1"))
    assert shipped["name"] == config.name
    assert shipped["subjects"] == config.subjects
    assert shipped["storage"] == config.storage.value  # type: ignore[union-attr]
    assert shipped["retention"] == config.retention.value  # type: ignore[union-attr]
    assert shipped["discard"] == config.discard.value  # type: ignore[union-attr]
    assert shipped["deny_delete"] is config.deny_delete is True
    assert shipped["max_age"] == int((config.max_age or 0) * 1e9) == 7 * 24 * 3600 * 10**9
    assert shipped["duplicate_window"] == int(config.duplicate_window * 1e9) == 600 * 10**9
