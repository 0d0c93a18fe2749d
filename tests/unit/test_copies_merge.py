"""Copies of one entity with different instance counts: the most complete one answers."""

from __future__ import annotations

from pydicom import Dataset

from dicomrouter.query.federation import FederatedAnswer
from dicomrouter.query.merge import instance_count, merge_copies, most_complete_first


def study(count: str | None, description: str) -> Dataset:
    answer = Dataset()
    answer.StudyInstanceUID = "1.2.3"
    answer.StudyDescription = description
    if count is not None:
        answer.NumberOfStudyRelatedInstances = count
    return answer


def test_the_most_complete_copy_wins_then_server_order():
    copies = [
        study("15", "primary"),
        study("20", "second"),
        study("20", "third"),
        study(None, "fourth"),
    ]
    counts = [instance_count("STUDY", copy) for copy in copies]
    assert counts == [15, 20, 20, None]
    order = most_complete_first(counts)
    assert order == [1, 2, 0, 3]
    merged = merge_copies([copies[i] for i in order])
    assert (merged.NumberOfStudyRelatedInstances, merged.StudyDescription) == (20, "second")
    assert (
        instance_count("IMAGE", copies[0]) is None and instance_count("WORKLIST", copies[0]) is None
    )


def test_an_answer_names_its_incomplete_copies():
    answer = FederatedAnswer(study("20", "x"), ["A", "B", "C"], {"A": 15, "B": 20, "C": None})
    assert answer.copies_differ and answer.incomplete == ["A", "C"]
    same = FederatedAnswer(study("2", "x"), ["A", "B"], {"A": 2, "B": 2})
    assert not same.copies_differ and same.incomplete == []
