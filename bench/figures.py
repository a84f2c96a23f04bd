"""The figures of a run, from its raw measurements: medians over the repetitions, each
against the baseline measured next to it, judged against the issue's targets."""

from __future__ import annotations

import itertools
from typing import Any, Protocol

from bench.report import Figure, median

Raw = dict[str, list[dict[str, Any]]]


class _Plan(Protocol):
    @property
    def recovery_total(self) -> int: ...


def _vals(raw: Raw, name: str, key: str) -> list[float]:
    return [e[key] for e in raw.get(name, []) if e.get(key) is not None]


def _fig(
    raw: Raw,
    key: str,
    label: str,
    value: tuple[str, str],
    unit: str,
    base: tuple[str, str, str] | None = None,
    **kw: Any,
) -> Figure | None:
    """Median of ``raw[value[0]][*][value[1]]`` against the median of the baseline's."""
    reps = _vals(raw, *value)
    if not reps:
        return None
    breps = _vals(raw, base[0], base[1]) if base else []
    return Figure(
        key=key,
        label=label,
        value=median(reps),
        unit=unit,
        baseline=median(breps) if breps else None,
        baseline_label=base[2] if base else "",
        reps=reps,
        baseline_reps=breps,
        **kw,
    )


def declined(raw: Raw, name: str) -> str:
    """Why the measurement ``name`` is invalid: > 1 % of its asks declined (or failed)."""
    entries = raw.get(name, [])
    declines = sum(e.get("declines", 0) for e in entries)
    asked = sum(e.get("asked", 0) for e in entries)
    errors = sum(e.get("errors", 0) for e in entries)
    if asked and declines / asked > 0.01:
        reasons: dict[str, int] = {}
        for e in entries:
            for r, c in e.get("decline_reasons", {}).items():
                reasons[r] = reasons.get(r, 0) + c
        return f"{declines}/{asked} asks declined (> 1 %): {reasons}"
    if asked and errors / asked > 0.01:
        return f"{errors} errors in {asked} asks: {entries[-1].get('first_error', '')}"
    return ""


def _bid(raw: Raw, sync: str) -> list[Figure]:
    normal = sync == "normal"
    tag = "" if normal else " [sync full]"
    seq, c64 = f"bid.{sync}.node_seq", f"bid.{sync}.node_c64"
    specs = [
        (
            f"bid_rtt_p50_{sync}",
            f"bid round trip p50{tag}",
            (seq, "p50_ms"),
            "ms",
            (f"bid.{sync}.echo_seq", "p50_ms", "echo p50"),
            "ratio <= 2.0",
            "ratio_le",
            2.0,
        ),
        (
            f"bid_rtt_p99_{sync}",
            f"bid round trip p99{tag}",
            (seq, "p99_ms"),
            "ms",
            (f"bid.{sync}.echo_seq", "p99_ms", "echo p99"),
            "ratio <= 4.0",
            "ratio_le",
            4.0,
        ),
        (
            f"ask_c64_{sync}",
            f"AskForBid, 64 in flight, each bid rejected{tag}",
            (c64, "rate"),
            "/s",
            (f"bid.{sync}.echo_c64", "rate", "echo c64 /s"),
            "ratio >= 0.20",
            "ratio_ge",
            0.20,
        ),
    ]
    out: list[Figure] = []
    for key, label, value, unit, base, target, kind, limit in specs:
        f = _fig(
            raw,
            key,
            label,
            value,
            unit,
            base,
            target=target if normal else "",
            kind=kind if normal else "",
            limit=limit,
        )
        if f is not None:
            out.append(f.judge(invalid=declined(raw, value[0])))
    wal = _vals(raw, f"bid.{sync}.wal", "wal_mb")
    out += _info(
        f"ask_wal_{sync}",
        f"node WAL file after each 64-in-flight run{tag}",
        wal,
        "MB",
        "report (max; was unbounded)",
        value=max(wal, default=0.0),
    )
    out += _info(f"ask_node_cpu_{sync}", f"node CPU per ask+reject{tag}", _node_cpu(raw, c64), "µs")
    out += _cpu_bound(raw, f"ask_{sync}", "ask+reject", tag, c64, f"bid.{sync}.echo_c64")
    return out


def _node_cpu(raw: Raw, name: str, key: str = "cpu_us_per_op") -> list[float]:
    return [e["cpu"].get(key, {}).get("node", float("nan")) for e in raw.get(name, [])]


