"""One benchmark run: start the processes, measure each group with its baseline next to
it, repeat, take medians, judge against the issue's targets, print and save.

Groups, in order (each node group on a fresh data dir):

  bid/normal, bid/full   echo seq → node bid RTT; echo c64 → node AskForBid c64 (per rep)
  e2e                    echo c64 → noop jobs c64; echo seq → noop job latency (per rep)
  fanout                 10 echo processes vs 10 nodes: time until all 10 replies are in
  store                  in-process: raw aiosqlite anchor vs SqliteStore transitions
  memory                 RSS of a node before/after 2 × 5,000 noop jobs driven to Completed
  recovery               start-up of a node on an empty data dir vs one holding 100,000
                         executions (5 % live), their deadlines ahead and (recovery late)
                         all passed; and Recovery.run timed in-process

After an earlier run's clean-up less than SETTLE_S ago (ext4 without a journal), e2e moves
to just before recovery and waits until then: see Run.settle and bench/README.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client

from bench import netbench as nb
from bench import netgroups, stategroups, wire
from bench.figures import figures
from bench.load import INFLIGHT, LoadResult
from bench.procs import (
    CLEANUP_MARK,
    SETTLE_S,
    CpuMeter,
    Echo,
    NatsServer,
    NodeProc,
    loadavg,
    remove_tree,
)
from bench.report import table, write

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Plan:
    quick: bool
    reps: int
    seq_n: int
    seq_warmup: int
    c64_s: float
    c64_warmup_s: float
    e2e_s: float
    e2e_seq_n: int
    fanout_rounds: int
    fanout_nodes: int
    store_s: float
    memory_jobs: int
    memory_max_s: float
    recovery_total: int
    recovery_reps: int

    @staticmethod
    def make(quick: bool) -> Plan:
        if quick:
            return Plan(
                quick=True,
                reps=1,
                seq_n=400,
                seq_warmup=50,
                c64_s=1.5,
                c64_warmup_s=0.5,
                e2e_s=2.0,
                e2e_seq_n=60,
                fanout_rounds=20,
                fanout_nodes=10,
                store_s=1.0,
                memory_jobs=600,
                memory_max_s=20,
                recovery_total=5_000,
                recovery_reps=1,
            )
        return Plan(
            quick=False,
            reps=3,
            seq_n=2000,
            seq_warmup=200,
            c64_s=5.0,
            c64_warmup_s=1.0,
            e2e_s=6.0,
            e2e_seq_n=300,
            fanout_rounds=100,
            fanout_nodes=10,
            store_s=3.0,
            memory_jobs=5_000,
            memory_max_s=120,
            recovery_total=100_000,
            recovery_reps=3,
        )


class Run:
    def __init__(
        self, plan: Plan, *, tree: str, code_hash: str, log: Callable[[str], None]
    ) -> None:
        self.plan = plan
        self.tree = tree  # PYTHONPATH of the nodes: the run's copy of worker/ and schemas/
        self.code_hash = code_hash
        self.log = log
        self.root = Path(tempfile.mkdtemp(prefix="bench-run-"))
        self.server = NatsServer(self.root / "nats")
        self.url = ""
        self.nc: Client | None = None
        self.echo: Echo | None = None
        self.raw: dict[str, list[dict[str, Any]]] = {}
        self.started = datetime.now(UTC)
        self.since_cleanup: float | None = None  # see since_cleanup()
        self.settle_until: float | None = None  # e2e waits until then (time.time())
        self.settle_waited_s = 0.0

    # -- plumbing ------------------------------------------------------------------------
    def record(self, name: str, entry: dict[str, Any]) -> None:
        self.raw.setdefault(name, []).append(entry)

    def pids(self, **more: int) -> dict[str, int]:
        pids = {"bench": os.getpid(), "nats-server": self.server.pid}
        if self.echo is not None and self.echo.proc is not None:
            pids["echo"] = self.echo.pid
        return {**pids, **more}

    def node(self, name: str, prefix: str, sync: str = "normal") -> NodeProc:
        return NodeProc(
            url=self.url,
            data_dir=self.root / name,
            node_id=f"bench-{name}-{os.getpid()}",
            prefix=prefix,
            sync=sync,
            pythonpath=self.tree,
        )

    async def measured(
        self,
        name: str,
        pids: dict[str, int],
        body: Callable[..., Awaitable[LoadResult]],
        **extra: Any,
    ) -> LoadResult:
        """Run the load ``body(window=meter)``; the CPU is measured over its window only
        (after the warm-up, before the drain), the window its ``ops`` were counted in."""
        with CpuMeter(pids) as meter:
            result = await body(window=meter)
        entry: dict[str, Any] = {
            "ops": result.ops,
            "rate": round(result.rate, 1),
            "errors": result.errors,
            "skipped": result.skipped,
            "first_error": result.first_error,
            **wire.latency_summary(result.latencies),
            "cpu": meter.summary(result.ops),
            **extra,
        }
        self.record(name, entry)
        self.log(
            f"  {name:<28} {result.ops:>7} ops  {result.rate:>9.1f}/s  "
            f"p50 {entry['p50_ms']:.3f} ms  p99 {entry['p99_ms']:.3f} ms  "
            f"err {result.errors}  foreign {entry['cpu']['foreign_cores']} cores"
        )
        return result

    async def settle(self) -> None:
        """Wait until ``settle_until``: the e2e figure would otherwise measure the inodes an
        earlier run deleted (see since_cleanup)."""
        if self.settle_until is None:
            return
        t0 = time.time()
        while (left := self.settle_until - time.time()) > 0:
            self.log(
                f"e2e: waiting {left:.0f} s more for the disk to settle after the previous"
                " run's clean-up (--no-settle skips this)"
            )
            await asyncio.sleep(min(left, 30))
        self.settle_waited_s = round(time.time() - t0, 1)

    # -- the baseline ----------------------------------------------------------------------
    async def echo_seq(self, name: str, headers: bool = True) -> None:
        assert self.nc is not None
        p = self.plan
        op = nb.echo_op(self.nc, "benchecho.x", wire.ask_body("j-echo-0"), wire.Headers(headers))
        await self.measured(
            name, self.pids(), partial(nb.sequential, op, n=p.seq_n, warmup=p.seq_warmup, max_s=30)
        )

    async def echo_c64(self, name: str, headers: bool = True) -> None:
        assert self.nc is not None
        p = self.plan
        op = nb.echo_op(self.nc, "benchecho.x", wire.ask_body("j-echo-0"), wire.Headers(headers))
        await self.measured(
            name,
            self.pids(),
            partial(
                nb.concurrent,
                op,
                inflight=INFLIGHT,
                duration=p.c64_s,
                warmup=p.c64_warmup_s,
                max_ops=10**7,
            ),
        )

    # -- groups ----------------------------------------------------------------------------
    async def stop_node(self, node: NodeProc) -> None:
        code = await node.stop()
        if code not in (0, -15):
            self.log(f"  node {node.node_id} exited {code}: {node.stderr_tail(600)}")

    # -- whole run -------------------------------------------------------------------------
    async def execute(self, only: set[str] | None) -> None:
        self.url = self.server.start()
        try:
            self.nc = await nats.connect(
                self.url,
                name="bench-load",
                pending_size=64 * 1024 * 1024,
                max_reconnect_attempts=3,
            )
            self.echo = Echo(url=self.url, subject="benchecho.>")
            await self.echo.start()
            groups: list[tuple[str, Callable[[], Awaitable[None]]]] = [
                ("bid", lambda: netgroups.bid_group(self, "normal")),
                ("bidfull", lambda: netgroups.bid_group(self, "full")),
                ("e2e", lambda: netgroups.e2e_group(self)),
                ("fanout", lambda: netgroups.fanout_group(self)),
                ("store", lambda: stategroups.store_group(self)),
                ("memory", lambda: stategroups.memory_group(self)),
                ("recovery", lambda: stategroups.recovery_group(self)),
            ]
            if self.settle_until is not None:
                # e2e as late as it can be, the time the groups before it take (they delete
                # few inodes), but before recovery, which copies and deletes GBs of stores.
                late = {"e2e": 1, "recovery": 2}
                groups.sort(key=lambda g: late.get(g[0], 0))
            for name, group in groups:
                if only and name not in only:
                    continue
                if name == "e2e":
                    await self.settle()
                t0 = time.perf_counter()
                self.record("timing", {"group": name, "start_load": loadavg()})
                await group()
                self.raw["timing"][-1]["seconds"] = round(time.perf_counter() - t0, 1)
        finally:
            if self.echo is not None:
                await self.echo.stop()
            if self.nc is not None:
                with contextlib.suppress(Exception):
                    await self.nc.close()
            self.server.stop()
            remove_tree(self.root)  # and mark it, for the next run's settle wait


# --- meta -------------------------------------------------------------------------------


def _git(*args: str, cwd: Path) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def revision(source: str) -> tuple[Path, str, str]:
    """(the measured tree, its git revision, its uncommitted changes to worker/ and
    schemas/), read when the run starts: the code was copied then, and commits made
    during a run must not relabel it."""
    if source.startswith("git:"):
        return REPO, _git("rev-parse", "--short", source[4:], cwd=REPO), ""
    where = Path(source).resolve() if source else REPO
    rev = _git("rev-parse", "--short", "HEAD", cwd=where)
    return where, rev, _git("status", "--porcelain", "--", "worker", "schemas", cwd=where)


def meta(
    run: Run, source: str, code_hash: str, started: float, measured: tuple[Path, str, str]
) -> dict[str, Any]:
    where, rev, dirty = measured
    nats_version = subprocess.run(
        [str(Path(sys.executable).parent / "nats-server"), "--version"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "started": run.started.isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - started, 1),
        "quick": run.plan.quick,
        "plan": asdict(run.plan),
        "worker_tree": source if source.startswith("git:") else str(where),
        "worker_code_hash": code_hash,  # of the copy of worker/ + schemas/ that was measured
        "worker_rev": (rev + "+dirty" if dirty else rev) if rev else "(not a git tree)",
        "python": sys.version.split()[0],
        # Which build: one 3.11 differs from another by ~7 % in CPU per job (README).
        "python_build": f"{os.path.realpath(getattr(sys, '_base_executable', sys.executable))}"
        f" ({platform.python_compiler()}, {' '.join(platform.python_build())})",
        "nats_server": nats_version,
        "host": {
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
            "kernel": platform.release(),
        },
        "loadavg_end": loadavg(),
        "data_fs": data_fs(run.root),
        "since_previous_cleanup_s": run.since_cleanup,  # None: none in the last SETTLE_S
        "e2e_settle_wait_s": run.settle_waited_s,
    }


def since_cleanup(root: Path) -> float | None:
    """Seconds since an earlier run, profile or walmap deleted its temp dir beside
    ``root``; None when that was SETTLE_S or more ago (or never)."""
    try:
        age = time.time() - float((root.parent / CLEANUP_MARK).read_text())
    except (OSError, ValueError):
        return None
    return round(age) if 0 <= age < SETTLE_S else None


def data_fs(path: Path) -> str:
    """The file system the nodes' data dirs are on, as /proc/mounts has it, and for ext4
    whether it has a journal: without one, inode allocation slows down after deletions
    (bench/README.md, "The disk under the e2e figure")."""
    try:
        mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return "unknown"
    where = str(path.resolve())
    best: list[str] = []
    for m in mounts:  # the longest mount point holding the path
        inside = len(m) >= 4 and (where == m[1] or where.startswith(m[1].rstrip("/") + "/"))
        if inside and (not best or len(m[1]) > len(best[1])):
            best = m
    if not best:
        return "unknown"
    device, mount, kind, options = best[:4]
    text = f"{kind} on {device} at {mount} ({options})"
    if kind == "ext4":
        journal = Path("/sys/fs/ext4") / Path(device).name / "journal_task"
        with contextlib.suppress(OSError):
            text += ", no journal" if "<none>" in journal.read_text() else ", journal"
    return text


async def main(
    *,
    quick: bool,
    out: Path,
    only: set[str] | None,
    tree: str,
    source: str,
    code_hash: str,
    settle: bool = True,
) -> int:
    plan = Plan.make(quick)
    t0 = time.perf_counter()
    measured = revision(source)

    def log(line: str) -> None:
        print(line, flush=True)

    run = Run(plan, tree=tree, code_hash=code_hash, log=log)
    log(
        f"bench: {'quick' if quick else 'full'} run, temp dir {run.root}, "
        f"load average {loadavg():.2f}"
    )
    fs = data_fs(run.root)
    log(f"bench: data dirs on {fs}")
    run.since_cleanup = since_cleanup(run.root)
    if run.since_cleanup is not None and fs.endswith("no journal"):
        if settle and not quick:
            run.settle_until = time.time() + SETTLE_S - run.since_cleanup
            log(
                f"bench: the bench deleted its files {run.since_cleanup:.0f} s ago; on an"
                f" ext4 without a journal new files stay slow for up to {SETTLE_S} s after"
                " that (bench/README.md), so e2e waits until then (and runs late in the run)"
            )
        else:
            log(
                f"bench: WARNING: the bench deleted its files {run.since_cleanup:.0f} s ago;"
                f" on an ext4 without a journal new files stay slow for up to {SETTLE_S} s"
                " after that (bench/README.md), so this run's e2e figure will be low"
            )
    try:
        await run.execute(only)
    finally:
        figs = figures(run.raw, plan)
        m = meta(run, source, code_hash, t0, measured)
        write(out, m, figs, run.raw)
        log("")
        log(table(figs))
        log("")
        log(
            "ratio = value / baseline measured in the same run (medians of "
            f"{plan.reps} repetitions); '*' = measured at a smaller scale than the target"
        )
        log(f"results: {out}  ({m['seconds']} s, worker {m['worker_rev']})")
    return 0
