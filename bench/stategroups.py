"""The groups about the node's state: store transitions in-process, resident memory of a
node process per 10,000 jobs, and the start-up recovery with 100,000 stored executions."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench import netbench as nb
from bench import storebench as sb
from bench import wire
from bench.load import INFLIGHT
from bench.procs import CpuMeter, NodeProc, rss_bytes

if TYPE_CHECKING:
    from bench.run import Run


async def store_group(run: Run) -> None:
    p = run.plan
    base = run.root / "store"
    me = {"bench": os.getpid()}
    for rep in range(p.reps):
        run.log(f"store: rep {rep + 1}/{p.reps}")
        for name, fn, sync, workers in (
            ("store.anchor_seq", sb.sqlite_anchor, "normal", 1),
            ("store.seq", sb.transitions, "normal", 1),
            ("store.anchor_c64", sb.sqlite_anchor, "normal", INFLIGHT),
            ("store.c64", sb.transitions, "normal", INFLIGHT),
            ("store.anchor_c64_full", sb.sqlite_anchor, "full", INFLIGHT),
            ("store.c64_full", sb.transitions, "full", INFLIGHT),
        ):
            d = base / f"{name}-{rep}"
            d.mkdir(parents=True)
            with CpuMeter(me) as meter:
                r = await fn(d, sync=sync, workers=workers, duration=p.store_s)
            entry: dict[str, Any] = {
                "ops": r.ops,
                "rate": round(r.rate, 1),
                "cpu": meter.summary(r.ops),
            }
            run.record(name, entry)
            run.log(
                f"  {name:<28} {r.rate:>9.0f}/s  "
                f"{entry['cpu']['cpu_us_per_op']['bench']} µs CPU/op  "
                f"foreign {entry['cpu']['foreign_cores']}"
            )
            shutil.rmtree(d, ignore_errors=True)


async def memory_group(run: Run) -> None:
    assert run.nc is not None
    p = run.plan
    node = run.node("mem", "benchmem")
    await node.start()
    router = nb.CallbackRouter(run.nc, "benchmem")
    await router.start()
    client = nb.NodeClient(run.nc, prefix="benchmem", node_id=node.node_id, tag="m")
    entry: dict[str, Any] = {"segments": []}
    try:
        warm = max(200, p.memory_jobs // 10)
        done = await _jobs(run, client, router, warm, p.memory_max_s)
        entry["warmup_jobs"] = done
        await _settle(run, node)
        points = [(0, rss_bytes(node.pid))]
        total = 0
        for seg in range(2):
            t0 = time.perf_counter()
            done = await _jobs(run, client, router, p.memory_jobs, p.memory_max_s)
            elapsed = time.perf_counter() - t0
            total += done
            await _settle(run, node)
            points.append((total, rss_bytes(node.pid)))
            entry["segments"].append(
                {
                    "jobs": done,
                    "seconds": round(elapsed, 1),
                    "jobs_per_s": round(done / elapsed, 1),
                }
            )
            run.log(
                f"memory: segment {seg + 1}: {done} jobs in {elapsed:.1f} s, "
                f"RSS {points[-1][1]['VmRSS'] / 2**20:.1f} MiB"
            )
        entry["points"] = [{"executions": n, **{k: v for k, v in r.items()}} for n, r in points]
        entry["db_bytes"] = sum(f.stat().st_size for f in node.data_dir.glob("*.db*"))
        entry["declines"] = client.counters.declines
        entry["errors_first"] = ""
    finally:
        await router.stop()
        await run.stop_node(node)
    run.record("memory", entry)


async def _jobs(
    run: Run, client: nb.NodeClient, router: nb.CallbackRouter, n: int, max_s: float
) -> int:
    result = await nb.concurrent(
        nb.job_op(client, router),
        inflight=INFLIGHT,
        duration=max_s,
        warmup=0,
        max_ops=n,
        drain=40,
    )
    return result.ops


async def _settle(run: Run, node: NodeProc, timeout: float = 15) -> None:
    """Wait until the node has nothing running and its outbox is empty, then a beat."""
    assert run.nc is not None
    subject = f"{node.prefix}.compute.{node.node_id}.{wire.REQUESTER}.NodeInfo/v1"
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        info = json.loads((await run.nc.request(subject, b"", timeout=10)).data)
        c = info["ComputeNodeInfo"]
        busy = c["OutboxPending"] + c["RunningExecutions"] + c["EnqueuedExecutions"]
        if not busy:
            break
        await asyncio.sleep(0.2)
    await asyncio.sleep(1.0)


# The two data dirs of the recovery group: the live executions' deadlines still ahead (a
# restart soon after a stop: the target's case), and all of them passed (a node down for
# longer than its bid TTL, queue timeout and verification TTL: 4,000 of the 5,000 live
# executions expire at start-up). Fixed offsets, so a cached data dir measures the same
# however old it is (it used to hold deadlines an hour after it was written).
RECOVERY_VARIANTS: tuple[tuple[str, timedelta], ...] = (
    ("recovery", timedelta(days=3650)),
    ("recovery_late", -sb.HOUR),
)


async def recovery_group(run: Run) -> None:
    p = run.plan
    node_id = "bench-rec"
    pristine = {}
    for name, deadline_in in RECOVERY_VARIANTS:
        pristine[name], populated = await _populated(
            run, p.recovery_total, node_id, name, deadline_in
        )
        run.record(f"{name}.populate", populated)
        run.log(f"  {name}: populated {populated}")
    for rep in range(p.recovery_reps):
        empty = run.node(f"rec-empty-{rep}", "benchrec")
        await empty.start()
        run.record("recovery.startup_empty", {"startup_s": round(empty.startup_s, 3)})
        await run.stop_node(empty)
        shutil.rmtree(empty.data_dir, ignore_errors=True)
        starts = []
        for name, _ in RECOVERY_VARIANTS:
            d = run.root / f"{name}-{rep}"
            shutil.copytree(pristine[name], d, ignore=shutil.ignore_patterns("populated.json"))
            full = NodeProc(
                url=run.url, data_dir=d, node_id=node_id, prefix="benchrec", pythonpath=run.tree
            )
            await full.start(timeout=120)
            restored = [ln for ln in full.stderr_tail(20000).splitlines() if "restored" in ln]
            run.record(
                f"{name}.startup_full",
                {"startup_s": round(full.startup_s, 3), "log": restored[-1:]},
            )
            await run.stop_node(full)
            shutil.rmtree(d, ignore_errors=True)
            starts.append(f"{name} {full.startup_s:.2f} s")

        d = run.root / f"rec-inproc-empty-{rep}"
        empty_phases = await in_process_start(
            d, url=run.url, node_id=f"{node_id}-empty", prefix="benchrec"
        )
        run.record("recovery.inprocess_empty", empty_phases)
        shutil.rmtree(d, ignore_errors=True)
        d = run.root / f"rec-inproc-{rep}"
        shutil.copytree(pristine["recovery"], d, ignore=shutil.ignore_patterns("populated.json"))
        phases = await in_process_start(d, url=run.url, node_id=node_id, prefix="benchrec")
        run.record("recovery.inprocess", phases)
        shutil.rmtree(d, ignore_errors=True)
        run.log(
            f"  rep {rep + 1}: start-up empty {empty.startup_s:.2f} s, with "
            f"{p.recovery_total:,}: {', '.join(starts)}; in-process {phases}"
        )


async def _populated(
    run: Run, total: int, node_id: str, name: str, deadline_in: timedelta
) -> tuple[Path, dict[str, Any]]:
    """The populated data dir, from the cache when the same code and plan made it
    before (writing 100,000 executions through the store API takes minutes). Each
    repetition runs on a fresh copy of it; the cache keeps one dir per variant and size."""
    key = hashlib.sha256(
        f"{run.code_hash}:{total}:{node_id}:{deadline_in.total_seconds()}".encode()
        + Path(sb.__file__).read_bytes()
    ).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "worker-bench"
    pristine = cache / f"{name}-{total}-{key}"
    done = pristine / "populated.json"
    if done.exists():
        run.log(f"{name}: {total:,} executions from the cache {pristine}")
        return pristine, {**json.loads(done.read_text()), "cached": True}
    for old in cache.glob(f"{name}-{total}-*"):  # older ones of this variant
        shutil.rmtree(old, ignore_errors=True)
    run.log(f"{name}: populating {total:,} executions via the store API …")
    for stale in cache.glob("building-*"):  # left by a run that died while populating
        pid = stale.name.removeprefix("building-")
        if not pid.isdigit() or not Path(f"/proc/{pid}").exists():
            shutil.rmtree(stale, ignore_errors=True)
    building = cache / f"building-{os.getpid()}"
    shutil.rmtree(building, ignore_errors=True)
    populated = await sb.populate(
        building, node_id=node_id, prefix="benchrec", total=total, deadline_in=deadline_in
    )
    (building / "populated.json").write_text(json.dumps(populated))
    building.rename(pristine)
    return pristine, populated


async def in_process_start(
    data_dir: Path, *, url: str, node_id: str, prefix: str
) -> dict[str, float]:
    """Start a Node in this process on ``data_dir`` and time its start-up phases (the
    store's open and count, live_executions, Recovery.run, the outbox's first load)."""
    from worker.config import load_config
    from worker.node import Node
    from worker.recovery import Recovery
    from worker.store.sqlite import SqliteStore
    from worker.transport.callbacks import OutboxDispatcher

    timings: dict[str, float] = {}

    def timed(owner: Any, attr: str, key: str) -> Callable[[], None]:
        original = getattr(owner, attr)

        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return await original(*args, **kwargs)
            finally:
                timings[key] = round(timings.get(key, 0.0) + time.perf_counter() - t0, 4)

        setattr(owner, attr, wrapper)
        return lambda: setattr(owner, attr, original)

    undo = [
        timed(SqliteStore, "open", "store_open_s"),
        timed(SqliteStore, "count", "store_count_s"),
        timed(SqliteStore, "live_executions", "live_executions_s"),
        timed(Recovery, "run", "recovery_run_s"),
        timed(OutboxDispatcher, "start", "outbox_start_s"),
    ]
    config = load_config(
        {
            "nats_url": url,
            "data_dir": str(data_dir),
            "node_id": node_id,
            "subject_prefix": prefix,
            "limit_total_cpu": "10000",
            "limit_total_memory": "10Ti",
            "log_level": "warning",
        },
        {},
    )
    node = Node(config=config, nats_url=url, create_callback_stream=True)
    quiet = logging.getLogger("worker")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the limits warning, as printed by every bench node
    try:
        t0 = time.perf_counter()
        await node.start()
        timings["node_start_s"] = round(time.perf_counter() - t0, 4)
        await node.close()
    finally:
        quiet.setLevel(level)
        for u in undo:
            u()
    return timings
