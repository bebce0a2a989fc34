"""
Tests for L{ollamaproxy.web.site}: the deadline for request heads, requests
twisted.web refuses itself, C{Expect: 100-continue}, the minimum body rate,
and shedding idle connections.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogEvent, capturedLogs
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from ollamaproxy.errors import reason_phrase
from ollamaproxy.twisted_internals import HTTP_CHANNEL_INTERNALS
from ollamaproxy.web.site import ProxySite
from tests.fakes.chain import KEY, Chain

TIMEOUT = 30.0


class _Slow(Resource):
    """
    Answers with a head and keeps the response open.
    """

    isLeaf = True

    def render(self, request: Request) -> int:
        request.write(b"started")
        return NOT_DONE_YET


def connect(clock: Clock) -> tuple[StringTransport, object]:
    site = ProxySite(_Slow(), TIMEOUT, 0, clock)
    protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1234))
    assert protocol is not None
    transport = StringTransport()
    protocol.makeConnection(transport)
    return transport, protocol


def test_slow_request_head_is_cut() -> None:
    """
    A client still sending its request head when the client timeout has
    passed since its first byte is disconnected, however steadily it
    trickles bytes.
    """
    clock = Clock()
    transport, protocol = connect(clock)
    for _ in range(int(TIMEOUT) - 1):
        protocol.dataReceived(b"X")  # type: ignore[attr-defined]
        clock.advance(1)
    assert not transport.disconnecting
    clock.advance(1)
    assert transport.disconnecting


def test_complete_head_in_time_is_served_and_streams_without_deadline() -> None:
    """
    A head completed in time is served, and the deadline does not apply
    while its response streams.
    """
    clock = Clock()
    transport, protocol = connect(clock)
    protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n")  # type: ignore[attr-defined]
    clock.advance(TIMEOUT - 1)
    protocol.dataReceived(b"\r\n")  # type: ignore[attr-defined]
    assert b"started" in transport.value()
    clock.advance(10 * TIMEOUT)
    assert not transport.disconnecting


def test_idle_connection_without_request_is_kept_until_idle_timeout() -> None:
    """
    A connection that sends nothing is governed by the idle timeout only
    (twisted.web's), which is the same client timeout.
    """
    clock = Clock()
    transport, _ = connect(clock)
    clock.advance(TIMEOUT - 1)
    assert not transport.disconnecting
    clock.advance(1)
    assert transport.disconnecting


# Requests twisted.web refuses by itself: a JSON error and an access event.

_MALFORMED = [
    # (request bytes, status, method, path, detail)
    (b"NOT A REQUEST LINE AT ALL\r\n\r\n", 400, "-", "-", "malformed request line"),
    (b"GET / HTTP/2.0\r\n\r\n", 400, "-", "-", "malformed request line"),
    (b"GET /api/tags?x=1 HTTP/1.1\r\nno colon here\r\n\r\n", 400, "GET", "/api/tags",
     "malformed header"),
    (b"POST /api/chat HTTP/1.1\r\nContent-Length: ten\r\n\r\n", 400, "POST", "/api/chat",
     "malformed header"),
    (b"POST /api/chat HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400,
     "POST", "/api/chat", "malformed header"),
    (b"GET /api/ps HTTP/1.1\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 100)
                                           for i in range(200)) + b"\r\n",
     431, "GET", "/api/ps", "request head larger than 16384 bytes"),
    (b"GET /api/ps HTTP/1.1\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(501)) + b"\r\n",
     431, "GET", "/api/ps", "more than 500 header lines"),
    (b"GET /" + b"a" * 17000, 414, "-", "-", "request line longer than 16384 bytes"),
    (b"GET /api/ps HTTP/1.1\r\nX-Big: " + b"b" * 17000, 431, "GET", "/api/ps",
     "header line longer than 16384 bytes"),
]


@pytest.mark.parametrize(("data", "status", "method", "path", "detail"), _MALFORMED)
def test_request_refused_by_twisted_web_is_answered_and_logged(
    data: bytes, status: int, method: str, path: str, detail: str,
    access_events: list[LogEvent],
) -> None:
    """
    A request twisted.web cannot parse (bad request line or header, a head
    too large, an unsupported version) is answered with its status and a
    JSON error, and leaves an access event with what was parsed of it.
    """
    clock = Clock()
    transport, protocol = connect(clock)
    clock.advance(5)
    protocol.dataReceived(data)  # type: ignore[attr-defined]
    head, _, body = transport.value().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d %s\r\n" % (status, reason_phrase(status)))
    assert b"Unknown" not in head
    assert json.loads(body) == {"error": detail}
    assert transport.disconnecting
    # Written down once the answer has gone.
    clock.advance(0)
    [event] = access_events
    assert (event["status"], event["method"], event["path"], event["outcome"],
            event["detail"]) == (status, method, path, "bad_request", detail)
    assert event["client"] == "192.168.1.1"


def test_refused_request_on_v1_path_gets_openai_error() -> None:
    """
    On a C{/v1} path the refusal has OpenAI's error shape, like every other
    error there.
    """
    transport, protocol = connect(Clock())
    protocol.dataReceived(b"POST /v1/chat/completions HTTP/1.1\r\nbad\r\n\r\n")  # type: ignore[attr-defined]
    body = transport.value().partition(b"\r\n\r\n")[2]
    assert json.loads(body)["error"]["message"] == "malformed header"


def test_refused_request_is_logged_once_and_counted() -> None:
    """
    Through the daemon's wiring, a refused request goes to the proxy's own
    record: its path redacted like any other, counted in the metrics, and
    logged once even if twisted.web finds more wrong with it.
    """
    chain = Chain()
    site = ProxySite(chain.proxy.resource(), TIMEOUT, 0, chain.clock,
                     record=chain.recorder.record)
    _, protocol = _connect_site(site)
    with capturedLogs() as events:
        protocol.dataReceived(
            b"GET /api/pull/" + KEY.encode() + b" HTTP/1.1\r\nbad one\r\nbad two\r\n\r\n"
        )
        _, other = _connect_site(site)
        other.dataReceived(KEY.encode() + b" / HTTP/1.1\r\nbad\r\n\r\n")
        chain.clock.advance(0)
    first, second = [e for e in events if e.get("log_namespace") == "ollamaproxy.access"]
    assert KEY not in first["line"] + second["line"]
    assert first["path"] == "/api/pull/[redacted]"
    assert second["method"] == "[redacted]"
    _, text = chain.metrics.render(None)
    assert b'method="other",outcome="bad_request",route="other",status="400"} 1.0' in text


def test_broken_chunked_body_is_logged_as_bad_request(access_events: list[LogEvent]) -> None:
    """
    A chunked body whose framing breaks while the proxy relays it ends the
    request with a 400 and an access event saying so (not a client that went
    away), once.
    """
    chain = Chain()
    site = ProxySite(chain.proxy.resource(), TIMEOUT, 0, chain.clock,
                     record=chain.recorder.record)
    transport, protocol = _connect_site(site)
    protocol.dataReceived(
        b"POST /api/chat HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
        + b"\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n"
    )
    chain.flush()
    assert transport.value().startswith(b"HTTP/1.1 400 Bad Request")
    assert transport.disconnecting
    protocol.connectionLost(Failure(ConnectionDone()))
    chain.flush()
    [event] = access_events
    assert (event["status"], event["outcome"], event["detail"]) == (
        400, "bad_request", "malformed request body framing"
    )


def test_twisted_web_internals_relied_on_are_there() -> None:
    """
    What ProxyChannel overrides or reads of twisted.web's HTTPChannel beyond
    its public API is still there and still means the same: if Twisted
    changes it, this fails rather than refused requests going unlogged.
    """
    for name in ("_respondToBadRequestAndDisconnect", "_send100Continue",
                 "_receivedHeaderSize", "_receivedHeaderCount"):
        assert hasattr(HTTPChannel, name), name
    channel = HTTPChannel()
    channel.makeConnection(StringTransport())
    channel.dataReceived(b"GET /x?y HTTP/1.1\r\nA: b\r\n")
    for name in HTTP_CHANNEL_INTERNALS:
        assert hasattr(channel, name), name
    assert (channel._command, channel._path, channel._version) == (b"GET", b"/x?y", b"HTTP/1.1")
    assert channel._receivedHeaderSize == len(b"GET /x?y HTTP/1.1A: b")
    calls: list[str] = []
    channel._respondToBadRequestAndDisconnect = lambda: calls.append("400")  # type: ignore[method-assign]
    channel._send100Continue = lambda: calls.append("100")  # type: ignore[method-assign]
    channel.dataReceived(b"Expect: 100-continue\r\nContent-Length: 1\r\n\r\n")
    assert calls == ["100"]
    channel = HTTPChannel()
    channel.makeConnection(StringTransport())
    channel._respondToBadRequestAndDisconnect = lambda: calls.append("400")  # type: ignore[method-assign]
    channel.dataReceived(b"GET / HTTP/1.1\r\nbad\r\n\r\n")
    assert calls == ["100", "400"]


def _connect_site(site: ProxySite) -> tuple[StringTransport, Any]:
    protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1234))
    assert protocol is not None
    transport = StringTransport()
    protocol.makeConnection(transport)
    return transport, protocol


def test_client_leaving_mid_body_is_logged_as_disconnected(
    access_events: list[LogEvent],
) -> None:
    """
    A client that goes away while its body is on its way to Ollama is
    logged as gone, not as an error of the proxy's.
    """
    chain = Chain()
    _, protocol = _connect_site(ProxySite(chain.proxy.resource(), TIMEOUT, 0, chain.clock))
    protocol.dataReceived(
        b"POST /api/chat HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
        + b"\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
    )
    chain.flush()
    protocol.connectionLost(Failure(ConnectionDone()))
    chain.flush()
    [event] = access_events
    assert event["outcome"] == "client_disconnected"


# Expect: 100-continue, answered only once the key has been checked.

def _proxy_connection(chain: Chain, **site_options: Any) -> tuple[StringTransport, Any]:
    site = ProxySite(chain.proxy.resource(), TIMEOUT, 0, chain.clock, **site_options)
    return _connect_site(site)


def _head(key: str, length: int, path: bytes = b"/api/chat") -> bytes:
    return (
        b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + key.encode()
        + b"\r\nExpect: 100-continue\r\nContent-Type: application/json\r\n"
        + b"Content-Length: %d\r\n\r\n" % length
    )


def test_refused_key_gets_401_without_100_continue() -> None:
    """
    A client that waits for C{100 Continue} before sending its body gets its
    401 for a wrong key without ever being told to send the body.
    """
    chain = Chain()
    transport, protocol = _proxy_connection(chain)
    protocol.dataReceived(_head("olpk_wrong", 10))
    chain.flush()
    response = transport.value()
    assert response.startswith(b"HTTP/1.1 401 ")
    assert b"100 Continue" not in response
    assert chain.fake.received == []


def test_valid_key_gets_100_continue_then_the_answer() -> None:
    """
    With a valid key, C{100 Continue} comes when the proxy starts reading the
    body, and the request then goes through.
    """
    chain = Chain()
    transport, protocol = _proxy_connection(chain)
    body = json.dumps({"model": "llama3.2", "messages": [], "stream": False}).encode()
    protocol.dataReceived(_head(KEY, len(body)))
    chain.flush()
    assert transport.value() == b"HTTP/1.1 100 Continue\r\n\r\n"
    protocol.dataReceived(body)
    chain.flush()
    assert transport.value().startswith(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n"
    )
    assert len(chain.fake.received) == 1


# The minimum rate of a request body.

RATE = 1024


def test_body_trickled_below_the_minimum_rate_is_dropped(
    access_events: list[LogEvent],
) -> None:
    """
    A body that arrives a byte at a time, each within the client timeout, is
    dropped with 408 once a whole client timeout has brought less than the
    minimum rate, and its access event says why.
    """
    chain = Chain()
    transport, protocol = _proxy_connection(chain, min_body_rate=RATE)
    protocol.dataReceived(_head(KEY, 100_000, b"/api/blobs/sha256:" + b"0" * 64))
    chain.flush()
    for _ in range(int(TIMEOUT) - 1):
        protocol.dataReceived(b"x")
        chain.clock.advance(1)
        chain.flush()
    assert not transport.disconnecting
    chain.clock.advance(1)
    assert transport.disconnecting
    assert b"HTTP/1.1 408 " in transport.value()
    protocol.connectionLost(Failure(ConnectionDone()))
    chain.flush()
    [event] = access_events
    assert (event["status"], event["outcome"]) == (408, "client_timeout")
    assert event["detail"] == f"request body arrived slower than {RATE} bytes/s"


def test_body_at_the_minimum_rate_is_not_dropped() -> None:
    """
    A long body that keeps up the minimum rate over every client timeout
    passes, however long it takes in all.
    """
    chain = Chain()
    transport, protocol = _proxy_connection(chain, min_body_rate=RATE)
    size = int(RATE * TIMEOUT) * 10
    digest = hashlib.sha256(b"x" * size).hexdigest().encode()
    protocol.dataReceived(_head(KEY, size, b"/api/blobs/sha256:" + digest))
    chain.flush()
    for _ in range(10 * int(TIMEOUT)):
        protocol.dataReceived(b"x" * RATE)
        chain.clock.advance(1)
        chain.flush()
    assert not transport.disconnecting
    assert b"HTTP/1.1 201 Created" in transport.value()


def test_body_held_back_by_the_proxy_does_not_count_as_slow() -> None:
    """
    A window in which the proxy itself stopped reading (Ollama reads slowly)
    does not count against the client.
    """
    chain = Chain()
    transport, protocol = _proxy_connection(chain, min_body_rate=RATE)
    protocol.dataReceived(_head(KEY, 10 * 1024 * 1024, b"/api/blobs/sha256:" + b"0" * 64))
    chain.flush()
    request = protocol.requests[-1]

    def trickle(seconds: int) -> None:
        for _ in range(seconds):
            protocol.dataReceived(b"x")
            chain.clock.advance(1)

    trickle(int(TIMEOUT) - 1)
    request.body.held = True
    trickle(1)
    assert not transport.disconnecting
    trickle(int(TIMEOUT))
    assert transport.disconnecting


# Shedding idle connections, the longest idle first.

class _SlowOrQuick(Resource):
    """
    Keeps C{/slow} open; answers anything else at once.
    """

    isLeaf = True

    def render(self, request: Request) -> int | bytes:
        if request.path == b"/slow":
            request.write(b"started")
            return NOT_DONE_YET
        return b"ok"


def test_new_connection_beyond_the_limit_closes_the_longest_idle() -> None:
    """
    Past C{max_connections}, a new connection closes the connection idle the
    longest: one waiting for its first byte, or for its next request after
    one has been answered (it goes to the back of the line then).  A
    connection whose request is running is never closed.
    """
    clock = Clock()
    shed: list[None] = []
    site = ProxySite(_SlowOrQuick(), TIMEOUT, 0, clock, max_connections=3,
                     count_shed=lambda: shed.append(None))
    (a, pa), (b, pb), (c, _) = (_connect_site(site) for _ in range(3))
    pb.dataReceived(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    pa.dataReceived(b"GET /quick HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b"ok" in a.value() and not a.disconnecting
    # Idle the longest now: c (a was answered after c connected).
    d, _ = _connect_site(site)
    assert c.disconnecting and not (a.disconnecting or b.disconnecting or d.disconnecting)
    e, _ = _connect_site(site)
    assert a.disconnecting and not (b.disconnecting or d.disconnecting or e.disconnecting)
    assert len(shed) == 2
    assert site.open_connections == 3


def test_new_connection_is_closed_when_none_is_idle() -> None:
    """
    When every open connection has a request running, the new connection is
    the one closed.
    """
    clock = Clock()
    site = ProxySite(_SlowOrQuick(), TIMEOUT, 0, clock, max_connections=2)
    connections = [_connect_site(site) for _ in range(2)]
    for _, protocol in connections:
        protocol.dataReceived(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    newcomer, _ = _connect_site(site)
    assert newcomer.disconnecting
    assert not any(transport.disconnecting for transport, _ in connections)


def test_closed_connections_make_room() -> None:
    """
    Connections that close make room for new ones: nothing is shed while
    fewer than C{max_connections} are open.
    """
    clock = Clock()
    site = ProxySite(_SlowOrQuick(), TIMEOUT, 0, clock, max_connections=2)
    for _ in range(10):
        transport, protocol = _connect_site(site)
        assert not transport.disconnecting
        protocol.connectionLost(Failure(ConnectionDone()))
    assert site.open_connections == 0


def test_shedding_is_logged_at_most_once_a_minute() -> None:
    """
    Under a flood of connections the log says so once a minute, with the
    number closed, not once per connection.
    """
    clock = Clock()
    site = ProxySite(_SlowOrQuick(), TIMEOUT, 0, clock, max_connections=1)
    with capturedLogs() as events:
        for _ in range(100):
            _connect_site(site)
        clock.advance(60)
        _connect_site(site)
    shed = [e for e in events if "idle connection(s) closed" in e["log_format"]]
    assert [e["count"] for e in shed] == [1, 99]
