"""
Tests for L{ollamaproxy.redis.link}: timeouts, up and down, the log lines,
the metric and readiness, with a fake client and a L{Clock}.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence

import pytest
from prometheus_client import CollectorRegistry
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import LogEvent, capturedLogs, formatEvent
from twisted.python.failure import Failure

from ollamaproxy.errors import ConfigError
from ollamaproxy.reactors import daemon_reactor
from ollamaproxy.readiness import Readiness
from ollamaproxy.redis.link import RedisDown, RedisLink, open_link
from ollamaproxy.redis_address import RedisAddress
from tests.fakes.redis import FakeRedis


class Made:
    """
    The clients a link made, newest last.
    """

    def __init__(self) -> None:
        self.clients: list[FakeRedis] = []

    def __call__(self) -> FakeRedis:
        self.clients.append(FakeRedis())
        return self.clients[-1]


@pytest.fixture
def logged() -> Iterator[list[LogEvent]]:
    """
    The events logged while the test runs.
    """
    with capturedLogs() as events:
        yield list_of(events)


def list_of(events: Sequence[LogEvent]) -> list[LogEvent]:
    assert isinstance(events, list)
    return events


def _texts(events: list[LogEvent]) -> list[str]:
    return [formatEvent(e) for e in events if e.get("log_namespace") == "ollamaproxy.redis.link"]


def _link(clock: Clock, made: Made, registry: CollectorRegistry | None = None) -> RedisLink:
    return RedisLink(made, clock, "redis://cache:6379/0", "the proxy keeps them itself",
                     interval=5.0, timeout=1.5, registry=registry)


def test_up_after_first_ping(logged: list[LogEvent]) -> None:
    """The first PING answered marks Redis up, says so once, and sets the metric to 1."""
    clock, made, registry = Clock(), Made(), CollectorRegistry()
    link = _link(clock, made, registry)
    link.startService()
    assert not link.up
    assert registry.get_sample_value("ollamaproxy_redis_up") == 0
    made.clients[0].pings[0].callback("PONG")
    assert link.up
    assert registry.get_sample_value("ollamaproxy_redis_up") == 1
    assert _texts(logged) == ["Limits are shared through Redis at redis://cache:6379/0"]
    link.stopService()


def test_call_times_out() -> None:
    """A call Redis does not answer fails with RedisDown after the timeout, and marks it down."""
    clock, made = Clock(), Made()
    link = _link(clock, made)
    link.startService()
    made.clients[0].pings[0].callback("PONG")
    asked = link.call("return 1", [], [])
    clock.advance(1.4)
    assert not asked.called
    clock.advance(0.1)
    assert isinstance(asked.result, Failure) and isinstance(asked.result.value, RedisDown)
    asked.addErrback(lambda _: None)
    assert not link.up
    link.stopService()


def test_told_when_redis_goes_down() -> None:
    """
    What waits on Redis is told each time it goes down (once for several
    failed calls), not at a start that finds it down.
    """
    clock, made = Clock(), Made()
    link = _link(clock, made)
    told: list[bool] = []
    link.on_down(lambda: told.append(True))
    link.startService()
    made.clients[0].pings[0].errback(ConnectionError("refused"))
    assert told == []
    clock.advance(5)
    made.clients[0].pings[1].callback("PONG")
    for _ in range(2):
        link.call("return 1", [], []).addErrback(lambda _: None)
    for call in made.clients[0].calls:
        call.answer.errback(ConnectionError("Lost connection"))
    assert told == [True]
    link.stopService()


def test_no_call_while_down() -> None:
    """While Redis is down, a call fails at once without being sent."""
    clock, made = Clock(), Made()
    link = _link(clock, made)
    link.startService()
    made.clients[0].pings[0].errback(ConnectionError("refused"))
    asked = link.call("return 1", [], [])
    assert isinstance(asked.result, Failure) and isinstance(asked.result.value, RedisDown)
    asked.addErrback(lambda _: None)
    assert made.clients[0].calls == []
    link.stopService()


def test_down_and_back_logged_once(logged: list[LogEvent]) -> None:
    """Going down is logged once however many calls fail, and so is coming back."""
    clock, made, registry = Clock(), Made(), CollectorRegistry()
    link = _link(clock, made, registry)
    link.startService()
    client = made.clients[0]
    client.pings[0].callback("PONG")
    for _ in range(3):
        link.call("return 1", [], []).addErrback(lambda _: None)
    for call in client.calls:
        call.answer.errback(ConnectionError("Lost connection"))
    assert registry.get_sample_value("ollamaproxy_redis_up") == 0
    clock.advance(5)
    clock.advance(1.5)  # that PING gets no answer
    clock.advance(3.5)
    client.pings[-1].callback("PONG")
    assert link.up
    assert registry.get_sample_value("ollamaproxy_redis_up") == 1
    assert _texts(logged) == [
        "Limits are shared through Redis at redis://cache:6379/0",
        "Redis at redis://cache:6379/0 cannot be reached (ConnectionError: Lost "
        "connection): the proxy keeps them itself",
        "Redis at redis://cache:6379/0 answers again: limits and the fair queue are shared "
        "again",
    ]
    link.stopService()


def test_unreachable_at_start_logged(logged: list[LogEvent]) -> None:
    """A Redis that never answers at start is logged as unreachable within the timeout."""
    clock, made = Clock(), Made()
    link = _link(clock, made)
    link.startService()
    clock.advance(1.5)
    assert _texts(logged) == [
        "Redis at redis://cache:6379/0 cannot be reached (no answer in time): "
        "the proxy keeps them itself"
    ]
    link.stopService()
    assert clock.getDelayedCalls() == []


def test_client_that_gave_up_is_replaced() -> None:
    """A client that stopped reconnecting (a refused login) is replaced by a new one."""
    clock, made = Clock(), Made()
    link = _link(clock, made)
    link.startService()
    made.clients[0].pings[0].errback(ConnectionError("could not auth"))
    made.clients[0].gave_up = True
    clock.advance(5)
    assert made.clients[0].disconnected
    made.clients[1].pings[0].callback("PONG")
    assert link.up
    link.stopService()


def test_rounds_while_up() -> None:
    """
    Every round PINGs Redis, even while it is up (an outage is noticed
    without a request); its work runs only when Redis answered.
    """
    clock, made = Clock(), Made()
    link = _link(clock, made)
    rounds: list[float] = []

    async def work() -> None:
        rounds.append(clock.seconds())

    link.each_round(lambda: Deferred.fromCoroutine(work()))
    link.startService()
    made.clients[0].pings[0].callback("PONG")
    clock.advance(5)
    assert rounds == [0.0]
    made.clients[0].pings[1].callback("PONG")
    assert rounds == [0.0, 5.0]
    clock.advance(5)
    made.clients[0].pings[2].errback(ConnectionError("Lost connection"))
    assert rounds == [0.0, 5.0]
    link.stopService()
    assert made.clients[0].disconnected


@pytest.mark.parametrize(("policy", "ready_while_down"), [("local", True), ("closed", False)])
def test_readiness(policy: str, ready_while_down: bool) -> None:
    """
    Under the local policy the proxy stays ready while Redis is down (it
    serves without it); under closed it is not ready until Redis answers.
    """
    readiness = Readiness()
    link = open_link(RedisAddress("cache"), policy, 30.0, daemon_reactor(Clock()), readiness,
                     CollectorRegistry())
    assert readiness.answer()[0] == (200 if ready_while_down else 503)
    link.up = True
    assert readiness.answer()[0] == 200


def test_missing_client_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """--redis without txredisapi installed stops the start saying what to install."""
    monkeypatch.setitem(sys.modules, "txredisapi", None)
    with pytest.raises(ConfigError, match=r"pip install 'ollamaproxy\[redis\]'"):
        open_link(RedisAddress("cache"), "local", 30.0, daemon_reactor(Clock()), Readiness(),
                  CollectorRegistry())
