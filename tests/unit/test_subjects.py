"""Request subjects (PROTOCOL.md §2): parsing, and the parser's memory of subjects seen."""

from __future__ import annotations

import pytest

from worker.transport import subjects as subjects_module
from worker.transport.subjects import ALL, Method, RequestSubject, Subjects


@pytest.fixture
def subjects() -> Subjects:
    return Subjects(prefix="p.q", node_id="n-1")


def test_parse_request_subjects(subjects: Subjects) -> None:
    assert subjects.parse("p.q.compute.n-1.r-1.AskForBid/v1") == RequestSubject(
        node="n-1", requester="r-1", method=Method.ASK_FOR_BID, raw_method="AskForBid/v1"
    )
    assert subjects.parse(f"p.q.compute.{ALL}.r-2.BidRejected/v1") == RequestSubject(
        node=ALL, requester="r-2", method=Method.BID_REJECTED, raw_method="BidRejected/v1"
    )
    unknown = subjects.parse("p.q.compute.n-1.r-1.Nope/v9")
    assert unknown is not None and unknown.method is None and unknown.raw_method == "Nope/v9"
    short = subjects.parse("p.q.compute.n-1.AskForBid/v1")
    assert short is not None and short.method is None and short.node == ""
    assert subjects.parse("p.compute.n-1.r-1.AskForBid/v1") is None
    assert subjects.parse("other.compute.n-1.r-1.AskForBid/v1") is None


def test_parse_remembers_each_subject_apart(subjects: Subjects) -> None:
    """Asked again, each subject gives its own parse, never another's."""
    names = [f"p.q.compute.n-1.r-{i}.{m.value}" for i in range(20) for m in Method]
    first = [subjects.parse(s) for s in names]
    again = [subjects.parse(s) for s in reversed(names)]
    assert again == list(reversed(first))
    for name, parsed in zip(names, first, strict=True):
        assert parsed is not None
        assert f"p.q.compute.{parsed.node}.{parsed.requester}.{parsed.raw_method}" == name
    assert subjects.parse("x.compute.n-1.r-1.AskForBid/v1") is None  # also remembered
    assert subjects.parse("x.compute.n-1.r-1.AskForBid/v1") is None


def test_parse_memory_is_bounded(subjects: Subjects, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(subjects_module, "PARSED_MAX", 8)
    for i in range(50):
        parsed = subjects.parse(f"p.q.compute.n-1.r-{i}.GetExecution/v1")
        assert parsed is not None and parsed.requester == f"r-{i}"
        assert len(subjects._parsed) <= 8
    assert subjects.parse("p.q.compute.n-1.r-3.GetExecution/v1") == RequestSubject(
        node="n-1", requester="r-3", method=Method.GET_EXECUTION, raw_method="GetExecution/v1"
    )
