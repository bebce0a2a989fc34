# -*- test-case-name: tests.web.test_app -*-
"""
Log observers that keep what the tests look at.
"""

from __future__ import annotations

from twisted.logger import ILogObserver, LogEvent
from zope.interface import implementer


@implementer(ILogObserver)
class ErrorCollector:
    """
    Keeps every logged event that carries a failure or is marked as an error.
    """

    def __init__(self) -> None:
        self.errors: list[LogEvent] = []

    def __call__(self, event: LogEvent) -> None:
        if event.get("log_failure") is not None or event.get("isError"):
            self.errors.append(event)
