"""
Several real fake Ollama servers behind a real twistd: routing by model, a
backend stopped and restarted under load, with failover and recovery.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import pytest_twisted
from twisted.internet.defer import Deferred

from ollamaproxy.admission.keys import digest, generate_key
from tests.fakes.client import agent, body, read, request, sleep, wait_for
from tests.fakes.ollama import FakeOllama
from tests.fakes.twistd import TEST_KEY, TwistdLauncher, Upstream, proxy_args, serve, stop


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
        if upstream.connections is not None:
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
    # Found by a chat sent to it, or else by the next look at its models
    # (the router may send all four where their conversation lives).
    await wait_for(reactor, lambda: f"Backend {first_url} is unhealthy" in proxy.output,
                   "the stopped backend to be found unhealthy")
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


@pytest_twisted.ensureDeferred
async def test_a_burst_does_not_hold_up_another_key(
    reactor: Any, upstream: Upstream, twistd: TwistdLauncher
) -> None:
    """
    At --parallel 1, a key's burst of three waits behind its first request;
    another key's request sent after the burst is the next that Ollama
    receives, as the fake upstream records.
    """
    other = generate_key()
    (twistd.directory / "keys.json").write_text(json.dumps({"keys": [
        {"name": "other", "hash": "sha256:" + digest(other).hex()}
    ]}))
    proxy = await twistd.start(proxy_args(upstream.url, "--parallel", "1"))

    async def held_chat(key: str, label: str) -> int:
        response = await request(
            agent(reactor), b"POST", proxy.url + "/api/chat",
            {"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
            body(json.dumps({"model": "hold", "label": label,
                             "messages": [{"role": "user", "content": "hi"}]}).encode()),
        )
        await (await read(response)).done
        code: int = response.code
        return code

    def labels() -> list[str]:
        return [r.json()["label"] for r in upstream.fake.received]

    def received(count: int) -> bool:
        return len(labels()) == count

    first = Deferred.fromCoroutine(held_chat(TEST_KEY, "burst-0"))
    await wait_for(reactor, lambda: labels() == ["burst-0"], "the burst's first request")
    burst = [first, *(Deferred.fromCoroutine(held_chat(TEST_KEY, f"burst-{i}"))
                      for i in range(1, 4))]
    await sleep(reactor, 0.2)  # the rest of the burst reaches the proxy and waits
    late = Deferred.fromCoroutine(held_chat(other, "other"))
    await sleep(reactor, 0.2)
    assert labels() == ["burst-0"]
    for turn in range(4):
        upstream.fake.held[turn].finish()
        await wait_for(reactor, partial(received, turn + 2), "the next turn")
    # The rest of the burst came on three connections at once: in any order.
    assert labels()[:2] == ["burst-0", "other"]
    assert sorted(labels()[2:]) == ["burst-1", "burst-2", "burst-3"]
    upstream.fake.held[4].finish()
    assert [await d for d in burst] == [200] * 4
    assert await late == 200
    assert await proxy.terminate(reactor), proxy.output
