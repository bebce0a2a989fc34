"""
Shared fixtures, and the markers every test gets from where it is and what
it uses.

Every test fails if an error was logged and not handled: pytest, unlike
trial, says nothing about a Failure that a Deferred logged when it was
garbage-collected unhandled, or that a Klein handler logged.
L{observe_errors} collects every logged error and fails the test that caused
it.

The markers (registered in C{pyproject.toml}) are given here, by location
and fixture, not file by file, so that a new test cannot forget its own:

  - C{integration}: everything under C{tests/integration/} (real sockets,
    processes, engines, a browser), and any test that starts a real engine
    wherever it is, so that C{pytest -m "not integration"} is the quick loop
    and needs nothing but Python;
  - C{engines}: a test that starts a real Redis or PostgreSQL, by the
    engines' fixtures it uses (or a parameter marked so), or by its module
    when the module starts its own (L{tests.fakes.markers});
  - C{browser}: the tests that drive Chromium.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from zope.interface import implementer

# The real engines' fixtures, for every test (tests/fakes/engines.py).
from tests.fakes.engines import own_postgres, postgres, postgres_cluster, postgres_url, redis_server
from tests.fakes.markers import marks_for
from tests.fakes.observers import ErrorCollector

__all__ = ["own_postgres", "postgres", "postgres_cluster", "postgres_url", "redis_server"]



def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """
    Mark each test from where it is and what it uses
    (L{tests.fakes.markers.marks_for}).
    """
    tests = Path(__file__).parent
    for item in items:
        where = item.path.relative_to(tests).as_posix() if item.path.is_relative_to(tests) else ""
        marks = marks_for(
            where,
            getattr(item, "fixturenames", ()),
            engines=item.get_closest_marker("engines") is not None,
        )
        for name in sorted(marks):
            if item.get_closest_marker(name) is None:
                item.add_marker(name)


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
