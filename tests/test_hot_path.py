"""
A guard on the cost of relaying a chunk, counted rather than timed.

Timing tests fail on busy machines; the number of Python function calls made
per relayed chunk does not change from run to run.  If a change makes the hot
path do more work per chunk, this test says so: raise the budget only on
purpose, with the benchmark figures to show it is worth it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.http_headers import Headers

from ollamaproxy.relay import _BodyRelay
from ollamaproxy.upstream import Upstream

# Python and C function calls per relayed chunk, as measured when the guard
# was written: the call itself, the idle timer's reset (and its clock), the
# newline search and the write; NDJSON adds the line bookkeeping.
BUDGET = {b"application/x-ndjson": 8, b"text/event-stream": 4}
CHUNKS = 1000


class _Request:
    channel = object()

    def write(self, data: bytes) -> None:
        pass

    def registerProducer(self, producer: object, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass


class _Response:
    def __init__(self, content_type: bytes) -> None:
        self.headers = Headers({b"content-type": [content_type]})


def calls_per_chunk(content_type: bytes, chunk: bytes) -> float:
    """
    How many function calls relaying one chunk makes, on average.
    """
    clock = Clock()
    upstream = Upstream(agent=None, base=b"", clock=clock,  # type: ignore[arg-type]
                        header_timeout=1, idle_timeout=600)
    relay = _BodyRelay(_Request(), _Response(content_type), upstream,  # type: ignore[arg-type]
                       openai=False)
    relay.makeConnection(StringTransport())
    calls = 0

    def count(frame: FrameType, event: str, arg: Any) -> None:
        nonlocal calls
        if event in ("call", "c_call"):
            calls += 1

    receive: Callable[[bytes], None] = relay.dataReceived
    sys.setprofile(count)
    try:
        for _ in range(CHUNKS):
            receive(chunk)
    finally:
        sys.setprofile(None)
    relay.stopProducing()
    return (calls - 1) / CHUNKS  # less the call that stopped the counting


@pytest.mark.parametrize(
    ("content_type", "chunk"),
    [
        (b"application/x-ndjson", b'{"model":"m","message":{"content":"tok "},"done":false}\n'),
        (b"text/event-stream", b'data: {"choices":[{"delta":{"content":"tok "}}]}\n\n'),
    ],
)
def test_calls_per_relayed_chunk_stay_within_budget(content_type: bytes, chunk: bytes) -> None:
    """
    Relaying a chunk makes no more function calls than the budget.
    """
    assert calls_per_chunk(content_type, chunk) <= BUDGET[content_type]
