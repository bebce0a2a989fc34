"""
Shared fixtures: every test fails if an error was logged and not handled.

pytest, unlike trial, says nothing about a Failure that a Deferred logged
when it was garbage-collected unhandled, or that a Klein handler logged.
L{observe_errors} collects every logged error and fails the test that caused
it.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from zope.interface import implementer

from tests.fakes.engines import own_postgres, postgres, postgres_cluster, postgres_url, redis_server

# The real engines' fixtures, for every test (tests/fakes/engines.py).
from tests.fakes.observers import ErrorCollector

__all__ = ["own_postgres", "postgres", "postgres_cluster", "postgres_url", "redis_server"]


@pytest.fixture(autouse=True, scope="session")
def _frozen_heap() -> None:
    """
    Move everything alive before the first test out of the collector's way,
    so the per-test collections below only look at what tests made.
    """
    gc.collect()
    gc.freeze()


@pytest.fixture(autouse=True)
def observe_errors(_frozen_heap: None) -> Iterator[ErrorCollector]:
    """
    Fail the test if anything logged an error while it ran (including
    Deferreds that die with an unhandled failure).
    """
    collector = ErrorCollector()
    gc.collect()
    globalLogPublisher.addObserver(collector)
    try:
        yield collector
        gc.collect()
    finally:
        globalLogPublisher.removeObserver(collector)
    if collector.errors:
        failures = [
            str(e.get("log_failure") or e.get("log_format") or e) for e in collector.errors
        ]
        pytest.fail("errors were logged:\n" + "\n".join(failures))


@implementer(ILogObserver)
class _AccessEvents:
    def __init__(self) -> None:
        self.events: list[LogEvent] = []

    def __call__(self, event: LogEvent) -> None:
        if event.get("log_namespace") == "ollamaproxy.access":
            self.events.append(event)


@pytest.fixture
def access_events() -> Iterator[list[LogEvent]]:
    """
    The access events (one per request) logged while the test runs.
    """
    observer = _AccessEvents()
    globalLogPublisher.addObserver(observer)
    try:
        yield observer.events
    finally:
        globalLogPublisher.removeObserver(observer)
