"""The transition table (Bacalhau v0.3.25 ``ExecutionState`` moves) and its lookups."""

from __future__ import annotations

import pytest

from schemas.compute import ExecutionState as S
from worker.states import TRANSITIONS, Cause, single_move, sources_of, transition


@pytest.mark.parametrize("cause", list(Cause))
def test_lookups_agree_with_the_table(cause: Cause) -> None:
    rows = [t for t in TRANSITIONS if t.cause is cause]
    assert sources_of(cause) == {src for t in rows for src in t.sources}
    assert single_move(cause) == (rows[0] if len(rows) == 1 else None)
    for state in S:
        found = transition(cause, state)
        assert found == next((t for t in rows if state in t.sources), None)


def test_known_moves() -> None:
    rejected = single_move(Cause.BID_REJECTED)
    assert rejected is not None
    assert (rejected.sources, rejected.target) == ({S.CREATED}, S.CANCELLED)
    assert single_move(Cause.CANCEL) is None  # its move depends on the current state
    assert S.CREATED in sources_of(Cause.CANCEL) and S.RUNNING in sources_of(Cause.CANCEL)
    assert sources_of(Cause.RESULT_ACCEPTED) == {S.WAITING_VERIFICATION}
    assert not sources_of(Cause.ASK_FOR_BID) - {S.UNDEFINED}
