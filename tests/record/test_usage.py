"""
Tests for L{ollamaproxy.record.usage}: recording usage in memory, writing it to
SQLite away from the reactor thread, and summing it for the command.

Most tests give the store a L{Worker} that runs work when the test says
(at once, or when released), and a L{Clock}; one runs the real
L{ThreadWorker}, delivering its results through a queue that the test
drains, since no reactor runs.
"""

from __future__ import annotations

import os
import queue
import sqlite3
import stat
import threading
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

from ollamaproxy.config import default_usage_file
from ollamaproxy.exchange import StreamSummary
from ollamaproxy.record.usage import ThreadWorker, UsageStore
from ollamaproxy.record.usage_db import (
    Row,
    UsageFileError,
    UsageRow,
    aggregate,
    drain,
    minute,
    summarise,
    write_rows,
)
from tests.fakes.observers import ErrorCollector
from tests.fakes.worker import ManualWorker

# 2026-11-27T07:00:00Z, the start of a minute.
T0 = 1795762800.0
THREAD_NAME = "test-usage"


@implementer(IReactorFromThreads)
class QueueReactor:
    """
    Just enough reactor for L{ThreadWorker}: C{callFromThread} queues the
    call for the test's thread to make.
    """

    def __init__(self) -> None:
        self.calls: queue.Queue[Callable[[], object]] = queue.Queue()

    def callFromThread(
        self, callable: Callable[..., object], *args: object, **kwargs: object
    ) -> None:
        self.calls.put(partial(callable, *args, **kwargs))

    def wait_for(self, d: Deferred[Any]) -> None:
        """
        Make the queued calls until C{d} has a result.
        """
        while not d.called:
            self.calls.get(timeout=30)()


def pool_threads() -> list[threading.Thread]:
    """
    The live threads of the test L{ThreadWorker}s.
    """
    return [t for t in threading.enumerate() if THREAD_NAME in t.name]


@pytest.fixture
def path(tmp_path: Path) -> str:
    """
    A usage database in a directory that does not exist yet.
    """
    return str(tmp_path / "state" / "ollamaproxy" / "usage.sqlite3")


@pytest.fixture
def clock() -> Clock:
    """
    The store's clock, at L{T0}.
    """
    clock = Clock()
    clock.advance(T0)
    return clock


@pytest.fixture
def worker() -> ManualWorker:
    """
    A worker that runs work at once.
    """
    return ManualWorker()


@pytest.fixture
def store(path: str, clock: Clock, worker: ManualWorker) -> Iterator[UsageStore]:
    """
    A running store writing to L{path} every 5 seconds; stopped afterwards
    if the test did not.
    """
    store = UsageStore(path, clock, 5.0, worker=worker)
    store.startService()
    yield store
    if store.running:
        store.stopService()


@implementer(ILogObserver)
class Warnings:
    """
    Keeps the warnings logged.
    """

    def __init__(self) -> None:
        self.events: list[LogEvent] = []

    def __call__(self, event: LogEvent) -> None:
        if event.get("log_level") == LogLevel.warn:
            self.events.append(event)


@pytest.fixture
def warnings() -> Iterator[list[LogEvent]]:
    """
    The warnings logged while the test runs.
    """
    observer = Warnings()
    globalLogPublisher.addObserver(observer)
    yield observer.events
    globalLogPublisher.removeObserver(observer)


def table(path: str) -> list[tuple[Any, ...]]:
    """
    Every row of the usage table, in order.
    """
    with sqlite3.connect(path) as connection:
        rows = connection.execute(
            "SELECT ts, key, model, requests, prompt_tokens, completion_tokens FROM usage "
            "ORDER BY ts, key, model"
        ).fetchall()
    connection.close()
    return rows


def by_key(path: str) -> list[Row]:
    """
    All the usage in L{path}, per key.
    """
    return summarise(path, None, "key")


