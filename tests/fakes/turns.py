# -*- test-case-name: tests.test_after_send -*-
"""
A clock that turns as a reactor does.
"""

from __future__ import annotations

from twisted.internet.task import Clock


class Turns(Clock):
    """
    A clock that runs its calls a turn of the reactor at a time, as Twisted's
    reactors do: a call scheduled while a turn runs waits for the next one
    (after the poll that sends what transports hold), where L{Clock.advance}
    would run it at once.
    """

    def turn(self) -> None:
        """
        Run the calls due now that were scheduled before this turn, as
        C{runUntilCurrent} does: one cancelled by a call made before it in
        the turn is not run, and each is marked called, as L{Clock.advance}
        marks it.
        """
        now = self.seconds()
        for call in [call for call in self.calls if call.getTime() <= now]:
            if call.cancelled:
                continue
            self.calls.remove(call)
            call.called = 1
            call.func(*call.args, **call.kw)