def _cpu_bound(raw: Raw, key: str, op: str, tag: str, name: str, echo: str) -> list[Figure]:
    """The node's event-loop CPU per ``op`` (one core: the rate can reach 1 s / that at
    most), and the rate the CPU per ``op`` of the node, the bench process and nats-server
    together allows at most on the machine's cores: its ratio is the best the target's
    ratio could be at these costs, with the work spread perfectly over every core."""
    out = _info(
        f"{key}_node_loop",
        f"node event-loop CPU per {op}{tag}",
        _node_cpu(raw, name, "main_thread_us_per_op"),
        "µs",
        "report: 1 s / this bounds the rate",
    )
    ceilings = [c for c in (_ceiling(e["cpu"]) for e in raw.get(name, [])) if c is not None]
    if ceilings:
        rates = _vals(raw, echo, "rate")
        cores = _cores(raw, name)
        out.append(
            Figure(
                key=f"{key}_ceiling",
                label=f"most {op}s/s all processes' CPU allows on {cores}{tag}",
                value=median(ceilings),
                unit="/s",
                baseline=median(rates) if rates else None,
                baseline_label="echo c64 /s",
                reps=ceilings,
                baseline_reps=rates,
                target="report: no design with these costs passes this ratio",
            )
        )
    return out


def _ceiling(cpu: dict[str, Any]) -> float | None:
    total = sum(cpu.get("cpu_us_per_op", {}).values())
    return float(cpu.get("cores", 2) * 1e6 / total) if total else None


def _cores(raw: Raw, name: str) -> str:
    cores = {e["cpu"].get("cores", 2) for e in raw.get(name, [])}
    return f"{max(cores)} cores"


def _info(
    key: str, label: str, reps: list[float], unit: str, target: str = "", value: float | None = None
) -> list[Figure]:
    """A reported figure without a baseline (the median of ``reps`` unless ``value``);
    none when nothing was measured."""
    if not reps:
        return []
    shown = median(reps) if value is None else value
    return [Figure(key=key, label=label, value=shown, unit=unit, reps=reps, target=target)]


def _e2e(raw: Raw) -> list[Figure]:
    out: list[Figure] = []
    f = _fig(
        raw,
        "e2e_c64",
        "noop jobs/s, 64 in flight",
        ("e2e.node_c64", "rate"),
        "jobs/s",
        ("e2e.echo_c64", "rate", "echo c64 /s"),
        target=">= 1500/s and ratio >= 0.03 (stretch 2500)",
        kind="abs_ge+ratio_ge",
        limit=1500,
        limit2=0.03,
    )
    if f is not None:
        out.append(f.judge(invalid=declined(raw, "e2e.node_c64")))
    out += _info("e2e_node_cpu", "node CPU per noop job", _node_cpu(raw, "e2e.node_c64"), "µs")
    out += _cpu_bound(raw, "e2e", "noop job", "", "e2e.node_c64", "e2e.echo_c64")
    out += _info(
        "e2e_fs_probe",
        "results folder per job on the data dir's disk (2 mkdir + 3 files)",
        _vals(raw, "e2e.fs_probe", "us_per_job"),
        "µs",
        "report: PROTOCOL.md §7 work, on the event loop",
    )
    for q in ("p50", "p99"):
        f = _fig(
            raw,
            f"e2e_seq_{q}",
            f"noop job latency {q}, 1 in flight",
            ("e2e.node_seq", f"{q}_ms"),
            "ms",
            ("e2e.echo_seq", f"{q}_ms", f"echo {q}"),
        )
        if f is not None:
            out.append(f)
    return out + _fanout(raw)


def _fanout(raw: Raw) -> list[Figure]:
    """The fan-out's latency and where its time goes: the first bid, the CPU each
    responder spends per bid, and the floor all processes' CPU per round puts under it."""
    specs = [
        (
            "fanout_p50",
            "fan-out to 10 nodes, all bids in, p50",
            "p50_ms",
            "ms",
            "10 echoes p50",
            "",
        ),
        (
            "fanout_p99",
            "fan-out to 10 nodes, all bids in, p99",
            "p99_ms",
            "ms",
            "10 echoes p99",
            "",
        ),
        ("fanout_first", "fan-out: first bid in, p50", "rank1_p50_ms", "ms", "first echo p50", ""),
        (
            "fanout_cpu_per_bid",
            "fan-out: CPU of a responder per bid",
            "responders_cpu_us_per_reply",
            "µs",
            "echo per reply",
            "",
        ),
        (
            "fanout_cpu_floor",
            "fan-out: all processes' CPU per round / 2 cores",
            "cpu_floor_ms",
            "ms",
            "with 10 echoes",
            "report: all bids in cannot come sooner",
        ),
    ]
    out: list[Figure] = []
    for key, label, field, unit, base_label, target in specs:
        f = _fig(
            raw,
            key,
            label,
            ("fanout.node", field),
            unit,
            ("fanout.echo", field, base_label),
            target=target,
        )
        if f is not None:
            out.append(f)
    return out


