"""
Tests for L{ollamaproxy.site}: the deadline for request heads.
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from ollamaproxy.site import ProxySite

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
