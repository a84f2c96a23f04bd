"""``worker submit JOB``: ask for bids, accept one, follow the job to its end."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer

from schemas.compute import AskForBidResponse
from schemas.compute import ExecutionState as S
from schemas.job import Job
from schemas.node import LogChunk
from worker import durations
from worker.cli_common import (
    EXIT_CANCELLED,
    EXIT_FAILED,
    EXIT_NO_BID,
    EXIT_OK,
    EXIT_USAGE,
    ClientOptions,
    CommandError,
    client_command,
    fail,
    print_json,
    run,
    stderr_console,
    stdout_console,
)
from worker.cli_jobs import Pick, bids_json, bids_table, chooser, load_job

if TYPE_CHECKING:
    from worker.cli_client import Session
    from worker.cli_track import Outcome

LOG_GRACE = 10.0  # seconds the log stream may lag behind the end of the run


@dataclass
class Placed:
    node: str
    execution_id: str
    bids: list[AskForBidResponse]
    errors: list[Any]


def emit_log(json_out: bool) -> Any:
    """A LogChunk printer: stdout/stderr data as written, or JSON lines."""

    def emit(chunk: LogChunk) -> None:
        if json_out:
            print_json(
                {"event": "log", "Stream": chunk.Stream, "Offset": chunk.Offset, "Data": chunk.Data}
            )
            return
        stream = sys.stderr if chunk.Stream == "stderr" else sys.stdout
        stream.write(chunk.Data)
        stream.flush()

    return emit


@client_command
def submit(
    job: Annotated[
        Path,
        typer.Argument(
            metavar="JOB",
            show_default=False,
            help="A Bacalhau v0.3.25 job spec, YAML or JSON (by its .json name), as is. "
            "A fresh Metadata.ID is added when it has none.",
        ),
    ],
    node: Annotated[
        str,
        typer.Option(
            "--node", show_default=False, metavar="ID", help="Ask only this node for a bid."
        ),
    ] = "",
    fanout: Annotated[
        bool,
        typer.Option("--fanout", show_default=False, help="Ask every node at once (the default)."),
    ] = False,
    pick: Annotated[
        Pick,
        typer.Option(
            "--pick",
            show_default=False,
            help="Which bid to accept: fastest (lowest estimated start, then price), "
            "cheapest (lowest price, then start) or first (first to arrive); default: fastest.",
        ),
    ] = Pick.FASTEST,
    wait: Annotated[
        bool,
        typer.Option(
            "--wait",
            show_default=False,
            help="Follow the job to its end, accept its result; exit code says how.",
        ),
    ] = False,
    logs: Annotated[
        bool,
        typer.Option(
            "--logs",
            show_default=False,
            help="Print the job's stdout/stderr as written (implies --wait).",
        ),
    ] = False,
    download: Annotated[
        Path | None,
        typer.Option(
            "--download",
            show_default=False,
            metavar="DIR",
            help="Fetch the published result (Local or ObjectStore) into DIR/<execution ID> "
            "(implies --wait).",
        ),
    ] = None,
    bid_timeout: Annotated[
        str,
        typer.Option(
            "--bid-timeout",
            show_default=False,
            metavar="DURATION",
            help="Longest wait for bids (default: 2s).",
        ),
    ] = "2s",
    wait_timeout: Annotated[
        str,
        typer.Option(
            "--wait-timeout",
            show_default=False,
            metavar="DURATION",
            help="Give up waiting for the end after this (default: 0, never).",
        ),
    ] = "0s",
    callbacks: Annotated[
        str,
        typer.Option(
            "--callbacks",
            show_default=False,
            metavar="jetstream|core",
            help="How the nodes deliver callbacks (as their --callbacks; default: jetstream).",
        ),
    ] = "jetstream",
    max_download: Annotated[
        str,
        typer.Option(
            "--max-download",
            show_default=False,
            metavar="SIZE",
            help="Largest result fetched (default: 10Gi).",
        ),
    ] = "10Gi",
    *,
    client: ClientOptions,
) -> None:
    """Submit a job: a table of the bids (node, price, estimated start, or why it
    declined), accept the pick, reject the rest; with --wait a live status through the
    states until the job ends.

    With --json, stdout carries JSON lines: {"event": "bids"}, {"event": "accepted"},
    {"event": "state"}, {"event": "log"} and {"event": "result"}.

    Exit codes: 0 placed (without --wait) or Completed, 1 Failed (or a request or the
    download failed), 2 usage, 3 no bid, 4 Cancelled, 6 broker unreachable, 130 Ctrl-C.
    """
    if node and fanout:
        fail("--node and --fanout exclude each other", EXIT_USAGE)
    if callbacks not in ("jetstream", "core"):
        fail(f"--callbacks: expected jetstream or core, got {callbacks!r}", EXIT_USAGE)
    from worker.capacity.parse import ResourceParseError, parse_bytes

    try:
        limit = parse_bytes(max_download, field="--max-download")
        timeouts = durations.parse(bid_timeout), durations.parse(wait_timeout)
    except (ValueError, ResourceParseError) as exc:
        fail(str(exc), EXIT_USAGE)
    try:
        spec = load_job(job, client.requester_id)
    except CommandError as exc:
        fail(str(exc), exc.code)
    flow = _Submit(client, spec, pick, wait or logs or download is not None, logs, download, limit)
    mode: Literal["jetstream", "core"] = "core" if callbacks == "core" else "jetstream"
    run(flow.main(node, mode, timeouts[0], timeouts[1]))


def _no_bid(bids: list[AskForBidResponse], errors: list[Any], bid_timeout: float) -> str:
    if not bids and not errors:
        return f"no bid: no node answered within {durations.format(bid_timeout)}"
    if offers := sum(1 for b in bids if b.Accepted):
        return f"no bid: {offers} bids could not be accepted"
    return f"no bid: {len(bids)} declined, {len(errors)} refused the job"


class _Submit:
    def __init__(
        self,
        client: ClientOptions,
        job: Job,
        pick: Pick,
        wait: bool,
        logs: bool,
        download: Path | None,
        max_bytes: int,
    ) -> None:
        self.client, self.job, self.pick = client, job, pick
        self.wait, self.logs, self.download, self.max_bytes = wait, logs, download, max_bytes
        self.out, self.err = stdout_console(), stderr_console()

    async def main(
        self, node: str, mode: Literal["jetstream", "core"], bid_timeout: float, wait_timeout: float
    ) -> int:
        from worker.cli_client import session

        async with session(self.client, callbacks=mode if self.wait else None) as s:
            placed = await self.place(s, node, bid_timeout)
            accepted = {"NodeID": placed.node, "ExecutionID": placed.execution_id}
            if self.client.json:
                print_json({"event": "accepted", **accepted, "JobID": self.job.Metadata.ID})
            else:
                self.err.print(
                    f"Accepted {placed.execution_id} on {placed.node} (job {self.job.Metadata.ID})"
                )
            if not self.wait:
                return EXIT_OK
            try:
                async with asyncio.timeout(wait_timeout or None):
                    return await self.follow(s, placed)
            except asyncio.CancelledError:
                self.err.print(
                    f"Stopped waiting; {placed.execution_id} goes on. Stop it with: "
                    f"worker executions cancel {placed.execution_id} --node {placed.node}"
                )
                raise
            except TimeoutError:
                raise CommandError(
                    f"{placed.execution_id} did not end within {durations.format(wait_timeout)}"
                ) from None

    async def place(self, s: Session, node: str, bid_timeout: float) -> Placed:
        from worker.cli_client import discover
        from worker.requester import Bids, PlacementError

        bids: Bids
        chosen = ""
        with self.err.status("Asking for bids…"):
            if node:
                bids = Bids()
                bids.append(await s.requester.ask(node, self.job, timeout=bid_timeout))
                bid = chooser(self.pick)(bids)
                if bid is not None:
                    await s.requester.accept(bid.NodeID or node, bid.ExecutionID)
                    chosen = bid.ExecutionID
            else:
                found = await discover(s.nc, self.client.prefix, self.client.discover_timeout)
                expected = set(found.node_ids) or None
                try:
                    placement = await s.requester.place(
                        self.job, choose=chooser(self.pick), deadline=bid_timeout, expected=expected
                    )
                    bids, chosen = placement.bids, placement.execution_id
                except PlacementError as exc:
                    bids = Bids()
                    bids.extend(exc.bids)
                    # The error replies, when PlacementError carries them (see the report).
                    bids.errors.extend(getattr(exc, "errors", None) or [])
        errors = list(bids.errors)
        if self.client.json:
            print_json(bids_json(bids, errors, chosen))
        else:
            self.out.print(bids_table(bids, errors, chosen))
        if not chosen:
            raise CommandError(_no_bid(bids, errors, bid_timeout), EXIT_NO_BID)
        bid = next(b for b in bids if b.ExecutionID == chosen)
        return Placed(bid.NodeID or node, chosen, list(bids), errors)

    async def follow(self, s: Session, placed: Placed) -> int:
        from worker.cli_client import stream_logs
        from worker.cli_track import download, drive

        started = time.monotonic()
        log_task = None
        if self.logs:
            log_task = asyncio.create_task(
                stream_logs(
                    s,
                    placed.node,
                    placed.execution_id,
                    follow=True,
                    tail=None,
                    emit=emit_log(self.client.json),
                )
            )
        try:
            with self.err.status(f"{placed.execution_id}: waiting…") as status:

                def on_state(state: S) -> None:
                    took = durations.format(round(time.monotonic() - started, 1))
                    if self.client.json:
                        print_json({"event": "state", "State": state.value})
                    else:
                        self.err.print(f"  {state.value} [dim]({took})[/]")
                    status.update(f"{placed.execution_id} on {placed.node}: {state.value}…")

                outcome = await drive(
                    s.requester, placed.node, placed.execution_id, on_state=on_state
                )
            if log_task is not None:  # the stream ends with the run: let it catch up
                await asyncio.wait({log_task}, timeout=LOG_GRACE)
        finally:
            if log_task is not None:
                log_task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await log_task
        where = None
        if self.download is not None and outcome.state is S.COMPLETED:
            spec = outcome.published
            if spec is None or spec.StorageSource is None:
                raise CommandError("the job published nothing to download (publisher Noop?)")
            with self.err.status("Downloading the result…"):
                where = await download(
                    s.nc, spec, placed.execution_id, self.download, max_bytes=self.max_bytes
                )
        self.report(placed, outcome, where, time.monotonic() - started)
        return {S.COMPLETED: EXIT_OK, S.CANCELLED: EXIT_CANCELLED}.get(outcome.state, EXIT_FAILED)

    def report(self, placed: Placed, outcome: Outcome, where: Path | None, took: float) -> None:
        from schemas.codec import to_builtins

        run_result = outcome.run
        exit_code = run_result.exitCode if run_result is not None else None
        if self.client.json:
            print_json(
                {
                    "event": "result",
                    "NodeID": placed.node,
                    "ExecutionID": placed.execution_id,
                    "JobID": self.job.Metadata.ID,
                    "State": outcome.state.value,
                    "ExitCode": exit_code,
                    "RunCommandResult": to_builtins(run_result),
                    "PublishResult": to_builtins(outcome.published),
                    "Error": outcome.error,
                    "Downloaded": str(where) if where is not None else None,
                }
            )
            return
        if run_result is not None and not self.logs and run_result.stdout:
            sys.stdout.write(run_result.stdout)
            sys.stdout.flush()
        line = (
            f"{placed.execution_id}: {outcome.state.value} after {durations.format(round(took, 1))}"
        )
        if exit_code is not None:
            line += f", exit code {exit_code}"
        if outcome.error:
            line += f": {outcome.error}"
        self.err.print(line, markup=False)
        if outcome.published is not None and outcome.published.URL:
            self.err.print(f"Result: {outcome.published.URL}", markup=False)
        if where is not None:
            self.err.print(f"Downloaded to {where}", markup=False)
