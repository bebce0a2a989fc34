"""
Tests for L{ollamaproxy.record.logs}: what each finished request leaves in the log.
"""

from __future__ import annotations

from io import StringIO

from twisted.logger import (
    LogLevel,
    capturedLogs,
    eventAsJSON,
    eventFromJSON,
    formatEvent,
    textFileLogObserver,
)

from ollamaproxy.exchange import Exchange, StreamSummary
from ollamaproxy.record.logs import log_exchange, text_file_observer


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