def test_records_wait_for_a_flush(store: UsageStore, clock: Clock, path: str) -> None:
    """Records stay in memory until the flush interval passes, and are then written."""
    store.record("bob", "llama3", 10, 20)
    store.record("bob", "llama3", 1, 2)
    clock.advance(4.9)
    assert by_key(path) == []
    assert store.pending == 2
    clock.advance(0.1)
    assert by_key(path) == [Row("bob", 2, 11, 22)]
    assert store.pending == 0


def test_each_flush_is_one_transaction(
    store: UsageStore, clock: Clock, worker: ManualWorker
) -> None:
    """Each flush is one piece of work for the worker, and none is made with nothing to write."""
    assert worker.log == ["start", "run", "done"]
    clock.advance(5)
    assert worker.log == ["start", "run", "done"]
    for i in range(100):
        store.record(f"key{i % 3}", "m", 1, 1)
    clock.advance(5)
    assert worker.log == ["start", "run", "done", "run", "done"]


def test_database_is_made_private_and_in_wal_mode(store: UsageStore, path: str) -> None:
    """Starting makes the directory (0o700) and database (0o600, WAL) before any request."""
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with sqlite3.connect(path) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        indexes = connection.execute("PRAGMA index_list(usage)").fetchall()
        columns = connection.execute("PRAGMA table_info(usage)").fetchall()
    connection.close()
    assert [(c[1], c[2]) for c in columns] == [
        ("ts", "REAL"), ("key", "TEXT"), ("model", "TEXT"), ("requests", "INTEGER"),
        ("prompt_tokens", "INTEGER"), ("completion_tokens", "INTEGER"), ("refused", "INTEGER"),
        ("end_user", "TEXT"),
    ]
    [index] = indexes
    assert index[1] == "usage_minute_user" and index[2] == 1
    store.record("bob")
    store.flush()
    for name in os.listdir(os.path.dirname(path)):
        mode = stat.S_IMODE(os.stat(os.path.join(os.path.dirname(path), name)).st_mode)
        assert mode == 0o600, name


def test_rows_are_summed_per_minute(store: UsageStore, clock: Clock, path: str) -> None:
    """Rows are summed per minute, key and model, and every flush adds to its minute's row."""
    store.record("bob", "llama3", 1, 10, when=T0 + 1)
    store.record("bob", "llama3", 2, 20, when=T0 + 59.9)
    store.record("bob", "qwen", 4, 40, when=T0 + 30)
    store.record("alice", "llama3", 8, 80, when=T0 + 30)
    store.record("bob", "llama3", 16, 160, when=T0 + 60)
    clock.advance(5)
    store.record("bob", "llama3", 32, 320, when=T0 + 61)
    clock.advance(5)
    assert table(path) == [
        (T0, "alice", "llama3", 1, 8, 80),
        (T0, "bob", "llama3", 2, 3, 30),
        (T0, "bob", "qwen", 1, 4, 40),
        (T0 + 60, "bob", "llama3", 2, 48, 480),
    ]


def test_several_proxies_add_up_in_one_database(
    store: UsageStore, clock: Clock, path: str, worker: ManualWorker
) -> None:
    """
    Proxies sharing a port (C{reuseport:}) share the database too: what each
    writes for the same minute, key and model adds up in one row.
    """
    other = UsageStore(path, clock, 5.0, worker=worker)
    other.startService()
    store.record("bob", "llama3", 1, 10, when=T0 + 1)
    other.record("bob", "llama3", 2, 20, when=T0 + 2)
    other.record("alice", "llama3", 4, 40, when=T0 + 3)
    clock.advance(5)
    store.record("bob", "llama3", 8, 80, when=T0 + 4)
    other.stopService()
    store.stopService()
    assert table(path) == [
        (T0, "alice", "llama3", 1, 4, 40),
        (T0, "bob", "llama3", 3, 11, 110),
    ]


