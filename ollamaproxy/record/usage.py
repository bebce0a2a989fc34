# -*- test-case-name: tests.record.test_usage -*-
"""
Keeping usage while the proxy runs.

The proxy calls L{UsageStore.record} once a request, in the reactor thread;
that only appends to a list.  Every few seconds the store writes what has
built up to the usage database, in one transaction, on a thread of its own,
so the reactor never waits for the disk or the network.

The database is anything with the small interface L{UsageDatabase}: the
SQLite file (L{ollamaproxy.record.usage_db.SqliteUsage}), the default, or
PostgreSQL (L{ollamaproxy.postgres.usage.PostgresUsage}) with C{--database}.

When the database cannot take a write (PostgreSQL is down, say), nothing is
lost and no request waits: the rows stay in memory, summed per minute, key
and model, and are written at a later flush.  Those sums are bounded by
keys x models x minutes of the outage, and kept up to C{max_pending} of
them (L{DEFAULT_MAX_PENDING}, a few MB); beyond that, and at shutdown with
the database still down, they go to the I{spill} file (the local SQLite
usage file, same rows), which is handed over to the database once it takes
writes again, at the next start at the latest.  Without a spill file, the
oldest sums beyond the bound are dropped, with an error in the log and a
count in the metrics, never silently.

Why the store's own worker thread and psycopg rather than
C{twisted.enterprise.adbapi}: writes come in one batch every few seconds,
so one thread and one connection are enough, and one thread writes the
batches in the order they were made; C{adbapi}'s pool would add threads that
have nothing to do, reconnects only on the next use anyway, and would make
the store's retry and spill logic depend on the engine.  Both engines go
through the same L{Worker}, so the failure handling here is tested once, in
memory, with a fake database.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Final, Protocol, TypeVar

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from ollamaproxy.exchange import StreamSummary
from ollamaproxy.record.usage_db import (
    Bucket,
    By,
    DatabaseDown,
    Row,
    SeriesRow,
    SqliteUsage,
    UsageRow,
    UserRow,
    aggregate,
)

log = Logger()

DEFAULT_FLUSH_INTERVAL: Final = 5.0
# Minute sums (one per minute, key and model) kept in memory while the
# database cannot take them: 100 keys using 5 models each for over three
# hours, in about 20 MB.
DEFAULT_MAX_PENDING: Final = 100_000

_T = TypeVar("_T")


class UsageDatabase(Protocol):
    """
    Where usage is written and summed: blocking methods, which the store
    calls on its worker's thread.
    """

    @property
    def name(self) -> str:
        """
        What logs call it: the file, or the URL without its password.
        """

    def write(self, rows: Sequence[UsageRow]) -> None:
        """
        Add C{rows} in one transaction, summed per minute, key, model and
        user;
        with none, only check that the database can be written.

        @raise Exception: If it cannot; then nothing is written.
        """

    def summarise(self, since: float | None, by: By, until: float | None = None) -> list[Row]:
        """
        Requests and tokens per key, per model or per user behind a key,
        from the minute holding C{since} on (or all) up to C{until} (or
        now), most total tokens first (C{ollamaproxy usage}).
        """

    def tokens_by_key(self, since: float) -> dict[str, int]:
        """
        Prompt and completion tokens per key name, from the minute holding
        C{since} on.
        """

    def series(self, since: float, until: float, bucket: Bucket) -> list[SeriesRow]:
        """
        Requests and tokens per key and model, per hour or UTC day, from the
        minute holding C{since} up to C{until}, by time, key and model (the
        console's Usage view).
        """

    def last_used(self) -> dict[str, float]:
        """
        When each key (by name) was last used: the start of its latest
        minute (the console's Keys view).
        """

    def close(self) -> None:
        """
        Let go of any connection; called once no more work is given.
        """


class SpillFile(Protocol):
    """
    Where usage goes when the database cannot take it: the local usage file.
    """

    @property
    def name(self) -> str:
        """
        What logs call it.
        """

    def write(self, rows: Sequence[UsageRow]) -> None:
        """
        Add C{rows}.
        """

    def drain(self, into: Callable[[list[UsageRow]], None]) -> int:
        """
        Hand every row to C{into}, and delete them once it returns.

        @return: How many rows.
        """


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
    rows are kept, summed per minute, for the next flush, as the module
    says.

    @ivar spilled_rows: Minute sums moved to the spill file so far.
    @ivar dropped_rows: Minute sums lost so far (logged as errors).
    """

    def __init__(
        self,
        database: UsageDatabase | str,
        clock: IReactorTime,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
        *,
        worker: Worker,
        spill: SpillFile | None = None,
        max_pending: int = DEFAULT_MAX_PENDING,
    ) -> None:
        """
        @param database: Where usage goes; a path is the SQLite file there
            (it and its directory are made if missing).
        @param clock: Times the flushes, and dates records given no time.
        @param flush_interval: Seconds between writes.
        @param worker: Does the writing; the store starts and stops it (in
            the daemon, a L{ThreadWorker} of the reactor).
        @param spill: Where usage goes that the database cannot take, when
            more than C{max_pending} minute sums wait or at stop; handed over
            to the database once it takes writes again.  L{None}: beyond the
            bound the oldest are dropped, and at stop they are lost.
        @param max_pending: How many minute sums to keep in memory while
            the database cannot take them.
        """
        self._database: UsageDatabase = (
            SqliteUsage(database) if isinstance(database, str) else database
        )
        self._name = self._database.name
        self._clock = clock
        self._flush_interval = flush_interval
        self._worker = worker
        self._spill = spill
        self._max_pending = max_pending
        self._pending: list[UserRow] = []
        self._writing: set[Deferred[None]] = set()
        self._loop: LoopingCall | None = None
        # Whether the last write went through; None before the first.
        self._up: bool | None = None
        # Whether the spill file may hold rows for the database: look at
        # start, and after every spill.
        self._spill_dirty = spill is not None
        self._draining = False
        self._stopped = False
        self.spilled_rows = 0
        self.dropped_rows = 0

    @property
    def database(self) -> UsageDatabase:
        """
        Where usage goes.
        """
        return self._database

    @property
    def path(self) -> str:
        """
        The database's name (the file, for the SQLite file).
        """
        return self._name

    @property
    def ready(self) -> bool:
        """
        Whether the database took the last write (for readiness checks).
        """
        return self._up is True

    def record(
        self,
        key: str,
        model: str = "",
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        when: float | None = None,
        *,
        refused: bool = False,
        user: str = "",
    ) -> None:
        """
        Count one request.  Cheap: nothing is written until the next flush.

        @param key: The name of the key that made it.
        @param model: The model that answered; C{""} if none is known.
        @param when: When it ended (seconds since the epoch); now if
            L{None}.
        @param refused: Whether the proxy refused it rather than Ollama
            serving it: counted apart (L{ollamaproxy.record.usage_db}).
        @param user: Who it was for behind its key; C{""} for none.
        """
        if self._stopped:
            log.warn(
                "Usage by key {key} came after the usage store stopped, and is not "
                "written to {usage_file}",
                key=key,
                usage_file=self._name,
            )
            return
        if when is None:
            when = self._clock.seconds()
        self._pending.append(
            (when, key, model, int(not refused), prompt_tokens, completion_tokens, int(refused),
             user)
        )

    def record_summary(
        self, key: str, summary: StreamSummary | None, when: float | None = None,
        *, refused: bool = False, user: str = "",
    ) -> None:
        """
        Count one request and what its generation used, if anything (a
        request without a summary counts with no model and no tokens).
        """
        if summary is None:
            self.record(key, when=when, refused=refused, user=user)
        else:
            self.record(
                key, summary.model, summary.prompt_tokens, summary.completion_tokens, when,
                refused=refused, user=user,
            )

    # Reads of the database, on the store's worker (off the reactor thread,
    # after the writes given to it before): the console's Usage and Keys
    # views, and the token quotas at start.

    def series(self, since: float, until: float, bucket: Bucket) -> Deferred[list[SeriesRow]]:
        database = self._database
        return self._worker.run(lambda: database.series(since, until, bucket))

    def last_used(self) -> Deferred[dict[str, float]]:
        return self._worker.run(self._database.last_used)

    def tokens_by_key(self, since: float) -> Deferred[dict[str, int]]:
        database = self._database
        return self._worker.run(lambda: database.tokens_by_key(since))

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
        if self._pending or self._up is False:
            # With nothing pending, a write of nothing sees whether the
            # database is back.
            batch, self._pending = self._pending, []
            self._submit(batch)
        else:
            self._drain()
        done: Deferred[list[None]] = gatherResults(list(self._writing))
        return done.addCallback(lambda _: None)

    def _track(self, work: Deferred[None]) -> None:
        """
        Keep track of C{work} until it ends, so that L{flush} waits for it.
        """
        self._writing.add(work)
        work.addBoth(self._finished, work)

    def _submit(self, batch: list[UserRow]) -> None:
        """
        Hand C{batch} to the worker, and keep track of the write until it ends.
        """
        written: Deferred[None] = self._worker.run(lambda: self._database.write(batch))
        written.addCallbacks(self._written, self._failed, errbackArgs=(batch,))
        self._track(written)

    def _finished(self, result: None, written: Deferred[None]) -> None:
        self._writing.discard(written)
        return result

    def _written(self, _: None) -> None:
        if self._up is False:
            log.info("Writing usage to {usage_file} again", usage_file=self._name)
        self._up = True
        self._drain()

    def _failed(self, reason: Failure, batch: list[UserRow]) -> Deferred[None] | None:
        requests = sum(row[3] for row in batch)
        if self._stopped:
            if self._spill is not None and batch:
                return self._to_spill(aggregate(batch), "the proxy stops")
            log.failure(
                "Cannot write usage to {usage_file}: the usage of {requests} requests is lost",
                reason,
                usage_file=self._name,
                requests=requests,
            )
            self.dropped_rows += len(aggregate(batch))
            return None
        self._pending[:0] = aggregate(batch)
        if self._up is not False:
            self._up = False
            message = (
                "Cannot write usage to {usage_file}: {reason}; will try again every "
                "{interval} seconds, keeping it in memory until then (up to {max_pending} "
                "minute sums{beyond})"
            )
            fields: dict[str, object] = {
                "usage_file": self._name,
                "interval": self._flush_interval,
                "max_pending": self._max_pending,
                "beyond": "" if self._spill is None else f", then in {self._spill.name}",
            }
            if reason.check(DatabaseDown):
                log.warn(message, reason=reason.getErrorMessage(), **fields)
            else:
                log.failure(message, reason, LogLevel.critical,
                            reason=reason.getErrorMessage(), **fields)
        self._bound()
        return None

    def _bound(self) -> None:
        """
        Keep at most C{max_pending} minute sums in memory: move them all to
        the spill file beyond that, or, without one, drop the oldest.
        """
        if len(self._pending) <= self._max_pending:
            return
        self._pending = aggregate(self._pending)
        if len(self._pending) <= self._max_pending:
            return
        if self._spill is not None:
            batch, self._pending = self._pending, []
            self._track(self._to_spill(batch, "more are waiting than are kept in memory"))
            return
        # The failed batches are at the front: the oldest go.
        cut = len(self._pending) - self._max_pending
        dropped, self._pending = self._pending[:cut], self._pending[cut:]
        self.dropped_rows += cut
        log.error(
            "Usage waiting for {usage_file} is over the {max_pending} minute sums kept in "
            "memory: the oldest {count}, of {requests} requests, are dropped",
            usage_file=self._name,
            max_pending=self._max_pending,
            count=cut,
            requests=sum(row[3] for row in dropped),
        )

    def _to_spill(self, batch: list[UserRow], why: str) -> Deferred[None]:
        """
        Write C{batch} to the spill file, to be handed to the database later.
        """
        spill = self._spill
        assert spill is not None
        log.warn(
            "Keeping {count} minute sums of usage for {usage_file} in {spill_file} ({why}); "
            "they are written to {usage_file} once it takes writes again",
            count=len(batch),
            usage_file=self._name,
            spill_file=spill.name,
            why=why,
        )
        spilled: Deferred[None] = self._worker.run(lambda: spill.write(batch))

        def done(_: None) -> None:
            self.spilled_rows += len(batch)
            self._spill_dirty = True

        def lost(reason: Failure) -> None:
            self.dropped_rows += len(batch)
            log.failure(
                "Cannot keep usage in {spill_file} either: the usage of {requests} "
                "requests is lost",
                reason,
                spill_file=spill.name,
                requests=sum(row[3] for row in batch),
            )

        return spilled.addCallbacks(done, lost)

    def _drain(self) -> None:
        """
        Hand what the spill file holds to the database, if it holds
        anything and is not being handed over already.
        """
        if not self._spill_dirty or self._draining or self._stopped:
            return
        spill = self._spill
        assert spill is not None
        self._draining = True
        drained: Deferred[int] = self._worker.run(lambda: spill.drain(self._database.write))

        def done(count: int) -> None:
            self._spill_dirty = False
            if count:
                log.info(
                    "Wrote {count} minute sums of usage kept in {spill_file} to {usage_file}",
                    count=count,
                    spill_file=spill.name,
                    usage_file=self._name,
                )

        def failed(reason: Failure) -> None:
            log.warn(
                "Cannot write the usage kept in {spill_file} to {usage_file} yet: {reason}",
                spill_file=spill.name,
                usage_file=self._name,
                reason=reason.getErrorMessage(),
            )

        def end(_: None) -> None:
            self._draining = False

        self._track(drained.addCallbacks(done, failed).addBoth(end))

    def startService(self) -> None:
        super().startService()
        self._stopped = False
        self._worker.start()
        # Make the database now, so that one that cannot be used is
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

        def stop(_: None) -> None:
            self._worker.stop()
            # The worker's thread has ended: nothing else uses the database.
            self._database.close()

        done.addCallback(stop)
        return done


class UsageCollector(Collector):
    """
    The usage store's state at a scrape, for Prometheus.
    """

    def __init__(self, store: UsageStore, database_up: Callable[[], bool] | None = None) -> None:
        """
        @param database_up: With C{--database}, whether PostgreSQL answers
            (exposed as C{ollamaproxy_database_up}).
        """
        self._store = store
        self._database_up = database_up

    def collect(self) -> Iterable[Metric]:
        metrics: list[Metric] = [
            GaugeMetricFamily(
                "ollamaproxy_usage_pending_rows",
                "Usage records and minute sums waiting to be written to the usage database.",
                value=float(self._store.pending),
            ),
            CounterMetricFamily(
                "ollamaproxy_usage_spilled_rows",
                "Minute sums of usage moved to the local usage file because the database "
                "could not take them.",
                value=float(self._store.spilled_rows),
            ),
            CounterMetricFamily(
                "ollamaproxy_usage_dropped_rows",
                "Minute sums of usage lost because neither the database nor the local file "
                "could take them.",
                value=float(self._store.dropped_rows),
            ),
        ]
        if self._database_up is not None:
            metrics.append(GaugeMetricFamily(
                "ollamaproxy_database_up",
                "Whether PostgreSQL (--database) took the last write and the last keys read.",
                value=1.0 if self._database_up() else 0.0,
            ))
        return metrics
