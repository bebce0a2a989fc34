"""
Every log sink is clean: the events the proxy emits carry redacted text and
fields, so twistd's console observer (the journal, under systemd), the JSON
file and the text file all see no key.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from io import StringIO
from pathlib import Path
from typing import cast
from urllib.parse import quote

import pytest
from twisted.logger import (
    ILogObserver,
    LogEvent,
    Logger,
    LogPublisher,
    capturedLogs,
    eventAsText,
    formatEventAsClassicLogText,
    globalLogPublisher,
)
from twisted.python.failure import Failure

from ollamaproxy.admission.keys import SCOPES, ApiKey, digest
from ollamaproxy.exchange import Exchange
from ollamaproxy.record.logs import LogFilesService, json_file_observer, log_exchange
from ollamaproxy.record.redact import Redactor
from tests.fakes.agents import FailingAgent
from tests.fakes.chain import KEY, Chain
from tests.fakes.observers import ErrorCollector

# A key an operator chose, with punctuation, and one made by the proxy.
CHOSEN = "my:custom;secret!key-0042"
INFERENCE_KEY = "olpk_inferenceonlyinferenceonlyinferenc"
SECRETS = (KEY, CHOSEN, quote(CHOSEN, safe=""))


@pytest.fixture
def events() -> Iterator[list[LogEvent]]:
    """
    Every event logged while the test runs, as twistd's observers get them.
    """
    seen: list[LogEvent] = []
    observer = cast(ILogObserver, seen.append)
    globalLogPublisher.addObserver(observer)
    try:
        yield seen
    finally:
        globalLogPublisher.removeObserver(observer)


def chain_with_keys(**kwargs: object) -> Chain:
    chain = Chain(**kwargs)  # type: ignore[arg-type]
    chain.keys.replace([
        ApiKey(name="alice", digest=digest(KEY), scopes=SCOPES),
        ApiKey(name="operator", digest=digest(CHOSEN), scopes=SCOPES),
        ApiKey(name="bob", digest=digest(INFERENCE_KEY), models=("llama3.2",)),
    ])
    return chain


def sinks(events: list[LogEvent]) -> str:
    """
    What each observer would write: twistd's console (the classic text
    format, tracebacks included), the text file and the JSON file.
    """
    return "\n".join(
        text
        for event in events
        for text in (
            formatEventAsClassicLogText(event) or "",
            eventAsText(event, includeTraceback=True),
            json_line(event),
        )
    )


def json_line(event: LogEvent) -> str:
    """
    The JSON log's line for C{event}.
    """
    out = StringIO()
    json_file_observer(out)(event)
    return out.getvalue()


def assert_clean(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, text[max(0, text.find(secret) - 300):text.find(secret) + 60]


@pytest.mark.parametrize("secret", [KEY, CHOSEN, quote(CHOSEN, safe="")])
def test_key_in_a_refused_path_is_not_in_any_sink(
    events: list[LogEvent], access_events: list[LogEvent], secret: str
) -> None:
    """
    A key pasted into a path the key may not use (no route of Ollama's): the
    access line's detail (which repeats the path) and its fields show no
    key, nor does the error body the client gets.
    """
    chain = chain_with_keys()
    response = chain.respond("POST", f"/api/pull/{secret}", key=INFERENCE_KEY, data=b"{}")
    assert response.code == 404
    body = chain.body(response).decode()
    assert_clean(body)
    [access] = access_events
    assert "[redacted]" in access["detail"]
    assert_clean(sinks(events))


@pytest.mark.parametrize("secret", [KEY, CHOSEN])
def test_key_as_a_model_name_is_not_in_any_sink(
    events: list[LogEvent], access_events: list[LogEvent], secret: str
) -> None:
    """
    A key sent as the model name, refused for a key limited to some models:
    neither the access line nor the error body repeats it.
    """
    chain = chain_with_keys()
    data = json.dumps({"model": secret, "messages": []}).encode()
    response = chain.respond("POST", "/api/chat", key=INFERENCE_KEY, data=data)
    assert response.code == 403
    assert_clean(chain.body(response).decode())
    [access] = access_events
    assert "may not use model" in access["detail"]
    assert_clean(sinks(events))


@pytest.mark.parametrize("query", [
    f"api_key={KEY}", f"token={KEY}", f"key={quote(CHOSEN, safe='')}", f"X-Api-Key={KEY}",
])
def test_unexpected_error_line_has_no_key_in_its_uri(
    events: list[LogEvent], observe_errors: ErrorCollector, query: str
) -> None:
    """
    The line logged for a bug names the request's URI with credential query
    values blanked, and the exception's message with keys blanked; the
    traceback stays.
    """
    chain = chain_with_keys(agent=FailingAgent(RuntimeError(f"bug near {KEY}"), raises=True))
    response = chain.respond("GET", f"/api/tags?{query}&limit=1")
    assert response.code == 500
    chain.body(response)
    text = sinks(events)
    assert "Unexpected error handling /api/tags?" in text
    assert "limit=1" in text and "RuntimeError" in text and "Traceback" in text
    assert_clean(text)
    assert observe_errors.errors
    observe_errors.errors.clear()


def test_log_files_blank_the_clear_key_in_text_the_proxy_did_not_make(tmp_path: Path) -> None:
    """
    The log files' last guard blanks the C{--api-key} (and credential
    shapes) in events the proxy did not clean itself, such as another
    library's message.
    """
    publisher = LogPublisher()
    files = LogFilesService(str(tmp_path), publisher, redact=Redactor(secrets=[CHOSEN]))
    files.startService()
    Logger(namespace="somelibrary", observer=publisher).info(
        "connecting to /x?token=abcdefgh12 with {what}", what=CHOSEN
    )
    files.stopService()
    written = "".join(f.read_text() for f in tmp_path.iterdir())
    assert "somelibrary" in written
    assert CHOSEN not in written and "abcdefgh12" not in written


def test_json_log_file_blanks_keys_in_a_traceback(tmp_path: Path) -> None:
    """
    The JSON log writes the traceback of an event that logs a failure, and
    its last guard blanks a key in it (text the proxy did not make), as in
    the text log.
    """
    publisher = LogPublisher()
    files = LogFilesService(str(tmp_path), publisher, redact=Redactor(secrets=[CHOSEN]))
    files.startService()
    Logger(namespace="somelibrary", observer=publisher).failure(
        "it broke", Failure(RuntimeError(f"refused {CHOSEN} and Bearer abcdefgh12"))
    )
    files.stopService()
    [record] = [json.loads(line) for line in (tmp_path / "ollamaproxy.json").open()]
    assert (record["event"], record["text"]) == ("somelibrary", "it broke")
    assert "RuntimeError: refused [redacted] and Bearer [redacted]" in record["traceback"]
    assert CHOSEN not in json.dumps(record) and "abcdefgh12" not in json.dumps(record)


def test_help_in_the_401_reads_intact(
    events: list[LogEvent], access_events: list[LogEvent]
) -> None:
    """
    Redacting what the proxy answers and logs leaves its own help text
    alone: the 401 still tells how to send the key, in the body and in the
    access line.
    """
    chain = chain_with_keys()
    response = chain.respond("GET", "/api/tags", key=None)
    assert response.code == 401
    help_text = "'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
    assert help_text in json.loads(chain.body(response))["error"]
    [access] = access_events
    assert help_text in access["detail"]


def test_a_key_cut_by_the_sample_s_end_is_not_logged() -> None:
    """
    A body sample that ends in the middle of a key logs no part of it: half
    a key matches no pattern, so the word the sample ends on is dropped.
    """
    exchange = Exchange("POST", "/api/chat", "127.0.0.1", started=0.0)
    exchange.request_sample = b'{"model": "llama3.2", "note": "' + KEY[:30].encode()
    exchange.response_sample = b'{"done": true}'
    with capturedLogs() as events:
        log_exchange(exchange, 0, 1.0)
    [logged] = [e for e in events if e["log_namespace"] == "ollamaproxy.bodies"]
    assert KEY[:12] not in logged["request_body"]
    assert logged["request_body"].startswith('{"model": "llama3.2"')
    assert logged["response_body"] == '{"done": true}'
