"""
Tests for L{ollamaproxy.backends.upstream}: the client towards Ollama.
"""

from __future__ import annotations

import pytest
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.web.client import URI
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from zope.interface import implementer

from ollamaproxy.backends.upstream import Upstream, _Endpoints, agent_for, connection_pool


def test_one_endpoint_per_address() -> None:
    """
    Requests to the same address share one endpoint; another address gets
    its own.
    """
    endpoints = _Endpoints(MemoryReactorClock(), 5.0)
    first = endpoints.endpointForURI(URI.fromBytes(b"http://127.0.0.1:11434/api/chat"))
    again = endpoints.endpointForURI(URI.fromBytes(b"http://127.0.0.1:11434/api/tags"))
    other = endpoints.endpointForURI(URI.fromBytes(b"http://127.0.0.1:11435/api/tags"))
    assert first is again
    assert other is not first


@pytest.mark.parametrize(
    ("url", "host"),
    [(b"http://127.0.0.1:11434/", "127.0.0.1"), (b"http://[::1]:11434/", "::1")],
)
def test_ip_literal_is_connected_to_directly(url: bytes, host: str) -> None:
    """
    An address given as an IP literal is connected to at once, with the
    connect timeout: no name resolution, no connection race.
    """
    reactor = MemoryReactorClock()
    endpoint = _Endpoints(reactor, 5.0).endpointForURI(URI.fromBytes(url))
    endpoint.connect(Factory.forProtocol(Protocol))
    assert [(h, port, timeout) for h, port, _, timeout, _ in reactor.tcpClients] == [
        (host, 11434, 5.0)
    ]


def test_host_name_is_resolved() -> None:
    """
    A host name goes through L{HostnameEndpoint}, which resolves it and
    tries each address it has.
    """
    endpoints = _Endpoints(MemoryReactorClock(), 5.0)
    endpoint = endpoints.endpointForURI(URI.fromBytes(b"http://gpu-box:11434/api/tags"))
    assert isinstance(endpoint, HostnameEndpoint)


def test_https_upstream_is_wrapped_in_tls() -> None:
    """
    An https:// Ollama is reached through TLS, checked like a browser would.
    """
    endpoints = _Endpoints(MemoryReactorClock(), 5.0)
    endpoint = endpoints.endpointForURI(URI.fromBytes(b"https://gpu-box:443/api/tags"))
    assert not isinstance(endpoint, HostnameEndpoint)
    assert type(endpoint).__name__ == "_WrapperEndpoint"


def test_new_connections_are_not_logged() -> None:
    """
    Opening and closing a connection to Ollama writes nothing to the log:
    with one connection per stream, Twisted's factory start and stop lines
    would be most of it.
    """
    reactor = MemoryReactorClock()
    pool = connection_pool(reactor)
    agent = agent_for(reactor, pool, 5.0)
    agent.request(b"GET", b"http://127.0.0.1:11434/api/tags")
    [(_, _, factory, _, _)] = reactor.tcpClients
    with capturedLogs() as events:
        factory.doStart()
        factory.doStop()
    assert list(events) == []


def test_a_request_cancelled_while_connecting_looks_cancelled() -> None:
    """
    A request cancelled before its connection is made (the client left
    while the proxy was connecting) fails as the agent's endpoint fails it,
    with C{ConnectingCancelledError}: the upstream makes that a plain
    L{CancelledError}, as it does a cancellation after connecting, so that
    the request is recorded as the client's leaving, not as a bug.
    """
    @implementer(IAgent)
    class Connecting:
        def request(
            self, method: bytes, uri: bytes, headers: Headers | None = None,
            bodyProducer: IBodyProducer | None = None,
        ) -> Deferred[IResponse]:
            return Deferred(lambda d: d.errback(Failure(ConnectingCancelledError(None))))

    upstream = Upstream(Connecting(), b"http://127.0.0.1:11434", Clock(), 5, 5)
    sent = upstream.request(b"POST", b"/api/chat", Headers(), None)
    failures: list[Failure] = []
    sent.addErrback(failures.append)
    sent.cancel()
    [failure] = failures
    assert failure.check(CancelledError)
