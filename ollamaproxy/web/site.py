# -*- test-case-name: tests.web.test_site -*-
"""
The web server clients connect to: twisted.web's L{Site}, with request
bodies streamed as they arrive, a deadline for request heads, and without
twisted.web's own access log.

Request bodies: twisted.web receives a whole request body before it hands
the request on.  L{ProxyRequest} instead starts the request as soon as its
head is complete and passes the body on while it arrives
(L{ollamaproxy.backends.request_body.StreamedBody}), so a model upload flows to Ollama
at once, a key is checked before a byte of the body is read, and a body over
the size limit is refused as soon as that shows.

Slow clients: a client that sends its request line and headers slowly (a
slowloris) would otherwise hold a connection for as long as it trickles
bytes, since twisted.web's idle timeout starts again with every byte.  Here
a request's head must be complete within the client timeout of its first
byte; the same timeout is the idle limit while a client sends a body or
between requests.  Neither applies while a response streams.  A body must
also keep up a minimum rate (L{ProxySite.min_body_rate}) once the proxy
reads it, so a body trickled a byte per timeout cannot hold a connection (and
one of Ollama's) for ever.

Requests twisted.web refuses itself: L{HTTPChannel} answers a malformed
request line or header, an oversized head, bad body framing, with a bare
C{400} and closes, without a resource ever seeing the request.  Here they
get a JSON error with the right status and an access event like any other
request (L{ProxyChannel._refuse}).

Expect: 100-continue: L{HTTPChannel} tells a client to send its body as soon
as it sees the header.  Here the C{100 Continue} goes out only when the proxy
first reads the body, after the key has been checked.

Idle connections: the site keeps its open connections in the order they
last became idle; when there are more than C{max_connections}, a new
connection closes the one idle the longest (L{ProxySite.shed_longest_idle}),
so idle sockets held by one client cannot use up the descriptors.

What this relies on in twisted.web that is not its public API is in
L{ollamaproxy.twisted_internals.HTTP_CHANNEL_INTERNALS}, and
C{tests/test_site.py} fails if it changes.
"""

from __future__ import annotations

from collections.abc import Callable
from io import BytesIO
from typing import Any, cast

from twisted.internet.interfaces import IDelayedCall, IReactorTime, ITCPTransport
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.http import Request as HTTPRequest
from twisted.web.http_headers import Headers
from twisted.web.resource import IResource
from twisted.web.server import Request, Site

from ollamaproxy.backends.request_body import StreamedBody
from ollamaproxy.errors import error_body, is_openai_path, reason_phrase
from ollamaproxy.exchange import Exchange, Outcome
from ollamaproxy.record.recorder import Recorder

log = Logger()

# How often a shed connection is logged at most, in seconds.
SHED_LOG_INTERVAL = 60.0


