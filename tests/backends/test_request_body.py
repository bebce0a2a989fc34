"""
Tests for request bodies streamed to Ollama as they arrive:
L{ollamaproxy.backends.request_body} and L{ollamaproxy.web.site.ProxyRequest}.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.client import RequestGenerationFailed
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from zope.interface import implementer

from ollamaproxy.admission.auth import Authenticator
from ollamaproxy.admission.keys import SCOPES, ApiKey, KeyStore, digest
from ollamaproxy.admission.limits import KeyLimits
from ollamaproxy.assembly import assemble
from ollamaproxy.backends.pool import Backend, BackendPool
from ollamaproxy.backends.request_body import (
    HIGH_WATER,
    WAITING_HOLD,
    BodyTooLarge,
    StreamedBody,
)
from ollamaproxy.backends.router import Router
from ollamaproxy.backends.upstream import Upstream
from ollamaproxy.config import parse_routes
from ollamaproxy.readiness import Readiness
from ollamaproxy.record.metrics import Metrics
from ollamaproxy.web.site import ProxySite
from tests.fakes.chain import KEY

DIGEST = "sha256:" + "0" * 64


class _Consumer:
    """
    Ollama's side of the upload: records what the body producer writes.
    """

    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data


@implementer(IAgent)
class _RecordingAgent:
    """
    An agent that starts sending the body at once and never answers.
    """

    def __init__(self) -> None:
        self.consumer = _Consumer()
        self.sent: Deferred[None] | None = None
        self.response: Deferred[IResponse] = Deferred()

    def request(
        self, method: bytes, uri: bytes, headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        assert bodyProducer is not None
        self.producer = bodyProducer
        self.sent = bodyProducer.startProducing(self.consumer)
        return self.response


def serve(max_body_size: int = 0) -> tuple[Any, StringTransport, _RecordingAgent, Clock]:
    """
    The proxy's site on an in-memory connection, in front of a recording
    agent.
    """
    clock = Clock()
    agent = _RecordingAgent()
    upstream = Upstream(agent=agent, base=b"http://127.0.0.1:11434", clock=clock,
                        header_timeout=600, idle_timeout=600)
    keys = KeyStore([ApiKey(name="alice", digest=digest(KEY), scopes=SCOPES)])
    auth = Authenticator(keys, parse_routes(""), clock)
    router = Router(BackendPool([Backend(upstream)]), clock)
    proxy = assemble(router, auth, KeyLimits(clock), clock, Metrics(), Readiness()).proxy
    site = ProxySite(proxy.resource(), 60, max_body_size, clock)
    protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1234))
    transport = StringTransport()
    assert protocol is not None
    protocol.makeConnection(transport)
    return protocol, transport, agent, clock


def head(length: int | None, key: str = KEY) -> bytes:
    framing = b"Transfer-Encoding: chunked" if length is None else b"Content-Length: %d" % length
    return (
        b"POST /api/blobs/" + DIGEST.encode() + b" HTTP/1.1\r\nHost: proxy\r\n"
        b"Authorization: Bearer " + key.encode() + b"\r\n" + framing + b"\r\n\r\n"
    )


def test_upload_flows_to_ollama_before_the_client_has_finished() -> None:
    """
    The first bytes of an upload reach Ollama while the client is still
    sending the rest.
    """
    protocol, _, agent, _ = serve()
    protocol.dataReceived(head(300) + b"a" * 100)
    assert agent.consumer.data == b"a" * 100
    protocol.dataReceived(b"b" * 100)
    assert agent.consumer.data == b"a" * 100 + b"b" * 100
    assert agent.sent is not None and not agent.sent.called
    protocol.dataReceived(b"c" * 100)
    assert len(agent.consumer.data) == 300
    assert agent.sent.called


def test_chunked_upload_is_streamed_with_unknown_length() -> None:
    """
    A chunked upload goes on as it arrives, with no length announced.
    """
    protocol, _, agent, _ = serve()
    protocol.dataReceived(head(None) + b"5\r\nhello\r\n")
    assert agent.consumer.data == b"hello"
    assert agent.producer.length != 5
    protocol.dataReceived(b"0\r\n\r\n")
    assert agent.sent is not None and agent.sent.called


def test_wrong_key_is_refused_before_the_body_is_read() -> None:
    """
    A request with a wrong key is answered 401 as soon as its head is in,
    and the connection closes: nothing of the body goes anywhere.
    """
    protocol, transport, agent, _ = serve()
    protocol.dataReceived(head(10**9, key="wrong") + b"x" * 10)
    assert transport.value().startswith(b"HTTP/1.1 401 ")
    assert b"connection: close" in transport.value().lower()
    assert transport.disconnecting
    assert agent.sent is None


def test_declared_body_over_the_limit_is_413_before_reading_it() -> None:
    """
    A Content-Length over the maximum body size gets 413 at once, in
    Ollama's error shape, without contacting Ollama.
    """
    protocol, transport, agent, _ = serve(max_body_size=1000)
    protocol.dataReceived(head(1001))
    response = transport.value()
    assert response.startswith(b"HTTP/1.1 413 ")
    body = response.split(b"\r\n\r\n", 1)[1]
    assert json.loads(body.split(b"\r\n")[1]) == {
        "error": "request body is larger than the limit of 1000 bytes (--max-body-size)"
    }
    assert agent.sent is None


def test_chunked_body_growing_over_the_limit_is_413() -> None:
    """
    A chunked body that grows past the maximum fails the upload to Ollama
    and gets 413.
    """
    protocol, transport, agent, _ = serve(max_body_size=8)
    protocol.dataReceived(head(None) + b"5\r\nhello\r\n")
    assert agent.sent is not None and not agent.sent.called
    protocol.dataReceived(b"5\r\nworld\r\n")
    failures: list[Failure] = []
    agent.sent.addErrback(failures.append)
    assert failures and failures[0].check(BodyTooLarge)
    # The agent reports a failed body as RequestGenerationFailed.
    agent.response.errback(RequestGenerationFailed([failures[0]]))
    assert transport.value().startswith(b"HTTP/1.1 413 ")
    error = json.loads(transport.value().split(b"\r\n\r\n", 1)[1].split(b"\r\n")[1])
    assert error == {"error": "request body is larger than the limit of 8 bytes (--max-body-size)"}


def test_client_gone_mid_upload_fails_the_upload() -> None:
    """
    A client that disconnects mid-upload fails the body Ollama is receiving
    and cancels the request to Ollama.
    """
    protocol, _, agent, _ = serve()
    protocol.dataReceived(head(1000) + b"x" * 10)
    protocol.connectionLost(Failure(ConnectionError("gone")))
    assert agent.sent is not None
    failures: list[Failure] = []
    agent.sent.addErrback(failures.append)
    assert failures
    assert agent.response.called  # cancelled by Klein


def test_slow_upstream_pauses_the_client() -> None:
    """
    When Ollama takes the upload more slowly than the client sends it, at
    most about HIGH_WATER bytes wait in the proxy before it stops reading
    from the client; it reads again once Ollama has taken them.
    """
    paused: list[bool] = []
    body = StreamedBody(None, 0, lambda: paused.append(True), lambda: paused.append(False))
    consumer = _Consumer()
    body.startProducing(consumer)  # type: ignore[arg-type]
    body.pauseProducing()
    chunk = b"x" * 65536
    while not paused:
        body.write(chunk)
    assert HIGH_WATER < len(chunk) * 5
    assert consumer.data == b""
    body.resumeProducing()
    assert len(consumer.data) == body.received
    assert paused == [True, False]


def test_a_waiting_body_reads_on_up_to_its_bound() -> None:
    """
    A body paused at HIGH_WATER before it goes on is read again once its
    request waits for a slot, so that a client's hang-up can be seen; it
    holds up to WAITING_HOLD, then pauses; sent on, the whole of it goes
    and the bound is HIGH_WATER again.
    """
    paused: list[bool] = []
    body = StreamedBody(None, 0, lambda: paused.append(True), lambda: paused.append(False))
    chunk = b"x" * 65536
    while not paused:
        body.write(chunk)
    body.wait()
    assert paused == [True, False]
    while body.received + len(chunk) <= WAITING_HOLD:
        body.write(chunk)
        assert paused == [True, False]
    body.write(chunk)
    assert paused == [True, False, True]
    consumer = _Consumer()
    body.startProducing(consumer)  # type: ignore[arg-type]
    assert len(consumer.data) == body.received
    assert paused == [True, False, True, False]
    body.pauseProducing()
    while len(paused) < 5:
        body.write(chunk)
    assert body.received - len(consumer.data) <= HIGH_WATER + len(chunk)
