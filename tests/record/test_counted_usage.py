"""
Usage is never silently zero for a generation: a C{/v1} stream whose client
did not ask for usage (C{stream_options.include_usage}) has its completion
tokens counted from the chunks and its prompt tokens estimated from the
request, and says so; the client's stream is not changed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.logger import LogEvent, capturedLogs, formatEvent

from ollamaproxy.exchange import StreamSummary
from ollamaproxy.record.summary import summarise
from tests.fakes.chain import Chain

TOKENS = 7
DELAY = 0.02


def v1_request(path: str, **extra: Any) -> bytes:
    body: dict[str, Any] = {"model": "llama3.2", "stream": True, "max_tokens": TOKENS,
                            "options": {"fake_delay": DELAY}, **extra}
    if path.endswith("chat/completions"):
        body["messages"] = [{"role": "user", "content": "hi there"}]
    else:
        body["prompt"] = "hi there"
    return json.dumps(body).encode()


def stream_events(chain: Chain, path: str, data: bytes) -> tuple[bytes, list[LogEvent]]:
    """
    Send a streamed request and let Ollama write one chunk per turn of the
    clock, as a real one does; return what the client got and the
    summary events.
    """
    with capturedLogs() as events:
        response = chain.respond("POST", path, data=data)
        assert response.code == 200
        collector = chain.stream(response)
        for _ in range(TOKENS + 5):
            chain.clock.advance(DELAY)
            chain.flush()
        chain.result(collector.done)
    return collector.body, [e for e in events if e.get("log_namespace") == "ollamaproxy.stream"]


@pytest.fixture
def chain() -> Iterator[Chain]:
    yield Chain()


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_stream_without_usage_is_counted(chain: Chain, path: str) -> None:
    """
    Without C{include_usage}, the completion tokens are the chunks counted,
    the prompt tokens are estimated from the request (a quarter of its
    bytes), the summary says both, and the metrics (like the usage record,
    which takes the same summary) add them up.
    """
    request = v1_request(path)
    body, [event] = stream_events(chain, path, request)
    assert b'"usage"' not in body  # the client got the stream as Ollama sent it
    assert body.endswith(b"data: [DONE]\n\n")
    assert (event["model"], event["completion_tokens"], event["prompt_tokens"]) == (
        "llama3.2", TOKENS, math.ceil(len(request) / 4))
    assert event["tokens_counted"] is True
    assert event["prompt_estimated"] is True
    assert event["done_reason"] == "length"
    assert "counted from the stream" in formatEvent(event)
    assert "prompt estimated from the request" in formatEvent(event)
    _, metrics = chain.metrics.render(None)
    assert (f'ollamaproxy_tokens_total{{key="alice",kind="completion",model="llama3.2"}} '
            f"{TOKENS}.0").encode() in metrics


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_stream_with_usage_is_reported(chain: Chain, path: str) -> None:
    """
    With C{include_usage}, Ollama's own figures are used, prompt included,
    and the summary does not say counted.
    """
    data = v1_request(path, stream_options={"include_usage": True})
    _, [event] = stream_events(chain, path, data)
    assert (event["completion_tokens"], event["prompt_tokens"]) == (TOKENS, 2)
    assert event["tokens_counted"] is False
    assert event["prompt_estimated"] is False
    assert "counted" not in formatEvent(event)
    assert "estimated" not in formatEvent(event)


def test_events_at_the_end_that_carry_no_token_are_not_counted() -> None:
    """
    Of the events the relay counted, those in the tail that carry no token
    (the chunk with the finish reason, C{[DONE]}) are left out, however the
    pieces fell: three tokens are three, in five pieces or in two.
    """
    chat = (b'data: {"model":"m","choices":[{"index":0,"delta":{"content":"a"},'
            b'"finish_reason":null}]}\n\n')
    final = (b'data: {"model":"m","choices":[{"index":0,"delta":{},'
             b'"finish_reason":"stop"}]}\n\n')
    done = b"data: [DONE]\n\n"
    expected = StreamSummary("m", "stop", completion_tokens=3, counted=True)
    assert summarise(final + done, True, 5) == expected
    assert summarise(chat + chat + chat + final + done, True, 5) == expected


@pytest.mark.parametrize("tail", [
    b'{"object":"list","data":[{"id":"llama3.2"}]}',
    b'data: {"error":{"message":"boom","type":"api_error"}}\n\n',
    b"",
])
def test_no_counting_without_completion_chunks(tail: bytes) -> None:
    """
    A body that is no completion stream (a listing, an error) gets no
    summary, counted or not.
    """
    assert summarise(tail, True, 4) is None