def test_aggregate() -> None:
    """aggregate sums requests and tokens per minute, key and model, in order of appearance."""
    assert aggregate([
        (T0 + 70, "b", "m", 1, 1, 1, 0),
        (T0 + 5, "a", "m", 1, 2, 3, 0),
        (T0 + 119, "b", "m", 2, 10, 10, 0),
        (T0 + 5, "a", "", 1, 0, 0, 0),
    ]) == [
        (T0 + 60, "b", "m", 3, 11, 11, 0, ""),
        (T0, "a", "m", 1, 2, 3, 0, ""),
        (T0, "a", "", 1, 0, 0, 0, ""),
    ]
    assert aggregate([]) == []
    assert minute(T0 - 0.5) == T0 - 60


def test_requests_without_a_summary_count(store: UsageStore, clock: Clock, path: str) -> None:
    """A request without a summary counts as one request with no model and no tokens."""
    store.record_summary("bob", None)
    store.record_summary("bob", StreamSummary("llama3", "stop", 5, 7, 12.5, 0.1))
    store.record("carol")
    clock.advance(5)
    assert table(path) == [
        (T0, "bob", "", 1, 0, 0),
        (T0, "bob", "llama3", 1, 5, 7),
        (T0, "carol", "", 1, 0, 0),
    ]


def test_time_defaults_to_the_clock(store: UsageStore, clock: Clock, path: str) -> None:
    """A record given no time is dated by the store's clock."""
    clock.advance(90)
    store.record("bob")
    clock.advance(5)
    assert table(path) == [(T0 + 60, "bob", "", 1, 0, 0)]


def test_stopping_writes_what_is_left(
    store: UsageStore, clock: Clock, worker: ManualWorker, path: str
) -> None:
    """stopService writes the pending rows at once, stops the worker, and leaves no timer."""
    store.record("bob", "llama3", 1, 2)
    stopped = store.stopService()
    assert stopped.called
    assert by_key(path) == [Row("bob", 1, 1, 2)]
    assert worker.log[-1] == "stop"
    assert clock.getDelayedCalls() == []


def test_stopping_waits_for_the_write_in_flight(path: str, clock: Clock) -> None:
    """stopService fires only after the write in flight and the last one, then stops the worker."""
    worker = ManualWorker(held=True)
    store = UsageStore(path, clock, worker=worker)
    store.startService()
    store.record("bob", "llama3", 1, 1)
    clock.advance(5)
    store.record("bob", "llama3", 2, 2)
    stopped = store.stopService()
    assert not stopped.called
    assert worker.log == ["start", "run", "run", "run"]
    worker.release()
    assert stopped.called
    assert worker.log[-1] == "stop"
    assert by_key(path) == [Row("bob", 2, 3, 3)]
    assert clock.getDelayedCalls() == []


def test_usage_survives_a_restart(path: str, clock: Clock) -> None:
    """A second store on the same file adds to what the first wrote, in the same minute's row."""
    for tokens in (10, 100):
        store = UsageStore(path, clock, worker=ManualWorker())
        store.startService()
        store.record("bob", "llama3", tokens, tokens)
        store.stopService()
        clock.advance(1)
    assert by_key(path) == [Row("bob", 2, 110, 110)]
    assert table(path) == [(T0, "bob", "llama3", 2, 110, 110)]


def test_failed_write_is_kept_and_retried(
    tmp_path: Path, clock: Clock, observe_errors: ErrorCollector
) -> None:
    """A write that fails is logged once and kept, and is written when the file can be again."""
    blocker = tmp_path / "state"
    blocker.write_text("not a directory")
    path = str(blocker / "usage.sqlite3")
    store = UsageStore(path, clock, worker=ManualWorker())
    store.startService()
    assert len(observe_errors.errors) == 1
    store.record("bob", "llama3", 1, 1, when=T0)
    store.record("bob", "llama3", 2, 2, when=T0 + 1)
    clock.advance(5)
    store.record("bob", "llama3", 4, 4, when=T0 + 61)
    clock.advance(5)
    assert len(observe_errors.errors) == 1
    assert "Cannot write usage to" in observe_errors.errors[0]["log_format"]
    assert store.pending == 2
    observe_errors.errors.clear()
    blocker.unlink()
    clock.advance(5)
    assert store.pending == 0
    assert table(path) == [(T0, "bob", "llama3", 2, 3, 3), (T0 + 60, "bob", "llama3", 1, 4, 4)]
    store.stopService()
    assert observe_errors.errors == []