def _store(raw: Raw) -> list[Figure]:
    specs = [
        (
            "store_c64",
            "store transitions/s, 64 concurrent",
            "store.c64",
            "store.anchor_c64",
            "raw aiosqlite INSERT c64",
        ),
        (
            "store_seq",
            "store transitions/s, one at a time",
            "store.seq",
            "store.anchor_seq",
            "raw aiosqlite INSERT",
        ),
        (
            "store_c64_full",
            "store transitions/s, 64 concurrent [sync full]",
            "store.c64_full",
            "store.anchor_c64_full",
            "raw aiosqlite INSERT c64",
        ),
    ]
    out = []
    for key, label, name, base, base_label in specs:
        f = _fig(raw, key, label, (name, "rate"), "/s", (base, "rate", base_label))
        if f is not None:
            out.append(f)
    return out


def _memory(raw: Raw) -> list[Figure]:
    mem = raw.get("memory", [])
    points = mem[-1].get("points", []) if mem else []
    if len(points) < 2:
        return []
    n = points[-1]["executions"] - points[0]["executions"]
    if n <= 0:
        return []
    per = (points[-1]["VmRSS"] - points[0]["VmRSS"]) / n * 10_000 / 2**20
    anon = (points[-1]["RssAnon"] - points[0]["RssAnon"]) / n * 10_000 / 2**20
    steps = [
        (b["VmRSS"] - a["VmRSS"]) / max(1, b["executions"] - a["executions"]) * 10_000 / 2**20
        for a, b in itertools.pairwise(points)
    ]
    f = Figure(
        key="memory_per_10k",
        label=f"RSS growth per 10,000 completed jobs (over {n:,})",
        value=per,
        unit="MB",
        target="<= 5 MB",
        kind="abs_le",
        limit=5.0,
        note=f"RssAnon {anon:.2f} MB; per segment " + ", ".join(f"{s:.2f}" for s in steps),
        reps=steps,
    )
    return [f.judge(scaled=n < 10_000)]


def _recovery(raw: Raw, total: int) -> list[Figure]:
    out: list[Figure] = []
    empty = _vals(raw, "recovery.startup_empty", "startup_s")
    # (raw prefix, figure key prefix, what the data dir holds): see RECOVERY_VARIANTS.
    variants = (
        ("recovery", "", "executions"),
        ("recovery_late", "late_", "executions, every live one past its deadline"),
    )
    for name, key, what in variants:
        full = _vals(raw, f"{name}.startup_full", "startup_s")
        if not (empty and full):
            continue
        out.append(
            Figure(
                key=f"{key}startup_full",
                label=f"start-up to NODE_ID with {total:,} {what}",
                value=median(full),
                unit="s",
                baseline=median(empty),
                baseline_label="empty data dir",
                compare_by="value",
                reps=full,
                baseline_reps=empty,
            )
        )
        out.append(
            Figure(
                key=f"{name}_extra",
                label=f"{name.replace('_', ' ')}: start-up extra for {total:,} {what}",
                value=median(full) - median(empty),
                unit="s",
                target="<= 1 s",
                kind="abs_le",
                limit=1.0,
                note="median with − median empty",
            ).judge(scaled=total < 100_000)
        )
    inproc = raw.get("recovery.inprocess", [])
    inproc_empty = _vals(raw, "recovery.inprocess_empty", "node_start_s")
    if inproc:
        phases = ("recovery_run_s", "store_open_s", "live_executions_s", "outbox_start_s")
        start = [e.get("node_start_s", float("nan")) for e in inproc]
        out.append(
            Figure(
                key="recovery_inprocess",
                label=f"Node.start in-process with {total:,} executions",
                value=median(start),
                unit="s",
                baseline=median(inproc_empty) if inproc_empty else None,
                baseline_label="empty data dir",
                compare_by="value",
                reps=start,
                baseline_reps=inproc_empty,
                note="; ".join(
                    f"{k} {median([e.get(k, float('nan')) for e in inproc]):.3f}" for k in phases
                ),
            )
        )
    return out


def _traceparent(raw: Raw) -> list[Figure]:
    out: list[Figure] = []
    specs = [
        (
            "echo_traceparent",
            "echo c64 with traceparent vs without",
            "echo_c64",
            "rate",
            "/s",
            "ecosystem §3: ≈ 0.67",
        ),
        (
            "echo_traceparent_seq",
            "echo seq p50 with traceparent vs without",
            "echo_seq",
            "p50_ms",
            "ms",
            "ecosystem §3: ≈ 1.0",
        ),
    ]
    for key, label, name, field, unit, claim in specs:
        f = _fig(
            raw,
            key,
            label,
            (f"bid.normal.{name}", field),
            unit,
            (f"bid.normal.{name}_noheaders", field, "no headers"),
            target=claim,
        )
        if f is not None:
            out.append(f)
    return out


def figures(raw: Raw, plan: _Plan) -> list[Figure]:
    return [
        *_bid(raw, "normal"),
        *_bid(raw, "full"),
        *_e2e(raw),
        *_store(raw),
        *_memory(raw),
        *_recovery(raw, plan.recovery_total),
        *_traceparent(raw),
    ]
