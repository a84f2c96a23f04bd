"""Hiding the values of secret-looking environment variables of a job.

A variable is secret when its name contains one of :data:`SECRET_PATTERNS`
(case-insensitive substring). Its value must never reach logs, span attributes, error
replies or GetExecution; :func:`redact_env` replaces it with :data:`MASK`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import overload

from schemas.job import Job

SECRET_PATTERNS: tuple[str, ...] = ("TOKEN", "SECRET", "PASSWORD", "KEY")
MASK = "***"


def is_secret(name: str, patterns: Iterable[str] = SECRET_PATTERNS) -> bool:
    """Whether the variable ``name`` looks secret (a pattern is a substring, any case)."""
    upper = name.upper()
    return any(p.upper() in upper for p in patterns if p)


@overload
def redact_env(  # type: ignore[overload-overlap]  # a Mapping is an Iterable too
    env: Mapping[str, str], patterns: Iterable[str] = SECRET_PATTERNS
) -> dict[str, str]: ...


@overload
def redact_env(env: Iterable[str], patterns: Iterable[str] = SECRET_PATTERNS) -> list[str]: ...


def redact_env(
    env: Mapping[str, str] | Iterable[str], patterns: Iterable[str] = SECRET_PATTERNS
) -> dict[str, str] | list[str]:
    """A copy of ``env`` with the values of secret variables replaced by ``***``.

    ``env`` is either a mapping (Wasm's ``{name: value}``) or Docker's ``["NAME=value"]``
    list; an entry without ``=`` is kept as it is unless its whole text looks secret.
    """
    pats = tuple(patterns)
    if isinstance(env, Mapping):
        return {k: MASK if is_secret(k, pats) else v for k, v in env.items()}
    out: list[str] = []
    for entry in env:
        name, sep, _ = entry.partition("=")
        if sep:
            out.append(f"{name}={MASK}" if is_secret(name, pats) else entry)
        else:
            out.append(MASK if is_secret(name, pats) else entry)
    return out


def secret_values(job: Job, patterns: Iterable[str] = SECRET_PATTERNS) -> list[str]:
    """The values of a job's secret-looking variables (Docker and Wasm), longest first."""
    pats = tuple(patterns)
    spec = job.Spec
    found = [v for k, v in spec.Wasm.EnvironmentVariables.items() if is_secret(k, pats)]
    for entry in spec.Docker.EnvironmentVariables:
        name, sep, value = entry.partition("=")
        if sep and is_secret(name, pats):
            found.append(value)
    return sorted({v for v in found if v}, key=len, reverse=True)


def scrub(text: str, job: Job, patterns: Iterable[str] = SECRET_PATTERNS) -> str:
    """``text`` (an error message about ``job``) with its secret values masked: an engine
    error may echo what the job printed or was given."""
    for value in secret_values(job, patterns):
        text = text.replace(value, MASK)
    return text
