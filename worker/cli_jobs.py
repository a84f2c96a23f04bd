"""Job specs and bids for ``worker submit``: loading a Bacalhau spec file as it is,
choosing a bid, and showing the bids."""

from __future__ import annotations

import enum
import json
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import yaml
from rich.table import Table

from schemas.codec import DecodeError, decode, format_time, to_builtins
from schemas.compute import AskForBidResponse
from schemas.job import Job
from worker import durations
from worker.cli_common import EXIT_USAGE, CommandError


class Pick(enum.StrEnum):
    """Which bid ``submit`` accepts."""

    FASTEST = "fastest"  # lowest EstimatedStartSeconds (absent = 0), then the cheapest
    CHEAPEST = "cheapest"  # lowest Price.Amount (absent = 0), then the fastest
    FIRST = "first"  # the first to arrive


def _key(doc: dict[str, Any], name: str) -> str | None:
    """The key of ``doc`` that Go's encoding/json would decode into field ``name``: an
    exact match, else the last case-insensitive one."""
    if name in doc:
        return name
    folded = [k for k in doc if isinstance(k, str) and k.lower() == name.lower()]
    return folded[-1] if folded else None


def load_job(path: Path, client_id: str) -> Job:
    """A Bacalhau job spec file (YAML, or JSON by its ``.json`` name) as a Job, with a
    fresh ``Metadata.ID`` (and ``ClientID``, ``CreatedAt``) when the spec has none."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CommandError(f"cannot read {path}: {exc}", EXIT_USAGE) from None
    try:
        doc = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        kind = "JSON" if path.suffix.lower() == ".json" else "YAML"
        raise CommandError(f"{path} is not valid {kind}: {exc}", EXIT_USAGE) from None
    if not isinstance(doc, dict):
        raise CommandError(f"{path}: a job spec is a mapping, got {type(doc).__name__}", EXIT_USAGE)
    meta_key = _key(doc, "Metadata") or "Metadata"
    meta = doc.get(meta_key)
    if not isinstance(meta, dict):
        meta = doc[meta_key] = {}
    defaults = {
        "ID": str(uuid.uuid4()),
        "ClientID": client_id,
        "CreatedAt": format_time(datetime.now(UTC)),
    }
    for field, value in defaults.items():
        key = _key(meta, field)
        if key is None or not meta[key]:
            meta[key or field] = value
    try:
        return decode(json.dumps(doc, default=str).encode(), Job)
    except DecodeError as exc:
        raise CommandError(f"{path}: {exc}", EXIT_USAGE) from None


def _price(bid: AskForBidResponse) -> float:
    return 0.0 if isinstance(bid.Price, msgspec.UnsetType) else bid.Price.Amount


def _start(bid: AskForBidResponse) -> float:
    est = bid.EstimatedStartSeconds
    return 0.0 if isinstance(est, msgspec.UnsetType) else est


def chooser(pick: Pick) -> Callable[[Sequence[AskForBidResponse]], AskForBidResponse | None]:
    """A ``Requester.place`` chooser for ``pick`` (ties go to the earlier bid)."""

    def choose(bids: Sequence[AskForBidResponse]) -> AskForBidResponse | None:
        offers = [b for b in bids if b.Accepted and b.ExecutionID]
        if not offers:
            return None
        if pick is Pick.FIRST:
            return offers[0]
        if pick is Pick.CHEAPEST:
            return min(offers, key=lambda b: (_price(b), _start(b)))
        return min(offers, key=lambda b: (_start(b), _price(b)))

    return choose


def decision(bid: AskForBidResponse, chosen: str) -> str:
    if not bid.Accepted:
        return "declined"
    return "accepted" if bid.ExecutionID == chosen else "rejected"


def bids_table(bids: Sequence[AskForBidResponse], errors: Sequence[Any], chosen: str) -> Table:
    """One row per reply: the node, what became of its bid, price, start, detail."""
    table = Table(title="Bids", title_justify="left")
    for column in ("NODE", "BID", "PRICE", "EST. START", "EXECUTION / REASON"):
        table.add_column(column, no_wrap=column != "EXECUTION / REASON")
    for bid in bids:
        outcome = decision(bid, chosen)
        style = {"accepted": "bold green", "declined": "yellow"}.get(outcome, "")
        price = "-"
        if not isinstance(bid.Price, msgspec.UnsetType):
            price = f"{bid.Price.Amount:.6g} {bid.Price.Unit}".strip()
        start = "-"
        if not isinstance(bid.EstimatedStartSeconds, msgspec.UnsetType):
            start = durations.format(bid.EstimatedStartSeconds)
        detail = bid.ExecutionID if bid.Accepted else bid.Reason
        table.add_row(
            bid.NodeID, f"[{style}]{outcome}[/]" if style else outcome, price, start, detail
        )
    for err in errors:
        table.add_row(
            getattr(err, "node_id", "") or "?",
            f"[red]error {getattr(err, 'code', '')}[/]",
            "-",
            "-",
            getattr(err, "message", str(err)),
        )
    return table


def bids_json(bids: Sequence[AskForBidResponse], errors: Sequence[Any], chosen: str) -> Any:
    return {
        "event": "bids",
        "Bids": [{**to_builtins(b), "Decision": decision(b, chosen)} for b in bids],
        "Errors": [
            {
                "NodeID": getattr(e, "node_id", ""),
                "Code": getattr(e, "code", 500),
                "Error": getattr(e, "message", str(e)),
            }
            for e in errors
        ],
    }
