"""``python -m bench profile SCENARIO``: one node (ten for ``fanout``) under one load while
py-spy samples it from outside. Writes ``<out>.txt`` (collapsed
stacks, for flamegraph.pl or speedscope) and ``<out>.top.txt`` (the functions by inclusive
and own time). With ``--native``, Linux ``perf`` samples the same process at the same
time and ``<out>.native.txt`` says which binaries the CPU time went to (the interpreter,
SQLite, the kernel, msgspec …) and their busiest symbols: where py-spy sees a Python line,
this tells whether it was Python or C work (which another thread could take, off the GIL).

py-spy is not a dependency of the project: ``.venv/bin/pip install py-spy``; ``perf`` comes
from Debian's ``linux-perf``.
Profiled runs are slower than measured ones: use them for where the time goes, not for
figures.
"""

from __future__ import annotations

import asyncio
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nats

from bench import netbench as nb
from bench import wire
from bench.procs import NatsServer, NodeProc, remove_tree

IDLE = ("EpollSelector.select", "_connection_worker_thread (aiosqlite/core.py:59)")


def _py_spy() -> str:
    found = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if found is None:
        raise SystemExit("py-spy not found: .venv/bin/pip install py-spy")
    return found


def _perf() -> str:
    found = shutil.which("perf")
    if found is None:
        raise SystemExit("perf not found (--native): apt-get install linux-perf")
    return found


def native_summary(data: Path, top: int = 30) -> str:
    """``perf report`` of ``data``: the share of each binary, then of each symbol."""
    perf = _perf()

    def report(sort: str, limit: int) -> list[str]:
        done = subprocess.run(
            [perf, "report", "-i", str(data), "--stdio", "-g", "none", "--sort", sort],
            capture_output=True,
            text=True,
            check=True,
        )
        rows = [r for r in done.stdout.splitlines() if r.strip() and not r.startswith("#")]
        return [r.rstrip() for r in rows[:limit]]

    lines = ["== by binary (perf; all threads of the node)", *report("dso", 15)]
    lines += ["", "== by symbol", *report("dso,sym", top)]
    return "\n".join(lines) + "\n"


def summarize(collapsed: Path, top: int = 45) -> str:
    """Inclusive and own share of each frame in py-spy's collapsed output. Frames where a
    thread only waits (epoll, aiosqlite's queue) are listed but are not work."""
    total = 0
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        for frame in set(frames):
            inclusive[frame] += n
        own[frames[-1]] += n
    skip = (
        "threading.py",
        "runpy",
        "typer",
        "click",
        "asyncio/runners.py",
        "worker/cli.py",
        "worker/__main__.py",
    )
    lines = [f"{total} samples; idle frames: {', '.join(IDLE)}", "", "== inclusive"]
    shown = 0
    for frame, n in inclusive.most_common():
        if any(s in frame for s in skip):
            continue
        lines.append(f"{100 * n / total:5.1f}%  {frame}")
        shown += 1
        if shown >= top:
            break
    lines += ["", "== own"]
    for frame, n in own.most_common(30):
        lines.append(f"{100 * n / total:5.1f}%  {frame}")
    return "\n".join(lines) + "\n"


async def profile(
    scenario: str, *, seconds: float, out: Path, tree: str, gil: bool = False, native: bool = False
) -> int:
    spy = _py_spy()
    perf = _perf() if native else ""
    root = Path(tempfile.mkdtemp(prefix="bench-profile-"))
    server = NatsServer(root / "nats")
    url = server.start()
    n = 10 if scenario == "fanout" else 1
    prefix = "benchprof"
    nodes = [
        NodeProc(
            url=url,
            data_dir=root / f"n{i}",
            node_id=f"bench-prof-{i}-{os.getpid()}",
            prefix=prefix,
            pythonpath=tree,
        )
        for i in range(n)
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        await asyncio.gather(*(x.start() for x in nodes))
        nc = await nats.connect(url, pending_size=64 * 1024 * 1024)
        target = nodes[0]
        raw = out.with_suffix(".txt")
        sampler = subprocess.Popen(
            [
                spy,
                "record",
                "--rate",
                "200",
                "--duration",
                str(int(seconds)),
                "--format",
                "raw",
                "--output",
                str(raw),
                "--pid",
                str(target.pid),
                *(("--gil",) if gil else ()),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        perf_data = out.with_suffix(".perf.data")
        recorder = (
            subprocess.Popen(
                # No call graphs: the binary and symbol of each sample are enough, and
                # cheap enough to leave the node's speed as it is.
                [
                    *(perf, "record", "-q", "-F", "499", "-o", str(perf_data)),
                    *("-p", str(target.pid), "--", "sleep", str(int(seconds))),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            if perf
            else None
        )
        await asyncio.sleep(0.5)
        client = nb.NodeClient(nc, prefix=prefix, node_id=target.node_id, tag="p")
        router = nb.CallbackRouter(nc, prefix)
        await router.start()
        end = time.perf_counter() + seconds
        done = 0
        if scenario == "fanout":
            fan = nb.FanOut(
                nc, subject=f"{prefix}.compute._all.{wire.REQUESTER}.AskForBid/v1", expect=n
            )
            await fan.start()
            ids = wire.JobIds("pf")
            k = 0
            while time.perf_counter() < end:
                result = nb.FanoutResult()
                for _ in range(50):
                    k += 1
                    await fan.one(k, result, wire.ask_body(ids.next()))
                await nb.reject_all(nc, prefix, result.bids)
                done += len(result.times_to_all)
            await fan.stop()
        else:
            op = {"ask": client.bid_op(), "seq": client.bid_op(), "e2e": nb.job_op(client, router)}[
                scenario
            ]
            while time.perf_counter() < end:
                if scenario == "seq":
                    r = await nb.sequential(op, n=10**6, warmup=0, max_s=2)
                else:
                    r = await nb.concurrent(op, inflight=64, duration=2, warmup=0, max_ops=10**7)
                done += r.ops
                print(f"  {scenario}: {r.rate:.0f}/s", flush=True)
        sampler.wait(timeout=seconds + 60)
        await router.stop()
        await nc.close()
        top = out.with_suffix(".top.txt")
        top.write_text(summarize(raw))
        print(top.read_text())
        print(f"{done} operations; collapsed stacks {raw} (flamegraph.pl/speedscope), {top}")
        if recorder is not None:
            _, err = recorder.communicate(timeout=seconds + 60)
            if recorder.returncode != 0 or not perf_data.exists():
                problem = err.decode(errors="replace").strip()
                raise SystemExit(f"perf record failed ({recorder.returncode}): {problem}")
            summary = out.with_suffix(".native.txt")
            summary.write_text(native_summary(perf_data))
            print(summary.read_text())
            print(f"native profile {summary} (perf data {perf_data})")
    finally:
        await asyncio.gather(*(x.stop() for x in nodes), return_exceptions=True)
        server.stop()
        remove_tree(root)  # marked: a run right after waits for the disk
    return 0
