"""
The proxy never calls itself: an upstream that points back at the proxy ends
with a 508 at the second turn, not with thousands of requests.
"""

from __future__ import annotations

import json

from treq.testing import RequestTraversalAgent
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.logger import capturedLogs, formatEvent
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from zope.interface import implementer

from ollamaproxy.backends.headers import came_back, upstream_request_headers, via_mark
from ollamaproxy.web.site import ProxySite
from tests.fakes.chain import CLIENT_TIMEOUT, VIA, Chain

# How many turns the fake circle allows before it gives up by itself (a
# proxy without loop detection would go on for ever).
TURNS = 10


@implementer(IAgent)
class Loopback:
    """
    An upstream that is the proxy itself: every request the proxy sends to
    "Ollama" enters the same proxy again, up to L{TURNS} times.
    """

    def __init__(self) -> None:
        self.turns = 0
        self.inner: RequestTraversalAgent | None = None

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        self.turns += 1
        if self.turns > TURNS or self.inner is None:
            return defer.fail(ConnectionRefusedError())
        d: Deferred[IResponse] = self.inner.request(method, uri, headers, bodyProducer)
        return d


def looping_chain() -> tuple[Chain, Loopback]:
    loop = Loopback()
    chain = Chain(agent=loop)
    inner = RequestTraversalAgent(chain.proxy.resource())
    inner._serverFactory = ProxySite(  # as Chain serves the client
        chain.proxy.resource(), CLIENT_TIMEOUT, 0, chain.clock
    )
    loop.inner = inner
    return chain, loop


def flush(chain: Chain, loop: Loopback) -> None:
    for _ in range(3 * TURNS):
        chain.flush()
        assert loop.inner is not None
        loop.inner.flush()


def test_upstream_pointing_at_the_proxy_is_508() -> None:
    """
    With an upstream that is the proxy itself, an open route (no key, so
    nothing stops it at the key check) goes round once: the second turn
    sees the proxy's own mark and answers 508, which reaches the client
    with an error saying the upstream points at the proxy.
    """
    chain, loop = looping_chain()
    with capturedLogs() as events:
        d = chain.request("GET", "/", key=None)
        flush(chain, loop)
        response = chain.result(d)
        collector = chain.stream(response)
        flush(chain, loop)
        chain.result(collector.done)
    assert response.code == 508
    assert loop.turns == 1  # forwarded once; the second arrival is refused
    message = json.loads(collector.body)["error"]
    assert "points at the proxy itself" in message
    lines = [formatEvent(e) for e in events if e.get("log_namespace") == "ollamaproxy.web.app"]
    assert any("points at the proxy itself" in line for line in lines), lines


def test_loop_is_caught_before_the_key_check() -> None:
    """
    A keyed request that goes round comes back without its key (the proxy
    never forwards it); it is still a 508 (not a 401 that blames the key).
    """
    chain, loop = looping_chain()
    d = chain.request("POST", "/api/chat", data=b'{"model":"llama3.2"}')
    flush(chain, loop)
    response = chain.result(d)
    assert response.code == 508
    assert loop.turns == 1  # forwarded once; the second arrival is refused


def test_via_reaches_ollama() -> None:
    """
    Ollama receives the proxy's mark in C{Via}, after any entries the
    client's request already carried (a proxy in front of this one).
    """
    chain = Chain()
    chain.body(chain.respond("GET", "/api/version", headers={"Via": "1.1 nginx"}))
    [received] = chain.fake.received
    assert received.headers.getRawHeaders(b"via") == [b"1.1 nginx", VIA]


def test_another_proxys_mark_passes() -> None:
    """
    A chain of two proxies works: a request marked by another ollamaproxy
    process (another instance token) is relayed as usual.
    """
    chain = Chain()
    response = chain.respond(
        "GET", "/api/version", headers={"Via": "1.1 ollamaproxy-someoneelse"}
    )
    assert response.code == 200
    chain.body(response)


def test_mark_is_per_instance() -> None:
    """
    The mark names the instance; only that instance's own mark, among any
    others, counts as coming back.
    """
    mine, other = via_mark("a1b2c3"), via_mark("d4e5f6")
    assert mine != other
    assert came_back(Headers({b"via": [b"1.1 nginx, " + mine]}), mine)
    assert not came_back(Headers({b"via": [other]}), mine)
    assert not came_back(Headers(), mine)
    forwarded = upstream_request_headers(Headers({b"via": [other]}), mine)
    assert forwarded.getRawHeaders(b"via") == [other, mine]
