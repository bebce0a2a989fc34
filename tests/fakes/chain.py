# -*- test-case-name: tests.web.test_app -*-
"""
The whole chain in memory: a client, the proxy, and a fake Ollama.

::

    StubTreq ──► OllamaProxy.resource() ──► RequestTraversalAgent ──► FakeOllama

No sockets, no running reactor: the two in-memory connections move bytes
when L{Chain.flush} is called, and time moves only when the test advances
L{Chain.clock}.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from treq.testing import RequestTraversalAgent, StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.iweb import IAgent, IResponse

from ollamaproxy.admission.auth import Authenticator
from ollamaproxy.admission.caps import Caps
from ollamaproxy.admission.keys import SCOPES, ApiKey, KeyStore, digest
from ollamaproxy.admission.limits import GuessThrottle, KeyLimits
from ollamaproxy.admission.quotas import QuotaBook
from ollamaproxy.assembly import assemble
from ollamaproxy.backends.pool import Backend, BackendPool
from ollamaproxy.backends.router import Router
from ollamaproxy.backends.upstream import Upstream
from ollamaproxy.config import (
    DEFAULT_FAIR_SHARE,
    DEFAULT_MAX_QUEUE,
    DEFAULT_OPEN_ROUTES,
    DEFAULT_PARALLEL,
    DEFAULT_QUEUE_TIMEOUT,
    parse_routes,
)
from ollamaproxy.readiness import Readiness
from ollamaproxy.record.metrics import Metrics
from ollamaproxy.record.usage import UsageStore
from ollamaproxy.web.client_address import NOBODY, TrustedProxies
from ollamaproxy.web.site import ProxySite
from tests.fakes.ollama import FakeOllama

KEY = "olpk_chaintestkeychaintestkeychaintest"
VIA = b"1.1 ollamaproxy-chaintest"
UPSTREAM = b"http://127.0.0.1:11434"
HEADER_TIMEOUT = 600.0
IDLE_TIMEOUT = 300.0
CLIENT_TIMEOUT = 60.0

T = TypeVar("T")


class Collector(Protocol):
    """
    Receives a response body chunk by chunk, as the client sees it.

    @ivar chunks: Every piece of body delivered so far, in order.
    @ivar done: Fires with L{None} when the body ended properly, or fails
        with the reason it did not.
    """

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.done: Deferred[None] = Deferred()

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        if reason.check(ResponseDone):
            self.done.callback(None)
        else:
            self.done.errback(reason)

    def disconnect(self) -> None:
        """
        Hang up, as a user closing a browser tab does.
        """
        self.transport.stopProducing()  # type: ignore[union-attr]


class Chain:
    """
    A client, the proxy and a fake Ollama, connected in memory.

    @ivar clock: The proxy's and the fake's clock.
    @ivar fake: The fake Ollama behind the proxy.
    @ivar client: A treq-like client in front of the proxy.
    """

    def __init__(
        self,
        *,
        open_routes: str = DEFAULT_OPEN_ROUTES,
        agent: IAgent | None = None,
        header_timeout: float = HEADER_TIMEOUT,
        idle_timeout: float = IDLE_TIMEOUT,
        client_timeout: float = CLIENT_TIMEOUT,
        max_body_size: int = 0,
        body_sample_bytes: int = 0,
        trusted_proxies: TrustedProxies = NOBODY,
        backends: Sequence[Sequence[str]] | None = None,
        parallel: int = DEFAULT_PARALLEL,
        max_queue: int = DEFAULT_MAX_QUEUE,
        queue_timeout: float = DEFAULT_QUEUE_TIMEOUT,
        fair_share: str = DEFAULT_FAIR_SHARE,
        caps: Caps | None = None,
        usage: UsageStore | None = None,
    ) -> None:
        """
        @param backends: With several Ollama servers behind the proxy, the
            models of each (a fake each, at ports 11434, 11435, ...); one
            with the fake's usual models by default.
        @param fair_share: What the router's fair queue shares out
            (C{--fair-share}).
        """
        self.clock = Clock()
        self.fakes = (
            [FakeOllama(self.clock, models=models) for models in backends]
            if backends else [FakeOllama(self.clock)]
        )
        self.fake = self.fakes[0]
        self._upstream_agents = [RequestTraversalAgent(fake) for fake in self.fakes]
        self._upstream_agent = self._upstream_agents[0]
        self.backends = [
            Backend(
                Upstream(
                    agent=(agent if agent is not None and number == 0 else upstream_agent),
                    base=b"http://127.0.0.1:%d" % (11434 + number),
                    clock=self.clock,
                    header_timeout=header_timeout,
                    idle_timeout=idle_timeout,
                    via=VIA,
                ),
                parallel,
            )
            for number, upstream_agent in enumerate(self._upstream_agents)
        ]
        if isinstance(agent, RequestTraversalAgent):
            # An in-memory upstream of the test's own moves when flushed too.
            self._upstream_agents.append(agent)
        self.pool = BackendPool(self.backends)
        # No collation: a test of it asks for a hold (tests/backends/test_collate.py).
        self.router = Router(self.pool, self.clock, max_queue, queue_timeout, fair_share,
                             switch_hold=0)
        self.keys = KeyStore([ApiKey(name="alice", digest=digest(KEY), scopes=SCOPES)])
        self.throttle = GuessThrottle(self.clock)
        auth = Authenticator(self.keys, parse_routes(open_routes), self.clock)
        self.metrics = Metrics()
        self.quotas = QuotaBook(self.clock, self.metrics.quota_refused, loaded=True)
        self.readiness = Readiness()
        assembled = assemble(
            self.router, auth, KeyLimits(self.clock, self.quotas), self.clock, self.metrics,
            self.readiness, body_sample_bytes=body_sample_bytes,
            trusted_proxies=trusted_proxies, caps=caps, throttle=self.throttle, usage=usage,
        )
        self.proxy = assembled.proxy
        self.in_flight = assembled.in_flight
        self.console = assembled.console
        self.recorder = assembled.recorder
        self.client = StubTreq(self.proxy.resource())
        # Serve through the proxy's own Site, as the daemon does, not the
        # plain one StubTreq makes.
        self.client._agent._serverFactory = ProxySite(
            self.proxy.resource(), client_timeout, max_body_size, self.clock,
            body_sample_bytes=body_sample_bytes, record=assembled.recorder.record,
        )

    def flush(self) -> None:
        """
        Move every byte waiting on either connection, and run what the
        proxy scheduled for "now", until nothing moves (bounded).
        """
        for _ in range(20):
            self.client.flush()
            for upstream_agent in self._upstream_agents:
                upstream_agent.flush()
            self.clock.advance(0)

    def request(
        self,
        method: str,
        path: str,
        *,
        key: str | None = KEY,
        headers: Mapping[str, str | list[str]] | None = None,
        data: bytes | None = None,
    ) -> Deferred[IResponse]:
        """
        Send a request to the proxy with the test key as a bearer token
        (C{key=None} for none), and move the bytes.
        """
        all_headers: dict[str, Any] = {}
        if key is not None:
            all_headers["Authorization"] = f"Bearer {key}"
        all_headers.update(headers or {})
        d: Deferred[IResponse] = self.client.request(  # type: ignore[attr-defined]
            method,
            "http://proxy.example:5000" + path,
            headers=all_headers,
            data=data,
            unbuffered=True,
        )
        self.flush()
        return d

    def respond(self, method: str, path: str, **kwargs: Any) -> IResponse:
        """
        L{request}, and the response, which must have arrived.
        """
        return self.result(self.request(method, path, **kwargs))

    def stream(self, response: IResponse) -> Collector:
        """
        Start receiving a response's body.
        """
        collector = Collector()
        response.deliverBody(collector)
        self.flush()
        return collector

    def body(self, response: IResponse) -> bytes:
        """
        A response's whole body, which must have arrived.
        """
        collector = self.stream(response)
        self.result(collector.done)
        return collector.body

    def result(self, d: Deferred[T]) -> T:
        """
        The result a L{Deferred} already has; fails the test if it has none
        or failed.
        """
        results: list[T] = []
        failures: list[Failure] = []
        d.addCallbacks(results.append, failures.append)
        if failures:
            failures[0].raiseException()
        assert results, "no result yet"
        return results[0]

    def pending(self, d: Deferred[Any]) -> bool:
        """
        Whether a L{Deferred} has no result yet.
        """
        outcomes: list[object] = []

        def note(outcome: object) -> object:
            outcomes.append(outcome)
            return outcome

        d.addBoth(note)
        return not outcomes

    def failure(self, d: Deferred[Any]) -> Failure:
        """
        The failure a L{Deferred} already has; fails the test if it has
        none.
        """
        failures: list[Failure] = []
        d.addErrback(failures.append)
        assert failures, "no failure yet"
        return failures[0]


def chat(model: str = "llama3.2", **fields: Any) -> bytes:
    """
    The body of a chat for C{model} that says C{hi}, with C{fields} added.
    """
    return json.dumps(
        {"model": model, "messages": [{"role": "user", "content": "hi"}], **fields}
    ).encode()
