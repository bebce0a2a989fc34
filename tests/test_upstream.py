"""
Tests for L{ollamaproxy.upstream}: the client towards Ollama.
"""

from __future__ import annotations

from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.testing import MemoryReactorClock
from twisted.web.client import URI

from ollamaproxy.upstream import _Endpoints


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
    assert isinstance(first, HostnameEndpoint)


def test_https_upstream_is_wrapped_in_tls() -> None:
    """
    An https:// Ollama is reached through TLS, checked like a browser would.
    """
    endpoints = _Endpoints(MemoryReactorClock(), 5.0)
    endpoint = endpoints.endpointForURI(URI.fromBytes(b"https://gpu-box:443/api/tags"))
    assert not isinstance(endpoint, HostnameEndpoint)
    assert type(endpoint).__name__ == "_WrapperEndpoint"
