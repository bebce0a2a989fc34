"""
Tests for L{ollamaproxy.record.usage.UsageStore} when its database is down: usage
kept in memory (bounded), moved to the spill file beyond the bound and at
stop, handed over when the database returns; logs and metrics say so.

In memory: a fake database the test takes down and brings back, a worker
that runs work at once, and a L{Clock}.  The spill file is a real SQLite
usage file.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, LogLevel, globalLogPublisher
from zope.interface import implementer

from ollamaproxy.record.usage import UsageCollector, UsageStore
from ollamaproxy.record.usage_db import (
    Bucket,
    By,
    DatabaseDown,
    Row,
    SeriesRow,
    SqliteUsage,
    UsageRow,
    aggregate,
    summarise,
)
from tests.fakes.worker import ManualWorker

T0 = 1795762800.0


class FakeDatabase:
    """
    A usage database in memory that the test can take down.

    @ivar rows: Every row written, summed per minute, key and model.
    """

    name = "postgresql://proxy@db.example/usage"

    def __init__(self) -> None:
        self.up = True
        self.rows: dict[tuple[float, str, str], tuple[int, int, int]] = {}
        self.closed = False

    def write(self, rows: Sequence[UsageRow]) -> None:
        if not self.up:
            raise DatabaseDown(f"database {self.name}: connection refused")
        for ts, key, model, r, p, c, *_ in aggregate(rows):
            old = self.rows.get((ts, key, model), (0, 0, 0))
            self.rows[(ts, key, model)] = (old[0] + r, old[1] + p, old[2] + c)

    def requests(self) -> int:
        return sum(r for r, _, _ in self.rows.values())

    def summarise(self, since: float | None, by: By, until: float | None = None) -> list[Row]:
        raise NotImplementedError

    def tokens_by_key(self, since: float) -> dict[str, int]:
        raise NotImplementedError

    def series(self, since: float, until: float, bucket: Bucket) -> list[SeriesRow]:
        raise NotImplementedError

    def last_used(self) -> dict[str, float]:
        raise NotImplementedError

    def close(self) -> None:
        self.closed = True




@implementer(ILogObserver)
class Events:
    def __init__(self) -> None:
        self.events: list[LogEvent] = []

    def __call__(self, event: LogEvent) -> None:
        if event.get("log_namespace") == "ollamaproxy.record.usage":
            self.events.append(event)

    def levels(self, level: LogLevel) -> list[LogEvent]:
        return [e for e in self.events if e["log_level"] == level]


@pytest.fixture
def events() -> Iterator[Events]:
    """
    The usage store's log events while the test runs.
    """
    observer = Events()
    globalLogPublisher.addObserver(observer)
    yield observer
    globalLogPublisher.removeObserver(observer)


@pytest.fixture
def clock() -> Clock:
    clock = Clock()
    clock.advance(T0)
    return clock


@pytest.fixture
def spill(tmp_path: Path) -> SqliteUsage:
    """
    The local usage file as the spill file.
    """
    return SqliteUsage(str(tmp_path / "usage.sqlite3"))


def in_file(spill: SqliteUsage) -> list[Row]:
    return summarise(spill.path, None, "key") if Path(spill.path).exists() else []


def test_usage_is_kept_while_the_database_is_down(clock: Clock, events: Events) -> None:
    """
    While the database is down, usage is kept in memory, summed per minute;
    it is written when the database returns.  One warning when it goes down
    (never a traceback), one line when it returns, and C{ready} follows.
    """
    database = FakeDatabase()
    store = UsageStore(database, clock, 5.0, worker=ManualWorker())
    store.startService()
    assert store.ready
    database.up = False
    for second in range(30):
        store.record("bob", "llama3", 1, 2, when=T0 + second)
        clock.advance(1)
    assert not store.ready
    assert store.pending == 1  # one minute, one key, one model
    [down] = events.levels(LogLevel.warn)
    assert "Cannot write usage to" in down["log_format"]
    assert down["usage_file"] == database.name
    assert "connection refused" in down["reason"]
    assert "log_failure" not in down
    database.up = True
    clock.advance(5)
    assert store.ready and store.pending == 0
    assert database.rows == {(T0, "bob", "llama3"): (30, 30, 60)}
    [back] = [e for e in events.levels(LogLevel.info) if "again" in e["log_format"]]
    assert back["usage_file"] == database.name
    store.stopService()


def test_beyond_the_bound_usage_goes_to_the_spill_file(
    clock: Clock, spill: SqliteUsage, events: Events
) -> None:
    """
    More minute sums waiting than C{max_pending}: they are moved to the
    spill file (a warning, and a count), and handed to the database once it
    returns, then deleted from the file.
    """
    database = FakeDatabase()
    store = UsageStore(database, clock, 5.0, worker=ManualWorker(), spill=spill, max_pending=3)
    store.startService()
    database.up = False
    for n in range(5):
        store.record(f"key{n}", "llama3", 1, 1, when=T0)
    clock.advance(5)
    assert store.pending == 0
    assert store.spilled_rows == 5 and store.dropped_rows == 0
    assert sum(row.requests for row in in_file(spill)) == 5
    assert any(spill.path == e.get("spill_file") for e in events.levels(LogLevel.warn))
    database.up = True
    clock.advance(5)
    assert database.requests() == 5
    assert in_file(spill) == []
    store.stopService()


def test_beyond_the_bound_without_a_spill_file_the_oldest_are_dropped_loudly(
    clock: Clock, events: Events
) -> None:
    """
    Without a spill file, the oldest minute sums beyond the bound are
    dropped: an error in the log says how many requests, and the count
    shows in the metrics; the newest are kept.
    """
    database = FakeDatabase()
    store = UsageStore(database, clock, 5.0, worker=ManualWorker(), max_pending=2)
    store.startService()
    database.up = False
    for n in range(4):
        store.record("bob", "llama3", when=T0 + 60 * n)
    clock.advance(5)
    assert store.pending == 2 and store.dropped_rows == 2
    [error] = events.levels(LogLevel.error)
    assert error["count"] == 2 and error["requests"] == 2
    database.up = True
    clock.advance(5)
    assert sorted(database.rows) == [(T0 + 120, "bob", "llama3"), (T0 + 180, "bob", "llama3")]
    registry = CollectorRegistry()
    registry.register(UsageCollector(store))
    assert b"ollamaproxy_usage_dropped_rows_total 2.0" in generate_latest(registry)
    store.stopService()


def test_stopping_while_down_spills_and_the_next_start_writes_it(
    clock: Clock, spill: SqliteUsage
) -> None:
    """
    Stopping while the database is down loses nothing: what is pending goes
    to the spill file, and the next start hands it to the database.
    """
    database = FakeDatabase()
    store = UsageStore(database, clock, 5.0, worker=ManualWorker(), spill=spill)
    store.startService()
    database.up = False
    store.record("bob", "llama3", 3, 4, when=T0)
    store.record("bob", "llama3", 3, 4, when=T0 + 1)
    assert store.stopService().called
    assert database.closed
    assert in_file(spill) == [Row("bob", 2, 6, 8)]
    assert database.rows == {}
    database.up = True
    again = UsageStore(database, clock, 5.0, worker=ManualWorker(), spill=spill)
    again.startService()
    assert database.rows == {(T0, "bob", "llama3"): (2, 6, 8)}
    assert in_file(spill) == []
    again.stopService()


def test_a_failed_hand_over_keeps_the_spill_file(clock: Clock, spill: SqliteUsage) -> None:
    """
    If the database fails while the spill file is handed over, the file
    keeps its rows (nothing counted twice), and they go at a later flush.
    """
    spill.write([(T0, "bob", "llama3", 1, 1, 1, 0)])
    database = FakeDatabase()
    writes: list[int] = []
    real = database.write

    def flaky(rows: Sequence[UsageRow]) -> None:
        writes.append(len(rows))
        if len(writes) == 2:
            raise DatabaseDown("gone")
        real(rows)

    database.write = flaky  # type: ignore[method-assign]
    store = UsageStore(database, clock, 5.0, worker=ManualWorker(), spill=spill)
    store.startService()
    assert writes == [0, 1] and database.rows == {}
    assert in_file(spill) == [Row("bob", 1, 1, 1)]
    store.record("alice")
    clock.advance(5)
    assert database.requests() == 2
    assert in_file(spill) == []
    store.stopService()


def test_metrics_say_whether_the_database_is_up(clock: Clock) -> None:
    """
    C{ollamaproxy_database_up} follows the readiness it is given, and the
    pending gauge counts what waits.
    """
    database = FakeDatabase()
    store = UsageStore(database, clock, 5.0, worker=ManualWorker())
    store.startService()
    registry = CollectorRegistry()
    registry.register(UsageCollector(store, lambda: store.ready))
    assert b"ollamaproxy_database_up 1.0" in generate_latest(registry)
    database.up = False
    store.record("bob")
    clock.advance(5)
    text = generate_latest(registry)
    assert b"ollamaproxy_database_up 0.0" in text
    assert b"ollamaproxy_usage_pending_rows 1.0" in text
    database.up = True
    store.stopService()
    assert database.requests() == 1