class ProxyRequest(Request):
    """
    A request whose body is streamed rather than collected.

    @ivar body: The body as it arrives, or L{None} if the request has none.
    @ivar refused: Set when the connection refused this request after it had
        started (a broken chunked body, a body too slow): the status, the
        reason and the outcome its access event should give.
    """

    body: StreamedBody | None = None
    refused: tuple[int, str, Outcome] | None = None
    _continue_expected = False
    _rate_check: IDelayedCall | None = None
    _rate_mark = 0

    def gotLength(self, length: int | None) -> None:
        if length == 0:
            super().gotLength(length)
            return
        # Nothing is collected; twisted.web's code expects a file here.
        self.content = BytesIO()
        # Any, as in _body_demanded: no cast() calls on every request with a
        # body.  The channel's transport is a push producer, its site ours.
        channel: Any = self.channel
        transport, site = channel.transport, channel.site
        self.body = StreamedBody(
            length,
            site.max_body_size,
            pause_client=transport.pauseProducing,
            resume_client=transport.resumeProducing,
            sample_bytes=site.body_sample_bytes,
        )
        self.body.on_demand = self._body_demanded

    def _body_demanded(self) -> None:
        """
        The proxy has begun to read the body (the key passed): tell a client
        that waits for it to send the body, and from now on watch its rate.
        """
        # Any: no cast() calls on every request with a body.
        channel: Any = self.channel
        if channel is None:
            return
        if self._continue_expected and not self.startedWriting:
            HTTPChannel._send100Continue(channel)
        self._continue_expected = False
        site = channel.site
        timeout = channel.timeOut
        if site.min_body_rate and timeout:
            self._rate_check = site.reactor.callLater(timeout, self._check_rate, timeout)

    def _check_rate(self, window: float) -> None:
        """
        Drop a client whose body, over the last C{window} seconds, came
        slower than the site's minimum rate, unless the proxy itself held
        it back (Ollama reading slowly).
        """
        self._rate_check = None
        body = self.body
        if body is None or body.complete or self.finished or self.channel is None:
            # Answered before its body was in: the connection closes anyway.
            return
        site = cast(ProxySite, cast(Any, self.channel).site)
        arrived = body.received - self._rate_mark
        if not body.held and arrived < site.min_body_rate * window:
            channel = cast(ProxyChannel, self.channel)
            channel._refuse(
                408,
                f"request body arrived slower than {site.min_body_rate} bytes/s",
                "client_timeout",
            )
            return
        body.held = False
        self._rate_mark = body.received
        self._rate_check = site.reactor.callLater(window, self._check_rate, window)

    def _stop_rate_check(self) -> None:
        if self._rate_check is not None:
            self._rate_check.cancel()
            self._rate_check = None

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
            self._stop_rate_check()
            self.body.finish()

    def connectionLost(self, reason: Failure) -> None:
        self._stop_rate_check()
        # First the handler hears of it (Klein cancels it), then the body.
        super().connectionLost(reason)
        if self.body is not None and not self.body.complete:
            self.body.fail(reason)


