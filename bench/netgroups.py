"""The groups measured over NATS against node processes: bid round trip and AskForBid
throughput (``--sync normal`` and ``full``), noop jobs end to end, and the fan-out to ten
nodes; each node measurement next to its echo baseline, in every repetition."""

from __future__ import annotations

import asyncio
import os
import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench import netbench as nb
from bench import wire
from bench.load import INFLIGHT
from bench.procs import CpuMeter, Echo, NodeProc
from bench.report import median

if TYPE_CHECKING:
    from bench.run import Run


async def bid_group(run: Run, sync: str) -> None:
    assert run.nc is not None
    p = run.plan
    node = run.node(f"bid-{sync}", "bench", sync)
    await node.start()
    run.log(f"bid/{sync}: node {node.node_id} up in {node.startup_s:.2f} s")
    try:
        for rep in range(p.reps):
            run.log(f" rep {rep + 1}/{p.reps}")
            await run.echo_seq(f"bid.{sync}.echo_seq")
            client = nb.NodeClient(run.nc, prefix="bench", node_id=node.node_id, tag=f"s{rep}")
            await run.measured(
                f"bid.{sync}.node_seq",
                run.pids(node=node.pid),
                partial(nb.sequential, client.bid_op(), n=p.seq_n, warmup=p.seq_warmup, max_s=60),
            )
            _fix_counters(run, f"bid.{sync}.node_seq", client)
            if sync == "normal":
                await run.echo_seq("bid.normal.echo_seq_noheaders", headers=False)
            await run.echo_c64(f"bid.{sync}.echo_c64")
            if sync == "normal":
                await run.echo_c64("bid.normal.echo_c64_noheaders", headers=False)
            client = nb.NodeClient(run.nc, prefix="bench", node_id=node.node_id, tag=f"c{rep}")
            await run.measured(
                f"bid.{sync}.node_c64",
                run.pids(node=node.pid),
                partial(
                    nb.concurrent,
                    client.bid_op(),
                    inflight=INFLIGHT,
                    duration=p.c64_s,
                    warmup=p.c64_warmup_s,
                    max_ops=10**7,
                ),
            )
            _fix_counters(run, f"bid.{sync}.node_c64", client)
            run.record(f"bid.{sync}.wal", wal_size(node.data_dir))
    finally:
        await run.stop_node(node)


def _client(run: Run, node: NodeProc, tag: str) -> nb.NodeClient:
    assert run.nc is not None
    return nb.NodeClient(run.nc, prefix=node.prefix, node_id=node.node_id, tag=tag)


def _fix_counters(run: Run, name: str, client: nb.NodeClient) -> None:
    """Declines and reject latencies of the client that just ran (whole run, warm-up
    included: a decline anywhere means the node was not bidding freely)."""
    entry = run.raw[name][-1]
    c = client.counters
    entry["declines"] = c.declines
    entry["decline_reasons"] = c.decline_reasons
    entry["asked"] = entry["ops"] + entry["skipped"]
    rejects = wire.latency_summary(c.rejects)
    entry["reject_p50_ms"] = rejects["p50_ms"]
    entry["reject_p99_ms"] = rejects["p99_ms"]


async def e2e_group(run: Run) -> None:
    assert run.nc is not None
    p = run.plan
    node = run.node("e2e", "benche2e")
    await node.start()
    run.log(f"e2e: node {node.node_id} up in {node.startup_s:.2f} s")
    router = nb.CallbackRouter(run.nc, "benche2e")
    await router.start()
    try:
        for rep in range(p.reps):
            run.log(f" rep {rep + 1}/{p.reps}")
            run.record("e2e.fs_probe", fs_probe(run.root / f"fs-probe-{rep}"))
            await run.echo_c64("e2e.echo_c64")
            client = _client(run, node, f"e{rep}")
            await run.measured(
                "e2e.node_c64",
                run.pids(node=node.pid),
                partial(
                    nb.concurrent,
                    nb.job_op(client, router),
                    inflight=INFLIGHT,
                    duration=p.e2e_s,
                    warmup=p.c64_warmup_s,
                    max_ops=10**7,
                    drain=40,
                ),
            )
            _fix_counters(run, "e2e.node_c64", client)
            await run.echo_seq("e2e.echo_seq")
            client = _client(run, node, f"q{rep}")
            await run.measured(
                "e2e.node_seq",
                run.pids(node=node.pid),
                partial(
                    nb.sequential,
                    nb.job_op(client, router),
                    n=p.e2e_seq_n,
                    warmup=20,
                    max_s=60,
                ),
            )
            _fix_counters(run, "e2e.node_seq", client)
    finally:
        await router.stop()
        await run.stop_node(node)


