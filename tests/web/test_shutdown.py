"""
Tests for shutting down gently: L{ollamaproxy.web.in_flight.InFlight}'s
withdraw and drain, as the app and C{/-/ready} see them.
"""

from __future__ import annotations

import json

from twisted.logger import LogEvent
from twisted.web._newclient import ResponseFailed

from tests.fakes.chain import Chain

GRACE = 30.0
CHAT = json.dumps({"model": "hold", "messages": [{"role": "user", "content": "hi"}]}).encode()


def test_nothing_in_flight_drains_at_once() -> None:
    """
    With no request in flight, draining is done immediately.
    """
    chain = Chain()
    assert chain.result(chain.in_flight.drain(GRACE)) is None


def test_stream_in_flight_finishes_within_grace_period() -> None:
    """
    A stream in flight when shutdown starts goes on to its normal end, and
    draining is done when it ends.
    """
    chain = Chain()
    d = chain.request("POST", "/api/chat", data=CHAT)
    held = chain.fake.held[-1]
    client = chain.stream(chain.result(d))
    drained = chain.in_flight.drain(GRACE)
    held.write_line({"n": 1, "done": False})
    chain.clock.advance(GRACE - 1)
    chain.flush()
    assert chain.pending(drained)
    held.write_line({"n": 2, "done": True})
    held.finish()
    chain.flush()
    chain.result(client.done)
    assert client.body == b'{"n":1,"done":false}\n{"n":2,"done":true}\n'
    assert chain.result(drained) is None
    assert chain.clock.getDelayedCalls() == []


def test_new_requests_while_draining_get_503() -> None:
    """
    A request arriving during shutdown (on a connection kept alive) is
    answered 503 in Ollama's error shape, without reaching Ollama.
    """
    chain = Chain()
    d = chain.request("POST", "/api/chat", data=CHAT)
    chain.in_flight.drain(GRACE)
    received = len(chain.fake.received)
    response = chain.respond("GET", "/api/tags")
    assert response.code == 503
    assert json.loads(chain.body(response)) == {"error": "ollamaproxy is shutting down"}
    assert len(chain.fake.received) == received
    chain.fake.held[-1].finish()
    chain.flush()
    chain.body(chain.result(d))


def test_streams_left_at_end_of_grace_period_are_cut(access_events: list[LogEvent]) -> None:
    """
    A stream still running when the grace period ends is cut (the client
    sees no clean end), Ollama's connection is closed, and draining is done.
    """
    chain = Chain()
    d = chain.request("POST", "/api/chat", data=CHAT)
    held = chain.fake.held[-1]
    client = chain.stream(chain.result(d))
    held.write_line({"n": 1, "done": False})
    drained = chain.in_flight.drain(GRACE)
    chain.clock.advance(GRACE)
    chain.flush()
    assert chain.failure(client.done).check(ResponseFailed)
    assert chain.result(drained) is None
    assert held.disconnected.called
    assert [e["outcome"] for e in access_events] == ["shutdown"]
    assert chain.clock.getDelayedCalls() == []


def test_withdrawn_is_not_ready_yet_serves() -> None:
    """
    Once withdrawn (the stop has begun, under C{--drain-delay}), C{/-/ready}
    answers 503 naming C{accepting}, while a request arriving then is
    served as usual, and a stream in flight goes on.
    """
    chain = Chain()
    assert chain.respond("GET", "/-/ready", key=None).code == 200
    d = chain.request("POST", "/api/chat", data=CHAT)
    held = chain.fake.held[-1]
    client = chain.stream(chain.result(d))
    chain.in_flight.withdraw()
    ready = chain.respond("GET", "/-/ready", key=None)
    assert ready.code == 503
    assert json.loads(chain.body(ready))["error"] == "not ready: accepting"
    tags = chain.respond("GET", "/api/tags")
    assert tags.code == 200
    assert "models" in json.loads(chain.body(tags))
    held.write_line({"n": 1, "done": True})
    held.finish()
    chain.flush()
    chain.result(client.done)
    assert client.body == b'{"n":1,"done":true}\n'


def test_draining_is_withdrawn() -> None:
    """
    A drain without a withdraw before it (C{--drain-delay 0}) turns
    C{/-/ready} to 503 all the same.
    """
    chain = Chain()
    chain.in_flight.drain(GRACE)
    assert chain.in_flight.withdrawn
    assert chain.respond("GET", "/-/ready", key=None).code == 503
