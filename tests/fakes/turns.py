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
        due = list(self.calls)
        self.calls.clear()
        for call in due:
            call.func(*call.args, **call.kw)