class ProxyChannel(HTTPChannel):
    """
    An L{HTTPChannel} that starts requests with a body at the end of their
    head, drops a client whose request head takes longer than C{timeOut}
    seconds, logs the requests it refuses itself, and tells the site when it
    is idle.
    """

    site: ProxySite
    _deadline: IDelayedCall | None = None
    _awaiting_head = True
    _refused = False
    _shed = False

    def connectionMade(self) -> None:
        super().connectionMade()
        # The site's bookkeeping, inline: this runs for every connection.
        site = self.site
        site.open_connections += 1
        site._idle[self] = None
        if site.max_connections and site.open_connections > site.max_connections:
            site.shed_longest_idle()

    def dataReceived(self, data: bytes) -> None:
        if self._awaiting_head and self._deadline is None and self.timeOut:
            self._deadline = self.callLater(self.timeOut, self._head_too_slow)
        super().dataReceived(data)

    def allHeadersReceived(self) -> None:
        self._awaiting_head = False
        self.site._idle.pop(self, None)
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
        if self.persistent and not self._shed:
            # Idle again: the last in the site's order.
            self.site._idle[self] = None

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_deadline()
        if not self._shed:
            self.site.open_connections -= 1
            self.site._idle.pop(self, None)
        super().connectionLost(reason)

    def shed(self) -> None:
        """
        Close this idle connection to make room for a new one.
        """
        self._shed = True
        if self.transport is not None:
            cast(ITCPTransport, self.transport).abortConnection()

    # Requests twisted.web refuses by itself.

    def _respondToBadRequestAndDisconnect(self) -> None:
        """
        twisted.web's answer to a request it cannot parse (a bare 400 and a
        closed connection), with the right status, a JSON error and an
        access event instead.
        """
        if self._receivedHeaderSize > self.totalHeadersSize:
            self._refuse(431, f"request head larger than {self.totalHeadersSize} bytes")
        elif self._receivedHeaderCount > self.maxHeaders:
            self._refuse(431, f"more than {self.maxHeaders} header lines")
        elif getattr(self, "_command", None) is None:
            self._refuse(400, "malformed request line")
        elif self._awaiting_head:
            self._refuse(400, "malformed header")
        else:
            self._refuse(400, "malformed request body framing")

    def lineLengthExceeded(self, line: bytes) -> None:
        """
        A request line or header line over C{MAX_LENGTH}: twisted.web would
        close the connection without a word.
        """
        if getattr(self, "_command", None) is None:
            self._refuse(414, f"request line longer than {self.MAX_LENGTH} bytes")
        else:
            self._refuse(431, f"header line longer than {self.MAX_LENGTH} bytes")

    def _send100Continue(self) -> None:
        # Not now: when the proxy first reads the body (ProxyRequest).
        cast(ProxyRequest, self.requests[-1])._continue_expected = True

    def _refuse(self, status: int, reason: str, outcome: Outcome = "bad_request") -> None:
        """
        Answer C{status} with C{{"error": reason}}, if no response has begun,
        and close the connection.  A request the proxy was already handling
        gets C{refused} set, for its own access event; any other gets one
        here.
        """
        if self._refused or self.transport is None or getattr(
            self.transport, "disconnecting", False
        ):
            return
        self._refused = True
        request = self.requests[-1] if self.requests else None
        command = getattr(self, "_command", None)
        target = getattr(self, "_path", None)
        path = target.split(b"?", 1)[0] if target else b"-"
        sent = 0
        if request is None or not request.startedWriting:
            body = error_body(reason, status, is_openai_path(path))
            head = (
                b"HTTP/1.1 %d %s\r\ncontent-type: application/json; charset=utf-8\r\n"
                b"content-length: %d\r\nconnection: close\r\n\r\n"
                % (status, reason_phrase(status), len(body))
            )
            self.transport.write(head + body)
            sent = len(body)
        if request is not None and not self._awaiting_head:
            # The client saw the status already sent, if one was.
            request.refused = (request.code if sent == 0 else status, reason, outcome)
        else:
            now = self.site.reactor.seconds()
            peer = self.transport.getPeer()
            # The head began when its deadline was set.
            deadline = self._deadline
            exchange = Exchange(
                method=command.decode("ascii", "replace") if command else "-",
                path=path.decode("ascii", "replace"),
                client=str(getattr(peer, "host", peer)),
                started=now if deadline is None else deadline.getTime() - (self.timeOut or 0),
                status=status,
            )
            exchange.failed(outcome, reason)
            self.site.record(exchange, sent)
        self.loseConnection()

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
    @ivar min_body_rate: The slowest a request body may arrive once the
        proxy reads it, in bytes a second, averaged over each client timeout;
        0 for no minimum.
    @ivar max_connections: How many client connections may be open before
        a new one closes the one idle the longest; 0 for no limit.
    @param record: Writes down a request refused before it reached the
        proxy's handler (L{Recorder.record}, given its sent body bytes); by
        default only its access event is logged.
    @param count_shed: Called for each idle connection closed to make room.
    """

    noisy = False
    protocol = ProxyChannel  # type: ignore[assignment]
    requestFactory = ProxyRequest

    def __init__(
        self,
        resource: IResource,
        client_timeout: float,
        max_body_size: int,
        reactor: IReactorTime,
        body_sample_bytes: int = 0,
        min_body_rate: int = 0,
        max_connections: int = 0,
        record: Callable[[Exchange, int], None] | None = None,
        count_shed: Callable[[], None] | None = None,
    ) -> None:
        # Bodies pass through: no form is ever parsed into request.args.
        super().__init__(
            resource, timeout=client_timeout, reactor=reactor, parsePOSTFormSubmission=False
        )
        self.max_body_size = max_body_size
        self.body_sample_bytes = body_sample_bytes
        self.min_body_rate = min_body_rate
        self.max_connections = max_connections
        self.record = record or Recorder(reactor).record
        self._count_shed = count_shed
        # Connections with no request in progress, the longest idle first.
        self._idle: dict[ProxyChannel, None] = {}
        self.open_connections = 0
        self._shed_since_logged = 0
        self._shed_logged_at: float | None = None

    def shed_longest_idle(self) -> None:
        """
        There are more than C{max_connections} connections: close the one
        idle the longest (the newest itself if no other is idle).
        """
        oldest = next(iter(self._idle))
        del self._idle[oldest]
        self.open_connections -= 1
        oldest.shed()
        self._note_shed()

    def _note_shed(self) -> None:
        if self._count_shed is not None:
            self._count_shed()
        self._shed_since_logged += 1
        now = self.reactor.seconds()
        if self._shed_logged_at is None or now - self._shed_logged_at >= SHED_LOG_INTERVAL:
            log.warn(
                "{count} idle connection(s) closed, the longest idle first: more "
                "than {limit} connections were open",
                count=self._shed_since_logged,
                limit=self.max_connections,
            )
            self._shed_logged_at = now
            self._shed_since_logged = 0

    def log(self, request: HTTPRequest) -> None:
        pass

