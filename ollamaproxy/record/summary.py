# -*- test-case-name: tests.record.test_summary -*-
"""
What a generation amounted to, read from the end of its response body.

Ollama ends every answer from C{/api/chat} and C{/api/generate} with an
object holding the model, why it stopped and how many tokens it read and
wrote (the last NDJSON line of a stream, or the whole body otherwise); the
OpenAI-compatible routes give the token counts in a C{usage} object (on a
stream, in a chunk of its own near the end when the client asked for it).
The relay keeps only the last two pieces of the body it relayed; they are
parsed here once, after the stream has ended, so nothing on the hot path
parses a line.

A C{/v1} stream whose client did not ask for usage
(C{stream_options.include_usage}) ends without token counts.  Rather than
record nothing, its completion tokens are counted: Ollama sends one chunk
per generated token, so the pieces the body arrived in, less those at its
end that carry no token (the chunk with C{finish_reason}, C{[DONE]}), are
the tokens.  The summary then says C{counted}; the prompt's tokens stay
unknown (0).  Chunks that reach the proxy together (when it falls behind)
count once, so a counted figure is a lower bound.
"""

from __future__ import annotations

import json
from typing import Any

from ollamaproxy.exchange import StreamSummary

NANOSECONDS = 1e9


def summarise(
    tail: bytes, openai: bool, pieces: tuple[bytes, bytes] = (b"", b""), reads: int = 0
) -> StreamSummary | None:
    """
    The summary in the end of a response body, if it has one; for a C{/v1}
    stream without usage, one with the completion tokens counted.

    @param tail: The last bytes of the body (at least its last object).
    @param openai: Whether the body came from a C{/v1} route.
    @param pieces: The last two pieces the body arrived in, each whole.
    @param reads: How many pieces the body arrived in.
    """
    if (b'"usage"' if openai else b'"done"') not in tail:
        # Not a generation (a model listing, an error), or a /v1 stream
        # without usage.
        return _counted(pieces, reads) if openai and b"data:" in tail else None
    for document in reversed(_objects(tail)):
        summary = _openai(document) if openai else _ollama(document)
        if summary is not None:
            return summary
    return _counted(pieces, reads) if openai else None


def _counted(pieces: tuple[bytes, bytes], reads: int) -> StreamSummary | None:
    """
    The summary of a C{/v1} stream that reported no usage: its model and
    finish reason from its last chunk, its completion tokens counted as
    the pieces it arrived in, less the last ones that carry no token.
    """
    last_chunk: dict[str, Any] | None = None
    empty_pieces = 0
    for piece in pieces:
        chunks = [c for c in _objects(piece) if _is_chunk(c)]
        if chunks:
            last_chunk = chunks[-1]
        if piece and not any(_carries_token(c) for c in chunks):
            empty_pieces += 1
    if last_chunk is None:
        return None  # not a completion stream
    choices = last_chunk.get("choices") or []
    reasons = [c.get("finish_reason") for c in choices if isinstance(c, dict)]
    return StreamSummary(
        model=str(last_chunk["model"]),
        done_reason=_text(next((r for r in reasons if r), None)),
        completion_tokens=max(0, reads - empty_pieces),
        counted=True,
    )


def _is_chunk(document: dict[str, Any]) -> bool:
    return "model" in document and isinstance(document.get("choices"), list)


def _carries_token(chunk: dict[str, Any]) -> bool:
    """
    Whether a chunk of a chat or completion stream holds generated output:
    text, reasoning or a tool call.
    """
    for choice in chunk["choices"]:
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta")
        if isinstance(delta, dict) and any(
            delta.get(field) for field in ("content", "reasoning", "tool_calls")
        ):
            return True
        if choice.get("text"):
            return True
    return False


def _objects(tail: bytes) -> list[dict[str, Any]]:
    """
    The JSON objects that can be read whole from the end of a body: NDJSON
    lines, SSE C{data:} fields, or one JSON document.
    """
    objects = []
    for line in tail.splitlines():
        line = line.strip()
        if line.startswith(b"data:"):
            line = line[len(b"data:"):].strip()
        if not line.startswith(b"{"):
            continue
        try:
            document = json.loads(line)
        except ValueError:
            continue  # the first line of the tail may be cut
        if isinstance(document, dict):
            objects.append(document)
    return objects


def _ollama(document: dict[str, Any]) -> StreamSummary | None:
    if not document.get("done") or "model" not in document:
        return None
    completion = _count(document.get("eval_count"))
    eval_seconds = _count(document.get("eval_duration")) / NANOSECONDS
    load = document.get("load_duration")
    return StreamSummary(
        model=str(document["model"]),
        done_reason=_text(document.get("done_reason")),
        prompt_tokens=_count(document.get("prompt_eval_count")),
        completion_tokens=completion,
        tokens_per_second=completion / eval_seconds if eval_seconds > 0 else None,
        load_seconds=_count(load) / NANOSECONDS if load is not None else None,
    )


def _openai(document: dict[str, Any]) -> StreamSummary | None:
    usage = document.get("usage")
    if not isinstance(usage, dict) or "model" not in document:
        return None
    choices = document.get("choices") or []
    reasons = [c.get("finish_reason") for c in choices if isinstance(c, dict)]
    return StreamSummary(
        model=str(document["model"]),
        done_reason=_text(next((r for r in reasons if r), None)),
        prompt_tokens=_count(usage.get("prompt_tokens")),
        completion_tokens=_count(usage.get("completion_tokens")),
    )


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None
