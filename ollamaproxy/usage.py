# -*- test-case-name: tests.test_usage -*-
"""
How much each key used: requests and tokens, kept in an SQLite database.

The proxy calls L{UsageStore.record} once a request, in the reactor thread;
that only appends to a list.  Every few seconds the store writes what has
built up, in one transaction, on a thread of its own, so the reactor never
waits for the disk.  Rows are summed per minute, key and model, so the table
grows with time and the number of keys and models, not with traffic.

C{ollamaproxy usage} reads the database with L{summarise}, at any time: the
database is in WAL mode, so a reader neither blocks the proxy nor is
blocked by it.

Keys never appear in the database: rows name a key by its name.
"""

from __future__ import annotations

import math
import os
import sqlite3
import stat
from collections.abc import Callable, Iterable, Sequence
from contextlib import closing
from dataclasses import dataclass
from typing import Final, Literal, Protocol, TypeVar
from urllib.parse import quote

from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from ollamaproxy.exchange import StreamSummary

log = Logger()

DEFAULT_FLUSH_INTERVAL: Final = 5.0
# How long a write waits for another writer (a second proxy on the same
# file) before giving up until the next flush.
_BUSY_TIMEOUT: Final = 10.0
_MINUTE: Final = 60

_SCHEMA: Final = (
    "CREATE TABLE IF NOT EXISTS usage (ts REAL, key TEXT, model TEXT, requests INTEGER, "
    "prompt_tokens INTEGER, completion_tokens INTEGER)",
    # Leads with ts, so it is also the index that --since uses; unique, so
    # that every flush adds to a minute's row instead of adding a row.
    "CREATE UNIQUE INDEX IF NOT EXISTS usage_minute ON usage (ts, key, model)",
)
_ADD = (
    "INSERT INTO usage (ts, key, model, requests, prompt_tokens, completion_tokens) "
    "VALUES (?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (ts, key, model) DO UPDATE SET "
    "requests = requests + excluded.requests, "
    "prompt_tokens = prompt_tokens + excluded.prompt_tokens, "
    "completion_tokens = completion_tokens + excluded.completion_tokens"
)

UsageRow = tuple[float, str, str, int, int, int]
"""
C{(ts, key, model, requests, prompt_tokens, completion_tokens)}: one
request as recorded (C{ts} its time, C{requests} 1), or a minute's sum.
"""

_T = TypeVar("_T")


class UsageFileError(ValueError):
    """
    The usage database cannot be read: the message says which and why.
    """


def minute(when: float) -> float:
    """
    The start of the minute holding C{when} (seconds since the epoch).
    """
    return float(math.floor(when / _MINUTE) * _MINUTE)


def aggregate(rows: Iterable[UsageRow]) -> list[UsageRow]:
    """
    Sum rows per minute, key and model.

    @return: One row per minute, key and model, its C{ts} the start of the
        minute, in the order each first appears.
    """
    sums: dict[tuple[float, str, str], tuple[int, int, int]] = {}
    for ts, key, model, requests, prompt_tokens, completion_tokens in rows:
        where = (minute(ts), key, model)
        r, p, c = sums.get(where, (0, 0, 0))
        sums[where] = (r + requests, p + prompt_tokens, c + completion_tokens)
    return [(ts, key, model, r, p, c) for (ts, key, model), (r, p, c) in sums.items()]


