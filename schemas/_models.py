"""Which Bacalhau job model a body that is not a v0.3.25 ``model.Job`` was.

A check runs only once the typed conversion has failed, so a job that has ``Spec.Engine``
is a v0.3.25 job whatever else it carries. Keys are matched ASCII case-insensitively (the
last match wins).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from schemas._errors import echo
from schemas.compute import AskForBidRequest
from schemas.job import Job

__all__ = ["MODEL_CHECKS"]

_V0325_HINT: Final = "send a v0.3.25 model.Job with Spec.Engine"
_V1_JOB_TYPES: Final = frozenset({"batch", "ops", "service", "daemon"})
_LEGACY_KEYS: Final = frozenset({"engine", "jobspecdocker", "jobspeclanguage", "jobspecwasm"})
_MISSING: Final = object()


def _get_folded(d: dict[str, Any], lower: str) -> Any:
    found: Any = _MISSING
    for k, v in d.items():
        if k == lower or (k.isascii() and k.lower() == lower):
            found = v
    return found


def _job_model_problem(job: Any) -> str | None:
    """Why ``job`` is some other Bacalhau job model than v0.3.25 ``model.Job``, if it is."""
    if type(job) is not dict:
        return None
    spec = _get_folded(job, "spec")
    if type(spec) is dict:
        engine = _get_folded(spec, "engine")
        if engine in (_MISSING, None, "") and _get_folded(spec, "enginespec") not in (
            _MISSING,
            None,
        ):
            return f"unsupported job model: Bacalhau v1.0 Spec.EngineSpec; {_V0325_HINT}"
        if engine not in (_MISSING, None):
            return None
    if _get_folded(job, "tasks") is not _MISSING:
        return f"unsupported job model: Bacalhau v1.x models.Job (tasks[]); {_V0325_HINT}"
    job_type = _get_folded(job, "type")
    if isinstance(job_type, str) and job_type.lower() in _V1_JOB_TYPES:
        return (
            f"unsupported job model: Bacalhau v1.x models.Job (type {echo(job_type)}); "
            f"{_V0325_HINT}"
        )
    if spec in (_MISSING, None) and any(k.isascii() and k.lower() in _LEGACY_KEYS for k in job):
        return f"unsupported job model: legacy flat job spec (pre-Spec layout); {_V0325_HINT}"
    return None


def _ask_model_problem(raw: Any) -> str | None:
    return _job_model_problem(_get_folded(raw, "job")) if type(raw) is dict else None


# Per type: explains a failed decode by the job model that was sent.
MODEL_CHECKS: Final[dict[Any, Callable[[Any], str | None]]] = {
    AskForBidRequest: _ask_model_problem,
    Job: _job_model_problem,
}
