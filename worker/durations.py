"""Go-style durations: ``parse("1m30s") == 90.0`` and ``format(90.0) == "1m30s"``.

Reasons and errors print durations exactly as Go's ``time.Duration.String()`` does, so a
requester comparing Bacalhau's reason strings byte for byte sees the same text.
"""

from __future__ import annotations

import re

_UNITS_NS = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,
    "μs": 1_000,
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def parse(text: str | float | int) -> float:
    """Seconds from a Go duration string (``"1h2m3.5s"``, ``"500ms"``) or a number of
    seconds. Raises ``ValueError`` with a readable message otherwise."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"negative duration {text!r}")
        return float(text)
    s = str(text).strip()
    if s in ("0", ""):
        if s == "":
            raise ValueError("empty duration")
        return 0.0
    sign = 1
    if s[0] in "+-":
        sign = -1 if s[0] == "-" else 1
        s = s[1:]
    pos, total_ns = 0, 0.0
    while pos < len(s):
        m = _PART.match(s, pos)
        if m is None:
            raise ValueError(f"invalid duration {text!r} (use Go syntax such as 30s, 10m, 1h30m)")
        total_ns += float(m.group(1)) * _UNITS_NS[m.group(2)]
        pos = m.end()
    if pos == 0:
        raise ValueError(f"invalid duration {text!r}")
    if sign < 0:
        raise ValueError(f"negative duration {text!r}")
    return total_ns / 1e9


def _fmt_frac(value: int, digits: int) -> str:
    """``value`` scaled down by 10**digits, trailing zeros trimmed (Go ``fmtFrac``)."""
    whole, frac = divmod(value, 10**digits)
    if frac == 0:
        return str(whole)
    return f"{whole}.{str(frac).rjust(digits, '0').rstrip('0')}"


def format(seconds: float) -> str:
    """Go's ``time.Duration.String()`` for a duration in seconds."""
    ns = round(seconds * 1e9)
    if ns == 0:
        return "0s"
    neg = ns < 0
    ns = abs(ns)
    if ns < 1_000_000_000:
        if ns < 1_000:
            out = f"{ns}ns"
        elif ns < 1_000_000:
            out = _fmt_frac(ns, 3) + "µs"
        else:
            out = _fmt_frac(ns, 6) + "ms"
    else:
        hours, rem = divmod(ns, 3_600_000_000_000)
        minutes, rem = divmod(rem, 60_000_000_000)
        secs = _fmt_frac(rem, 9) + "s"
        if hours:
            out = f"{hours}h{minutes}m{secs}"
        elif minutes:
            out = f"{minutes}m{secs}"
        else:
            out = secs
    return "-" + out if neg else out


def format_float(value: float) -> str:
    """Go ``strconv.FormatFloat(v, 'f', -1, 64)``: the shortest exact decimal, no exponent."""
    text = repr(float(value))
    if "e" in text or "E" in text:
        text = f"{value:.20f}".rstrip("0")
    if text.endswith(".0"):
        text = text[:-2]
    return text.rstrip(".") if "." in text and text.endswith(".") else text
