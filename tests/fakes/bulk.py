# -*- test-case-name: tests.integration.test_streaming -*-
"""
An upstream that streams a large NDJSON body as fast as the proxy takes it,
honouring backpressure.
"""

from __future__ import annotations

from twisted.internet.interfaces import IPushProducer
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

LINE = b'{"model":"bulk","message":{"role":"assistant","content":"' + b"x" * 65400 + b'"}}\n'


@implementer(IPushProducer)
class BulkWriter:
    """
    Writes a long NDJSON body as fast as the proxy takes it.
    """

    def __init__(self, request: Request, lines: int) -> None:
        self._request = request
        self._left = lines
        self.written = 0
        self._paused = False

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        while not self._paused and self._left > 0:
            self._left -= 1
            self._request.write(LINE)
            self.written += len(LINE)
        if self._left == 0:
            self._left = -1
            self._request.unregisterProducer()
            self._request.finish()

    def stopProducing(self) -> None:
        self._left = -1


class Bulk(Resource):
    """
    An upstream whose every answer to a client is an NDJSON stream of at
    least C{size} bytes, written as fast as it is taken.

    @ivar writers: The writer of each answer, in order.
    """

    isLeaf = True

    def __init__(self, size: int) -> None:
        super().__init__()
        self._lines = size // len(LINE) + 1
        self.writers: list[BulkWriter] = []

    def render(self, request: Request) -> int | bytes:
        agent = request.requestHeaders.getRawHeaders(b"user-agent", [b""])[0]
        if agent.startswith(b"ollamaproxy/"):
            # The proxy's own checks (version, models) get short answers.
            request.setHeader(b"content-type", b"application/json")
            return b'{"version": "0.0.0", "models": []}'
        request.setHeader(b"content-type", b"application/x-ndjson")
        writer = BulkWriter(request, self._lines)
        self.writers.append(writer)
        request.registerProducer(writer, True)
        writer.resumeProducing()
        return NOT_DONE_YET
