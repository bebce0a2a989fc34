# -*- test-case-name: tests.test_after_send -*-
"""
Work that waits until the answers written now have gone to their clients.

Twisted sends what a transport holds when a poll finds its socket writable:
after the calls due now, which run at the start of the reactor's next turn,
before its poll.  So whatever the turn that writes an answer does next, and
whatever it schedules for "now", delays that answer by as long.  What an
answer does not need (settling its tokens, freeing its slot, writing it
down) is given to L{AfterSend}, which makes the call in the turn after
next: two C{callLater(0)}, the calls one of them schedules running after
the next poll.  The calls of one turn share those two timers, so a busy
proxy pays for them once a turn, not once a request.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

log = Logger()

#: The most rounds L{AfterSend.flush} makes: each round makes the calls that
#: the last one asked for, which no call of the proxy's does more than once.
_FLUSH_ROUNDS = 10


class AfterSend:
    """
    Calls made once what the current turn of the reactor wrote has been
    sent (see the module's docstring).

    @param clock: Schedules the turns.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        # Asked for in this turn; asked for in the last one, whose writes
        # the next poll sends; the call that moves them on.
        self._now: list[Callable[[], object]] = []
        self._sent: list[Callable[[], object]] = []
        self._turn: IDelayedCall | None = None

    def call(self, f: Callable[[], object]) -> None:
        """
        Call C{f} once what this turn wrote has been sent.  A call that
        raises is logged, and keeps no other from being made.
        """
        self._now.append(f)
        if self._turn is None:
            self._turn = self._clock.callLater(0, self._next_turn)

    def flush(self) -> None:
        """
        Make every call asked for, now, and those they ask for in turn: for
        a proxy that stops, whose reactor will not turn again.
        """
        for _ in range(_FLUSH_ROUNDS):
            if self._turn is not None:
                self._turn.cancel()
                self._turn = None
            due, self._sent, self._now = self._sent + self._now, [], []
            if not due:
                return
            _make(due)

    def _next_turn(self) -> None:
        """
        Make the calls whose turn's writes the last poll sent; those asked
        for since wait for the poll after this turn's.
        """
        due, self._sent, self._now = self._sent, self._now, []
        self._turn = self._clock.callLater(0, self._next_turn) if self._sent else None
        _make(due)


def _make(calls: list[Callable[[], object]]) -> None:
    """
    Make each of C{calls}; one that raises is logged.
    """
    for f in calls:
        try:
            f()
        except Exception:
            log.failure("A call made after an answer was sent failed")
