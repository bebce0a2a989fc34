# -*- test-case-name: tests.test_relay -*-
"""
Sending a client's request body on to Ollama.

twisted.web has already received the body when the proxy sees the request:
bodies up to 100 kB are in memory, larger ones (model uploads to
C{/api/blobs}) in a temporary file.  L{SpooledBody} sends it from there in
64 kB pieces, one piece per reactor turn, pausing when Ollama's socket is
full, so a body of many GB never sits in memory and never blocks the reactor.
"""

from __future__ import annotations

from typing import IO

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IConsumer, IDelayedCall, IReactorTime
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

CHUNK = 64 * 1024


@implementer(IBodyProducer)
class SpooledBody:
    """
    An L{IBodyProducer} for a body that is in a file or in memory.

    @ivar length: The body's size in bytes.
    """

    def __init__(self, content: IO[bytes], length: int, clock: IReactorTime) -> None:
        self._content = content
        self.length = length
        self._clock = clock
        self._consumer: IConsumer | None = None
        self._done: Deferred[None] | None = None
        self._next: IDelayedCall | None = None
        self._paused = False

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        if self.length <= CHUNK:
            consumer.write(self._content.read(CHUNK))
            return succeed(None)
        self._consumer = consumer
        self._done = Deferred()
        self._schedule()
        return self._done

    def _schedule(self) -> None:
        self._next = self._clock.callLater(0, self._send)

    def _send(self) -> None:
        self._next = None
        assert self._consumer is not None and self._done is not None
        data = self._content.read(CHUNK)
        if not data:
            self._done.callback(None)
            return
        self._consumer.write(data)
        if not self._paused:
            self._schedule()

    def pauseProducing(self) -> None:
        self._paused = True
        if self._next is not None:
            self._next.cancel()
            self._next = None

    def resumeProducing(self) -> None:
        self._paused = False
        if self._next is None and self._done is not None and not self._done.called:
            self._schedule()

    def stopProducing(self) -> None:
        self.pauseProducing()


def spooled_body(content: IO[bytes] | None, clock: IReactorTime) -> SpooledBody | None:
    """
    A producer for a request's spooled body, or L{None} if it is empty.
    """
    if content is None:
        return None
    content.seek(0, 2)
    length = content.tell()
    content.seek(0, 0)
    return SpooledBody(content, length, clock) if length else None
