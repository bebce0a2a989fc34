# -*- test-case-name: tests.test_site -*-
"""
The web server clients connect to: twisted.web's L{Site}, with request
bodies streamed as they arrive, a deadline for request heads, and without
twisted.web's own access log.

Request bodies: twisted.web receives a whole request body before it hands
the request on.  L{ProxyRequest} instead starts the request as soon as its
head is complete and passes the body on while it arrives
(L{ollamaproxy.request_body.StreamedBody}), so a model upload flows to Ollama
at once, a key is checked before a byte of the body is read, and a body over
the size limit is refused as soon as that shows.

Slow clients: a client that sends its request line and headers slowly (a
slowloris) would otherwise hold a connection for as long as it trickles
bytes, since twisted.web's idle timeout starts again with every byte.  Here
a request's head must be complete within the client timeout of its first
byte; the same timeout is the idle limit while a client sends a body or
between requests.  Neither applies while a response streams.
"""

from __future__ import annotations

from io import BytesIO
from typing import Any, cast

from twisted.internet.interfaces import IDelayedCall, IPushProducer, ITCPTransport
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.http import Request as HTTPRequest
from twisted.web.http_headers import Headers
from twisted.web.resource import IResource
from twisted.web.server import Request, Site

from ollamaproxy.request_body import StreamedBody

log = Logger()


class ProxyRequest(Request):
    """
    A request whose body is streamed rather than collected.

    @ivar body: The body as it arrives, or L{None} if the request has none.
    """

    body: StreamedBody | None = None

    def gotLength(self, length: int | None) -> None:
        if length == 0:
            super().gotLength(length)
            return
        # Nothing is collected; twisted.web's code expects a file here.
        self.content = BytesIO()
        transport = cast(IPushProducer, self.channel.transport)
        site = cast(ProxySite, cast(Any, self.channel).site)
        self.body = StreamedBody(
            length,
            site.max_body_size,
            pause_client=transport.pauseProducing,
            resume_client=transport.resumeProducing,
            sample_bytes=site.body_sample_bytes,
        )

    def handleContentChunk(self, data: bytes) -> None:
        assert self.body is not None
        self.body.write(data)

    def begin(self, command: bytes, path: bytes, version: bytes) -> None:
        """
        The head is complete and a body follows: handle the request now.
        """
        super().requestReceived(command, path, version)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self.body is None:
            super().requestReceived(command, path, version)
        else:
            self.body.finish()

    def connectionLost(self, reason: Failure) -> None:
        # First the handler hears of it (Klein cancels it), then the body.
        super().connectionLost(reason)
        if self.body is not None and not self.body.complete:
            self.body.fail(reason)


class ProxyChannel(HTTPChannel):
    """
    An L{HTTPChannel} that starts requests with a body at the end of their
    head, and drops a client whose request head takes longer than
    C{timeOut} seconds.
    """

    _deadline: IDelayedCall | None = None
    _awaiting_head = True

    def dataReceived(self, data: bytes) -> None:
        if self._awaiting_head and self._deadline is None and self.timeOut:
            self._deadline = self.callLater(self.timeOut, self._head_too_slow)
        super().dataReceived(data)

    def allHeadersReceived(self) -> None:
        self._awaiting_head = False
        self._cancel_deadline()
        super().allHeadersReceived()
        request = self.requests[-1]
        if request.body is not None:
            request.begin(self._command, self._path, self._version)

    def writeHeaders(
        self, version: bytes, code: bytes, reason: bytes, headers: Headers
    ) -> None:
        request = self.requests[0] if self.requests else None
        if request is not None and request.body is not None and not request.body.complete:
            # Answering before the whole body has arrived (a refused key, a
            # body too large): the rest of it cannot be told from the next
            # request, so this connection ends with the response.
            headers.setRawHeaders(b"connection", [b"close"])
            self.persistent = False
        super().writeHeaders(version, code, reason, headers)

    def allContentReceived(self) -> None:
        if not self.requests:
            # The response ended before the body (see writeHeaders),
            # in the same read as the body's last bytes: nothing to finish.
            return
        super().allContentReceived()

    def requestDone(self, request: HTTPRequest) -> None:
        super().requestDone(request)
        self._awaiting_head = True

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_deadline()
        super().connectionLost(reason)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _head_too_slow(self) -> None:
        self._deadline = None
        peer = self.transport.getPeer() if self.transport is not None else None
        log.info(
            "Dropped {peer}: request head not complete within {timeout:g} seconds",
            peer=str(getattr(peer, "host", peer)),
            timeout=self.timeOut,
        )
        if self.transport is not None:
            cast(ITCPTransport, self.transport).abortConnection()


class ProxySite(Site):
    """
    The proxy's L{Site}: HTTP/1.1 with streamed request bodies and a
    request-head deadline, and no access log of its own (the proxy logs each
    request itself, with the key's name and the outcome).

    @ivar max_body_size: The largest request body accepted, in bytes; 0 for
        no limit.
    @ivar body_sample_bytes: How much of each request body to keep for the
        log; 0 for none.
    """

    noisy = False
    protocol = ProxyChannel  # type: ignore[assignment]
    requestFactory = ProxyRequest

    def __init__(
        self,
        resource: IResource,
        client_timeout: float,
        max_body_size: int,
        reactor: Any,
        body_sample_bytes: int = 0,
    ) -> None:
        super().__init__(resource, timeout=client_timeout, reactor=reactor)
        self.max_body_size = max_body_size
        self.body_sample_bytes = body_sample_bytes

    def log(self, request: HTTPRequest) -> None:
        pass
