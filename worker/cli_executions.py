"""``worker executions ls|show|logs|cancel|accept|reject``: this requester's executions,
over the node's NATS API (ListExecutions, GetExecution, ExecutionLogs, CancelExecution,
ResultAccepted, ResultRejected). Without ``--node`` the nodes are discovered and asked
together; an execution is looked up on every node."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Group
from rich.table import Table

from worker.cli_common import (
    EXIT_CODES,
    EXIT_FAILED,
    EXIT_USAGE,
    ClientOptions,
    client_command,
    fail,
    print_json,
    run,
    stderr_console,
    stdout_console,
)

if TYPE_CHECKING:
    from schemas.compute import ExecutionSummary
    from schemas.node import ExecutionView

app = typer.Typer(
    help=f"This requester's executions on the nodes. {EXIT_CODES}",
    no_args_is_help=True,
    rich_markup_mode=None,
)

ExecutionArg = Annotated[
    str, typer.Argument(metavar="EXECUTION_ID", help="The execution, e-<uuid>.", show_default=False)
]
NodeOpt = Annotated[
    str,
    typer.Option(
        "--node",
        show_default=False,
        metavar="ID",
        help="The node holding it (default: ask every node).",
    ),
]
ReasonOpt = Annotated[
    str,
    typer.Option(
        "--reason", show_default=False, metavar="TEXT", help="Justification sent with the request."
    ),
]
STATES = (
    "Created",
    "BidAccepted",
    "Running",
    "WaitingVerification",
    "ResultAccepted",
    "Publishing",
    "Completed",
    "Failed",
    "Cancelled",
)


@app.command("ls")
@client_command
def ls(
    node: Annotated[
        list[str] | None,
        typer.Option(
            "--node",
            show_default=False,
            metavar="ID",
            help="Only this node; repeatable (default: all).",
        ),
    ] = None,
    state: Annotated[
        list[str] | None,
        typer.Option(
            "--state",
            show_default=False,
            metavar="STATE",
            help=f"Only these states; repeatable ({', '.join(STATES)}).",
        ),
    ] = None,
    since: Annotated[
        str,
        typer.Option(
            "--since",
            show_default=False,
            metavar="TIME",
            help="Only those updated since (RFC 3339).",
        ),
    ] = "",
    *,
    client: ClientOptions,
) -> None:
    """List this requester's executions: node, execution, job, state."""
    wanted = []
    for name in state or []:
        match = next((s for s in STATES if s.lower() == name.lower()), None)
        if match is None:
            fail(f"--state: unknown state {name!r} (known: {', '.join(STATES)})", EXIT_USAGE)
        wanted.append(match)
    run(_ls(client, node or [], wanted, since))


async def _ls(client: ClientOptions, nodes: list[str], states: list[str], since: str) -> int:
    from worker.cli_client import nodes_or_fail, session

    async with session(client) as s:
        with stderr_console().status("Asking the nodes…"):
            chosen = await nodes_or_fail(s, nodes)

            async def one(node: str) -> list[ExecutionSummary]:
                return [
                    e
                    async for e in s.requester.list_executions(
                        node, states=states, updated_since=since or None
                    )
                ]

            pages = await asyncio.gather(*(one(n) for n in chosen), return_exceptions=True)
    rows: list[tuple[str, ExecutionSummary]] = []
    failed: list[str] = []
    for node, page in zip(chosen, pages, strict=True):
        if isinstance(page, BaseException):
            failed.append(f"{node}: {page}")
            continue
        rows.extend((node, e) for e in page)
    if client.json:
        print_json([{"NodeID": n, **_summary(e)} for n, e in rows])
    else:
        table = Table("NODE", "EXECUTION", "JOB", "STATE")
        for node, e in rows:
            table.add_row(node, e.ExecutionID, e.JobID, e.State.value)
        stdout_console().print(table)
    if failed:
        fail(f"{len(failed)} of {len(chosen)} nodes did not answer: {failed[0]}", EXIT_FAILED)
    return 0


def _summary(e: ExecutionSummary) -> dict[str, str]:
    return {"ExecutionID": e.ExecutionID, "JobID": e.JobID, "State": e.State.value}


@app.command("show")
@client_command
def show(execution_id: ExecutionArg, node: NodeOpt = "", *, client: ClientOptions) -> None:
    """Show one execution: its state, result, history (with causes) and callbacks."""
    run(_show(client, execution_id, node))


async def _show(client: ClientOptions, execution_id: str, node: str) -> int:
    from schemas.codec import to_builtins
    from worker.cli_client import find_execution, session

    async with session(client) as s:
        holder, view = await find_execution(s, execution_id, [node] if node else [])
    if client.json:
        print_json({"NodeID": holder, **to_builtins(view)})
    else:
        stdout_console().print(render_view(holder, view))
    return 0


