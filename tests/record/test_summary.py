"""
Tests for L{ollamaproxy.record.summary}: reading what a generation amounted to.
"""

from __future__ import annotations

import json

import pytest

from ollamaproxy.exchange import StreamSummary
from ollamaproxy.record.redact import blank_credentials
from ollamaproxy.record.summary import summarise

FINAL = {
    "model": "llama3.2", "created_at": "2025-01-01T00:00:00Z", "message": {"role": "assistant",
    "content": ""}, "done": True, "done_reason": "stop", "total_duration": 5_000_000_000,
    "load_duration": 250_000_000, "prompt_eval_count": 26, "prompt_eval_duration": 1,
    "eval_count": 100, "eval_duration": 2_000_000_000,
}


def test_ndjson_final_line() -> None:
    """
    The last NDJSON line of a stream gives model, reason, counts, speed and
    load time; a cut first line in the tail is skipped.
    """
    tail = b'ontent":"x"},"done":false}\n{"model":"llama3.2","done":false}\n' + json.dumps(
        FINAL
    ).encode() + b"\n"
    assert summarise(tail, openai=False) == StreamSummary(
        model="llama3.2", done_reason="stop", prompt_tokens=26, completion_tokens=100,
        tokens_per_second=50.0, load_seconds=0.25,
    )


def test_whole_json_answer() -> None:
    """
    A non-streamed answer (one object, no trailing newline) is summarised too.
    """
    summary = summarise(json.dumps(FINAL).encode(), openai=False)
    assert summary is not None and summary.completion_tokens == 100


@pytest.mark.parametrize("tail", [
    b'{"model":"llama3.2","done":false}\n',
    b'{"error":"an error was encountered while running the model"}\n',
    b'{"status":"success"}\n',
    b'{"models":[{"name":"done:latest","model":"done:latest","size":1}]}',
    b"",
    b"not json",
])
def test_no_summary_without_a_final_object(tail: bytes) -> None:
    """
    Bodies that end without Ollama's final object have no summary.
    """
    assert summarise(tail, openai=False) is None


def test_openai_stream_usage_chunk() -> None:
    """
    On /v1 the usage chunk before [DONE] gives the counts, the finish chunk
    before it the reason is not needed.
    """
    finish = {"id": "c", "model": "llama3.2", "choices": [{"delta": {}, "finish_reason": "stop"}]}
    usage = {"id": "c", "model": "llama3.2", "choices": [],
             "usage": {"prompt_tokens": 26, "completion_tokens": 2, "total_tokens": 28}}
    tail = (b"data: " + json.dumps(finish).encode() + b"\n\ndata: " + json.dumps(usage).encode()
            + b"\n\ndata: [DONE]\n\n")
    assert summarise(tail, openai=True) == StreamSummary(
        model="llama3.2", prompt_tokens=26, completion_tokens=2
    )


def test_openai_whole_answer() -> None:
    """
    A non-streamed /v1 answer gives counts and its finish reason.
    """
    answer = {"model": "llama3.2", "choices": [{"finish_reason": "length"}],
              "usage": {"prompt_tokens": 3, "completion_tokens": 4}}
    summary = summarise(json.dumps(answer).encode() + b"\n", openai=True)
    assert summary == StreamSummary(model="llama3.2", done_reason="length", prompt_tokens=3,
                                    completion_tokens=4)


@pytest.mark.parametrize(("text", "redacted"), [
    ("Authorization: Bearer abc.def", "Authorization: [redacted]"),
    ("x-api-key: secret1", "x-api-key: [redacted]"),
    ('{"api_key": "zzz"}', '{"api_key": "[redacted]"}'),
    ("key olpk_" + "A" * 38 + " end", "key [redacted] end"),
    ("cookie=sess123; other", "cookie=[redacted]; other"),
    ("nothing here", "nothing here"),
    ("AUTHORIZATION: Basic dXNlcjpwdw==", "AUTHORIZATION: [redacted]"),
    ('{"key": "api-key", "path": "/api/chat"}', '{"key": "api-key", "path": "/api/chat"}'),
    ("a Bearer x and x-api-key=y and OLPK_ no",
     "a Bearer [redacted] and x-api-key=[redacted] and OLPK_ no"),
])
def test_redact(text: str, redacted: str) -> None:
    """
    Anything that looks like a credential is blanked in logged text.
    """
    assert blank_credentials(text) == redacted
