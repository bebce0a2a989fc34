"""
Tests for L{ollamaproxy.backends.probe}: at start, one line per upstream saying
where requests go and whether Ollama answered there; the start never waits.
"""

from __future__ import annotations

from typing import Any

from treq.testing import RequestTraversalAgent
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IResponse
from twisted.web.pages import notFound
from twisted.web.resource import Resource

from ollamaproxy.backends.probe import UpstreamProbe
from ollamaproxy.backends.upstream import Upstream
from tests.fakes.ollama import VERSION, FakeOllama

BASE = b"http://127.0.0.1:11434"


class _Agent:
    """
    An agent whose every request gets the same answer: C{result}'s, or a
    Deferred that never fires (and notes its cancellation).
    """

    def __init__(self, result: Deferred[IResponse] | None = None) -> None:
        self._result = result
        self.cancelled = 0

    def request(self, method: bytes, uri: bytes, headers: Headers | None = None,
                bodyProducer: IBodyProducer | None = None) -> Deferred[IResponse]:
        assert (method, uri) == (b"GET", BASE + b"/api/version")
        if self._result is not None:
            return self._result

        def cancel(d: Deferred[IResponse]) -> None:
            self.cancelled += 1

        return Deferred(cancel)


def upstream(agent: Any, clock: Clock) -> Upstream:
    return Upstream(agent=agent, base=BASE, clock=clock, header_timeout=600, idle_timeout=600)


def probe_lines(agent: Any, clock: Clock, advance: float = 0) -> list[tuple[LogLevel, str]]:
    """
    Start a probe of one upstream, let C{advance} seconds pass, and return
    the lines it logged.
    """
    service = UpstreamProbe([upstream(agent, clock)])
    with capturedLogs() as events:
        assert service.startService() is None  # type: ignore[func-returns-value]
        assert service.running
        flush = getattr(agent, "flush", None)
        if flush is not None:
            flush()
        clock.advance(advance)
    return [(e["log_level"], formatEvent(e)) for e in events]


def test_answered() -> None:
    """An Ollama that answers gives one info line naming its address and its version."""
    clock = Clock()
    agent = RequestTraversalAgent(FakeOllama(clock))
    assert probe_lines(agent, clock) == [
        (LogLevel.info,
         f"Relaying requests to Ollama at http://127.0.0.1:11434: it answered, version {VERSION}"),
    ]
    assert clock.getDelayedCalls() == []


def test_refused() -> None:
    """An Ollama that refuses the connection gives a warning naming the address and why."""
    clock = Clock()
    [(level, line)] = probe_lines(_Agent(fail(ConnectionRefusedError())), clock)
    assert level == LogLevel.warn
    assert line.startswith("Relaying requests to Ollama at http://127.0.0.1:11434, which did "
                           "not answer (Connection was refused")
    assert line.endswith("clients get 502 until it does")


def test_no_answer_in_time() -> None:
    """
    An Ollama that does not answer within the probe's timeout gives a
    warning after 5 seconds, the request is cancelled, and nothing is left
    scheduled; until then the start went on.
    """
    clock = Clock()
    agent = _Agent()
    assert probe_lines(agent, clock, advance=4.9) == []
    with capturedLogs() as events:
        clock.advance(0.1)
    assert [formatEvent(e) for e in events] == [
        "Relaying requests to Ollama at http://127.0.0.1:11434, which did not answer (no "
        "answer within 5 seconds); clients get 502 until it does"
    ]
    assert agent.cancelled == 1
    assert clock.getDelayedCalls() == []


def test_not_ollama() -> None:
    """Something else at the address (a 404, not Ollama's JSON) is a warning saying so."""
    clock = Clock()
    [(level, line)] = probe_lines(RequestTraversalAgent(notFound()), clock)
    assert level == LogLevel.warn
    assert "(it answered GET /api/version with 404)" in line


def test_stopping_cancels_quietly() -> None:
    """Stopping before the answer cancels the request and logs nothing more."""
    clock = Clock()
    agent = _Agent()
    service = UpstreamProbe([upstream(agent, clock)])
    with capturedLogs() as events:
        service.startService()
        service.stopService()
    assert list(events) == []
    assert agent.cancelled == 1
    assert clock.getDelayedCalls() == []


def test_an_upstream_that_is_the_proxy_itself() -> None:
    """
    The probe carries the proxy's Via mark, so an upstream that points back
    at the proxy answers 508 at once, and the warning says what is wrong.
    """
    clock = Clock()
    seen: list[Headers] = []

    class _Loop:
        def request(self, method: bytes, uri: bytes, headers: Headers | None = None,
                    bodyProducer: IBodyProducer | None = None) -> Deferred[IResponse]:
            assert headers is not None
            seen.append(headers)
            answer: Deferred[IResponse] = RequestTraversalAgent(_LoopDetected()).request(
                method, uri, headers)
            return answer

    class _LoopDetected(Resource):
        isLeaf = True

        def render(self, request: Any) -> bytes:
            request.setResponseCode(508)
            return b'{"error": "loop"}'

    service = UpstreamProbe([Upstream(agent=_Loop(), base=BASE, clock=clock,  # type: ignore[arg-type]
                                      header_timeout=600, idle_timeout=600, via=b"1.1 mark")])
    with capturedLogs() as events:
        service.startService()
    [line] = [formatEvent(e) for e in events]
    assert seen[0].getRawHeaders(b"via") == [b"1.1 mark"]
    assert line == (
        "Relaying requests to http://127.0.0.1:11434, which is this proxy itself: every "
        "request would come back to it (clients get 508).  Point --upstream at Ollama."
    )