def render_view(node: str, view: ExecutionView) -> Group:
    e = view.Execution
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold")
    facts.add_column()
    rows = [
        ("Execution", e.ExecutionID),
        ("Job", e.JobID),
        ("Node", node),
        ("State", e.State.value),
        ("Created", e.CreateTime),
        ("Updated", e.UpdateTime),
        ("Comment", e.LatestComment),
        ("Reserved", f"CPU {e.ResourceUsage.CPU:g}, memory {e.ResourceUsage.Memory} B"),
    ]
    if e.RunCommandResult is not None:
        r = e.RunCommandResult
        rows.append(("Exit code", str(r.exitCode)))
        rows.append(("Stdout", r.stdout + (" …" if r.stdouttruncated else "")))
        rows.append(("Stderr", r.stderr + (" …" if r.stderrtruncated else "")))
        if r.runnerError:
            rows.append(("Runner error", r.runnerError))
    published = e.PublishResult
    if published is not None and published.StorageSource is not None:
        where = published.URL or published.Name
        rows.append(("Published", f"{published.StorageSource.value} {where}".strip()))
    for key, value in rows:
        facts.add_row(key, value.rstrip("\n"))
    history = Table("TIME", "FROM", "TO", "CAUSE", "COMMENT", title="History", title_justify="left")
    for h in view.History:
        history.add_row(h.Time, h.PreviousState.value, h.NewState.value, h.Cause, h.Comment)
    callbacks = Table(
        "SEQ", "KIND", "CREATED", "DELIVERED", title="Callbacks", title_justify="left"
    )
    for c in view.Callbacks:
        callbacks.add_row(str(c.Seq), c.Kind, c.CreatedAt, "yes" if c.Delivered else "no")
    return Group(facts, history, callbacks)


@app.command("logs")
@client_command
def logs(
    execution_id: ExecutionArg,
    node: NodeOpt = "",
    follow: Annotated[
        bool,
        typer.Option(
            "--follow",
            "-f",
            show_default=False,
            help="Keep printing new output until the run ends.",
        ),
    ] = False,
    tail: Annotated[
        int | None,
        typer.Option(
            "--tail",
            show_default=False,
            metavar="BYTES",
            min=0,
            help="Only the last BYTES of each stream.",
        ),
    ] = None,
    *,
    client: ClientOptions,
) -> None:
    """Print an execution's stdout and stderr (to stdout and stderr); with -f follow them
    as they are written. With --json, one JSON line per chunk, then {"EOF": true, ...}.
    Exits 0 (the job's own exit code is not this command's)."""
    run(_logs(client, execution_id, node, follow, tail))


async def _logs(
    client: ClientOptions, execution_id: str, node: str, follow: bool, tail: int | None
) -> int:
    from worker.cli_client import find_execution, session, stream_logs
    from worker.cli_submit import emit_log

    async with session(client) as s:
        holder = node or (await find_execution(s, execution_id))[0]
        exit_code = await stream_logs(
            s, holder, execution_id, follow=follow, tail=tail, emit=emit_log(client.json)
        )
    if client.json:
        print_json({"EOF": True, "ExitCode": exit_code})
    return 0


_VERBS = {
    "cancel": "Cancelled",
    "accept": "Accepted the result of",
    "reject": "Rejected the result of",
}


async def _act(
    client: ClientOptions, method: str, execution_id: str, node: str, reason: str
) -> int:
    from worker.cli_client import find_execution, session

    async with session(client) as s:
        holder = node or (await find_execution(s, execution_id))[0]
        r = s.requester
        if method == "cancel":
            response = await r.cancel(holder, execution_id, reason or "cancelled from the CLI")
        elif method == "accept":
            response = await r.accept_result(holder, execution_id)
        else:
            response = await r.reject_result(holder, execution_id, reason or "rejected")
    if client.json:
        print_json({"NodeID": holder, "ExecutionID": execution_id, "State": response.State})
    else:
        verb = _VERBS[method]
        stdout_console().print(f"{verb} {execution_id} on {holder}: {response.State.value}")
    return 0


@app.command("cancel")
@client_command
def cancel(
    execution_id: ExecutionArg, node: NodeOpt = "", reason: ReasonOpt = "", *, client: ClientOptions
) -> None:
    """Cancel an execution (CancelExecution); a finished one answers 409."""
    run(_act(client, "cancel", execution_id, node, reason))


@app.command("accept")
@client_command
def accept(execution_id: ExecutionArg, node: NodeOpt = "", *, client: ClientOptions) -> None:
    """Accept the result of an execution waiting for verification (ResultAccepted), e.g.
    one submitted without --wait; the node then publishes it."""
    run(_act(client, "accept", execution_id, node, ""))


@app.command("reject")
@client_command
def reject(
    execution_id: ExecutionArg, node: NodeOpt = "", reason: ReasonOpt = "", *, client: ClientOptions
) -> None:
    """Reject the result of an execution waiting for verification (ResultRejected)."""
    run(_act(client, "reject", execution_id, node, reason))