def test_failure_when_stopping_is_logged(
    tmp_path: Path, clock: Clock, observe_errors: ErrorCollector
) -> None:
    """If the last write fails, stopService still stops, and logs how much usage was lost."""
    blocker = tmp_path / "state"
    blocker.write_text("")
    worker = ManualWorker()
    store = UsageStore(str(blocker / "usage.sqlite3"), clock, worker=worker)
    store.startService()
    observe_errors.errors.clear()
    store.record("bob")
    store.record("bob")
    stopped = store.stopService()
    assert stopped.called and worker.log[-1] == "stop"
    [event] = observe_errors.errors
    assert event["requests"] == 2
    assert "is lost" in event["log_format"]
    observe_errors.errors.clear()


def test_record_after_stop_warns(
    store: UsageStore, path: str, warnings: list[LogEvent]
) -> None:
    """Usage recorded after the store stopped is not kept, and a warning says so."""
    store.stopService()
    store.record("bob", "llama3", 1, 1)
    assert store.pending == 0
    [warning] = warnings
    assert warning["key"] == "bob"
    assert by_key(path) == []


@pytest.fixture
def threads() -> Iterator[QueueReactor]:
    """
    A reactor for L{ThreadWorker}s; fails the test if a worker thread is
    still alive at its end.
    """
    before = set(threading.enumerate())
    yield QueueReactor()
    left = pool_threads()
    for thread in left:
        thread.join(timeout=30)
    assert left == []
    assert set(threading.enumerate()) <= before


def test_writes_happen_on_the_worker_thread(
    path: str, clock: Clock, threads: QueueReactor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a ThreadWorker, the database is opened and written on its thread, never the caller's."""
    connected: list[threading.Thread] = []
    connect = sqlite3.connect

    def spy(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        connected.append(threading.current_thread())
        connection: sqlite3.Connection = connect(*args, **kwargs)
        return connection

    monkeypatch.setattr(sqlite3, "connect", spy)
    store = UsageStore(path, clock, worker=ThreadWorker(threads, name=THREAD_NAME))
    store.startService()
    [thread] = pool_threads()
    store.record("bob", "llama3", 1, 2)
    flushed = store.flush()
    threads.wait_for(flushed)
    store.record("bob", "llama3", 4, 8)
    stopped = store.stopService()
    threads.wait_for(stopped)
    assert stopped.called
    assert not thread.is_alive()
    assert pool_threads() == []
    assert len(connected) == 3
    assert set(connected) == {thread}
    monkeypatch.undo()
    assert by_key(path) == [Row("bob", 2, 5, 10)]


def test_thread_worker_reports_failures(threads: QueueReactor) -> None:
    """ThreadWorker delivers an exception raised on its thread as a failed Deferred."""
    worker = ThreadWorker(threads, name=THREAD_NAME)
    worker.start()
    try:

        def boom() -> None:
            raise ZeroDivisionError(threading.current_thread().name)

        failed = worker.run(boom)
        threads.wait_for(failed)
        reasons: list[Failure] = []
        failed.addErrback(reasons.append)
        assert reasons[0].check(ZeroDivisionError)
        assert THREAD_NAME in str(reasons[0].value)
    finally:
        worker.stop()
    worker.stop()


@pytest.fixture
def recorded(path: str) -> str:
    """
    A database with usage by three keys of three models over two days.
    """
    day = 24 * 3600
    write_rows(path, [
        (T0 - day, "alice", "llama3", 1, 1000, 1000, 0),
        (T0 - day + 30, "bob", "qwen", 1, 10, 10, 0),
        (T0, "bob", "llama3", 1, 100, 200, 0),
        (T0 + 10, "bob", "", 1, 0, 0, 0),
        (T0 + 3600, "carol", "qwen", 1, 50, 50, 0),
        (T0 + 3600, "carol", "", 1, 0, 0, 0),
        (T0 + 3601, "dave", "", 1, 0, 0, 0),
    ])
    return path


def test_summarise_by_key(recorded: str) -> None:
    """summarise sums per key, most tokens first, then most requests, then by name."""
    assert summarise(recorded, None, "key") == [
        Row("alice", 1, 1000, 1000),
        Row("bob", 3, 110, 210),
        Row("carol", 2, 50, 50),
        Row("dave", 1, 0, 0),
    ]


def test_summarise_by_model(recorded: str) -> None:
    """summarise sums per model; requests without a model have the name ''."""
    assert summarise(recorded, None, "model") == [
        Row("llama3", 2, 1100, 1200),
        Row("qwen", 2, 60, 60),
        Row("", 3, 0, 0),
    ]


def test_summarise_since(recorded: str) -> None:
    """summarise counts from the minute holding since, for both groupings."""
    assert summarise(recorded, T0 + 59, "key") == [Row("bob", 2, 100, 200),
                                                   Row("carol", 2, 50, 50), Row("dave", 1, 0, 0)]
    assert summarise(recorded, T0 + 60, "model") == [Row("qwen", 1, 50, 50), Row("", 2, 0, 0)]
    assert summarise(recorded, T0 + 7200, "key") == []


def test_summarise_missing_file(path: str) -> None:
    """summarise raises FileNotFoundError for a missing database, and creates nothing."""
    with pytest.raises(FileNotFoundError):
        summarise(path, None, "key")
    assert not os.path.exists(os.path.dirname(path))


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"not a database, not at all, but long enough to look like one" * 20,
         "file is not a database"),
        (None, "no such table: usage"),
    ],
)
def test_summarise_unusable_file(tmp_path: Path, content: bytes | None, fragment: str) -> None:
    """summarise raises UsageFileError naming the file for a file that is not a usage database."""
    path = tmp_path / "usage.sqlite3"
    if content is None:
        with sqlite3.connect(path) as connection:
            connection.execute("CREATE TABLE other (x)")
        connection.close()
    else:
        path.write_bytes(content)
    with pytest.raises(UsageFileError, match=fragment) as raised:
        summarise(str(path), None, "key")
    assert str(path) in str(raised.value)


