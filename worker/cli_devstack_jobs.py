"""The jobs of ``worker devstack``: sample jobs placed and followed concurrently, shown
as a live table of jobs × state (or JSON lines)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rich.live import Live
from rich.table import Table

from worker import durations
from worker.cli_common import EXIT_FAILED, print_json, stderr_console, stdout_console

if TYPE_CHECKING:
    from schemas.compute import AskForBidResponse
    from worker.requester import Requester

DONE = frozenset({"Completed", "Failed", "Cancelled", "NoBid", "Error"})
COLOUR = {"Completed": "green", "Failed": "red", "NoBid": "yellow", "Error": "red"}


@dataclass
class Row:
    job_id: str
    kind: str
    node: str = ""
    execution_id: str = ""
    state: str = "Waiting"
    detail: str = ""
    started: float = 0.0
    took: float = 0.0


def _start(bid: AskForBidResponse) -> float:
    est = bid.EstimatedStartSeconds
    return est if isinstance(est, float | int) else 0.0


class JobBoard:
    """``count`` sample jobs cycling through ``kinds``, at most two per node in flight."""

    def __init__(
        self, *, kinds: list[str], count: int, publisher: str, nodes: list[str], json_out: bool
    ) -> None:
        stamp = time.strftime("%H%M%S")
        self.rows = [
            Row(f"{kinds[i % len(kinds)]}-{stamp}-{i + 1}", kinds[i % len(kinds)])
            for i in range(count)
        ]
        self.publisher = publisher
        self.nodes = nodes
        self.json = json_out
        self.console = stdout_console()
        self.err = stderr_console()
        self.chosen: dict[str, int] = {}  # node → bids accepted there

    async def run(self, requester: Requester) -> None:
        from worker.samples import sample_job

        gate = asyncio.Semaphore(2 * len(self.nodes))

        async def one(row: Row) -> None:
            async with gate:
                job = sample_job(row.kind, row.job_id, publisher=self.publisher)
                try:
                    await self._run_job(requester, row, job)
                except Exception as exc:  # one job's trouble is its row's, not the stack's
                    self._update(row, "Error", detail=str(exc) or repr(exc))

        await asyncio.gather(*(one(r) for r in self.rows))

    async def _run_job(self, requester: Requester, row: Row, job: Any) -> None:
        from worker.cli_track import drive
        from worker.requester import PlacementError

        row.started = time.monotonic()
        self._update(row, "Bidding")
        try:
            placement = await requester.place(
                job, choose=self._spread, deadline=2.0, expected=set(self.nodes)
            )
        except PlacementError as exc:
            reasons = sorted({b.Reason for b in exc.bids if b.Reason})
            self._update(row, "NoBid", detail="; ".join(reasons) or str(exc))
            return
        row.node, row.execution_id = placement.node_id, placement.execution_id
        outcome = await drive(
            requester,
            row.node,
            row.execution_id,
            on_state=lambda s: self._update(row, s.value, final=False),
            poll=0.3,
        )
        detail = outcome.error
        if not detail and outcome.run is not None:
            first = (outcome.run.stdout.strip().splitlines() or [""])[0]
            detail = first or f"exit code {outcome.run.exitCode}"
        if outcome.published is not None and outcome.published.URL:
            detail = f"{detail} → {outcome.published.URL}".strip(" →")
        self._update(row, outcome.state.value, detail=detail)

    def _spread(self, bids: Sequence[AskForBidResponse]) -> AskForBidResponse | None:
        """The bid that starts soonest; among equals, the node chosen least so far."""
        offers = [b for b in bids if b.Accepted and b.ExecutionID]
        bid = min(offers, key=lambda b: (_start(b), self.chosen.get(b.NodeID, 0)), default=None)
        if bid is not None:
            self.chosen[bid.NodeID] = self.chosen.get(bid.NodeID, 0) + 1
        return bid

    def _update(self, row: Row, state: str, *, detail: str = "", final: bool = True) -> None:
        row.state, row.detail = state, detail or row.detail
        row.took = time.monotonic() - row.started if row.started else 0.0
        if self.json and (final or state not in DONE):  # the final update has the detail
            print_json(
                {
                    "event": "job",
                    "JobID": row.job_id,
                    "Sample": row.kind,
                    "NodeID": row.node,
                    "ExecutionID": row.execution_id,
                    "State": state,
                    "Detail": row.detail,
                }
            )
        elif final and state in DONE and not self.console.is_terminal:
            self.err.print(f"{row.job_id}: {state} {row.detail}".rstrip(), markup=False)

    def live(self) -> contextlib.AbstractContextManager[Any]:
        if self.json:
            return contextlib.nullcontext()
        return Live(console=self.console, get_renderable=self.table, refresh_per_second=8)

    def table(self) -> Table:
        done = sum(r.state in DONE for r in self.rows)
        table = Table(title=f"{done}/{len(self.rows)} jobs done", title_justify="left")
        for column in ("JOB", "SAMPLE", "NODE", "EXECUTION", "STATE", "TIME", "OUTPUT"):
            table.add_column(column, no_wrap=column != "OUTPUT")
        for r in self.rows:
            state = f"[{COLOUR[r.state]}]{r.state}[/]" if r.state in COLOUR else r.state
            took = durations.format(round(r.took, 1)) if r.started else ""
            table.add_row(r.job_id, r.kind, r.node, r.execution_id, state, took, r.detail)
        return table

    def summary(self) -> int:
        counts: dict[str, int] = {}
        for r in self.rows:
            counts[r.state] = counts.get(r.state, 0) + 1
        if self.json:
            print_json({"event": "done", "Jobs": len(self.rows), "States": counts})
        else:
            shown = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
            self.err.print(f"All {len(self.rows)} jobs ended: {shown}" if shown else "No jobs.")
        return 0 if all(r.state == "Completed" for r in self.rows) else EXIT_FAILED
