"""
Tests for L{ollamaproxy.backends.upstream}: the client towards Ollama.
"""

from __future__ import annotations

import pytest
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs
from twisted.web.client import URI

from ollamaproxy.backends.upstream import _Endpoints, agent_for, connection_pool


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