def test_summarise_directory(tmp_path: Path) -> None:
    """summarise raises UsageFileError for a directory."""
    with pytest.raises(UsageFileError, match="it is a directory"):
        summarise(str(tmp_path), None, "model")


def test_summarise_empty_file(tmp_path: Path) -> None:
    """An empty file (a database not yet set up) holds no usage."""
    (tmp_path / "usage.sqlite3").write_bytes(b"")
    assert summarise(str(tmp_path / "usage.sqlite3"), None, "key") == []


def test_summarise_checks_by(recorded: str) -> None:
    """summarise refuses to group by anything but key or model."""
    with pytest.raises(ValueError, match="cannot sum usage by 'ts'"):
        summarise(recorded, None, "ts")  # type: ignore[arg-type]


def test_summarise_reads_while_a_store_writes(store: UsageStore, clock: Clock, path: str) -> None:
    """summarise reads the database while a store's writes go on, and sees each committed flush."""
    for i in range(3):
        store.record("bob", "m", 1, 1)
        clock.advance(5)
        assert by_key(path) == [Row("bob", i + 1, i + 1, i + 1)]


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"XDG_STATE_HOME": "/xdg", "HOME": "/home/u"}, "/xdg/ollamaproxy/usage.sqlite3"),
        ({"XDG_STATE_HOME": "", "HOME": "/home/u"},
         "/home/u/.local/state/ollamaproxy/usage.sqlite3"),
        ({"HOME": "/home/u"}, "/home/u/.local/state/ollamaproxy/usage.sqlite3"),
    ],
)
def test_default_usage_file(environ: dict[str, str], expected: str) -> None:
    """The default database is $XDG_STATE_HOME/ollamaproxy/usage.sqlite3, under ~/.local/state."""
    assert default_usage_file(environ) == expected


