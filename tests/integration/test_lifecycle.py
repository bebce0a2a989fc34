"""
A stream's life as only real sockets show it: a client that leaves, a client
that reads slowly, a client that sends slowly, and a proxy told to stop.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, cast

import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectError, ConnectionRefusedError
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.python.failure import Failure
from twisted.web.client import FileBodyProducer, ResponseNeverReceived
from twisted.web.server import Site

from tests.fakes.bulk import Bulk
from tests.fakes.client import agent, body, read, request, sleep, wait_for, wait_for_call
from tests.fakes.twistd import TEST_KEY, TwistdLauncher, Upstream, held_stream, proxy_args


def _consume(d: Deferred[Any]) -> None:
    d.addErrback(lambda _: None)


@pytest_twisted.ensureDeferred
async def test_client_gone_closes_upstream_at_once(
    reactor: Any, upstream: Upstream, twistd: TwistdLauncher
) -> None:
    """
    A client hanging up mid-stream makes the proxy close its connection to
    Ollama straight away, so Ollama stops generating.
    """
    proxy = await twistd.start(proxy_args(upstream.url))
    held, client = await held_stream(reactor, upstream, proxy)
    held.write_line({"n": 0, "done": False})
    await wait_for(reactor, lambda: client.size > 0, "the first line")
    _consume(client.done)
    hung_up = time.monotonic()
    cast(IPushProducer, client.transport).stopProducing()
    await wait_for(reactor, lambda: held.disconnected.called, "Ollama's connection to close")
    # Generous against a loaded machine; on an idle one it takes about 1 ms.
    assert time.monotonic() - hung_up < 1.0
    assert upstream.fake.connections_lost == 1


@pytest_twisted.ensureDeferred
async def test_slow_reader_slows_the_upstream(reactor: Any, twistd: TwistdLauncher) -> None:
    """
    A client that reads slowly makes the proxy read Ollama slowly: the proxy
    holds no more than a few socket buffers (memory stays within 20 MB of
    its start), and the stream completes intact once the client reads again.
    """
    size = 50 * 1024 * 1024
    bulk = Bulk(size)
    site = Site(bulk)
    site.noisy = False
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    try:
        proxy = await twistd.start(proxy_args(f"http://127.0.0.1:{port.getHost().port}"))
        before = proxy.rss_kb()
        response = await request(agent(reactor), b"POST", proxy.url + "/api/chat",
                                 {"X-API-Key": TEST_KEY}, body(b"{}"))
        stream = await read(response, keep=False)
        reading = cast(IPushProducer, stream.transport)
        peak = before
        # About 1 KB/s: read for a moment every half second, for 3 seconds.
        for _ in range(6):
            reading.pauseProducing()
            await sleep(reactor, 0.5)
            peak = max(peak, proxy.rss_kb())
            reading.resumeProducing()
            reading.pauseProducing()
        # The last answer: the first was to the proxy's start-up GET /api/version.
        assert bulk.writers[-1].written < size / 2, "Ollama was read regardless of the client"
        assert stream.size < size / 2
        assert peak - before < 20 * 1024, f"grew from {before} kB to {peak} kB"
        reading.resumeProducing()
        await stream.done
        assert stream.size == bulk.writers[-1].written >= size
    finally:
        await port.stopListening()


class _Trickle(Protocol):
    """
    Sends a request head one header line at a time, never finishing it.
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self.closed: Deferred[None] = Deferred()
        self._call: Any = None

    def connectionMade(self) -> None:
        self.transport.write(b"GET /api/tags HTTP/1.1\r\nHost: x\r\n")  # type: ignore[union-attr]
        self._call = self._reactor.callLater(0.2, self._more)

    def _more(self) -> None:
        self.transport.write(b"X-Slow: 1\r\n")  # type: ignore[union-attr]
        self._call = self._reactor.callLater(0.2, self._more)

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self.closed.callback(None)


@pytest_twisted.ensureDeferred
async def test_slowloris_is_cut_and_others_are_served(
    reactor: Any, upstream: Upstream, twistd: TwistdLauncher
) -> None:
    """
    A client trickling its request head is dropped after the client
    timeout, while other clients are served all along.
    """
    proxy = await twistd.start(proxy_args(upstream.url, "--client-timeout", "1"))
    trickle = _Trickle(reactor)
    factory = ClientFactory.forProtocol(lambda: trickle)
    connector = reactor.connectTCP("127.0.0.1", proxy.port, factory)
    started = time.monotonic()
    for _ in range(3):
        response = await request(agent(reactor), b"GET", proxy.url + "/api/tags",
                                 {"X-API-Key": TEST_KEY})
        assert response.code == 200
        await (await read(response)).done
    await wait_for(reactor, lambda: trickle.closed.called, "the slow client to be dropped")
    assert 1.0 <= time.monotonic() - started < 10
    connector.disconnect()


@pytest_twisted.ensureDeferred
async def test_sigterm_lets_streams_finish(
    reactor: Any, upstream: Upstream, twistd: TwistdLauncher
) -> None:
    """
    On SIGTERM the proxy stops accepting connections at once, but a stream
    in flight runs to its normal end within the grace period; then the
    process exits cleanly with its log complete.
    """
    proxy = await twistd.start(proxy_args(upstream.url, "--grace-period", "20"))
    held, client = await held_stream(reactor, upstream, proxy)
    held.write_line({"n": 0, "done": False})
    stopped = Deferred.fromCoroutine(proxy.terminate(reactor))

    async def refused() -> bool:
        try:
            response = await request(agent(reactor), b"GET", proxy.url + "/")
        except ConnectionRefusedError:
            return True
        except (ResponseNeverReceived, ConnectError):
            # Queued on the listening socket as it closed: reset unanswered,
            # or reset while connecting.
            return False
        await (await read(response)).done
        return False

    await wait_for_call(reactor, refused, "the proxy to stop accepting connections",
                        seconds=10)
    held.write_line({"n": 1, "done": True})
    held.finish()
    await client.done
    assert [json.loads(line)["n"] for line in client.body.splitlines()] == [0, 1]
    assert await stopped, proxy.output
    assert "POST /api/chat 200 completed" in proxy.output


@pytest_twisted.ensureDeferred
async def test_large_upload_streams_through_without_growing_memory(
    reactor: Any, upstream: Upstream, twistd: TwistdLauncher, tmp_path: Path
) -> None:
    """
    A 200 MB model upload reaches Ollama whole (its digest matches) while
    the proxy's memory grows by less than 20 MB.
    """
    blob = tmp_path / "model.gguf"
    digest = hashlib.sha256()
    with blob.open("wb") as f:
        block = bytes(range(256)) * 4096
        for i in range(200):
            piece = block[i:] + block[:i]
            f.write(piece)
            digest.update(piece)
    proxy = await twistd.start(proxy_args(upstream.url))
    before = proxy.rss_kb()
    peak = before
    with blob.open("rb") as f:
        sent = Deferred.fromCoroutine(
            request(agent(reactor), b"POST",
                    f"{proxy.url}/api/blobs/sha256:{digest.hexdigest()}",
                    {"X-API-Key": TEST_KEY}, FileBodyProducer(f))
        )
        while not sent.called:
            peak = max(peak, proxy.rss_kb())
            await sleep(reactor, 0.02)
        response = await sent
    assert response.code == 201
    await (await read(response)).done
    received = upstream.fake.received[-1]
    assert (received.body_length, received.body_sha256) == (
        blob.stat().st_size, digest.hexdigest()
    )
    assert peak - before < 20 * 1024, f"grew from {before} kB to {peak} kB"
