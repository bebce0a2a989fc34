# -*- test-case-name: tests.record.test_usage -*-
"""
A worker for the usage store that runs its work in the test's thread.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed


class ManualWorker:
    """
    A L{Worker} in the test's thread: runs work at once, or, when held,
    when the test releases it.

    @ivar log: What happened, in order: C{start}, C{run}, C{done}, C{stop}.
    """

    def __init__(self, held: bool = False) -> None:
        self.held = held
        self.log: list[str] = []
        self._queue: list[tuple[Callable[[], Any], Deferred[Any]]] = []

    def start(self) -> None:
        self.log.append("start")

    def run(self, work: Callable[[], Any]) -> Deferred[Any]:
        self.log.append("run")
        if not self.held:
            return self._do(work)
        d: Deferred[Any] = Deferred()
        self._queue.append((work, d))
        return d

    def _do(self, work: Callable[[], Any]) -> Deferred[Any]:
        try:
            result = work()
        except Exception:
            self.log.append("done")
            return fail()
        self.log.append("done")
        return succeed(result)

    def release(self) -> None:
        """
        Run the held work, in order, and stop holding.
        """
        self.held = False
        queued, self._queue = self._queue, []
        for work, d in queued:
            self._do(work).chainDeferred(d)

    def stop(self) -> None:
        assert not self._queue, "stopped with work left"
        self.log.append("stop")