def test_a_file_from_before_refusals_gets_their_column(path: str) -> None:
    """
    A usage file made before refused requests were counted apart gets the
    column when next written, keeping its rows; read before that, it has
    no refusals.
    """
    os.makedirs(os.path.dirname(path))
    with sqlite3.connect(path) as connection:
        connection.execute(
            "CREATE TABLE usage (ts REAL, key TEXT, model TEXT, requests INTEGER, "
            "prompt_tokens INTEGER, completion_tokens INTEGER)")
        connection.execute(
            "CREATE UNIQUE INDEX usage_minute ON usage (ts, key, model)")
        connection.execute("INSERT INTO usage VALUES (?, 'bob', 'llama3', 1, 2, 3)", (T0,))
    connection.close()
    assert summarise(path, None, "key") == [Row("bob", 1, 2, 3, refused=0)]
    write_rows(path, [(T0 + 1, "bob", "llama3", 0, 0, 0, 1)])
    assert summarise(path, None, "key") == [Row("bob", 1, 2, 3, refused=1)]


def test_usage_is_summed_per_user_behind_a_key(store: UsageStore, clock: Clock,
                                               path: str) -> None:
    """
    Requests of a key that names its users are summed per user: by user,
    one row per user behind each key, the anonymous user and keys naming
    none as C{""}; by key, the key's users together, as before.
    """
    store.record("webui", "llama3", 1, 10, user="alice")
    store.record("webui", "llama3", 2, 20, user="alice")
    store.record("webui", "llama3", 4, 40, user="bob")
    store.record("webui", "llama3", 8, 80)
    store.record("webui", refused=True, user="bob")
    store.record("laptop", "llama3", 16, 160)
    clock.advance(5)
    assert summarise(path, None, "user") == [
        Row("laptop", 1, 16, 160, 0, ""),
        Row("webui", 1, 8, 80, 0, ""),
        Row("webui", 1, 4, 40, 1, "bob"),
        Row("webui", 2, 3, 30, 0, "alice"),
    ]
    assert summarise(path, None, "key") == [Row("laptop", 1, 16, 160), Row("webui", 4, 15, 150, 1)]


def test_a_file_from_before_users_gets_their_column(path: str) -> None:
    """
    A usage file made before users were counted gets the column when next
    written, keeping its rows as the keys' anonymous users'; its minute
    rows are then one per user.  Read before that, every user is the
    anonymous one.
    """
    os.makedirs(os.path.dirname(path))
    with sqlite3.connect(path) as connection:
        connection.execute(
            "CREATE TABLE usage (ts REAL, key TEXT, model TEXT, requests INTEGER, "
            "prompt_tokens INTEGER, completion_tokens INTEGER, "
            "refused INTEGER NOT NULL DEFAULT 0)")
        connection.execute(
            "CREATE UNIQUE INDEX usage_minute ON usage (ts, key, model)")
        connection.execute("INSERT INTO usage VALUES (?, 'bob', 'llama3', 1, 2, 3, 0)", (T0,))
    connection.close()
    assert summarise(path, None, "user") == [Row("bob", 1, 2, 3, 0, "")]
    write_rows(path, [(T0 + 1, "bob", "llama3", 1, 10, 10, 0, "alice"),
                      (T0 + 2, "bob", "llama3", 1, 1, 1, 0)])
    assert summarise(path, None, "user") == [Row("bob", 1, 10, 10, 0, "alice"),
                                             Row("bob", 2, 3, 4, 0, "")]
    with sqlite3.connect(path) as connection:
        indexes = [row[1] for row in connection.execute("PRAGMA index_list(usage)")]
    connection.close()
    assert indexes == ["usage_minute_user"]


def test_a_spilled_users_usage_is_handed_over_with_its_user(tmp_path: Any) -> None:
    """
    Usage kept in the spill file while the database was down keeps its
    users when it is handed over.
    """
    spill = str(tmp_path / "spill.sqlite3")
    write_rows(spill, [(T0, "webui", "llama3", 1, 2, 3, 0, "alice")])
    handed: list[UsageRow] = []
    assert drain(spill, handed.extend) == 1
    assert handed == [(T0, "webui", "llama3", 1, 2, 3, 0, "alice")]
