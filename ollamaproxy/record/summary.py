# -*- test-case-name: tests.record.test_summary -*-
"""
What a generation amounted to, read from the end of its response body.

Ollama ends every answer from C{/api/chat} and C{/api/generate} with an
object holding the model, why it stopped and how many tokens it read and
wrote (the last NDJSON line of a stream, or the whole body otherwise);
C{/api/embed} answers with the model and C{prompt_eval_count}, without
C{done}.  The OpenAI-compatible routes give the token counts in a C{usage}
object (on a stream, in a chunk of its own near the end when the client
asked for it; C{/v1/embeddings} too).  The relay keeps only the last two
pieces of a stream, and of any other body its start and a bounded tail
(L{TAIL_BYTES}); they are parsed here once, after the body has ended, so
nothing on the hot path parses a line.

A non-streamed answer can be far larger than what is kept (a long chat
answer, C{/api/generate}'s C{context}, embeddings): its top-level count
fields are then read from the tail, where Ollama writes them (after the
message, the context or the vectors), and its model from the start of the
body, where it comes first (L{_scanned}).

A C{/v1} stream whose client did not ask for usage
(C{stream_options.include_usage}) ends without token counts.  Rather than
record nothing, its completion tokens are counted: Ollama sends one event
per generated token, so the events the relay counted
(L{ollamaproxy.exchange.Meter.output}), less those at its end that carry
no token (the chunk with C{finish_reason}, C{[DONE]}), are the tokens.
The summary then says C{counted}; the prompt's tokens are estimated by the
meter.
"""

from __future__ import annotations

import json
import re
from typing import Any, Final

from ollamaproxy.exchange import StreamSummary

NANOSECONDS = 1e9

#: How much of the end of a body that is not a stream the relay keeps: far
#: more than Ollama's count fields and whatever follows them.
TAIL_BYTES: Final = 64 * 1024

#: How much of the start of such a body the relay keeps, for its model.
HEAD_BYTES: Final = 4 * 1024

# A top-level-looking field of a JSON object and its value (a string, a
# number or null).  A quote inside a JSON string is escaped, so a field
# name preceded by "{" or "," cannot be a string's content.
_FIELD = re.compile(
    rb'[{,]\s*"(model|done_reason|finish_reason|prompt_eval_count|eval_count|eval_duration'
    rb'|load_duration|prompt_eval_duration|prompt_tokens|completion_tokens)"\s*:\s*'
    rb'("(?:[^"\\]|\\.)*"|-?[0-9]+|null)'
)


def summarise(
    tail: bytes, openai: bool, events: int = 0, head: bytes = b""
) -> StreamSummary | None:
    """
    The summary at the end of a response body, if it has one; for a C{/v1}
    stream without usage, one with the completion tokens counted.

    @param tail: The last bytes of the body (at least its last object), or
        the whole body.
    @param openai: Whether the body came from a C{/v1} route.
    @param events: How many NDJSON lines or SSE events the relay counted.
    @param head: The start of a body too long to be kept whole (C{tail}
        then holds only its end); empty if C{tail} is the whole body.
    """
    if head:
        return _scanned(head, tail, openai)
    if (b'"usage"' if openai else b'"done"') not in tail and (
        openai or b'"prompt_eval_count"' not in tail
    ):
        # Not a generation (a model listing, an error), or a /v1 stream
        # without usage.
        return _counted(tail, events) if openai and b"data:" in tail else None
    for document in reversed(_objects(tail)):
        summary = _openai(document) if openai else _ollama(document)
        if summary is not None:
            return summary
    return _counted(tail, events) if openai else None


def _scanned(head: bytes, tail: bytes, openai: bool) -> StreamSummary | None:
    """
    The summary of a non-streamed answer too long to keep whole: the count
    fields as they last appear in its tail (Ollama's are the answer's last
    fields, after anything a model wrote, such as a tool call's arguments),
    its model as it first appears in its head, else last in its tail.
    """
    fields: dict[str, Any] = {}
    for match in _FIELD.finditer(tail):
        fields[match.group(1).decode("ascii")] = _value(match.group(2))
    first = _FIELD.search(head)
    while first is not None and first.group(1) != b"model":
        first = _FIELD.search(head, first.end())
    if first is not None:
        fields["model"] = _value(first.group(2))
    if not isinstance(fields.get("model"), str):
        fields["model"] = ""  # the meter names the model the request named
    if openai:
        if "prompt_tokens" not in fields and "completion_tokens" not in fields:
            return None
        usage = {name: fields.get(name) for name in ("prompt_tokens", "completion_tokens")}
        document = {"model": fields.get("model"), "usage": usage,
                    "choices": [{"finish_reason": fields.get("finish_reason")}]}
        return _openai(document)
    if "prompt_eval_count" not in fields and "eval_count" not in fields:
        return None
    return _ollama({**fields, "done": True})


def _value(raw: bytes) -> object:
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _counted(tail: bytes, events: int) -> StreamSummary | None:
    """
    The summary of a C{/v1} stream that reported no usage: its model and
    finish reason from its last chunk, its completion tokens counted as
    the events relayed, less the last ones that carry no token.
    """
    last_chunk: dict[str, Any] | None = None
    empty_events = 0
    for line in tail.splitlines():
        if not line.startswith(b"data:"):
            continue  # a comment, or an event cut at the tail's start
        data = line[len(b"data:"):].strip()
        if data == b"[DONE]":
            empty_events += 1
            continue
        document = _object(data)
        if document is None or not _is_chunk(document):
            continue
        last_chunk = document
        if not _carries_token(document):
            empty_events += 1
    if last_chunk is None:
        return None  # not a completion stream
    choices = last_chunk.get("choices") or []
    reasons = [c.get("finish_reason") for c in choices if isinstance(c, dict)]
    return StreamSummary(
        model=str(last_chunk["model"]),
        done_reason=_text(next((r for r in reasons if r), None)),
        completion_tokens=max(0, events - empty_events),
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
        document = _object(line)
        if document is not None:
            objects.append(document)
    return objects


def _object(line: bytes) -> dict[str, Any] | None:
    """
    The JSON object a line holds, or L{None} (the first line of a tail may
    be cut).
    """
    if not line.startswith(b"{"):
        return None
    try:
        document = json.loads(line)
    except ValueError:
        return None
    return document if isinstance(document, dict) else None


def _ollama(document: dict[str, Any]) -> StreamSummary | None:
    """
    The summary in Ollama's final object: a generation's (C{done}) or an
    embedding's (no C{done}, a C{prompt_eval_count}).
    """
    final = document.get("done") or ("done" not in document and "prompt_eval_count" in document)
    if not final or "model" not in document:
        return None
    completion = _count(document.get("eval_count"))
    eval_seconds = _count(document.get("eval_duration")) / NANOSECONDS
    load = document.get("load_duration")
    prompt = document.get("prompt_eval_duration")
    return StreamSummary(
        model=str(document["model"]),
        done_reason=_text(document.get("done_reason")),
        prompt_tokens=_count(document.get("prompt_eval_count")),
        completion_tokens=completion,
        tokens_per_second=completion / eval_seconds if eval_seconds > 0 else None,
        load_seconds=_count(load) / NANOSECONDS if load is not None else None,
        # Asked of its class, not with isinstance as _count does: one call
        # fewer per request (a JSON number's class is int, a bool's is not).
        prompt_seconds=prompt / NANOSECONDS if prompt.__class__ is int and prompt > 0 else None,
        eval_seconds=eval_seconds if eval_seconds > 0 else None,
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
