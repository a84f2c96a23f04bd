"""``python -m bench walmap SCENARIO``: which tables and indexes the node's commits write.

One node under one load (``ask``: ask + reject, or ``e2e``: noop jobs, 64 in flight) with
its WAL checkpoints off, so that every page the commits wrote stays in the WAL. After a
warm-up (the tables get some depth), the frames the measured operations appended are read
from the WAL and each page number is mapped to its B-tree with SQLite's ``dbstat``. Every
frame is a page write on the event loop at commit, and one more when a checkpoint copies
it: fewer pages per operation is less work and less I/O.

The two changes this found: the job in every execution document (a row that big takes a
page of its own, rewritten by each update) and the outbox keyed on random execution IDs
(a random leaf per row); see ``worker/store/migrations/0005`` and ``0006``.
"""

from __future__ import annotations

import asyncio
import collections
import os
import shutil
import sqlite3
import struct
import tempfile
from pathlib import Path

import nats

from bench import netbench as nb
from bench.procs import NatsServer, NodeProc, remove_tree

# The node, with the PASSIVE/RESTART checkpoints of worker.store.sqlite_wal never due.
NO_CHECKPOINTS = (
    "import sys; import worker.store.sqlite_wal as w; w.CHECKPOINT_INTERVAL = 1e9;"
    " from worker.cli import main; sys.argv[0] = 'worker'; main()"
)
_WAL_HEADER = 32
_FRAME_HEADER = 24


def wal_frames(wal: bytes, start: int) -> tuple[int, list[int], int]:
    """(page size, page numbers of the frames at or after byte ``start``, commits among
    them) of a WAL file's contents."""
    if len(wal) < _WAL_HEADER:
        return 0, [], 0
    page_size = struct.unpack(">I", wal[8:12])[0]
    pages: list[int] = []
    commits = 0
    offset = _WAL_HEADER
    while offset + _FRAME_HEADER + page_size <= len(wal):
        page, size_after_commit = struct.unpack(">II", wal[offset : offset + 8])
        if offset >= start:
            pages.append(page)
            commits += size_after_commit != 0
        offset += _FRAME_HEADER + page_size
    return page_size, pages, commits


def owners(db: Path) -> dict[int, str]:
    """Page number → the table or index it belongs to (``dbstat``), reading the WAL too."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return {page: name for name, page in conn.execute("SELECT name, pageno FROM dbstat")}
    finally:
        conn.close()


def table(pages: list[int], owner: dict[int, str], ops: int) -> list[tuple[str, float]]:
    counts = collections.Counter(owner.get(p, "(freed since)") for p in pages)
    return [(name, n / ops) for name, n in counts.most_common()]


async def walmap(scenario: str, *, ops: int, warmup: int, tree: str, out: Path) -> int:
    root = Path(tempfile.mkdtemp(prefix="bench-walmap-"))
    server = NatsServer(root / "nats")
    url = server.start()
    node = NodeProc(
        url=url,
        data_dir=root / "n",
        node_id=f"bench-walmap-{os.getpid()}",
        prefix="benchwal",
        pythonpath=tree,
        python_code=NO_CHECKPOINTS,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        await node.start()
        nc = await nats.connect(url, pending_size=64 * 1024 * 1024)
        client = nb.NodeClient(nc, prefix="benchwal", node_id=node.node_id, tag="w")
        router = nb.CallbackRouter(nc, "benchwal")
        await router.start()
        op = client.bid_op() if scenario == "ask" else nb.job_op(client, router)
        wal = node.data_dir / "worker.db-wal"
        print(f"  warm-up: {warmup} {scenario} operations", flush=True)
        await nb.concurrent(op, inflight=64, duration=600, warmup=0, max_ops=warmup)
        await asyncio.sleep(0.5)  # the last callbacks' deliveries are committed
        start = wal.stat().st_size
        print(f"  measured: {ops} {scenario} operations", flush=True)
        result = await nb.concurrent(op, inflight=64, duration=600, warmup=0, max_ops=ops)
        await asyncio.sleep(0.5)
        snapshot = root / "snapshot"
        snapshot.mkdir()
        shutil.copy(node.data_dir / "worker.db", snapshot / "worker.db")
        shutil.copy(wal, snapshot / "worker.db-wal")
        await router.stop()
        await nc.close()
        page_size, pages, commits = wal_frames((snapshot / "worker.db-wal").read_bytes(), start)
        if not pages:
            raise SystemExit("no WAL frames were written: were checkpoints really off?")
        done = result.ops
        lines = [
            f"walmap {scenario}: {done} operations, {len(pages)} WAL frames of {page_size} B,"
            f" {commits} commits ({done / max(commits, 1):.1f} operations per commit)",
            f"pages per operation: {len(pages) / done:.2f}"
            f" ({len(pages) * (page_size + _FRAME_HEADER) / done / 1024:.1f} KiB of WAL)",
        ]
        lines += [
            f"  {name:34s} {per_op:6.2f}"
            for name, per_op in table(pages, owners(snapshot / "worker.db"), done)
        ]
        text = "\n".join(lines) + "\n"
        out.write_text(text)
        print(text + f"written to {out}")
    finally:
        await node.stop()
        server.stop()
        remove_tree(root)  # marked: a run right after waits for the disk
    return 0
