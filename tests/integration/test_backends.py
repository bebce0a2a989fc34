"""
Several real fake Ollama servers behind a real twistd: routing by model, a
backend stopped and restarted under load, with failover and recovery.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import maybeDeferred
from twisted.protocols.policies import WrappingFactory
from twisted.web.server import Site

from tests.fake_ollama import FakeOllama
from tests.integration.client import agent, body, read, request, wait_for
from tests.integration.conftest import TEST_KEY, TwistdLauncher, Upstream, proxy_args

pytestmark = pytest.mark.integration


def serve(reactor: Any, fake: FakeOllama, port: int = 0) -> Upstream:
    site = Site(fake)
    site.noisy = False
    connections = WrappingFactory(site)
    upstream = Upstream(fake, reactor.listenTCP(port, connections, interface="127.0.0.1"))
    _CONNECTIONS[id(upstream)] = connections
    return upstream


_CONNECTIONS: dict[int, WrappingFactory] = {}


async def stop(upstream: Upstream) -> None:
    """
    Stop a fake Ollama as a stopped server stops: no new connections, and
    the open ones (the proxy's pooled ones) cut.
    """
    await maybeDeferred(upstream.port.stopListening)
    for protocol in list(_CONNECTIONS.pop(id(upstream)).protocols):
        protocol.transport.abortConnection()


@pytest_twisted.async_yield_fixture
async def two(reactor: Any) -> AsyncIterator[list[Upstream]]:
    """
    Two fake Ollamas: both have llama3.2; only the first has mistral, only
    the second qwen3.
    """
    upstreams = [
        serve(reactor, FakeOllama(reactor, models=("llama3.2:latest", "mistral:latest"))),
        serve(reactor, FakeOllama(reactor, models=("llama3.2:latest", "qwen3:latest"))),
    ]
    yield upstreams
    for upstream in upstreams:
        if id(upstream) in _CONNECTIONS:
            await stop(upstream)


async def chat(reactor: Any, url: str, model: str) -> int:
    response = await request(
        agent(reactor), b"POST", url + "/api/chat",
        {"Authorization": f"Bearer {TEST_KEY}", "Content-Type": "application/json"},
        body(json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}],
                         "stream": False}).encode()),
    )
    await (await read(response)).done
    code: int = response.code
    return code


@pytest_twisted.ensureDeferred
async def test_requests_find_their_model_and_survive_a_backend_stopping(
    reactor: Any, two: list[Upstream], twistd: TwistdLauncher
) -> None:
    """
    Each chat reaches a backend that has its model; with the first backend
    stopped, chats for a model both have keep working (failover, one log
    line); once it listens again it is healthy within seconds.
    """
    first, second = two
    proxy = await twistd.start(proxy_args(first.url, "--upstream", second.url))
    await wait_for(reactor, lambda: "Relaying requests to Ollama at " + second.url
                   in proxy.output, "the start-up line of the second backend")
    assert await chat(reactor, proxy.url, "qwen3") == 200
    assert await chat(reactor, proxy.url, "mistral") == 200
    assert [r.json()["model"] for r in first.fake.received] == ["mistral"]
    assert [r.json()["model"] for r in second.fake.received] == ["qwen3"]
    assert await chat(reactor, proxy.url, "gemma3") == 404

    port = first.port.getHost().port  # type: ignore[attr-defined]
    first_url = first.url
    await stop(first)
    for _ in range(4):
        assert await chat(reactor, proxy.url, "llama3.2") == 200
    assert [r.json()["model"] for r in second.fake.received].count("llama3.2") == 4
    assert proxy.output.count(f"Backend {first_url} is unhealthy") == 1

    restarted = serve(reactor, first.fake, port)
    try:
        await wait_for(reactor, lambda: f"Backend {first_url} is healthy again" in proxy.output,
                       "the first backend to be healthy again")
        assert await chat(reactor, proxy.url, "mistral") == 200
    finally:
        await stop(restarted)
    assert await proxy.terminate(reactor), proxy.output
    assert "Traceback" not in proxy.output
