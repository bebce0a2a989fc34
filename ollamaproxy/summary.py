# -*- test-case-name: tests.test_summary -*-
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
"""

from __future__ import annotations

import json
from typing import Any

from ollamaproxy.logs import StreamSummary

NANOSECONDS = 1e9


def summarise(tail: bytes, openai: bool) -> StreamSummary | None:
    """
    The summary in the end of a response body, if it has one.

    @param tail: The last bytes of the body (at least its last object).
    @param openai: Whether the body came from a C{/v1} route.
    """
    if (b'"usage"' if openai else b'"done"') not in tail:
        return None  # not a generation (a model listing, an error): nothing to parse
    for document in reversed(_objects(tail)):
        summary = _openai(document) if openai else _ollama(document)
        if summary is not None:
            return summary
    return None


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
