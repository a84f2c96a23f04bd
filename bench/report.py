"""Figures: the value, its baseline from the same run, the ratio, the target and a verdict;
the table printed at the end of a run, and the comparison of two result files."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Verdicts: PASS / MISS against a target; INFO when the issue asks for the figure only;
# INVALID when the run cannot be trusted (e.g. > 1 % of asks declined); SCALED when a
# quick run measured fewer items than the target is stated for.


@dataclass
class Figure:
    key: str
    label: str
    value: float
    unit: str
    baseline: float | None = None
    baseline_label: str = ""
    target: str = ""  # human text, e.g. "ratio <= 2.0"
    kind: str = ""  # ratio_le | ratio_ge | abs_le | abs_ge | abs_ge+ratio_ge | ""
    limit: float | None = None
    limit2: float | None = None  # the ratio limit of abs_ge+ratio_ge
    status: str = "INFO"
    note: str = ""
    compare_by: str = "ratio"  # what `compare` follows: "ratio", or "value" when the
    # baseline is no same-conditions anchor (a start-up on an empty dir)
    reps: list[float] = field(default_factory=list)
    baseline_reps: list[float] = field(default_factory=list)

    @property
    def ratio(self) -> float | None:
        if self.baseline in (None, 0) or self.baseline is None or math.isnan(self.baseline):
            return None
        return self.value / self.baseline

    def judge(self, *, invalid: str = "", scaled: bool = False) -> Figure:
        if invalid:
            self.status, self.note = "INVALID", invalid
            return self
        ratio = self.ratio
        ok: bool | None = None
        if self.kind == "ratio_le" and ratio is not None and self.limit is not None:
            ok = ratio <= self.limit
        elif self.kind == "ratio_ge" and ratio is not None and self.limit is not None:
            ok = ratio >= self.limit
        elif self.kind == "abs_le" and self.limit is not None:
            ok = self.value <= self.limit
        elif self.kind == "abs_ge" and self.limit is not None:
            ok = self.value >= self.limit
        elif self.kind == "abs_ge+ratio_ge" and self.limit is not None and self.limit2 is not None:
            ok = self.value >= self.limit and ratio is not None and ratio >= self.limit2
        if ok is not None:
            self.status = "PASS" if ok else "MISS"
            if scaled:
                self.status += "*"
        return self


def median(values: list[float]) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(values) if values else float("nan")


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if abs(value) >= 1000:
        text = f"{value:,.0f}"
    elif abs(value) >= 100:
        text = f"{value:.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.3g}"
    return f"{text} {unit}".rstrip()


def table(figures: list[Figure]) -> str:
    rows = [("figure", "value", "baseline", "ratio", "target", "verdict")]
    for f in figures:
        ratio = f.ratio
        rows.append(
            (
                f.label,
                _fmt(f.value, f.unit),
                _fmt(f.baseline) + (f" ({f.baseline_label})" if f.baseline_label else ""),
                f"{ratio:.3f}" if ratio is not None else "-",
                f.target or "report",
                f.status + (f"  {f.note}" if f.note else ""),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = []
    for n, r in enumerate(rows):
        lines.append("  ".join(r[i].ljust(widths[i]) for i in range(5)) + "  " + r[5])
        if n == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 7)
    return "\n".join(lines)


def write(path: Path, meta: dict[str, Any], figures: list[Figure], raw: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "meta": meta,
        "figures": [{**asdict(f), "ratio": f.ratio} for f in figures],
        "raw": raw,
    }
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")


def compare(a_path: Path, b_path: Path, threshold: float = 0.10) -> str:
    """Figure by figure: A and B values, their ratios to their own run's baseline, and the
    change of the ratio (the figure to trust on a noisy machine: each run's baseline
    absorbs the machine's state at the time)."""
    a = json.loads(a_path.read_text())
    b = json.loads(b_path.read_text())
    fa = {f["key"]: f for f in a["figures"]}
    fb = {f["key"]: f for f in b["figures"]}
    rows = [("figure", "A", "B", "ratio A", "ratio B", "change", "verdict A→B")]
    for key in [k for k in fa if k in fb] + [k for k in fb if k not in fa]:
        x, y = fa.get(key), fb.get(key)
        ref = y or x
        assert ref is not None
        va = x["value"] if x else None
        vb = y["value"] if y else None
        ra = x.get("ratio") if x else None
        rb = y.get("ratio") if y else None
        if ra and rb and ref.get("compare_by", "ratio") == "ratio":
            change = rb / ra - 1
        elif va and vb:
            change = vb / va - 1
        else:
            change = None
        flag = ""
        if change is not None and abs(change) >= threshold:
            flag = " <<" if _worse(ref, change) else " >>"
        rows.append(
            (
                ref["label"],
                _fmt(va, ref["unit"]),
                _fmt(vb, ref["unit"]),
                f"{ra:.3f}" if ra else "-",
                f"{rb:.3f}" if rb else "-",
                (f"{change:+.1%}" if change is not None else "-") + flag,
                f"{x['status'] if x else '-'} → {y['status'] if y else '-'}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = [f"A = {a_path}  ({a['meta'].get('started', '?')}, {a['meta'].get('worker_rev', '?')})"]
    out.append(
        f"B = {b_path}  ({b['meta'].get('started', '?')}, {b['meta'].get('worker_rev', '?')})"
    )
    out.append("change = ratio B / ratio A − 1 (value B / value A − 1 for figures without a")
    out.append("same-conditions baseline: start-up times, memory, CPU per operation);")
    out.append(f"'>>' better, '<<' worse by ≥ {threshold:.0%}")
    out.append("")
    for n, r in enumerate(rows):
        out.append("  ".join(r[i].ljust(widths[i]) for i in range(len(r))))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def _worse(figure: dict[str, Any], change: float) -> bool:
    """Whether a change of this figure is for the worse (latency, time, CPU, memory: up)."""
    lower_is_better = figure["unit"] in ("ms", "s", "µs", "MB") or figure.get("kind", "").endswith(
        "_le"
    )
    return change > 0 if lower_is_better else change < 0


def rerender(path: Path, *, write_back: bool = False) -> str:
    """The table of a result file, its figures recomputed from its raw measurements with
    the current rules (``write_back`` stores them)."""
    from types import SimpleNamespace

    from bench.figures import figures

    doc = json.loads(path.read_text())
    plan = SimpleNamespace(**doc["meta"]["plan"])
    figs = figures(doc["raw"], plan)
    if write_back:
        write(path, doc["meta"], figs, doc["raw"])
    return table(figs)
