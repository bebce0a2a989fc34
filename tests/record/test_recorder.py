"""
Tests for L{ollamaproxy.record.recorder}: one request written down once,
with what a client chose redacted and what it did not left as it is.
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

from twisted.internet.task import Clock
from twisted.logger import LogEvent

from ollamaproxy.admission.keys import SCOPES, ApiKey, digest
from ollamaproxy.exchange import Exchange
from ollamaproxy.record.metrics import Metrics
from ollamaproxy.record.recorder import Recorder
from ollamaproxy.record.redact import Redactor
from ollamaproxy.record.usage import UsageStore
from ollamaproxy.record.usage_db import Row
from tests.fakes.chain import KEY, Chain, chat
from tests.fakes.observers import ErrorCollector
from tests.fakes.turns import Turns
from tests.fakes.worker import ManualWorker

SECRET = "olpk_recordertestrecordertestrecorderte"


def exchange(method: str = "GET", path: str = "/api/tags", route: str = "/api/tags") -> Exchange:
    return Exchange(method=method, path=path, client="127.0.0.1", started=0.0, route=route,
                    status=200)


def record(recorder: Recorder, clock: Clock, done: Exchange, events: list[LogEvent]) -> LogEvent:
    recorder.record(done, 0)
    clock.advance(0)
    [event] = [e for e in events if e.get("log_namespace") == "ollamaproxy.access"]
    return event


def test_a_request_is_written_after_the_turn_that_sends_its_answer(
    access_events: list[LogEvent],
) -> None:
    """
    A request recorded in one turn of the reactor is written two turns
    later, after the poll that sends its answer, with the time it was
    recorded; requests recorded in one turn are written together, and one
    recorded between two turns (as the poll runs) is written two turns
    later.
    """
    clock = Turns()
    clock.advance(7)
    recorder = Recorder(clock)
    recorder.record(exchange(path="/api/ps", route="/api/ps"), 0)
    recorder.record(exchange(), 0)
    clock.rightNow += 1
    clock.turn()
    assert access_events == []
    recorder.record(exchange(path="/api/version", route="/api/version"), 0)
    clock.turn()
    assert [e["path"] for e in access_events] == ["/api/ps", "/api/tags"]
    assert [e["log_time"] for e in access_events] == [7, 7]
    clock.turn()
    assert [e["path"] for e in access_events[2:]] == ["/api/version"]
    clock.turn()
    assert clock.calls == []


def test_stopping_writes_what_is_held(access_events: list[LogEvent]) -> None:
    """
    Stopping writes at once every request recorded and not yet written,
    however many turns it was from being written, so that the usage store,
    which stops after, has them all.
    """
    clock = Turns()
    recorder = Recorder(clock)
    recorder.startService()
    recorder.record(exchange(path="/api/ps", route="/api/ps"), 0)
    clock.turn()
    recorder.record(exchange(), 0)
    recorder.stopService()
    assert [e["path"] for e in access_events] == ["/api/ps", "/api/tags"]
    assert clock.calls == []


class _BrokenOnce:
    """
    Metrics whose first observation fails, as a bug would.
    """

    def __init__(self) -> None:
        self.observed: list[str] = []

    def observe(self, exchange: Exchange, now: float) -> None:
        if not self.observed:
            self.observed.append("failed")
            raise ZeroDivisionError("a bug")
        self.observed.append(exchange.path)


def test_one_record_that_fails_loses_none_of_the_others(
    access_events: list[LogEvent], observe_errors: ErrorCollector,
) -> None:
    """
    A record whose writing fails (a bug in a consumer) is logged as a
    failure, naming its route, and the records written with it are written
    all the same.
    """
    clock = Clock()
    metrics = _BrokenOnce()
    recorder = Recorder(clock, cast(Metrics, metrics))
    recorder.record(exchange(path="/api/ps", route="/api/ps"), 0)
    recorder.record(exchange(), 0)
    clock.advance(0)
    assert metrics.observed == ["failed", "/api/tags"]
    [failure] = observe_errors.errors
    assert failure["route"] == "/api/ps"
    assert failure["log_failure"].check(ZeroDivisionError)
    observe_errors.errors.clear()
    assert [e["path"] for e in access_events] == ["/api/ps", "/api/tags"]


def test_a_method_that_is_not_http_s_is_redacted(access_events: list[LogEvent]) -> None:
    """
    Any token passes for a method, a key too: one that is not among HTTP's
    is logged redacted; HTTP's own are logged as they are.
    """
    clock = Clock()
    recorder = Recorder(clock, redact=Redactor(secrets=[SECRET]))
    assert record(recorder, clock, exchange(method=SECRET), access_events)["method"] == "[redacted]"
    access_events.clear()
    assert record(recorder, clock, exchange(method="POST"), access_events)["method"] == "POST"


def test_only_a_path_of_the_client_s_choosing_is_searched(access_events: list[LogEvent]) -> None:
    """
    A path that is one of Ollama's fixed routes is logged as it is; any
    other path (a parameter, or no route) is searched for keys first.
    """
    searched: list[str] = []

    def redact(text: str) -> str:
        searched.append(text)
        return text.replace(SECRET, "[redacted]")

    clock = Clock()
    recorder = Recorder(clock, redact=redact)
    record(recorder, clock, exchange(), access_events)
    assert searched == []
    access_events.clear()
    path = "/api/pull/" + SECRET
    event = record(recorder, clock, exchange(path=path, route="/api/pull/{model}"), access_events)
    assert event["path"] == "/api/pull/[redacted]"
    assert searched == [path]


def test_usage_counts_refused_requests_apart(tmp_path: Path) -> None:
    """
    A request Ollama served counts as a request of its key; one the proxy
    refused itself (here a model the key may not use) counts as refused,
    not as a request with no model mixed with the listings.
    """
    store = UsageStore(str(tmp_path / "usage.sqlite3"), Clock(), worker=ManualWorker())
    store.startService()
    chain = Chain(usage=store)
    chain.keys.replace([ApiKey(name="alice", digest=digest(KEY), scopes=SCOPES,
                               models=("llama3.2",))])
    assert chain.respond("GET", "/api/tags").code == 200
    assert chain.respond("POST", "/api/chat", data=chat("qwen3")).code == 403
    store.stopService()
    assert store.database.summarise(None, "key") == [Row("alice", 1, 0, 0, refused=1)]
    assert store.database.summarise(None, "model") == [Row("", 1, 0, 0, refused=1)]


def test_usage_is_recorded_per_user(tmp_path: Path) -> None:
    """
    A request of a key that names its users is counted in usage for the
    user it named, refused or served; one that named none for the key's
    anonymous user.
    """
    store = UsageStore(str(tmp_path / "usage.sqlite3"), Clock(), worker=ManualWorker())
    store.startService()
    chain = Chain(usage=store)
    chain.keys.replace([ApiKey(name="alice", digest=digest(KEY), scopes=SCOPES,
                               models=("llama3.2",), user_header="X-User")])
    for user, model, code in (("bob", "llama3.2", 200), ("bob", "qwen3", 403),
                              (None, "llama3.2", 200)):
        headers = {} if user is None else {"X-User": user}
        response = chain.respond("POST", "/api/chat", data=chat(model, stream=False),
                                 headers=headers)
        assert response.code == code
        chain.body(response)
    store.stopService()
    rows = store.database.summarise(None, "user")
    assert [(row.name, row.user, row.requests, row.refused) for row in rows] == [
        ("alice", "bob", 1, 1), ("alice", "", 1, 0)]
