"""
Tests for L{ollamaproxy.record.logs}: what each finished request leaves in the log.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from io import StringIO
from pathlib import Path
from typing import cast

import pytest
from twisted.logger import (
    ILogObserver,
    LegacyLogObserverWrapper,
    LogEvent,
    Logger,
    LogLevel,
    LogPublisher,
    capturedLogs,
    eventAsJSON,
    eventFromJSON,
    formatEvent,
    textFileLogObserver,
)
from twisted.python.failure import Failure
from twisted.python.log import ILogObserver as LegacyObserver

from ollamaproxy.exchange import Exchange, StreamSummary
from ollamaproxy.record.logs import json_file_observer, log_exchange, text_file_observer

SCHEMA = Path(__file__).parents[2] / "docs" / "logging-and-metrics.md"
#: What Twisted's observers for its old logging API add to an event itself
#: (and C{time}, a number there, which the JSON log's own C{time} replaces).
TWISTED_KEYS = {"message", "system", "format", "isError", "failure", "why"}


def _logged(exchange: Exchange) -> dict[str, dict[str, object]]:
    exchange.backend = "http://127.0.0.1:11434"
    with capturedLogs() as events:
        log_exchange(exchange, 811, 100.41)
    return {str(e["log_namespace"]): dict(e) for e in events}


def test_access_event_reads_as_a_line_and_keeps_its_fields() -> None:
    """
    The access event reads as one line in a text file, and keeps each
    field for the JSON file; read back from JSON, it reads the same.
    """
    exchange = Exchange("POST", "/api/chat", "127.0.0.1", started=100.0, key="laptop")
    exchange.responded(100.01, 200)
    event = _logged(exchange)["ollamaproxy.access"]
    line = "127.0.0.1 laptop POST /api/chat 200 completed 811B 0.410s"
    assert formatEvent(event) == line
    assert formatEvent(eventFromJSON(eventAsJSON(event))) == line
    assert (event["key"], event["status"], event["sent_bytes"]) == ("laptop", 200, 811)
    assert event["upstream"] == "http://127.0.0.1:11434"


def test_failure_detail_and_stream_summary() -> None:
    """
    A request that ended badly says why; one that generated says how much.
    """
    exchange = Exchange("POST", "/api/chat", "::1", started=100.0, key="laptop")
    exchange.responded(100.01, 200)
    exchange.failed("upstream_error", "Ollama's connection broke off")
    exchange.summary = StreamSummary(
        "llama3.2", "stop", prompt_tokens=26, completion_tokens=290, tokens_per_second=51.25
    )
    events = _logged(exchange)
    assert formatEvent(events["ollamaproxy.access"]).endswith(
        "upstream_error 811B 0.410s (Ollama's connection broke off)"
    )
    stream = events["ollamaproxy.stream"]
    assert formatEvent(stream) == (
        "laptop llama3.2: 26 prompt + 290 completion tokens at 51.2 tokens/s, stop"
    )
    assert (stream["model"], stream["completion_tokens"]) == ("llama3.2", 290)


def test_body_samples_are_shown_quoted() -> None:
    """
    Body samples appear as quoted strings, so a line break in a body cannot
    make a log line of its own.
    """
    exchange = Exchange("POST", "/api/generate", "127.0.0.1", started=100.0)
    exchange.request_sample = b'{"prompt": "a\\nb"}\n'
    event = _logged(exchange)["ollamaproxy.bodies"]
    text = formatEvent(event)
    assert "\n" not in text
    assert text.startswith("""POST /api/generate request body: '{"prompt": "a\\\\nb"}\\n'""")


def test_text_file_reads_as_twisted_writes_it() -> None:
    """
    The text log file's lines are those Twisted's own text observer would
    write, time stamps included, within a second and across seconds.
    """
    ours, twisteds = StringIO(), StringIO()
    observers = [text_file_observer(ours), textFileLogObserver(twisteds)]
    for when in [1795769505.1, 1795769505.9, 1795769506.0, 1795769505.5, None]:
        event = {"log_format": "{n} tokens", "n": 3, "log_time": when,
                 "log_namespace": "ollamaproxy.access", "log_level": LogLevel.info}
        for observer in observers:
            observer(event)
    assert ours.getvalue() == twisteds.getvalue()
    assert len(set(ours.getvalue().splitlines())) == 3


def test_events_are_stamped_when_written_down_and_read_as_their_line() -> None:
    """
    A request's events carry the time it was written down, on the proxy's
    clock, and read as their line in any text observer, braces in the
    path included.
    """
    exchange = Exchange("GET", "/api/{x}}", "127.0.0.1", started=100.0, key="laptop")
    exchange.responded(100.01, 200)
    exchange.summary = StreamSummary("llama3.2", "stop", prompt_tokens=1)
    events = _logged(exchange)
    assert {event["log_time"] for event in events.values()} == {100.41}
    access = events["ollamaproxy.access"]
    assert formatEvent(access) == "127.0.0.1 laptop GET /api/{x}} 200 completed 811B 0.410s"
    assert access["path"] == "/api/{x}}"
    [record] = json_records([access])
    assert record["text"] == formatEvent(access)


def test_a_request_without_a_status_shows_a_dash() -> None:
    """
    A request that ended before it had a status (its client left the
    queue) reads C{-} in the text line, never C{None}; its field is
    C{None} (C{null} in the JSON log).
    """
    exchange = Exchange("POST", "/api/chat", "127.0.0.1", started=100.0, key="laptop")
    exchange.failed("client_disconnected", "")
    event = _logged(exchange)["ollamaproxy.access"]
    assert formatEvent(event) == "127.0.0.1 laptop POST /api/chat - client_disconnected 811B 0.410s"
    assert event["status"] is None


def test_the_backend_is_named_when_asked() -> None:
    """
    The access line names the backend the request went to only when told
    there are several.
    """
    exchange = Exchange("GET", "/api/tags", "127.0.0.1", started=100.0, status=200,
                        backend="http://10.0.0.2:11434")
    lines = []
    for several in (False, True):
        with capturedLogs() as events:
            log_exchange(exchange, 5, 100.5, name_backend=several)
        lines.append(formatEvent(events[0]))
    assert lines == [
        "127.0.0.1 - GET /api/tags 200 completed 5B 0.500s",
        "127.0.0.1 - GET /api/tags 200 completed 5B 0.500s backend http://10.0.0.2:11434",
    ]


def test_the_user_behind_a_key_is_named() -> None:
    """
    The access line names the user behind a key that names its users,
    after the duration and before the backend; the key's anonymous user,
    and a key with no users, show none.  The event keeps it as a field,
    L{None} for a key with no users.
    """
    lines, users = [], []
    for user in ("3f2b6c1e-8a4d", "", None):
        exchange = Exchange("GET", "/api/tags", "127.0.0.1", started=100.0, status=200,
                            key="webui", user=user, backend="http://10.0.0.2:11434")
        with capturedLogs() as events:
            log_exchange(exchange, 5, 100.5, name_backend=True)
        lines.append(formatEvent(events[0]))
        users.append(events[0]["user"])
    assert lines == [
        "127.0.0.1 webui GET /api/tags 200 completed 5B 0.500s user 3f2b6c1e-8a4d "
        "backend http://10.0.0.2:11434",
        "127.0.0.1 webui GET /api/tags 200 completed 5B 0.500s backend http://10.0.0.2:11434",
        "127.0.0.1 webui GET /api/tags 200 completed 5B 0.500s backend http://10.0.0.2:11434",
    ]
    assert users == ["3f2b6c1e-8a4d", "", None]


@pytest.mark.parametrize(("queued", "shown"), [
    (0.0000031, ""), (0.0004, ""), (0.0005, " queued 0.001s"), (0.685, " queued 0.685s"),
])
def test_the_line_shows_a_wait_of_a_millisecond_or_more(queued: float, shown: str) -> None:
    """
    The access line shows the time a request waited in the queue when it
    is at least a millisecond, rounded: a request given its slot at once
    waited only the router's microseconds, which would read
    C{queued 0.000s}.  The field keeps the exact figure.
    """
    exchange = Exchange("GET", "/api/tags", "127.0.0.1", started=100.0, status=200,
                        queued=queued)
    with capturedLogs() as events:
        log_exchange(exchange, 5, 101.0)
    [event] = events
    assert formatEvent(event) == "127.0.0.1 - GET /api/tags 200 completed 5B 1.000s" + shown
    assert event["queued"] == queued


def documented_fields() -> dict[str, set[str]]:
    """
    The fields the JSON log's schema (C{docs/logging-and-metrics.md}, its
    section "The JSON log") documents: those of every event (under
    C{"*"}), and each event's own, by event name.
    """
    section = SCHEMA.read_text().split("\n## The JSON log\n", 1)[1].split("\n## ", 1)[0]
    fields: dict[str, set[str]] = {}
    event = "*"
    for line in section.splitlines():
        heading = re.fullmatch(r"### `(\w+)`", line)
        if heading:
            event = heading[1]
        row = re.match(r"\| `(\w+)` \|", line)
        if row:
            fields.setdefault(event, set()).add(row[1])
    return fields


def json_records(events: list[LogEvent]) -> list[dict[str, object]]:
    """
    The JSON log's lines for C{events}, each seen first by an observer of
    Twisted's old logging API (as twistd's may be), which adds keys of
    Twisted's own to the event itself.
    """
    out = StringIO()
    observe = json_file_observer(out)
    legacy = LegacyLogObserverWrapper(cast(LegacyObserver, lambda event: None))
    for event in events:
        legacy(event)
        observe(event)
    lines = out.getvalue().splitlines()
    assert len(lines) == len(events)
    return [json.loads(line) for line in lines]


def test_json_access_record_has_the_documented_fields_and_no_other() -> None:
    """
    An access event's JSON line has exactly the documented fields, with
    the values of the text line, and nothing of Twisted's event: no
    C{log_*} key, none of the keys of its old API.
    """
    exchange = Exchange("POST", "/api/chat", "127.0.0.1", started=100.0, key="laptop",
                        queued=0.685, notes="keep_alive clamped to 600s")
    exchange.responded(100.01, 200)
    exchange.failed("upstream_error", "Ollama's connection broke off")
    with capturedLogs() as events:
        log_exchange(exchange, 811, 100.41)
    [event] = events
    [record] = json_records([event])
    documented = documented_fields()
    assert set(record) == documented["*"] - {"traceback"} | documented["access"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", str(record["time"]))
    assert {k: v for k, v in record.items() if k != "time"} == {
        "level": "info",
        "event": "access",
        "text": formatEvent(event),
        "client": "127.0.0.1",
        "key": "laptop",
        "user": None,
        "method": "POST",
        "path": "/api/chat",
        "status": 200,
        "outcome": "upstream_error",
        "detail": "Ollama's connection broke off",
        "sent_bytes": 811,
        "upstream": "",
        "queued": 0.685,
        "notes": "keep_alive clamped to 600s",
        "first_byte": exchange.first_byte,
        "duration": event["duration"],
    }


def test_json_stream_and_bodies_records_have_their_documented_fields() -> None:
    """
    The summary and body-sample events' JSON lines have every field
    documented for them, and nothing of Twisted's.
    """
    exchange = Exchange("POST", "/api/chat", "127.0.0.1", started=100.0, key="laptop")
    exchange.responded(100.01, 200)
    exchange.summary = StreamSummary("llama3.2", "stop", prompt_tokens=26,
                                     completion_tokens=290, tokens_per_second=51.25,
                                     prompt_seconds=0.125, eval_seconds=5.5)
    exchange.request_sample = b'{"model": "llama3.2"}'
    with capturedLogs() as events:
        log_exchange(exchange, 811, 100.41)
    records = {str(r["event"]): r for r in json_records(list(events))}
    documented = documented_fields()
    for name in ("stream", "bodies"):
        assert set(records[name]) >= documented["*"] - {"traceback"} | documented[name]
        assert not {k for k in records[name] if k.startswith("log_")} | (
            set(records[name]) & (TWISTED_KEYS | {"line"})
        )
    assert records["stream"]["completion_tokens"] == 290
    # What the fair queue charged under gpu-time, for the operator to check.
    assert (records["stream"]["prompt_seconds"], records["stream"]["eval_seconds"]) == (0.125, 5.5)
    assert records["bodies"]["request_body"] == '{"model": "llama3.2"}'


def test_json_record_of_another_event() -> None:
    """
    Any other event is named by its namespace, keeps its own fields (as
    text when JSON has no type for them), gets its level, its formatted
    text and, for a failure, its traceback; its time is ISO 8601 in UTC to
    the millisecond.
    """
    publisher = LogPublisher()
    seen: list[LogEvent] = []
    publisher.addObserver(cast(ILogObserver, seen.append))
    log = Logger(namespace="ollamaproxy.record.usage", observer=publisher)
    log.warn("{rows} rows waiting for {where}", rows=3, where=b"db")
    log.failure("Writing usage failed", Failure(ZeroDivisionError("division by zero")))
    seen[0]["log_time"] = 1795769505.9
    warned, failed = json_records(seen)
    assert warned == {
        "time": datetime.fromtimestamp(1795769505.9, UTC)
        .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "level": "warn",
        "event": "ollamaproxy.record.usage",
        "text": "3 rows waiting for b'db'",
        "rows": 3,
        "where": "db",
    }
    assert (failed["level"], failed["text"]) == ("critical", "Writing usage failed")
    assert "ZeroDivisionError" in str(failed["traceback"])
    assert not {k for k in failed if k.startswith("log_")} | (set(failed) & TWISTED_KEYS)


def test_json_time_stamps_within_and_across_seconds() -> None:
    """
    Each event's time is its own, to the millisecond, in UTC, whether or
    not the one before was in the same second; an event without a time
    has C{null}.
    """
    times = [1795769505.1, 1795769505.999, 1795769506.0, 1795769505.5, None]
    events: list[LogEvent] = [
        {"log_format": "x", "log_time": when, "log_namespace": "n", "log_level": LogLevel.info}
        for when in times
    ]
    stamps = [r["time"] for r in json_records(events)]
    assert stamps == [
        "2026-11-27T08:51:45.100Z", "2026-11-27T08:51:45.999Z", "2026-11-27T08:51:46.000Z",
        "2026-11-27T08:51:45.500Z", None,
    ]
