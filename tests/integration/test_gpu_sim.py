"""
The simulated GPU (bench/gpu_sim.py) as it is run: its own process on a
real port, with the proxy as a real C{twistd} in front of it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import pytest_twisted
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from tests.fakes.client import agent, body, chat_lines, read, request, sleep, wait_for_call
from tests.fakes.twistd import REPO, START_TIMEOUT, TEST_KEY, TwistdLauncher, proxy_args

SCRIPT = REPO / "bench" / "gpu_sim.py"


class SimulatorProcess(ProcessProtocol):
    """
    C{python bench/gpu_sim.py 0 ...}: tells the port it listens on, and
    when it ends.
    """

    def __init__(self) -> None:
        self.output = b""
        self.listening: Deferred[int] = Deferred()
        self.ended: Deferred[None] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data
        marker = b"listening on 127.0.0.1:"
        if not self.listening.called and marker in self.output and b"\n" in self.output:
            self.listening.callback(int(self.output.split(marker)[1].split(b"\n")[0]))

    def errReceived(self, data: bytes) -> None:
        self.output += data

    def processEnded(self, reason: Failure) -> None:
        if not self.listening.called:
            self.listening.errback(reason)
        self.ended.callback(None)


@dataclass
class Simulators:
    """
    Starts simulators and kills whatever is left of them at the end.
    """

    reactor: Any
    started: list[SimulatorProcess] = field(default_factory=list)

    async def start(self, *flags: str) -> int:
        """
        Run C{python bench/gpu_sim.py 0 FLAGS} and give the port it says
        it listens on (bounded by the start timeout).
        """
        simulator = SimulatorProcess()
        self.started.append(simulator)
        self.reactor.spawnProcess(simulator, sys.executable,
                                  [sys.executable, str(SCRIPT), "0", *flags],
                                  env=dict(os.environ), path=str(REPO))
        port: int = await simulator.listening.addTimeout(START_TIMEOUT, self.reactor)
        return port

    async def stop_all(self) -> None:
        """
        Kill every simulator still running and wait until each has ended.
        """
        for simulator in self.started:
            if simulator.transport is not None and not simulator.ended.called:
                simulator.transport.signalProcess("KILL")
        for simulator in self.started:
            await simulator.ended


@pytest_twisted.async_yield_fixture
async def simulators(reactor: Any) -> AsyncIterator[Simulators]:
    """
    Start simulators; they are all killed when the test ends.
    """
    launcher = Simulators(reactor)
    yield launcher
    await launcher.stop_all()


@pytest_twisted.ensureDeferred
async def test_the_proxy_streams_a_chat_from_the_simulator(
    reactor: Any, twistd: TwistdLauncher, simulators: Simulators
) -> None:
    """
    A chat through the proxy reaches the simulator, whose answer streams
    back line by line with its final figures: the tokens asked, the load
    time given, and the whole prompt counted.
    """
    port = await simulators.start("--model", "llama3.2", "--load-seconds", "0.2")
    proxy = await twistd.start(proxy_args(f"http://127.0.0.1:{port}"))
    lines = await chat_lines(reactor, proxy.url, TEST_KEY)
    assert [line["message"]["content"] for line in lines[:-1]] == \
        ["t0", " t1", " t2", " t3", " t4"]
    final = lines[-1]
    assert (final["done"], final["eval_count"], final["prompt_eval_count"]) == (True, 5, 3)
    assert final["load_duration"] >= 200_000_000


KEYED = {"Authorization": f"Bearer {TEST_KEY}"}


async def _get(reactor: Any, url: str, headers: dict[str, str] | None = None) -> bytes:
    """
    The body of C{GET url}, read to its end.
    """
    response = await request(agent(reactor), b"GET", url, headers)
    arrivals = await read(response)
    await arrivals.done
    return arrivals.body


async def _post_chat(
    reactor: Any, url: str, headers: dict[str, str], chat: dict[str, Any]
) -> bytes:
    """
    C{chat} sent to C{url}'s C{/api/chat} with C{headers}: answered with a
    200, its body read to its end.
    """
    response = await request(agent(reactor), b"POST", url + "/api/chat",
                             {**headers, "Content-Type": "application/json"},
                             body(json.dumps(chat).encode()))
    assert response.code == 200
    arrivals = await read(response)
    await arrivals.done
    return arrivals.body


async def _chat(reactor: Any, url: str, messages: list[dict[str, str]]) -> dict[str, Any]:
    """
    A chat through the proxy, not streamed: its answer.
    """
    answer: dict[str, Any] = json.loads(await _post_chat(
        reactor, url, KEYED, {"model": "llama3.2", "messages": messages, "stream": False}))
    return answer


@pytest_twisted.ensureDeferred
async def test_conversations_go_home_over_four_simulated_gpus(
    reactor: Any, twistd: TwistdLauncher, simulators: Simulators
) -> None:
    """
    Three users chat three turns each, in rounds, through the proxy in front
    of four simulated GPUs of one slot each: every turn after a user's
    first finds its history in the slot's cache (the simulator evaluates
    only the new words), so each went to the backend of the turn before;
    and the proxy's metrics count those turns as gone home.  (Sent where
    the router alone sends them, every turn to the first backend, the
    users' histories would evict each other from its one slot.)
    """
    prefill = 1000.0
    flags = ("--model", "llama3.2", "--load-seconds", "0.1", "--default-output", "3",
             "--prefill-tps", str(prefill))
    ports = await gatherResults([Deferred.fromCoroutine(simulators.start(*flags))
                                 for _ in range(4)])
    upstreams = [f"http://127.0.0.1:{port}" for port in ports]
    extra = [arg for url in upstreams[1:] for arg in ("--upstream", url)]
    proxy = await twistd.start(proxy_args(upstreams[0], *extra, "--parallel", "1"))
    histories = {user: [{"role": "user", "content": f"I am user {user} " + "word " * 200}]
                 for user in range(3)}
    for number in range(3):
        for history in histories.values():
            answer = await _chat(reactor, proxy.url, history)
            evaluated = round(answer["prompt_eval_duration"] / 1e9 * prefill)
            if number:
                # At least the first message came from the cache.
                assert evaluated <= answer["prompt_eval_count"] - 200
            history += [answer["message"],
                        {"role": "user", "content": f"question {number} " + "word " * 20}]
    scraped = await _get(reactor, proxy.url + "/metrics", KEYED)
    turns = [line for line in scraped.decode().splitlines()
             if line.startswith("ollamaproxy_conversation_turns_total{")]
    homes = sum(float(line.split()[-1]) for line in turns if 'placement="home"' in line)
    assert homes == 6.0


MODELS = ("alpha", "beta", "gamma")
MODEL_FLAGS = [arg for model in MODELS for arg in ("--model", model)]


def _short_chat(model: str) -> dict[str, Any]:
    """
    A streamed chat of C{model} that asks for five tokens.
    """
    return {"model": model, "messages": [{"role": "user", "content": "hi"}],
            "options": {"num_predict": 5}}


async def alternating(reactor: Any, url: str, headers: dict[str, str], count: int,
                      models: tuple[str, ...] = MODELS) -> int:
    """
    Send C{count} streamed chats, one every 10 ms, their models taking
    turns (C{alpha beta gamma alpha ...}), and count the switches: the
    times the model of an answer that ends differs from the last one's.
    On a simulator that holds one model and runs one request at a time,
    answers of two models never overlap, so that is the number of loads
    after the first.
    """
    ended: list[tuple[float, str]] = []

    async def one(model: str) -> None:
        await _post_chat(reactor, url, headers, _short_chat(model))
        ended.append((time.monotonic(), model))

    sent = []
    for n in range(count):
        sent.append(Deferred.fromCoroutine(one(models[n % len(models)])))
        await sleep(reactor, 0.01)
    for d in sent:
        await d
    order = [model for _, model in sorted(ended)]
    return sum(a != b for a, b in pairwise(order))


@pytest_twisted.ensureDeferred
async def test_collation_makes_a_fifth_of_the_switches_of_ollama_alone(
    reactor: Any, twistd: TwistdLauncher, simulators: Simulators
) -> None:
    """
    Three models alternating on a backend that holds one: sent straight to
    the simulator nearly every request is a switch; through the proxy
    (--switch-hold 1) the requests for the model loaded go first, and the
    switches are at most a fifth as many.
    """
    port = await simulators.start("--load-seconds", "0.1", *MODEL_FLAGS)
    alone = await alternating(reactor, f"http://127.0.0.1:{port}", {}, 45)
    proxy = await twistd.start(proxy_args(f"http://127.0.0.1:{port}", "--switch-hold", "1"))
    through = await alternating(reactor, proxy.url, KEYED, 45)
    assert alone >= 20
    assert through * 5 <= alone


async def one_at_a_time(reactor: Any, url: str, headers: dict[str, str], turns: int) -> None:
    """
    Three clients, one per model, each sending C{turns} streamed chats one
    at a time, 50 ms after the last answer ended (a client reading it).
    """
    async def client(model: str) -> None:
        for _ in range(turns):
            await _post_chat(reactor, url, headers, _short_chat(model))
            await sleep(reactor, 0.05)

    for d in [Deferred.fromCoroutine(client(model)) for model in MODELS]:
        await d


async def _loads(reactor: Any, port: int) -> int:
    """
    How many times the simulator at C{port} has loaded a model.
    """
    return int(json.loads(await _get(reactor, f"http://127.0.0.1:{port}/sim/stats"))["loads"])


@pytest_twisted.ensureDeferred
async def test_clients_sending_one_request_at_a_time_are_collated(
    reactor: Any, twistd: TwistdLauncher, simulators: Simulators
) -> None:
    """
    Three clients of three models on a backend that holds one, each
    sending one request at a time: straight to the simulator nearly every
    request loads its model; through the proxy (--switch-hold 1) each
    client's next request comes within the gap, so its model stays for the
    hold, and the loads are at most a third as many.
    """
    port = await simulators.start("--load-seconds", "0.1", *MODEL_FLAGS)
    await one_at_a_time(reactor, f"http://127.0.0.1:{port}", {}, 10)
    alone = await _loads(reactor, port)
    proxy = await twistd.start(proxy_args(f"http://127.0.0.1:{port}", "--switch-hold", "1"))
    await one_at_a_time(reactor, proxy.url, KEYED, 10)
    through = await _loads(reactor, port) - alone
    assert alone >= 20
    assert through * 3 <= alone


@pytest_twisted.ensureDeferred
async def test_a_backend_running_one_at_a_time_gets_one_at_a_time(
    reactor: Any, twistd: TwistdLauncher, simulators: Simulators
) -> None:
    """
    A simulator with one slot behind a proxy told --parallel 4: the
    requests sent beyond the slot wait inside it with no first byte, so the
    proxy lowers the backend's effective parallel for the model to 1, says
    so in its log and its metrics.
    """
    port = await simulators.start("--load-seconds", "0.05", "--num-parallel", "1",
                                  "--model", "alpha")
    proxy = await twistd.start(proxy_args(f"http://127.0.0.1:{port}", "--parallel", "4"))
    await alternating(reactor, proxy.url, KEYED, 12, models=("alpha",))
    assert "runs at most 1 requests of model alpha:latest at once" in proxy.output
    metrics = (await _get(reactor, proxy.url + "/metrics", KEYED)).decode()
    assert 'ollamaproxy_backend_effective_parallel{backend="http://127.0.0.1:' in metrics
    assert 'model="alpha:latest"} 1.0' in metrics


async def _chat_with(reactor: Any, url: str, options: dict[str, int]) -> None:
    """
    A chat of llama3.2 through the proxy, with C{options}, read to its end.
    """
    chat = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}],
            "stream": False, "options": {"num_predict": 3, **options}}
    await _post_chat(reactor, url, KEYED, chat)


@pytest_twisted.ensureDeferred
async def test_a_request_right_after_a_larger_context_does_not_reload(
    reactor: Any, twistd: TwistdLauncher, simulators: Simulators
) -> None:
    """
    A chat that names no context, sent while the simulator reloads its
    model for a larger one another client asked for (before the proxy's
    next read of C{/api/ps} could list it), goes with that larger context:
    the model is loaded twice in all (its default, then 8192), not a third
    time for the smaller one.
    """
    port = await simulators.start("--model", "llama3.2", "--load-seconds", "0.5")
    proxy = await twistd.start(proxy_args(f"http://127.0.0.1:{port}"))
    await _chat_with(reactor, proxy.url, {})
    larger = Deferred.fromCoroutine(_chat_with(reactor, proxy.url, {"num_ctx": 8192}))

    async def reloading() -> bool:
        return await _loads(reactor, port) == 2

    # Sent once the reload has begun (it takes 0.5 s), not after a guess.
    await wait_for_call(reactor, reloading, "the reload for the larger context")
    await _chat_with(reactor, proxy.url, {})
    await larger
    assert await _loads(reactor, port) == 2