def wal_size(data_dir: Path) -> dict[str, Any]:
    """The size of the node's WAL file(s) now (after a 64-in-flight run). Under steady
    writes it used to grow without end (~22 KB per ask+reject); the store now starts it
    over past a threshold, and the file is cut back to 64 MiB when it does."""
    files = list(data_dir.rglob("*.db-wal"))
    return {"wal_mb": round(sum(f.stat().st_size for f in files) / 1e6, 1), "files": len(files)}


FS_PROBE_JOBS = 300


def fs_probe(folder: Path, jobs: int = FS_PROBE_JOBS) -> dict[str, Any]:
    """What a noop job's results folder costs on the disk of the nodes' data dirs, now:
    PROTOCOL.md §7 makes every job create ``<id>/``, ``<id>/outputs/`` and three small
    files (the executor's ``results.prepare`` and ``write_results``). Measured before
    each e2e repetition: on this VM the same five calls have taken from 50 us to 1.7 ms
    per job, and they run on the node's event loop.

    The folders stay until the run ends: on an ext4 without a journal (this VM's) every
    inode freed in the last minute or more slows each new one down (bench/README.md), so
    deleting them here would slow the next repetition's node."""
    folder.mkdir(parents=True, exist_ok=True)
    t0, c0 = time.perf_counter(), os.times()
    for i in range(jobs):
        job = os.path.join(folder, f"e-{i:06d}")
        os.mkdir(job, 0o700)
        os.mkdir(os.path.join(job, "outputs"), 0o700)
        for name, data in (("stdout", b""), ("stderr", b""), ("exitCode", b"0")):
            fd = os.open(os.path.join(job, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            os.write(fd, data)
            os.close(fd)
    elapsed, c1 = time.perf_counter() - t0, os.times()
    return {
        "jobs": jobs,
        "us_per_job": round(elapsed / jobs * 1e6, 1),
        "sys_us_per_job": round((c1.system - c0.system) / jobs * 1e6, 1),
    }


async def fanout_group(run: Run) -> None:
    assert run.nc is not None
    p = run.plan
    n = p.fanout_nodes
    echoes = [Echo(url=run.url, subject="benchfanecho.all") for _ in range(n)]
    nodes = [run.node(f"fan{i:02d}", "benchfan") for i in range(n)]
    try:
        t0 = time.perf_counter()
        await asyncio.gather(*(e.start() for e in echoes), *(x.start() for x in nodes))
        started = time.perf_counter() - t0
        run.log(
            f"fanout: {n} nodes + {n} echoes up in {started:.1f} s "
            f"(node start-up median {median([x.startup_s for x in nodes]):.2f} s)"
        )
        run.record(
            "fanout.startup",
            {"all_s": round(started, 2), "node_s": [round(x.startup_s, 2) for x in nodes]},
        )
        await _wait_nodes_subscribed(run, nodes, "benchfan")
        echo_fan = nb.FanOut(run.nc, subject="benchfanecho.all", expect=n)
        node_fan = nb.FanOut(
            run.nc,
            subject=f"benchfan.compute._all.{wire.REQUESTER}.AskForBid/v1",
            expect=n,
        )
        await echo_fan.start()
        await node_fan.start()
        ids = wire.JobIds("fan")
        echo_pids = {f"echo{i}": e.pid for i, e in enumerate(echoes)}
        node_pids = {f"node{i}": x.pid for i, x in enumerate(nodes)}
        body = wire.ask_body("j-echo-0")
        k = 0
        for rep in range(p.reps):
            run.log(f" rep {rep + 1}/{p.reps}")
            warm = nb.FanoutResult()
            for _ in range(5):
                k += 1
                await echo_fan.one(k, warm, body)
            result = nb.FanoutResult()
            with CpuMeter({**run.pids(), **echo_pids}) as meter:
                for _ in range(p.fanout_rounds):
                    k += 1
                    await echo_fan.one(k, result, body)
            _fanout_entry(run, "fanout.echo", result, meter, n, echo_pids)
            warm = nb.FanoutResult()
            for _ in range(5):
                k += 1
                await node_fan.one(k, warm, wire.ask_body(ids.next()))
            await nb.reject_all(run.nc, "benchfan", warm.bids)
            result = nb.FanoutResult()
            with CpuMeter({**run.pids(), **node_pids}) as meter:
                for _ in range(p.fanout_rounds):
                    k += 1
                    await node_fan.one(k, result, wire.ask_body(ids.next()))
            with CpuMeter({**run.pids(), **node_pids}) as reject_meter:
                failures = await nb.reject_all(run.nc, "benchfan", result.bids)
            entry = _fanout_entry(run, "fanout.node", result, meter, n, node_pids)
            entry["reject_failures"] = failures
            entry["reject_cpu"] = reject_meter.summary(len(result.bids))
        await echo_fan.stop()
        await node_fan.stop()
    finally:
        await asyncio.gather(
            *(e.stop() for e in echoes),
            *(run.stop_node(x) for x in nodes),
            return_exceptions=True,
        )


async def _wait_nodes_subscribed(run: Run, nodes: list[NodeProc], prefix: str) -> None:
    """Each node printed NODE_ID after subscribing; one NodeInfo round trip each
    makes sure the broker routes to all of them before the first fan-out."""
    assert run.nc is not None
    for x in nodes:
        subject = f"{prefix}.compute.{x.node_id}.{wire.REQUESTER}.NodeInfo/v1"
        await run.nc.request(subject, b"", timeout=10)


def _fanout_entry(
    run: Run,
    name: str,
    result: nb.FanoutResult,
    meter: CpuMeter,
    n: int,
    pids: dict[str, int],
) -> dict[str, Any]:
    rounds = len(result.rank_times)
    ranks: dict[str, float] = {}
    for r in (1, n // 2, n):
        col = sorted(x[r - 1] for x in result.rank_times if len(x) >= r)
        ranks[f"rank{r}_p50_ms"] = round(wire.percentile(col, 50) * 1e3, 3)
    responders_cpu = sum(meter.used[k] for k in pids)
    summary = wire.latency_summary(result.times_to_all)
    entry: dict[str, Any] = {
        "rounds": rounds,
        "incomplete": result.incomplete,
        "declines": result.declines,
        "errors": result.errors,
        **summary,
        **ranks,
        "cpu": meter.summary(rounds),
        "responders_cpu_us_per_reply": round(1e6 * responders_cpu / max(1, rounds * n), 1),
        # If the 2 cores were busy only with this, the fan-out could not end sooner.
        "cpu_floor_ms": round(1e3 * sum(meter.used.values()) / max(1, rounds) / 2, 3),
    }
    run.record(name, entry)
    run.log(
        f"  {name:<28} {rounds} rounds  all-{n} p50 {summary['p50_ms']:.2f} ms "
        f"p99 {summary['p99_ms']:.2f} ms  first p50 {ranks['rank1_p50_ms']:.2f} ms  "
        f"responder CPU {entry['responders_cpu_us_per_reply']} µs/reply  "
        f"foreign {entry['cpu']['foreign_cores']}"
    )
    return entry