def open_database(path: str) -> sqlite3.Connection:
    """
    Open the usage database for writing, creating it (readable by its owner
    only, in a directory created readable by its owner only) and its table
    if missing.  Blocking: call it away from the reactor thread.

    @return: A connection in autocommit mode (transactions are explicit).
    @raise OSError: If the file or its directory cannot be made.
    @raise sqlite3.Error: If the file is not a usable database.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o700, exist_ok=True)
    # SQLite would create the file world-readable; its -wal and -shm files
    # take the database file's permissions.
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
    connection = sqlite3.connect(path, timeout=_BUSY_TIMEOUT, isolation_level=None)
    try:
        connection.execute("PRAGMA journal_mode = WAL")
        # In WAL mode, a power cut may lose the last flushes, never the file.
        connection.execute("PRAGMA synchronous = NORMAL")
        for statement in _SCHEMA:
            connection.execute(statement)
    except BaseException:
        connection.close()
        raise
    return connection


def write_rows(path: str, rows: Sequence[UsageRow]) -> None:
    """
    Add C{rows} to the database at C{path} in one transaction, summed per
    minute, key and model, creating the database if missing.  Blocking: call
    it away from the reactor thread.

    @raise OSError: If the file or its directory cannot be made.
    @raise sqlite3.Error: If the database cannot be written; nothing is.
    """
    with closing(open_database(path)) as connection:
        connection.execute("BEGIN IMMEDIATE")
        try:
            connection.executemany(_ADD, aggregate(rows))
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")


@dataclass(frozen=True)
class Row:
    """
    What one key, or one model, used.

    @ivar name: The key's name, or the model (C{""} for requests that named
        no model or ended before saying what they used).
    """

    name: str
    requests: int
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        """
        Prompt and completion tokens together.
        """
        return self.prompt_tokens + self.completion_tokens


def summarise(path: str, since: float | None, by: Literal["key", "model"]) -> list[Row]:
    """
    Sum the usage in the database at C{path}, without changing it.

    @param since: Count only minutes from the one holding this time (seconds
        since the epoch), or everything if L{None}.
    @param by: Sum per C{key} or per C{model}.
    @return: One row per key or model, most total tokens first (then most
        requests, then by name).  An empty database file gives none.
    @raise FileNotFoundError: If there is no file at C{path}.
    @raise UsageFileError: If the file is not a usage database, or cannot be
        read.
    """
    if by not in ("key", "model"):
        raise ValueError(f"cannot sum usage by {by!r}")
    found = os.stat(path)
    if stat.S_ISDIR(found.st_mode):
        raise UsageFileError(f"cannot read usage file {path}: it is a directory")
    if found.st_size == 0:
        # Made by a proxy that has not yet had the chance to add the table.
        return []
    where, parameters = ("", ()) if since is None else ("WHERE ts >= ?", (minute(since),))
    query = (
        f"SELECT {by}, SUM(requests), SUM(prompt_tokens), SUM(completion_tokens) "
        f"FROM usage {where} GROUP BY {by} "
        "ORDER BY SUM(prompt_tokens) + SUM(completion_tokens) DESC, SUM(requests) DESC, "
        f"{by}"
    )
    uri = "file:" + quote(os.path.abspath(path)) + "?mode=ro"
    try:
        with closing(sqlite3.connect(uri, uri=True, timeout=_BUSY_TIMEOUT)) as connection:
            sums = connection.execute(query, parameters).fetchall()
    except sqlite3.Error as e:
        raise UsageFileError(f"cannot read usage file {path}: {e}") from None
    # A hand-made row may hold NULLs (SUM skips them; all NULL gives NULL).
    return [
        Row("" if name is None else str(name), int(r or 0), int(p or 0), int(c or 0))
        for name, r, p, c in sums
    ]


class Worker(Protocol):
    """
    Runs blocking work away from the reactor thread, one piece at a time.
    """

    def start(self) -> None:
        """
        Get ready to run work.
        """

    def run(self, work: Callable[[], _T]) -> Deferred[_T]:
        """
        Run C{work}.

        @return: Fires in the reactor thread with what C{work} returns, or
            fails with what it raises.
        """

    def stop(self) -> None:
        """
        Stop, once all work given to L{run} has finished.
        """


class ThreadWorker:
    """
    A L{Worker} with one thread of its own.

    With one thread, work runs in the order it is given, never two pieces
    at once.  L{stop} joins the thread: the store calls it once its last
    write has finished, so the join does not wait.
    """

    def __init__(self, reactor: IReactorFromThreads, name: str = "ollamaproxy-usage") -> None:
        """
        @param reactor: Given the results, in its thread.
        @param name: Names the thread (C{PoolThread-<name>-1}).
        """
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name=name)

    def start(self) -> None:
        self._pool.start()

    def run(self, work: Callable[[], _T]) -> Deferred[_T]:
        return deferToThreadPool(self._reactor, self._pool, work)

    def stop(self) -> None:
        if self._pool.started:
            self._pool.stop()


class UsageStore(Service):
    """
    Collects usage in memory and writes it to the database every
    C{flush_interval} seconds while the service runs.

    Stopping it writes what is left and stops the worker; the Deferred it
    returns fires when both are done.  Stop it after the requests in flight
    have finished: usage recorded after that is lost (with a warning).

    A write that fails is logged (once, until one succeeds again) and its
    rows are kept, summed per minute, for the next flush.
    """

    def __init__(
        self,
        path: str,
        clock: IReactorTime,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
        *,
        worker: Worker,
    ) -> None:
        """
        @param path: The database file; it and its directory are made if
            missing.
        @param clock: Times the flushes, and dates records given no time.
        @param flush_interval: Seconds between writes.
        @param worker: Does the writing; the store starts and stops it (in
            the daemon, a L{ThreadWorker} of the reactor).
        """
        self._path = path
        self._clock = clock
        self._flush_interval = flush_interval
        self._worker = worker
        self._pending: list[UsageRow] = []
        self._writing: set[Deferred[None]] = set()
        self._loop: LoopingCall | None = None
        self._failing = False
        self._stopped = False

    @property
    def path(self) -> str:
        """
        The database file.
        """
        return self._path

    def record(
        self,
        key: str,
        model: str = "",
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        when: float | None = None,
    ) -> None:
        """
        Count one request.  Cheap: nothing is written until the next flush.

        @param key: The name of the key that made it.
        @param model: The model that answered; C{""} if none is known.
        @param when: When it ended (seconds since the epoch); now if
            L{None}.
        """
        if self._stopped:
            log.warn(
                "Usage by key {key} came after the usage store stopped, and is not "
                "written to {usage_file}",
                key=key,
                usage_file=self._path,
            )
            return
        if when is None:
            when = self._clock.seconds()
        self._pending.append((when, key, model, 1, prompt_tokens, completion_tokens))

    def record_summary(
        self, key: str, summary: StreamSummary | None, when: float | None = None
    ) -> None:
        """
        Count one request and what its generation used, if anything (a
        request without a summary counts with no model and no tokens).
        """
        if summary is None:
            self.record(key, when=when)
        else:
            self.record(
                key, summary.model, summary.prompt_tokens, summary.completion_tokens, when
            )

    @property
    def pending(self) -> int:
        """
        How many records (or minute sums kept after a failed write) wait
        for the next flush.
        """
        return len(self._pending)

    def flush(self) -> Deferred[None]:
        """
        Start writing what is pending.

        @return: Fires (never fails) once this write and every write
            started before it have finished or failed.
        """
        if self._pending:
            batch, self._pending = self._pending, []
            self._submit(batch)
        done: Deferred[list[None]] = gatherResults(list(self._writing))
        return done.addCallback(lambda _: None)

    def _submit(self, batch: list[UsageRow]) -> None:
        """
        Hand C{batch} to the worker, and keep track of the write until it ends.
        """
        written: Deferred[None] = self._worker.run(lambda: write_rows(self._path, batch))
        written.addCallbacks(self._written, self._failed, errbackArgs=(batch,))
        self._writing.add(written)
        written.addBoth(self._finished, written)

    def _finished(self, result: None, written: Deferred[None]) -> None:
        self._writing.discard(written)
        return result

    def _written(self, _: None) -> None:
        if self._failing:
            self._failing = False
            log.info("Writing usage to {usage_file} again", usage_file=self._path)

    def _failed(self, reason: Failure, batch: list[UsageRow]) -> None:
        requests = sum(row[3] for row in batch)
        if self._stopped:
            log.failure(
                "Cannot write usage to {usage_file}: the usage of {requests} requests is lost",
                reason,
                usage_file=self._path,
                requests=requests,
            )
            return
        self._pending[:0] = aggregate(batch)
        if not self._failing:
            self._failing = True
            log.failure(
                "Cannot write usage to {usage_file}; will try again every {interval} "
                "seconds, keeping it in memory until then",
                reason,
                usage_file=self._path,
                interval=self._flush_interval,
            )

    def startService(self) -> None:
        super().startService()
        self._stopped = False
        self._worker.start()
        # Make the database now, so that a file that cannot be used is
        # reported at start, not at the first request.
        self._submit([])
        loop = LoopingCall(self.flush)
        loop.clock = self._clock
        self._loop = loop
        loop.start(self._flush_interval, now=False).addErrback(
            lambda reason: log.failure("Flushing usage failed", reason)
        )

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self._stopped = True
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()
        done = self.flush()
        done.addCallback(lambda _: self._worker.stop())
        return done
