"""The node's capacity limits from its configuration and its host (PROTOCOL.md §9).

Bacalhau panicked at start-up when a limit did not fit another (#4214, #3717, #2980: the
default job size exceeded 80 % of a small machine). Here :func:`resolve_limits` never
raises: it fills what is unset, clamps what is inconsistent, and returns a warning for each
change so the node can log it and start.
"""

from __future__ import annotations

import msgspec

from worker import durations
from worker.capacity.usage import ResourceUsage

DEFAULT_JOB_USAGE = ResourceUsage(CPU=0.1, Memory=100 * 1024 * 1024)
"""What a job gets for each dimension its request leaves out (Bacalhau's defaults)."""
DEFAULT_TIMEOUT = 600.0
MIN_TIMEOUT = 0.5
MAX_TIMEOUT = 3600.0


class Limits(msgspec.Struct, frozen=True, kw_only=True):
    """Resolved limits. Timeouts are seconds; ``job_timeout_max`` 0 means no maximum."""

    total: ResourceUsage
    queue: ResourceUsage
    job: ResourceUsage
    default_job: ResourceUsage
    job_timeout_default: float = DEFAULT_TIMEOUT
    job_timeout_min: float = MIN_TIMEOUT
    job_timeout_max: float = MAX_TIMEOUT


def _compare(over: ResourceUsage, limit: ResourceUsage) -> str:
    """``CPU 4 > 1.6, Memory 2147483648 > 1073741824`` for the dimensions over the limit."""
    parts = []
    for name in over.exceeded(limit):
        a, b = getattr(over, name), getattr(limit, name)
        parts.append(f"CPU {a:g} > {b:g}" if name == "CPU" else f"{name} {a} > {b}")
    return ", ".join(parts)


def resolve_limits(
    *,
    host: ResourceUsage,
    total: ResourceUsage,
    job: ResourceUsage,
    queue: ResourceUsage,
    default_job: ResourceUsage,
    job_timeout_default: float = DEFAULT_TIMEOUT,
    job_timeout_min: float = MIN_TIMEOUT,
    job_timeout_max: float = MAX_TIMEOUT,
) -> tuple[Limits, list[str]]:
    """Fill unset (0) dimensions and clamp inconsistent ones; never raises.

    - total: unset dimensions take the host's; above the host is allowed (over-commit),
      with a warning;
    - queue: unset dimensions take the total's;
    - job limit: unset dimensions take the total's; above the total is clamped to it;
    - default job usage: unset dimensions take CPU 0.1, Memory 100 MiB; above the job
      limit is clamped to it;
    - default timeout above the maximum (when there is one) is clamped to it, and so is a
      minimum above the maximum.
    """
    warnings: list[str] = []

    total = total.fill_defaults(host)
    over = total.exceeded(host)
    if over:
        warnings.append(
            f"total limits exceed the host's usable resources ({_compare(total, host)});"
            " the node may over-commit"
        )

    queue = queue.fill_defaults(total)

    job = job.fill_defaults(total)
    over = job.exceeded(total)
    if over:
        warnings.append(
            f"job limits exceed the total limits ({_compare(job, total)}); clamped to the total"
        )
        job = job.min(total)

    default_job = default_job.fill_defaults(DEFAULT_JOB_USAGE)
    over = default_job.exceeded(job)
    if over:
        warnings.append(
            f"default job resources exceed the job limits ({_compare(default_job, job)});"
            " clamped to the job limits"
        )
        default_job = default_job.min(job)

    t_default, t_min, t_max = (
        max(0.0, t) for t in (job_timeout_default, job_timeout_min, job_timeout_max)
    )
    if t_max > 0 and t_min > t_max:
        warnings.append(
            f"job timeout minimum {durations.format(t_min)} exceeds the maximum "
            f"{durations.format(t_max)}; clamped to the maximum"
        )
        t_min = t_max
    if t_max > 0 and t_default > t_max:
        warnings.append(
            f"default job timeout {durations.format(t_default)} exceeds the maximum "
            f"{durations.format(t_max)}; clamped to the maximum"
        )
        t_default = t_max

    limits = Limits(
        total=total,
        queue=queue,
        job=job,
        default_job=default_job,
        job_timeout_default=t_default,
        job_timeout_min=t_min,
        job_timeout_max=t_max,
    )
    return limits, warnings
