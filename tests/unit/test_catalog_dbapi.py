"""The one DB-API transaction both the CLI's plain SQL and the router's direct path run (catalog/dbapi.py):
the writers' lock around the whole of it, BEGIN, commit; on any failure rollback, discard, the first error."""

from __future__ import annotations

import pytest

from dicomrouter.catalog.dbapi import SQLITE_WRITE, transaction


class Recorded:
    """A DB-API connection and a writers' lock that write down what is done to them, in order."""

    def __init__(self, fail: str | None = None) -> None:
        self.calls: list[str] = []
        self.fail = fail  # the call that raises

    def _call(self, name: str) -> None:
        self.calls.append(name)
        if name == self.fail:
            raise RuntimeError(name)

    def __enter__(self) -> Recorded:  # the writers' lock, as `with` takes it
        self._call("lock")
        return self

    def __exit__(self, *_exc: object) -> None:
        self._call("unlock")

    def take(self) -> Recorded:
        self._call("take")
        return self

    def cursor(self) -> Recorded:
        return self

    def execute(self, sql: str) -> None:
        self._call(sql)

    def close(self) -> None:
        pass

    def commit(self) -> None:
        self._call("commit")

    def rollback(self) -> None:
        self._call("rollback")


def run(recorded: Recorded, begin: str | None, work_fails: bool = False) -> None:
    with transaction(
        recorded.take,
        begin=begin,
        write_lock=recorded,  # type: ignore[arg-type]
        discard=lambda connection: connection.calls.append("discard"),
    ):
        recorded.calls.append("work")
        if work_fails:
            raise ValueError("work")


def test_lock_then_connection_then_begin_and_commit_inside_the_lock() -> None:
    recorded = Recorded()
    run(recorded, SQLITE_WRITE)
    assert recorded.calls == ["lock", "take", SQLITE_WRITE, "work", "commit", "unlock"]


def test_no_begin_where_the_driver_begins_by_itself() -> None:
    recorded = Recorded()
    run(recorded, None)
    assert recorded.calls == ["lock", "take", "work", "commit", "unlock"]


@pytest.mark.parametrize("fail", [SQLITE_WRITE, "work", "commit"])
def test_a_failure_rolls_back_and_discards_under_the_lock(fail: str) -> None:
    recorded = Recorded(fail=None if fail == "work" else fail)
    with pytest.raises((RuntimeError, ValueError), match=fail):
        run(recorded, SQLITE_WRITE, work_fails=fail == "work")
    assert recorded.calls[-3:] == ["rollback", "discard", "unlock"]
    assert ("work" in recorded.calls) == (fail != SQLITE_WRITE)


def test_a_failed_rollback_does_not_hide_the_first_error() -> None:
    recorded = Recorded(fail="rollback")
    with pytest.raises(ValueError, match="work"):
        run(recorded, SQLITE_WRITE, work_fails=True)
    assert recorded.calls[-3:] == ["rollback", "discard", "unlock"]


def test_a_connection_that_cannot_be_had_releases_the_lock() -> None:
    recorded = Recorded(fail="take")
    with pytest.raises(RuntimeError, match="take"):
        run(recorded, SQLITE_WRITE)
    assert recorded.calls == ["lock", "take", "unlock"]
