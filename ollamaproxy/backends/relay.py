# -*- test-case-name: tests.backends.test_relay -*-
"""
The heart of the proxy: one request to Ollama and its response relayed back,
byte for byte, as it arrives.

The path of a response body::

    Ollama socket -> Agent -> _BodyAnswer.dataReceived -> request.write -> client

Nothing on that path keeps a body: an C{application/x-ndjson} stream goes out
one complete line at a time (a line split across reads waits for its end;
lines that arrive together go out together), everything else as it comes.

The relay is also a push producer on the client's connection, so a client
that reads slowly pauses the reading of Ollama's socket, and a client that
goes away closes it, which makes Ollama stop generating.  A body that stops
early never looks finished: the client gets an error line in the stream's own
format and a connection closed without the final empty chunk.  A body that
ends whole ends the client's response at once, in the turn that relays its
last bytes; what the request does next waits until they have been sent
(L{ollamaproxy.after_send}).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.internet.interfaces import IDelayedCall, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import (
    RequestGenerationFailed,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IBodyProducer, IResponse
from zope.interface import implementer

from ollamaproxy.after_send import AfterSend
from ollamaproxy.backends.downstream import Downstream
from ollamaproxy.backends.headers import copy_response_headers, upstream_request_headers
from ollamaproxy.backends.request_body import BodyTooLarge
from ollamaproxy.backends.upstream import Upstream
from ollamaproxy.config import show_size
from ollamaproxy.errors import ProxyError, error_body
from ollamaproxy.exchange import Meter, StreamSummary
from ollamaproxy.record.summary import HEAD_BYTES, TAIL_BYTES, summarise

NDJSON = b"application/x-ndjson"
SSE = b"text/event-stream"

# An NDJSON line still unfinished after this many bytes is passed on as it
# is, so one endless line cannot hold memory.
MAX_PENDING_LINE = 1024 * 1024

UNREACHABLE = (
    ConnectError,
    DNSLookupError,
    ResponseNeverReceived,
    RequestTransmissionFailed,
    ResponseFailed,
)


_DONE = Failure(ResponseDone())
#: How a body that ended properly ends: all of it, or all of it without a
#: length to check it by.
_ENDED = (ResponseDone, PotentialDataLoss)


class Unreachable(ProxyError):
    """
    Ollama could not be reached: no connection, so nothing of the request
    was sent, and another backend may take it.
    """


class NoResponseHead(ProxyError):
    """
    Ollama was connected to, but no response head came: it timed out (504)
    or the connection broke first (502).  The request may have been sent, so
    it goes to no other backend; but the backend is no longer trusted with
    new ones until a probe finds it answering.
    """


class BodyCut(Exception):
    """
    Ollama's response body stopped before its end.
    """


@dataclass(frozen=True)
class Target:
    """
    Where a client's request goes.

    @ivar path: The request path without the C{/proxy} prefix and query.
    @ivar uri: Path and query string to send to Ollama.
    @ivar openai: Whether this is one of the OpenAI-compatible C{/v1} routes.
    """

    path: bytes
    uri: bytes
    openai: bool


@dataclass(frozen=True)
class Answered:
    """
    What an answer relayed to the client amounted to.  (The tokens it used
    are in the request's L{Meter}, written as the answer streams.)

    @ivar sample: The start of the body, for the log.
    @ivar cut: Why the body stopped before its end, or L{None} if it did
        not.  The client has had an error in the stream's own format, and
        its connection was closed without the last chunk (L{end_cut}), so
        that it cannot take the answer for complete.
    """

    sample: bytes = b""
    cut: str | None = None


#: What a request that has not been answered yet amounted to.
NOTHING_ANSWERED = Answered()


async def send(
    request: Downstream,
    upstream: Upstream,
    target: Target,
    method: bytes | None = None,
    body: IBodyProducer | None = None,
) -> IResponse:
    """
    Send C{request} to Ollama, and wait for the response head.

    @param method: The method to send, if not the request's.
    @param body: The body to send instead of the client's (which is sent
        as it comes).
    @raise ProxyError: 502 if Ollama cannot be reached (L{Unreachable} if
        not even a connection was made, so nothing was sent), 504 if its
        response head does not come in time (that and a connection that
        broke before the head are L{NoResponseHead}), 413 for a body over
        the limit.
    """
    if body is None:
        body = request.body
        if request.body is not None and request.body.too_large:
            raise _too_large(request.body.max_size)
    try:
        return await upstream.request(
            method or request.method,
            target.uri,
            upstream_request_headers(request.requestHeaders, upstream.via),
            body,
        )
    except TimeoutError:
        raise NoResponseHead(
            504, f"Ollama sent no response within {upstream.header_timeout:g} seconds"
        ) from None
    except RequestGenerationFailed as e:
        if request.body is not None and any(
            reason.check(BodyTooLarge) for reason in e.reasons
        ):
            raise _too_large(request.body.max_size) from None
        if all(reason.check(CancelledError) for reason in e.reasons):
            # The client left (or was dropped) while its body was on its way.
            raise CancelledError() from None
        raise
    except UNREACHABLE as e:
        where = upstream.base.decode("ascii", "replace")
        unsent = isinstance(e, (ConnectError, DNSLookupError))
        raise (Unreachable if unsent else NoResponseHead)(
            502, f"cannot reach Ollama at {where}: {_reason(e)}"
        ) from e


async def answer(
    request: Downstream,
    response: IResponse,
    upstream: Upstream,
    target: Target,
    after_send: AfterSend,
    rewrite: Callable[[bytes], bytes] | None = None,
    sample_bytes: int = 0,
    meter: Meter | None = None,
) -> Answered:
    """
    Answer the client with Ollama's response: its head, then its body as it
    comes.

    @param after_send: Makes the call that returns once a body that ended
        whole, and with it the response, has been sent (L{answer_body}).
    @param rewrite: For the few small answers the proxy must change (model
        listings for a key limited to some models): called with a whole
        successful body, and what it returns is sent instead.
    @param sample_bytes: How much of the response body to keep for the log;
        0 for none.
    @param meter: Counts the tokens of the answer as it streams (see
        L{answer_body}).
    @return: What was answered; a body cut short is already ended.
    @raise ProxyError: 502 if an answer to rewrite could not be read,
        before anything was written to the client.
    """
    if rewrite is not None and response.code == 200:
        try:
            rewritten = rewrite(await whole_body(response))
        except ResponseFailed as e:
            raise ProxyError(502, "Ollama's answer broke off") from e
        except ValueError as e:  # too large, or not a listing
            raise ProxyError(502, f"Ollama's answer could not be read: {e}") from e
        answer_head(request, response)
        request.setHeader(b"content-length", b"%d" % len(rewritten))
        request.write(rewritten)
        return Answered()
    answer_head(request, response)
    request.write(b"")  # the response head goes out now, as Ollama sent it
    return await answer_body(request, response, upstream, target.openai, sample_bytes, meter,
                             after_send)


def answer_head(request: Downstream, response: IResponse) -> None:
    """
    Answer with Ollama's status and headers.
    """
    request.setResponseCode(response.code, response.phrase)
    # Ollama's type or none: not twisted.web's text/html default.
    request.defaultContentType = None
    copy_response_headers(response.headers, request.responseHeaders)


async def answer_body(
    request: Downstream,
    response: IResponse,
    upstream: Upstream,
    openai: bool,
    sample_bytes: int = 0,
    meter: Meter | None = None,
    after_send: AfterSend | None = None,
) -> Answered:
    """
    Stream Ollama's response body to the client as it comes (the head has
    been answered); end a body cut short with L{end_cut}.

    @param meter: Counts the answer's pieces as they are relayed, and is
        given Ollama's own figures when the body ends whole.  It is written
        as the body goes, so that a request cancelled (its client left) or
        cut still leaves what was generated where the caller reads it.
    @param after_send: Given when the body is the whole response: one that
        ends whole then ends the response at once, and the call returns
        only once that end has been sent (a call made by C{after_send}), so
        that what the caller does next never delays it.  Without, the
        response is left open for more.
    """
    if meter is None:
        meter = Meter()
    meter.generating = 200 <= response.code < 300
    body = _BodyAnswer(request, response, upstream, openai, sample_bytes, meter, after_send)
    response.deliverBody(body)
    try:
        await body.done
    except BodyCut as e:
        await end_cut(request)
        return Answered(sample=body.sample, cut=str(e))
    meter.final = body.summary()
    return Answered(sample=body.sample)


def pieces_answered(request: object) -> int | None:
    """
    How many pieces of its response body a request in flight has answered so
    far (one NDJSON line or SSE event is about one token), or L{None} if no
    body is streaming to it now.

    Read from the meter of the L{_BodyAnswer} that is the request's producer
    while it streams (twisted.web's C{Request.producer}): nothing is added
    per chunk or per request for it; the console samples it a few times a
    second.
    """
    producer = getattr(request, "producer", None)
    return producer.meter.output if isinstance(producer, _BodyAnswer) else None


async def end_cut(request: Downstream) -> None:
    """
    End a response whose body was cut: close the connection without the
    last chunk, so the client cannot take the stream for complete, and wait
    until it is closed (a response finished before then would still get its
    last chunk out).
    """
    request.loseConnection()
    try:
        await request.notifyFinish()
    except CancelledError:
        # Klein cancels the handler when the connection goes: the end
        # asked for here, not the client's leaving.
        pass
    except Exception:
        # The connection was lost: the end asked for here.
        pass


def _too_large(limit: int) -> ProxyError:
    """
    The 413 for a body over C{--max-body-size}, stating the limit.
    """
    if limit <= 0:
        return ProxyError(413, "request body is larger than this server accepts")
    return ProxyError(
        413, f"request body is larger than the limit of {show_size(limit)} (--max-body-size)"
    )


def _reason(error: Exception) -> str:
    """
    A short, human description of why Ollama could not be reached.
    """
    if isinstance(error, (ResponseFailed, ResponseNeverReceived, RequestTransmissionFailed)):
        reasons = getattr(error, "reasons", None) or []
        return "; ".join(r.getErrorMessage() for r in reasons) or type(error).__name__
    return str(error) or type(error).__name__


#: The largest small answer read whole (a model listing, a version).
MAX_WHOLE_BODY = 16 * 1024 * 1024


class _WholeBody(Protocol):
    """
    Collects a small response body whole; one that grows over C{max_size}
    bytes is cut off and fails, as does one that breaks off.

    @ivar done: Fires with the body, fails with L{ResponseFailed} if it
        broke off or L{ValueError} if it grew too large, and closes the
        connection if cancelled.
    """

    def __init__(self, max_size: int) -> None:
        self._chunks: list[bytes] = []
        self._size = 0
        self._max_size = max_size
        self.done: Deferred[bytes] = Deferred(lambda _: self._stop())

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self._chunks.append(data)
        self._size += len(data)
        if self._size > self._max_size:
            self.done.errback(ValueError(f"the answer is larger than {self._max_size} bytes"))
            self._stop()

    def connectionLost(self, reason: Failure = _DONE) -> None:
        if self.done.called:
            return
        # Not reason.check(): it compares the names of every class the
        # error's class derives from, at each request's end.
        if isinstance(reason.value, _ENDED):
            self.done.callback(b"".join(self._chunks))
        else:
            self.done.errback(ResponseFailed([reason]))

    def _stop(self) -> None:
        if self.transport is not None:
            cast(IPushProducer, self.transport).stopProducing()


def whole_body(response: IResponse, max_size: int = MAX_WHOLE_BODY) -> Deferred[bytes]:
    """
    A small response body (a model listing, a version), whole.

    @return: Fires with the body; fails with L{ResponseFailed} if it broke
        off, L{ValueError} past C{max_size} bytes; cancelling it closes the
        connection.
    """
    whole = _WholeBody(max_size)
    response.deliverBody(whole)
    return whole.done


@implementer(IPushProducer)
class _BodyAnswer(Protocol):
    """
    Receives Ollama's response body and writes it to the client.

    @ivar done: Fires once the body has been relayed whole (and, with
        C{after_send}, the response ended and its end sent), fails with
        L{BodyCut} if it stopped early, and closes Ollama's connection if
        cancelled.
    @ivar sample: The start of the body, up to C{sample_bytes}, for the log.
    @ivar meter: Counts the NDJSON lines or SSE events relayed, each about
        one generated token: one C{bytes.count} per piece, the only work
        per chunk that relaying does not need.
    """

    def __init__(
        self,
        request: Downstream,
        response: IResponse,
        upstream: Upstream,
        openai: bool,
        sample_bytes: int = 0,
        meter: Meter | None = None,
        after_send: AfterSend | None = None,
    ) -> None:
        self.done: Deferred[None] = Deferred(lambda _: self._stop_upstream())
        self._request = request
        self._after_send = after_send
        self._clock = upstream.clock
        self._idle_timeout = upstream.idle_timeout
        content_type = (response.headers.getRawHeaders(b"content-type") or [b""])[0]
        self._lines = content_type.startswith(NDJSON)
        self._sse = content_type.startswith(SSE)
        self._openai = openai
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._previous = self._last = b""
        # The lines last written whole from pieces joined (a line that
        # spanned them), until a line is written as it came: the final
        # object of a stream whose last line spanned more than two pieces
        # (C{/api/generate}'s C{context} after a long prompt).
        self._joined = b""
        # Of a body that is no stream: its start and a bounded tail, for
        # the final object however many pieces it spans.
        self._head = b""
        self._tail = bytearray()
        self._size = self._dropped = 0
        self.meter = Meter() if meter is None else meter
        self.sample = b""
        self._sample_left = sample_bytes
        self._idle: IDelayedCall | None = None
        self._cut_reason: str | None = None

    def connectionMade(self) -> None:
        self._request.registerProducer(self, True)
        self._start_idle_timer()

    def dataReceived(self, data: bytes) -> None:
        if self._idle is not None:
            self._idle.reset(self._idle_timeout)
        self._previous, self._last = self._last, data
        if self._sample_left:
            self.sample += data[: self._sample_left]
            self._sample_left = max(0, self._sample_left - len(data))
        if self._lines:
            self.meter.output += data.count(b"\n")
            self._write_lines(data)
        elif self._sse:
            self.meter.output += data.count(b"\n\n")
            self._request.write(data)
        else:
            self._keep(data)
            self._request.write(data)

    def _keep(self, data: bytes) -> None:
        """
        Keep the start of a body that is no stream, and its last
        L{TAIL_BYTES} at least: its final object (a non-streamed answer)
        may span any number of pieces.
        """
        if self._size < HEAD_BYTES:
            self._head += data[: HEAD_BYTES - self._size]
        self._size += len(data)
        self._tail += data
        if self._size - self._dropped > 2 * TAIL_BYTES:
            del self._tail[:-TAIL_BYTES]
            self._dropped = self._size - TAIL_BYTES

    def summary(self) -> StreamSummary | None:
        """
        What the body that has ended says it used (L{summarise}): read from
        an NDJSON stream's last line joined from its pieces, if it spanned
        them, else from the last two pieces of a stream, which hold its
        final object, or from what was kept of any other body.
        """
        if self._joined:
            return summarise(self._joined, self._openai, self.meter.output)
        if self._lines or self._sse:
            return summarise(self._previous + self._last, self._openai, self.meter.output)
        head = self._head if self._dropped else b""
        return summarise(bytes(self._tail), self._openai, head=head)

    def _write_lines(self, data: bytes) -> None:
        end = data.rfind(b"\n") + 1
        if end == 0:
            self._pending.append(data)
            self._pending_size += len(data)
            if self._pending_size > MAX_PENDING_LINE:
                self._flush_pending()
            return
        head = data if end == len(data) else data[:end]
        if self._pending:
            self._pending.append(head)
            self._flush_pending()
        else:
            self._joined = b""
            self._request.write(head)
        if end < len(data):
            self._pending.append(data[end:])
            self._pending_size = len(data) - end

    def _flush_pending(self) -> None:
        self._joined = b"".join(self._pending)
        self._request.write(self._joined)
        self._pending = []
        self._pending_size = 0

    def connectionLost(self, reason: Failure = _DONE) -> None:
        self._stop_idle_timer()
        if self._request.channel is not None:
            self._request.unregisterProducer()
        if self.done.called:
            return
        if isinstance(reason.value, _ENDED):  # as in _WholeBody
            if self._pending:
                self._flush_pending()
            if self._after_send is None:
                self.done.callback(None)
                return
            if self._request.channel is not None:
                self._request.finish()
            self._after_send.call(self._sent)
            return
        why = self._cut_reason or "Ollama's connection broke off in the middle of the response"
        self._write_error(why)
        self.done.errback(BodyCut(why))

    def _sent(self) -> None:
        """
        The whole body has been sent (unless the request was cancelled
        meanwhile: its client left, or the proxy stopped waiting).
        """
        if not self.done.called:
            self.done.callback(None)

    def _write_error(self, message: str) -> None:
        """
        Tell the client, in the stream's own format, that the body is cut.
        """
        if self._lines:
            self._request.write(error_body(message, 502, openai=False) + b"\n")
        elif self._sse:
            separator = b"" if self._last.endswith(b"\n\n") else b"\n\n"
            event = error_body(message, 502, openai=self._openai)
            self._request.write(separator + b"data: " + event + b"\n\n")

    def _upstream(self) -> IPushProducer:
        """
        Ollama's connection, as the agent hands it to a body protocol.
        """
        return cast(IPushProducer, self.transport)

    # IPushProducer, driven by the client's connection.

    def pauseProducing(self) -> None:
        self._stop_idle_timer()
        self._upstream().pauseProducing()

    def resumeProducing(self) -> None:
        self._start_idle_timer()
        self._upstream().resumeProducing()

    def stopProducing(self) -> None:
        self._stop_upstream()

    def _stop_upstream(self) -> None:
        self._stop_idle_timer()
        self._upstream().stopProducing()

    def _start_idle_timer(self) -> None:
        if self._idle is None:
            self._idle = self._clock.callLater(self._idle_timeout, self._idled)

    def _stop_idle_timer(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def _idled(self) -> None:
        self._idle = None
        self._cut_reason = f"Ollama sent nothing for {self._idle_timeout:g} seconds"
        self._upstream().stopProducing()
