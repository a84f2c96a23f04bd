"""``worker nodes ls`` and ``worker node info``: the compute nodes of a market, found
through ``$SRV.INFO.compute-node`` and ``<p>.info.*``, then asked for a fresh NodeInfo."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Group
from rich.table import Table

from worker.cli_common import (
    EXIT_CODES,
    ClientOptions,
    CommandError,
    client_command,
    print_json,
    run,
    stderr_console,
    stdout_console,
)

if TYPE_CHECKING:
    from schemas.node import Capacity, NodeInfo
    from worker.cli_client import Session

nodes_app = typer.Typer(
    help=f"The compute nodes of the market. {EXIT_CODES}",
    no_args_is_help=True,
    rich_markup_mode=None,
)
node_app = typer.Typer(
    help=f"One compute node. {EXIT_CODES}", no_args_is_help=True, rich_markup_mode=None
)


def size(n: float) -> str:
    """Bytes in binary units, as resources are written (``1.5Gi``)."""
    for unit in ("", "Ki", "Mi", "Gi", "Ti", "Pi"):
        if abs(n) < 1024 or unit == "Pi":
            return f"{n:.0f}" if unit == "" else f"{n:.1f}{unit}".replace(".0" + unit, unit)
        n /= 1024
    return str(n)  # pragma: no cover - the loop always returns


async def _infos(s: Session) -> tuple[list[str], dict[str, NodeInfo], dict[str, str]]:
    """Every node found, its fresh NodeInfo (or the one last published), and why a node
    did not answer."""
    from worker.cli_client import discover, no_nodes_message

    found = await discover(s.nc, s.options.prefix, s.options.discover_timeout)
    if not found.node_ids:
        raise CommandError(no_nodes_message(s.options))
    answers = await asyncio.gather(
        *(s.requester.node_info(n) for n in found.node_ids), return_exceptions=True
    )
    infos: dict[str, NodeInfo] = {}
    problems: dict[str, str] = {}
    for node, answer in zip(found.node_ids, answers, strict=True):
        if isinstance(answer, BaseException):
            problems[node] = f"no reply: {answer!r}"
            if node in found.infos:
                infos[node] = found.infos[node]
        else:
            infos[node] = answer
    return found.node_ids, infos, problems


@nodes_app.command("ls")
@client_command
def ls(*, client: ClientOptions) -> None:
    """List every node that is up: status, engines, running and queued executions, free
    CPU and memory (available / running + queue capacity), outbox (pending/parked
    callbacks), version."""
    run(_ls(client))


async def _ls(client: ClientOptions) -> int:
    from schemas.codec import to_builtins
    from worker.cli_client import session

    async with session(client) as s:
        with stderr_console().status("Looking for nodes…"):
            nodes, infos, problems = await _infos(s)
    if client.json:
        print_json(
            [{**to_builtins(infos[n]), "Reachable": n not in problems} for n in nodes if n in infos]
        )
        return 0
    # Free = AvailableCapacity, out of what running and queued jobs may take together.
    table = Table("NODE", "STATUS", "ENGINES", "RUNNING", "QUEUED", "CPU FREE", "MEMORY FREE")
    table.add_column("OUTBOX")
    table.add_column("VERSION")
    for node in nodes:
        info = infos.get(node)
        if info is None:
            table.add_row(node, "[red]no reply[/]", *["-"] * 7)
            continue
        c = info.ComputeNodeInfo
        status = "draining" if info.Draining else "ready"
        if node in problems:
            status = "no reply (last info)"
        table.add_row(
            node,
            status,
            ",".join(c.ExecutionEngines),
            str(c.RunningExecutions),
            str(c.EnqueuedExecutions),
            f"{c.AvailableCapacity.CPU:g}/{c.MaxCapacity.CPU + c.QueueCapacity.CPU:g}",
            f"{size(c.AvailableCapacity.Memory)}/"
            f"{size(c.MaxCapacity.Memory + c.QueueCapacity.Memory)}",
            f"{c.OutboxPending}/{c.OutboxParked}",
            info.Version,
        )
    stdout_console().print(table)
    return 0


@node_app.command("info")
@client_command
def info(
    node: Annotated[
        str,
        typer.Option(
            "--node", show_default=False, metavar="ID", help="The node (default: the only one up)."
        ),
    ] = "",
    *,
    client: ClientOptions,
) -> None:
    """Show one node's NodeInfo: labels, engines, publishers, storage sources,
    capacities, queue, outbox."""
    run(_info(client, node))


async def _info(client: ClientOptions, node: str) -> int:
    from schemas.codec import to_builtins
    from worker.cli_client import discover, no_nodes_message, session

    async with session(client) as s:
        if not node:
            with stderr_console().status("Looking for nodes…"):
                found = await discover(s.nc, client.prefix, client.discover_timeout)
            if not found.node_ids:
                raise CommandError(no_nodes_message(client))
            if len(found.node_ids) > 1:
                raise CommandError(
                    f"{len(found.node_ids)} nodes are up ({', '.join(found.node_ids)}): "
                    "choose one with --node"
                )
            node = found.node_ids[0]
        answer = await s.requester.node_info(node)
    if client.json:
        print_json(to_builtins(answer))
    else:
        stdout_console().print(render_info(answer))
    return 0


def render_info(info: NodeInfo) -> Group:
    c = info.ComputeNodeInfo
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold")
    facts.add_column()
    for key, value in (
        ("Node", info.NodeID),
        ("Instance", info.InstanceID),
        ("Version", f"{info.Version} (protocols {', '.join(info.ProtocolVersions)})"),
        ("Status", "draining" if info.Draining else "ready"),
        ("Labels", ", ".join(f"{k}={v}" for k, v in sorted(info.Labels.items())) or "-"),
        ("Engines", ", ".join(c.ExecutionEngines) or "-"),
        ("Verifiers", ", ".join(c.Verifiers) or "-"),
        ("Publishers", ", ".join(c.Publishers) or "-"),
        ("Storage", ", ".join(c.StorageSources) or "-"),
        ("Executions", f"{c.RunningExecutions} running, {c.EnqueuedExecutions} queued"),
        (
            "Outbox",
            f"{c.OutboxPending} pending, {c.OutboxParked} parked, oldest "
            f"{c.OutboxOldestAgeSeconds:.1f}s",
        ),
        ("Dropped", f"{c.DroppedRequests} requests without a reply subject"),
    ):
        facts.add_row(key, value)
    capacity = Table("CAPACITY", "CPU", "MEMORY", "DISK", "GPU")
    rows: list[tuple[str, Capacity]] = [
        ("total", c.MaxCapacity),
        ("queue", c.QueueCapacity),
        ("running", c.RunningUsedCapacity),
        ("queued", c.QueueUsedCapacity),
        ("pending bids", c.PendingBidCapacity),
        ("available", c.AvailableCapacity),
        ("max per job", c.MaxJobRequirements),
    ]
    for name, cap in rows:
        capacity.add_row(name, f"{cap.CPU:g}", size(cap.Memory), size(cap.Disk), str(cap.GPU))
    return Group(facts, capacity)
