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
from collections.abc import Sequence
from dataclasses import dataclass

from twisted.web.iweb import IResponse

from ollamaproxy.backends.downstream import Downstream
from ollamaproxy.backends.pool import Backend
from ollamaproxy.backends.relay import (
    NDJSON,
    Answered,
    Target,
    answer_body,
    answer_head,
    end_cut,
    send,
    whole_body,
)
from ollamaproxy.backends.upstream import BytesProducer
from ollamaproxy.errors import ProxyError, error_body


@dataclass(frozen=True)
class EveryAnswer:
    """
    What the client was answered for a request sent to every backend.

    @ivar status: The status the client got.
    @ivar responded: When its answer's head came (on the backends' clock).
    @ivar answered: What was answered of the last backend's answer (or why
        the stream was cut, already ended).
    @ivar reached: The backends the request reached.
    """

    status: int
    responded: float
    answered: Answered
    reached: list[Backend]


async def on_every_backend(
    request: Downstream,
    target: Target,
    backends: Sequence[Backend],
    body: bytes,
    sample_bytes: int = 0,
) -> EveryAnswer:
    """
    Send one request to each of C{backends} in turn, and answer the client
    once (see the module's docstring).

    @param body: The request's body, read whole.
    @raise ProxyError: If the first backend cannot be reached.
    """
    reached: list[Backend] = []
    streaming = False
    count = len(backends)
    clock = backends[0].upstream.clock
    responded = 0.0
    for number, backend in enumerate(backends, 1):
        which = f"backend {number} of {count}"
        try:
            response = await send(request, backend.upstream, target, body=BytesProducer(body))
        except ProxyError as e:
            if not streaming:
                raise
            cut = await _end_stream(request, f"{which}: {e.message}", e.code)
            return EveryAnswer(200, responded, cut, reached)
        reached.append(backend)
        if number == 1 and response.code == 200 and _is_stream(response):
            streaming = True
            responded = clock.seconds()
            answer_head(request, response)
            request.responseHeaders.removeHeader(b"content-length")
        if not streaming:
            answer = await whole_body(response)
            if response.code < 300 and number < count:
                continue
            answer_head(request, response)
            request.setHeader(b"content-length", b"%d" % len(answer))
            request.write(answer)
            return EveryAnswer(response.code, clock.seconds(),
                               Answered(sample=answer[:sample_bytes]), reached)
        request.write(_status_line(which))
        if response.code != 200:
            message = (await whole_body(response)).decode("utf-8", "replace").strip()
            cut = await _end_stream(request, f"{which}: {message}", response.code)
            return EveryAnswer(200, responded, cut, reached)
        answered = await answer_body(request, response, backend.upstream, False, sample_bytes)
        if answered.cut is not None or number == count:
            return EveryAnswer(200, responded, answered, reached)
    raise AssertionError("no backend")  # pragma: no cover: backends is never empty


def _is_stream(response: IResponse) -> bool:
    """
    Whether an answer is an NDJSON stream (a pull's progress).
    """
    content_type: bytes = (response.headers.getRawHeaders(b"content-type") or [b""])[0]
    return content_type.startswith(NDJSON)


def _status_line(status: str) -> bytes:
    return json.dumps({"status": status}).encode("utf-8") + b"\n"


async def _end_stream(request: Downstream, message: str, code: int) -> Answered:
    """
    End a streamed answer with an error line, as a cut stream.
    """
    request.write(error_body(message, code, openai=False) + b"\n")
    await end_cut(request)
    return Answered(cut=message)
