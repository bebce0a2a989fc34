"""
Tests for L{ollamaproxy.after_send}: calls made once what a turn of the
reactor wrote has been sent, two turns later, the calls of a turn sharing
their timers.
"""

from __future__ import annotations

from twisted.internet.task import Clock

from ollamaproxy.after_send import AfterSend
from tests.fakes.observers import ErrorCollector
from tests.fakes.turns import Turns


def test_calls_wait_for_the_turn_after_next() -> None:
    """
    A call asked for in one turn is made two turns later, after the poll
    that sends what its turn wrote; the calls of one turn are made together,
    on one timer at a time; one asked for between two turns (as the poll
    runs) waits two turns of its own.
    """
    clock = Turns()
    after = AfterSend(clock)
    made: list[str] = []
    after.call(lambda: made.append("a"))
    after.call(lambda: made.append("b"))
    assert len(clock.calls) == 1
    clock.turn()
    assert made == []
    after.call(lambda: made.append("c"))
    clock.turn()
    assert made == ["a", "b"]
    clock.turn()
    assert made == ["a", "b", "c"]
    clock.turn()
    assert clock.calls == []


def test_a_call_asked_for_by_a_call_waits_for_the_next_send() -> None:
    """
    What a call asks for (a request whose end, once sent, lets the next
    request in the queue be answered) waits for the poll after the turn in
    which it was asked.
    """
    clock = Turns()
    after = AfterSend(clock)
    made: list[str] = []
    after.call(lambda: after.call(lambda: made.append("next")))
    clock.turn()
    clock.turn()
    assert made == []
    clock.turn()
    assert made == []
    clock.turn()
    assert made == ["next"]
    assert clock.calls == []


def test_a_call_that_fails_keeps_none_of_the_others_from_being_made(
    observe_errors: ErrorCollector,
) -> None:
    """
    A call that raises (a bug) is logged as a failure, and the calls made
    with it are made all the same.
    """
    clock = Clock()
    after = AfterSend(clock)
    made: list[str] = []
    after.call(lambda: 1 / 0)
    after.call(lambda: made.append("made"))
    clock.advance(0)
    clock.advance(0)
    assert made == ["made"]
    [failure] = observe_errors.errors
    assert failure["log_failure"].check(ZeroDivisionError)
    observe_errors.errors.clear()


def test_flushing_makes_every_call_at_once() -> None:
    """
    Flushing (a proxy that stops, whose reactor will not turn again) makes
    every call asked for, however many turns it was from being made, and
    those they ask for, and leaves no timer behind.
    """
    clock = Turns()
    after = AfterSend(clock)
    made: list[str] = []
    after.call(lambda: made.append("sent"))
    clock.turn()
    after.call(lambda: after.call(lambda: made.append("asked by a call")))
    after.flush()
    assert made == ["sent", "asked by a call"]
    assert clock.calls == []
