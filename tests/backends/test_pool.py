"""
Tests for L{ollamaproxy.backends.pool}: backends' models and health.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from treq.testing import RequestTraversalAgent
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.web.iweb import IAgent, IResponse
from zope.interface import implementer

from ollamaproxy.backends.pool import Backend, BackendPool
from ollamaproxy.backends.upstream import Upstream
from ollamaproxy.model_names import resolve
from tests.fakes.ollama import FakeOllama


@implementer(IAgent)
class Switch:
    """
    An agent to a fake Ollama that can be switched off (connections
    refused).
    """

    def __init__(self, agent: RequestTraversalAgent) -> None:
        self.agent = agent
        self.down = False
        #: While set, each C{/api/ps} request waits until its gate, appended
        #: to L{held}, fires: a read begun and not yet answered.
        self.holding = False
        self.held: list[Deferred[None]] = []

    def request(self, method: bytes, uri: bytes, headers: Any = None,
                bodyProducer: Any = None) -> Deferred[IResponse]:
        if self.down:
            return fail(ConnectionRefusedError("refused"))
        if self.holding and uri.endswith(b"/api/ps"):
            gate: Deferred[None] = Deferred()
            self.held.append(gate)
            return gate.addCallback(
                lambda _: self.agent.request(method, uri, headers, bodyProducer))
        response: Deferred[IResponse] = self.agent.request(method, uri, headers, bodyProducer)
        return response


class Setup:
    """
    One backend, a fake Ollama behind it, and a pool watching it.
    """

    def __init__(self) -> None:
        self.clock = Clock()
        self.fake = FakeOllama(self.clock, models=("llama3.2:latest", "mistral:latest"))
        self.switch = Switch(RequestTraversalAgent(self.fake))
        self.backend = Backend(Upstream(self.switch, b"http://127.0.0.1:11434", self.clock, 5,
                                        600))
        self.changes: list[str] = []
        self.pool = BackendPool([self.backend], on_change=lambda: self.changes.append("change"),
                                refresh=5)


def test_start_learns_models() -> None:
    """
    On start every backend is asked for its models and loaded models.
    """
    t = Setup()
    clock, switch, backend, pool = t.clock, t.switch, t.backend, t.pool
    assert backend.models is None
    pool.startService()
    switch.agent.flush()
    assert backend.models == frozenset({resolve("llama3.2"), resolve("mistral")})
    assert backend.loaded == frozenset()
    assert t.changes == ["change"]
    pool.stopService()
    assert clock.getDelayedCalls() == []


def test_models_are_refreshed_every_few_seconds() -> None:
    """
    A model added on the backend shows after the refresh interval.
    """
    t = Setup()
    clock, switch, backend, pool = t.clock, t.switch, t.backend, t.pool
    pool.startService()
    switch.agent.flush()
    t.fake.models.append("qwen3:latest")
    clock.advance(5)
    switch.agent.flush()
    assert resolve("qwen3") in (backend.models or ())
    pool.stopService()


def test_unreachable_backend_turns_unhealthy_and_back() -> None:
    """
    A backend that refuses connections is unhealthy, with one log line; it
    is probed with growing delays (1, 2, 4, 8 s at most) and healthy again
    with one log line once it answers.
    """
    t = Setup()
    clock, switch, backend, pool = t.clock, t.switch, t.backend, t.pool
    switch.down = True
    with capturedLogs() as events:
        pool.startService()
        assert not backend.healthy
        for delay in (1, 2, 4, 8, 8):
            assert [round(c.getTime() - clock.seconds()) for c in clock.getDelayedCalls()] == [
                delay
            ]
            clock.advance(delay)
        assert not backend.healthy
        switch.down = False
        clock.advance(8)
        switch.agent.flush()
    assert backend.healthy
    lines = [e["log_format"] for e in events if "Backend" in e.get("log_format", "")]
    assert lines == ["Backend {backend} is unhealthy: {reason}",
                     "Backend {backend} is healthy again"]
    assert "ConnectionRefusedError" in backend.errors[0].reason
    pool.stopService()
    assert clock.getDelayedCalls() == []


def test_a_failed_request_marks_the_backend_and_probes_it() -> None:
    """
    A request that could not reach a backend marks it unhealthy at once;
    the next probe that succeeds brings it back.
    """
    t = Setup()
    clock, switch, backend, pool = t.clock, t.switch, t.backend, t.pool
    pool.startService()
    switch.agent.flush()
    pool.failed(backend, "connection refused")
    assert not backend.healthy
    clock.advance(1)
    switch.agent.flush()
    assert backend.healthy
    pool.stopService()


def test_refresh_now_after_a_model_change() -> None:
    """
    refresh_all asks at once, without waiting for the interval.
    """
    t = Setup()
    switch, backend, pool = t.switch, t.backend, t.pool
    pool.startService()
    switch.agent.flush()
    t.fake.models.remove("mistral:latest")
    pool.refresh_all()
    switch.agent.flush()
    assert backend.models == frozenset({resolve("llama3.2")})
    pool.stopService()


def test_a_backend_without_api_ps_is_still_healthy() -> None:
    """
    Only /api/tags decides health: a backend whose /api/ps fails is healthy,
    with no models known to be in memory.
    """
    t = Setup()

    @implementer(IAgent)
    class NoPs:
        def request(self, method: bytes, uri: bytes, headers: Any = None,
                    bodyProducer: Any = None) -> Deferred[IResponse]:
            if uri.endswith(b"/api/ps"):
                return fail(ValueError("no /api/ps here"))
            return t.switch.request(method, uri, headers, bodyProducer)

    t.backend.upstream = replace(t.backend.upstream, agent=NoPs())
    t.pool.startService()
    t.switch.agent.flush()
    assert t.backend.healthy
    assert t.backend.models == frozenset({resolve("llama3.2"), resolve("mistral")})
    assert t.backend.loaded == frozenset()
    t.pool.stopService()


def test_residency_is_read_and_kept() -> None:
    """
    Each loaded model's size, VRAM, context and expiry are read from
    C{/api/ps} with the models, in the same refresh, and kept per model.
    """
    t = Setup()
    t.fake.load("llama3.2", 8192)
    t.pool.startService()
    t.switch.agent.flush()
    kept = t.backend.resident[resolve("llama3.2")]
    assert kept.context_length == 8192
    assert kept.size_vram > 0 and kept.size == kept.size_vram
    assert kept.expires_at.startswith("19")  # the fake's clock starts at the epoch
    assert t.backend.loaded == frozenset({resolve("llama3.2")})
    t.pool.stopService()


def test_a_context_sent_holds_until_api_ps_can_have_seen_it() -> None:
    """
    A context the proxy sends a model's request with is its backend's from
    then on, over what C{/api/ps} says, while the request runs and until a
    read of C{/api/ps} begun after it ended: one begun earlier may list the
    runner as it was before the reload.  That read then speaks for the
    model again, whatever it lists.
    """
    t = Setup()
    t.fake.load("llama3.2", 2048)
    t.switch.holding = True
    model = resolve("llama3.2")

    def read() -> Deferred[None]:
        reading = t.pool.refresh(t.backend)
        t.switch.agent.flush()
        return reading

    def answer(reading: Deferred[None]) -> None:
        t.switch.held[-1].callback(None)
        t.switch.agent.flush()
        assert reading.called

    answer(read())
    assert t.backend.sent == {}
    kept = t.pool.sending(t.backend, model, 8192)
    assert t.pool.sending(t.backend, model, 8192) is kept
    answer(read())
    assert t.backend.sent == {"llama3.2:latest": kept}
    assert t.backend.resident[model].context_length == 2048
    t.pool.ended(t.backend, kept)
    begun = read()
    t.pool.ended(t.backend, kept)
    answer(begun)
    assert t.backend.sent == {"llama3.2:latest": kept}
    answer(read())
    assert t.backend.sent == {}


def test_a_larger_context_sent_replaces_the_one_held() -> None:
    """
    The last context sent is the one held: Ollama reloads the runner for
    it once the requests before it have run, and the end of one of those
    does not release the newer.
    """
    t = Setup()
    model = resolve("llama3.2")
    first = t.pool.sending(t.backend, model, 8192)
    second = t.pool.sending(t.backend, model, 16384)
    t.pool.ended(t.backend, first)
    t.pool.refresh(t.backend)
    t.switch.agent.flush()
    assert t.backend.sent == {"llama3.2:latest": second}
    t.pool.ended(t.backend, second)
    t.pool.refresh(t.backend)
    t.switch.agent.flush()
    assert t.backend.sent == {}


def test_a_model_that_appears_is_a_load_seen() -> None:
    """
    A model that C{/api/ps} names and the previous read did not is reported
    as a load; those loaded before the first read are not (nobody saw them
    load), nor is one still loaded at the next read.
    """
    t = Setup()
    loads: list[tuple[str, str]] = []
    pool = BackendPool([t.backend], refresh=5,
                       on_load=lambda backend, model: loads.append((backend, model)))
    t.fake.load("llama3.2")
    pool.startService()
    t.switch.agent.flush()
    assert loads == []
    t.fake.load("mistral")
    t.clock.advance(5)
    t.switch.agent.flush()
    assert loads == [("http://127.0.0.1:11434", "mistral:latest")]
    t.clock.advance(5)
    t.switch.agent.flush()
    assert len(loads) == 1
    pool.stopService()


def test_a_hung_generation_takes_the_backend_out_for_that_model_only() -> None:
    """
    A generation of one model that hung takes the backend out for that
    model only, with one log line: its listings, answering, keep it in for
    its other models and do not bring it back.  A one-token generation of
    the model, with no C{keep_alive}, is tried after 1 s, then 2 s after
    one that timed out; the one that answers brings it back, with one log
    line, and the waiting requests are told.
    """
    t = Setup()
    clock, switch, backend, pool, fake = t.clock, t.switch, t.backend, t.pool, t.fake
    slow, llama = resolve("slowhead"), resolve("llama3.2")
    fake.models.append("slowhead:latest")
    pool.startService()
    switch.agent.flush()
    with capturedLogs() as events:
        pool.hung(backend, slow, "no response head")
        assert backend.healthy and backend.serves(llama) and not backend.serves(slow)
        clock.advance(1)
        switch.agent.flush()
        [check] = [c for c in fake.checks if c.uri == b"/api/generate"]
        assert check.method == b"POST"
        assert check.json() == {"model": "slowhead:latest", "prompt": "Hi", "stream": False,
                                "options": {"num_predict": 1}}
        clock.advance(5)  # the check times out; the listings answer
        switch.agent.flush()
        assert backend.healthy and not backend.serves(slow)
        assert "TimeoutError" in backend.errors[-1].reason
        clock.advance(1)
        switch.agent.flush()
        assert len([c for c in fake.checks if c.uri == b"/api/generate"]) == 1
        clock.advance(1)
        switch.agent.flush()
        assert len([c for c in fake.checks if c.uri == b"/api/generate"]) == 2
        changes = len(t.changes)
        fake.held[-1].release()
        for _ in range(3):
            clock.advance(0)
            switch.agent.flush()
    assert backend.serves(slow)
    assert len(t.changes) == changes + 1
    lines = [e["log_format"] for e in events if "Backend" in e.get("log_format", "")]
    assert lines == ["Backend {backend} is out for model {model}: {reason}",
                     "Backend {backend} generates model {model} again"]
    pool.stopService()
    assert clock.getDelayedCalls() == []


def test_a_hung_model_s_name_is_redacted_in_its_log_lines() -> None:
    """
    With one backend a client may name any model, a pasted key included:
    the lines that take a backend out for a model, and bring it back, give
    the name through the pool's C{redact}, as the router's own lines do.
    """
    t = Setup()
    secret = resolve("olpk_" + "A" * 38)
    t.pool.redact = lambda text: text.replace("olpk_", "<key>")
    with capturedLogs() as events:
        t.pool.hung(t.backend, secret, "no response head")
    [event] = [e for e in events if "out for model" in e.get("log_format", "")]
    assert "olpk_" not in event["model"]
    assert event["model"].startswith("<key>")
    t.pool.stopService()
