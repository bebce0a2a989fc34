"""
Tests for L{ollamaproxy.record.summary}: reading what a generation amounted to.
"""

from __future__ import annotations

import json

import pytest

from ollamaproxy.exchange import Meter, StreamSummary
from ollamaproxy.record.redact import blank_credentials
from ollamaproxy.record.summary import HEAD_BYTES, TAIL_BYTES, summarise

FINAL = {
    "model": "llama3.2", "created_at": "2025-01-01T00:00:00Z", "message": {"role": "assistant",
    "content": ""}, "done": True, "done_reason": "stop", "total_duration": 5_000_000_000,
    "load_duration": 250_000_000, "prompt_eval_count": 26, "prompt_eval_duration": 1,
    "eval_count": 100, "eval_duration": 2_000_000_000,
}


def test_ndjson_final_line() -> None:
    """
    The last NDJSON line of a stream gives model, reason, counts, speed, the prompt's and the
    generation's time and load time; a cut first line in the tail is skipped.
    """
    tail = b'ontent":"x"},"done":false}\n{"model":"llama3.2","done":false}\n' + json.dumps(
        FINAL
    ).encode() + b"\n"
    assert summarise(tail, openai=False) == StreamSummary(
        model="llama3.2", done_reason="stop", prompt_tokens=26, completion_tokens=100,
        tokens_per_second=50.0, load_seconds=0.25, prompt_seconds=1e-9, eval_seconds=2.0,
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


def test_long_answer_read_from_its_head_and_tail() -> None:
    """
    A non-streamed answer too long to keep whole is summarised from its
    start (the model, Ollama's first field) and its kept tail (the counts,
    its last fields); count fields that a model wrote into a tool call's
    arguments earlier in the answer do not count.  (The reason it stopped
    comes before the long C{context}, out of the tail: it is not known.)
    """
    answer = json.dumps({
        "model": "llama3.2", "created_at": "2025-01-01T00:00:00Z",
        "message": {"role": "assistant", "content": "x" * 100_000, "tool_calls": [
            {"function": {"name": "f", "arguments": {"eval_count": 99999, "model": "no"}}}]},
        "done": True, "done_reason": "stop", "context": list(range(20_000)),
        "total_duration": 5, "load_duration": 250_000_000, "prompt_eval_count": 26,
        "prompt_eval_duration": 2_000_000_000, "eval_count": 500, "eval_duration": 10_000_000_000,
    }).encode()
    summary = summarise(answer[-TAIL_BYTES:], openai=False, head=answer[:HEAD_BYTES])
    assert summary == StreamSummary(
        model="llama3.2", done_reason=None, prompt_tokens=26, completion_tokens=500,
        tokens_per_second=50.0, load_seconds=0.25, prompt_seconds=2.0, eval_seconds=10.0,
    )


def test_long_openai_answer_read_from_its_tail() -> None:
    """
    On C{/v1}, a long answer's C{usage} is read from its tail, and the model
    from its head, or from the tail when it comes last (C{/v1/embeddings}).
    """
    chat = json.dumps({"id": "c", "object": "chat.completion", "model": "llama3.2",
                       "choices": [{"message": {"content": "y" * 100_000},
                                    "finish_reason": "length"}],
                       "usage": {"prompt_tokens": 3, "completion_tokens": 400}}).encode()
    assert summarise(chat[-TAIL_BYTES:], True, head=chat[:HEAD_BYTES]) == StreamSummary(
        model="llama3.2", done_reason="length", prompt_tokens=3, completion_tokens=400)
    vectors = json.dumps({"object": "list", "data": [{"embedding": [0.123456] * 20_000}],
                          "model": "nomic-embed-text", "usage": {"prompt_tokens": 7}}).encode()
    assert summarise(vectors[-TAIL_BYTES:], True, head=vectors[:HEAD_BYTES]) == (
        StreamSummary(model="nomic-embed-text", prompt_tokens=7))


def test_long_answer_without_counts_has_no_summary() -> None:
    """
    A long body without count fields (a large model listing, an error) has
    no summary.
    """
    listing = json.dumps({"models": [{"name": f"m{i}", "model": f"m{i}"}
                                     for i in range(10_000)]}).encode()
    assert summarise(listing[-TAIL_BYTES:], False, head=listing[:HEAD_BYTES]) is None


@pytest.mark.parametrize(("answer", "openai", "summary"), [
    ({"model": "all-minilm", "embeddings": [[0.1]], "total_duration": 1,
      "load_duration": 1_000_000_000, "prompt_eval_count": 6}, False,
     StreamSummary("all-minilm", prompt_tokens=6, load_seconds=1.0)),
    ({"object": "list", "data": [], "model": "all-minilm",
      "usage": {"prompt_tokens": 6, "total_tokens": 6}}, True,
     StreamSummary("all-minilm", prompt_tokens=6)),
    ({"embedding": [0.1, 0.2]}, False, None),
])
def test_embeddings(answer: dict[str, object], openai: bool,
                    summary: StreamSummary | None) -> None:
    """
    An C{/api/embed} answer (no C{done}) and a C{/v1/embeddings} one give
    their model and prompt tokens; the legacy C{/api/embeddings} one holds
    neither (the meter estimates it).
    """
    assert summarise(json.dumps(answer).encode(), openai) == summary


def test_meter_reading() -> None:
    """
    The meter reads Ollama's figures when they came; else the pieces it
    counted and the prompt estimated, each marked; and nothing for a
    request that got no successful answer, used no tokens, or runs no model
    (its pieces are no tokens).
    """
    final = StreamSummary("llama3.2", "stop", prompt_tokens=26, completion_tokens=100)
    assert Meter(True, 9, generating=True, output=101, final=final).reading() == final
    cut = Meter(True, 9, "llama3.2:latest", generating=True, output=15)
    assert cut.reading() == StreamSummary("llama3.2:latest", prompt_tokens=9,
                                          completion_tokens=15, counted=True,
                                          prompt_estimated=True)
    assert cut.tokens == 24
    counted = StreamSummary("llama3.2", "stop", completion_tokens=7, counted=True)
    assert Meter(True, 9, generating=True, final=counted).reading() == (
        StreamSummary("llama3.2", "stop", prompt_tokens=9, completion_tokens=7, counted=True,
                      prompt_estimated=True))
    assert Meter(True, 9, generating=False).reading() is None
    assert Meter(True, generating=True).reading() is None
    assert Meter(False, 9, generating=True, output=5).reading() is None
    assert Meter(model="llama3.2:latest", final=StreamSummary("", prompt_tokens=3)).reading() == (
        StreamSummary("llama3.2:latest", prompt_tokens=3))


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
