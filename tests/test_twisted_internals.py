"""
Tests for L{ollamaproxy.twisted_internals}: the private names of Twisted's
that the proxy uses are still there and still do what the proxy relies on.
"""

from __future__ import annotations

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.testing import MemoryReactorClock
from twisted.web.client import HTTPConnectionPool
from zope.interface import implementer

from ollamaproxy.twisted_internals import (
    HTTP11ClientFactory,
    RequestNotSent,
    use_client_factory,
)


class _Marked(HTTP11ClientFactory):
    """A client factory the test can recognise."""


@implementer(IStreamClientEndpoint)
class _Endpoint:
    """An endpoint that keeps the factory it is asked to connect with."""

    def __init__(self) -> None:
        self.factories: list[IProtocolFactory] = []

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        self.factories.append(factory)
        return Deferred()


def test_pool_connects_with_the_factory_given() -> None:
    """
    A pool given a client factory makes its new connections with it: the
    private attribute the pool reads is still the one it reads.
    """
    pool = HTTPConnectionPool(MemoryReactorClock(), persistent=True)
    use_client_factory(pool, _Marked)
    endpoint = _Endpoint()
    pool.getConnection(("http", b"127.0.0.1", 11434), endpoint)
    [factory] = endpoint.factories
    assert isinstance(factory, _Marked)


def test_pool_without_the_attribute_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    A pool that no longer has the attribute (a Twisted that renamed it) is
    refused, not silently given an attribute nobody reads.
    """
    monkeypatch.delattr(HTTPConnectionPool, "_factory")
    pool = HTTPConnectionPool(MemoryReactorClock(), persistent=True)
    with pytest.raises(RuntimeError, match="_factory"):
        use_client_factory(pool, _Marked)


def test_request_not_sent_is_an_exception() -> None:
    """
    The failure the Agent reports for a request it never sent is still an
    exception class under the name the upstream client checks for.
    """
    assert issubclass(RequestNotSent, Exception)
