# -*- test-case-name: tests.test_usage -*-
"""
Keeping usage while the proxy runs.

The proxy calls L{UsageStore.record} once a request, in the reactor thread;
that only appends to a list.  Every few seconds the store writes what has
built up to the usage database (L{ollamaproxy.usage_db}), in one
transaction, on a thread of its own, so the reactor never waits for the
disk.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, Protocol, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from ollamaproxy.exchange import StreamSummary
from ollamaproxy.usage_db import UsageRow, aggregate, write_rows

log = Logger()

DEFAULT_FLUSH_INTERVAL: Final = 5.0

_T = TypeVar("_T")


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

    def read(self, work: Callable[[], _T]) -> Deferred[_T]:
        """
        Run a blocking read of the database on the store's worker, after
        the writes given to it before (the console's Usage view).

        @return: Fires with what C{work} returns, in the reactor thread.
        """
        return self._worker.run(work)

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
