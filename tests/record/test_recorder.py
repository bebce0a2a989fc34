"""
Tests for L{ollamaproxy.record.recorder}: one request written down once,
with what a client chose redacted and what it did not left as it is.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.logger import LogEvent

from ollamaproxy.exchange import Exchange
from ollamaproxy.record.recorder import Recorder
from ollamaproxy.record.redact import Redactor

SECRET = "olpk_recordertestrecordertestrecorderte"


def exchange(method: str = "GET", path: str = "/api/tags", route: str = "/api/tags") -> Exchange:
    return Exchange(method=method, path=path, client="127.0.0.1", started=0.0, route=route,
                    status=200)


def record(recorder: Recorder, done: Exchange, events: list[LogEvent]) -> LogEvent:
    recorder.record(done, 0)
    [event] = [e for e in events if e.get("log_namespace") == "ollamaproxy.access"]
    return event


def test_a_method_that_is_not_http_s_is_redacted(access_events: list[LogEvent]) -> None:
    """
    Any token passes for a method, a key too: one that is not among HTTP's
    is logged redacted; HTTP's own are logged as they are.
    """
    recorder = Recorder(Clock(), redact=Redactor(secrets=[SECRET]))
    assert record(recorder, exchange(method=SECRET), access_events)["method"] == "[redacted]"
    access_events.clear()
    assert record(recorder, exchange(method="POST"), access_events)["method"] == "POST"


def test_only_a_path_of_the_client_s_choosing_is_searched(access_events: list[LogEvent]) -> None:
    """
    A path that is one of Ollama's fixed routes is logged as it is; any
    other path (a parameter, or no route) is searched for keys first.
    """
    searched: list[str] = []

    def redact(text: str) -> str:
        searched.append(text)
        return text.replace(SECRET, "[redacted]")

    recorder = Recorder(Clock(), redact=redact)
    record(recorder, exchange(), access_events)
    assert searched == []
    access_events.clear()
    path = "/api/pull/" + SECRET
    event = record(recorder, exchange(path=path, route="/api/pull/{model}"), access_events)
    assert event["path"] == "/api/pull/[redacted]"
    assert searched == [path]
