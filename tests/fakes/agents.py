# -*- test-case-name: tests.web.test_app,tests.backends.test_through_proxy -*-
"""
Agents towards Ollama that fail, for the tests of what the proxy does when
its upstream cannot be reached, or never answers.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionRefusedError
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from zope.interface import implementer


@implementer(IAgent)
class FailingAgent:
    """
    An upstream agent whose every request fails (or raises) with C{error}.
    """

    def __init__(self, error: Exception, *, raises: bool = False) -> None:
        self._error = error
        self._raises = raises

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        if self._raises:
            raise self._error
        return defer.fail(self._error)


@implementer(IAgent)
class Refusing:
    """
    An agent whose every connection is refused.
    """

    def request(self, method: bytes, uri: bytes, headers: Any = None,
                bodyProducer: Any = None) -> Deferred[IResponse]:
        return fail(ConnectionRefusedError("refused"))


@implementer(IAgent)
class Silent:
    """
    An agent to a backend that takes every request and never answers.
    """

    def request(self, method: bytes, uri: bytes, headers: Any = None,
                bodyProducer: Any = None) -> Deferred[IResponse]:
        return Deferred()
