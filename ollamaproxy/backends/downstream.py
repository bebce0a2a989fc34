# -*- test-case-name: tests.backends.test_relay -*-
"""
What the backends' side needs of a client's request: its head and body to
send on, and a response to write Ollama's answer into.

The web server's request (L{ollamaproxy.web.site.ProxyRequest}, a
twisted.web C{Request}) is one; it is named here, by what is used of it, so
that the relay depends on a small protocol of its own room rather than on
the web server above it, and so that tests can hand it anything that
writes.
"""

from __future__ import annotations

from typing import Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.web.http_headers import Headers

from ollamaproxy.backends.request_body import StreamedBody


class Downstream(Protocol):
    """
    A client's request, as the relay reads and answers it.

    @ivar defaultContentType: The content type the response gets if it sets
        none; the relay clears it, so that Ollama's type (or none) is sent.
    """

    defaultContentType: bytes | None

    @property
    def method(self) -> bytes:
        """The request's method."""

    @property
    def requestHeaders(self) -> Headers:
        """The headers the client sent."""

    @property
    def responseHeaders(self) -> Headers:
        """The headers of the answer, until it is written."""

    @property
    def body(self) -> StreamedBody | None:
        """The request's body as it arrives, or L{None} if it has none."""

    @property
    def channel(self) -> object | None:
        """The client's connection, or L{None} once it is gone."""

    def getHeader(self, key: bytes) -> bytes | None:
        """The last value the client sent for a header."""

    def setResponseCode(self, code: int, message: bytes | None = None) -> None:
        """Answer with C{code}."""

    def setHeader(self, name: bytes, value: bytes) -> None:
        """Set a response header."""

    def write(self, data: bytes) -> None:
        """Write to the response body (the head goes first)."""

    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None:
        """Let the client's connection pause and stop C{producer}."""

    def unregisterProducer(self) -> None:
        """Forget the producer."""

    def finish(self) -> None:
        """End the response: all of its body has been written."""

    def loseConnection(self) -> None:
        """Close the client's connection without ending the response."""

    def notifyFinish(self) -> Deferred[None]:
        """Fires when the response is done, fails when the connection is lost."""
