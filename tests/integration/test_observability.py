"""A node process exports its spans (here to the WORKER_TRACE_FILE exporter) in the
requester's trace, and its JSON log lines carry the execution, job and trace IDs."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import uuid
from pathlib import Path

import nats
from opentelemetry.sdk.trace import TracerProvider

from schemas.callbacks import ComputeError, PublishResult
from schemas.job import Engine, Job, Metadata, Spec, StorageSource, StorageSpec
from tests.engines import wasm_fixtures as wat
from tests.helpers import assert_eventually
from worker.requester import Requester


async def test_node_spans_and_logs_follow_the_job(tmp_path: Path, nats_url: str) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    spans_file = tmp_path / "spans.jsonl"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker",
        "serve",
        "--data-dir",
        str(tmp_path / "d"),
        "--nats-url",
        nats_url,
        "--subject-prefix",
        prefix,
        "--node-id",
        "obs",
        "--create-callback-stream",
        "--log-format",
        "json",
        "--engines",
        "Noop,Wasm",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "WORKER_TRACE_FILE": str(spans_file)},
    )
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 20)
    assert line.decode().strip() == "NODE_ID=obs"
    tracer = TracerProvider().get_tracer("requester")
    nc = await nats.connect(nats_url)
    requester = Requester(nc=nc, requester_id="r1", prefix=prefix, tracer=tracer)
    await requester.start()
    try:
        with tracer.start_as_current_span("job") as root:
            trace_id = format(root.get_span_context().trace_id, "032x")
            ok = await requester.ask(
                "obs", Job(Metadata=Metadata(ID="ok"), Spec=Spec(Engine=Engine.NOOP))
            )
            await requester.accept("obs", ok.ExecutionID)
            done = await requester.run_to_completion("obs", ok.ExecutionID, timeout=20)
            assert isinstance(done[-1], PublishResult)
            module = StorageSpec(
                StorageSource=StorageSource.INLINE, URL=wat.data_url(wat.MISSING_IMPORT)
            )
            broken = Spec(Engine=Engine.WASM)
            broken.Wasm.EntryModule = module
            bad = await requester.ask("obs", Job(Metadata=Metadata(ID="bad"), Spec=broken))
            await requester.accept("obs", bad.ExecutionID)
            failure = await requester.wait_callback(bad.ExecutionID, timeout=20)
            assert isinstance(failure, ComputeError), failure
    finally:
        await requester.close()
        await nc.close()
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()

    def spans() -> list[dict[str, object]]:
        return [json.loads(s) for s in spans_file.read_text().splitlines()]

    await assert_eventually(lambda: any(s["name"] == "execution publish" for s in spans()))
    names = {s["name"] for s in spans() if s["traceId"] == trace_id}
    for stage in ("bid strategies", "queue wait", "execution run", "engine run Noop"):
        assert stage in names, (stage, sorted(names))
    logs = [json.loads(x) for x in err.decode().splitlines() if x.startswith("{")]
    about_bad = [r for r in logs if r.get("execution_id") == bad.ExecutionID]
    assert about_bad, logs[-5:]
    assert all(r["job_id"] == "bad" and r["trace_id"] == trace_id for r in about_bad)
