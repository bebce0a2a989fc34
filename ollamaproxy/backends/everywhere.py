# -*- test-case-name: tests.backends.test_everywhere -*-
"""
Model management on every backend: a pull onto each healthy backend in
turn, a delete or a copy on each one that has the model.

The client sees one answer.  A streamed pull is one NDJSON stream: a status
line C{{"status": "backend 2 of 3"}} before each backend's own progress, and
an C{{"error": ...}} line, ending the stream, for a backend that fails (the
ones before it keep the model).  An answer that is not a stream (a delete, a
copy, a pull with C{"stream": false}) is the first failure's, else the last
backend's.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IConsumer
from twisted.web.iweb import IBodyProducer, IResponse
from zope.interface import implementer

from ollamaproxy.backends.pool import Backend
from ollamaproxy.backends.relay import (
    NDJSON,
    Relayed,
    Target,
    answer_head,
    relay_body,
    send,
    whole_body,
)
from ollamaproxy.errors import ProxyError, error_body
from ollamaproxy.web.site import ProxyRequest


@implementer(IBodyProducer)
class BytesProducer:
    """
    A small body held whole, written at once: the same request to several
    backends (and, in the tests, a fake client's bodies: treq's default
    producer needs a running reactor).
    """

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.length = len(data)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self._data)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


async def on_every_backend(
    request: ProxyRequest,
    target: Target,
    backends: Sequence[Backend],
    body: bytes,
    on_head: Callable[[int], None],
    sample_bytes: int = 0,
) -> tuple[Relayed, list[Backend]]:
    """
    Send one request to each of C{backends} in turn, and answer the client
    once (see the module's docstring).

    @param body: The request's body, read whole.
    @param on_head: Called with the status the client gets.
    @return: What was relayed of the last backend's answer (or why the
        stream was cut), and the backends the request reached.
    @raise ProxyError: If the first backend cannot be reached.
    """
    reached: list[Backend] = []
    streaming = False
    count = len(backends)
    for number, backend in enumerate(backends, 1):
        which = f"backend {number} of {count}"
        try:
            response = await send(request, backend.upstream, target, body=BytesProducer(body))
        except ProxyError as e:
            if not streaming:
                raise
            return _end_stream(request, f"{which}: {e.message}", e.code), reached
        reached.append(backend)
        if number == 1 and response.code == 200 and _is_stream(response):
            streaming = True
            on_head(response.code)
            answer_head(request, response)
            request.responseHeaders.removeHeader(b"content-length")
        if not streaming:
            answer = await whole_body(response)
            if response.code < 300 and number < count:
                continue
            on_head(response.code)
            answer_head(request, response)
            request.setHeader(b"content-length", b"%d" % len(answer))
            request.write(answer)
            return Relayed(sample=answer[:sample_bytes]), reached
        request.write(_status_line(which))
        if response.code != 200:
            message = (await whole_body(response)).decode("utf-8", "replace").strip()
            return _end_stream(request, f"{which}: {message}", response.code), reached
        relayed = await relay_body(request, response, backend.upstream, False, sample_bytes)
        if relayed.cut is not None or number == count:
            return relayed, reached
    raise AssertionError("no backend")  # pragma: no cover: backends is never empty


def _is_stream(response: IResponse) -> bool:
    """
    Whether an answer is an NDJSON stream (a pull's progress).
    """
    content_type: bytes = (response.headers.getRawHeaders(b"content-type") or [b""])[0]
    return content_type.startswith(NDJSON)


def _status_line(status: str) -> bytes:
    return json.dumps({"status": status}).encode("utf-8") + b"\n"


def _end_stream(request: ProxyRequest, message: str, code: int) -> Relayed:
    """
    End a streamed answer with an error line, as a cut stream.
    """
    request.write(error_body(message, code, openai=False) + b"\n")
    return Relayed(cut=message)
