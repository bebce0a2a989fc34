"""
Tests for bench/gpu_sim.py, the simulated GPU behind Ollama's API, in
memory: its resource through C{treq.testing.StubTreq}, its time on a
C{Clock}.  Each timing is checked against the cost model's own formula.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
from treq.testing import RequestTraversalAgent, StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import Agent, ResponseNeverReceived
from twisted.web.iweb import IResponse

from ollamaproxy.admission.caps import Caps
from tests.fakes.bench import load_bench
from tests.fakes.chain import Chain

sim = load_bench("gpu_sim")

BASE = "http://127.0.0.1:11434"
M1 = "llama3.1:8b"
M2 = "qwen2.5:7b"
M3 = "mistral:7b"


class Body(Protocol):
    """
    A response body as it arrives: each chunk with the clock's time.
    """

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.chunks: list[tuple[float, bytes]] = []
        self.done = False

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append((self.clock.seconds(), data))

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:  # noqa: B008
        self.done = True

    @property
    def data(self) -> bytes:
        return b"".join(chunk for _, chunk in self.chunks)

    def lines(self) -> list[Any]:
        return [json.loads(line) for line in self.data.splitlines() if line]

    def final(self) -> Any:
        return self.lines()[-1]


@dataclass
class Env:
    """
    A simulator with its cost model, on a clock, and a client for it.
    """

    cost: Any = None
    clock: Clock = field(default_factory=Clock)
    hang: Any = None
    sim: Any = None
    treq: Any = field(init=False)
    """A C{StubTreq}, whose methods are made at run time (so typed L{Any})."""
    responses: list[IResponse] = field(default_factory=list)
    sent: list[Deferred[IResponse]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.sim = sim.Simulator(self.clock, self.cost or sim.CostModel(), [M1, M2, M3],
                                 self.hang or sim.Hang())
        self.treq = StubTreq(self.sim)

    def send(self, path: str, doc: Any) -> Body:
        """
        POST C{doc}; its body is read as it comes, once the answer starts.
        """
        body = Body(self.clock)
        d: Deferred[IResponse] = self.treq.post(BASE + path, json.dumps(doc).encode())

        def got(response: IResponse) -> None:
            self.responses.append(response)
            response.deliverBody(body)

        d.addCallback(got)
        self.sent.append(d)
        self.treq.flush()
        return body

    def get(self, path: str) -> Any:
        """
        GET C{path}: its JSON.
        """
        body = Body(self.clock)
        d: Deferred[IResponse] = self.treq.get(BASE + path)
        d.addCallback(lambda response: response.deliverBody(body))
        self.treq.flush()
        assert body.done
        return json.loads(body.data)

    def advance(self, seconds: float) -> None:
        """
        Let simulated time pass, timer by timer: a timer set while another
        fires counts from that one's time, as on a running reactor.
        """
        target = self.clock.seconds() + seconds
        while True:
            due = [c.getTime() for c in self.clock.getDelayedCalls() if c.getTime() <= target]
            if not due:
                break
            self.clock.advance(min(due) - self.clock.seconds())
            self.treq.flush()
        self.clock.advance(target - self.clock.seconds())
        self.treq.flush()

    def run(self) -> None:
        """
        Let time pass until no timer is left.
        """
        while self.clock.getDelayedCalls():
            self.advance(min(c.getTime() for c in self.clock.getDelayedCalls())
                         - self.clock.seconds())


def chat(model: str = M1, words: int = 10, output: int = 5, **options: Any) -> dict[str, Any]:
    """
    A chat request whose prompt is C{words} words, asking C{output} tokens.
    """
    content = " ".join(f"w{i}" for i in range(words))
    return {"model": model, "messages": [{"role": "user", "content": content}],
            "options": {"num_predict": output, **options}}


def cost(**changes: Any) -> Any:
    """
    The default cost model with C{changes}, load time 0 unless given.
    """
    return sim.CostModel(**{"load_seconds": 0.0, **changes})


def ns(seconds: float) -> int:
    return round(seconds * 1e9)


def test_prefill_and_decode_follow_the_model() -> None:
    """
    A lone chat's prompt takes its tokens / the prefill rate, each output
    token 1 / the decode rate; the stream ends exactly then, with those
    figures in its final object.
    """
    model = cost()
    env = Env(model)
    body = env.send("/api/chat", chat(words=100, output=5))
    prompt = 100 + 2  # <user> and <assistant>
    prefill, step = prompt / model.prefill_tps, 1 / model.decode_tps
    env.advance(prefill + 5 * step - 1e-6)
    assert not body.done
    env.advance(2e-6)
    assert body.done
    final = body.final()
    assert [line["message"]["content"] for line in body.lines()[:-1]] == \
        ["t0", " t1", " t2", " t3", " t4"]
    assert (final["prompt_eval_count"], final["eval_count"], final["done_reason"]) == \
        (prompt, 5, "length")
    assert final["prompt_eval_duration"] == ns(prefill)
    assert final["eval_duration"] == ns(5 * step)
    assert final["load_duration"] == 0


def test_decode_slows_with_busy_slots() -> None:
    """
    Two chats decoding at once on two slots each take
    (1 + slot_slowdown) / decode rate per token.
    """
    model = cost(num_parallel=2)
    env = Env(model)
    bodies = [env.send("/api/chat", chat(output=10)) for _ in range(2)]
    env.run()
    for body in bodies:
        assert body.final()["eval_duration"] == ns(10 * model.step(2))
    assert model.step(2) == pytest.approx((1 + model.slot_slowdown) / model.decode_tps)


def test_slots_cap_concurrency_and_the_excess_waits_in_order() -> None:
    """
    With two slots, four chats: two run, the other two wait and start in
    the order they came as slots free up.
    """
    env = Env(cost(num_parallel=2))
    bodies = [env.send("/api/chat", chat(words=i + 1, output=20 - i)) for i in range(4)]
    env.advance(0)
    runner = env.sim.gpu.runners[M1]
    assert runner.busy() == 2
    assert len(runner.waiting) == 2
    env.run()
    ends = [body.chunks[-1][0] for body in bodies]
    starts = [body.chunks[0][0] for body in bodies]
    assert starts[0] <= starts[1] < starts[2] <= starts[3]
    # The third starts when the first slot frees (the second ends first).
    assert starts[2] > min(ends[:2])


def test_a_model_switch_costs_the_load_time() -> None:
    """
    With one model fitting, a chat for another model waits the load time,
    reported as its load_duration; the first load costs it too.
    """
    env = Env(cost(load_seconds=5.0))
    first = env.send("/api/chat", chat(M1))
    env.run()
    second = env.send("/api/chat", chat(M2))
    env.run()
    assert first.final()["load_duration"] == ns(5.0)
    assert second.final()["load_duration"] == ns(5.0)
    assert env.sim.gpu.loads == 2
    assert [m["name"] for m in env.get("/api/ps")["models"]] == [M2]


def test_a_request_for_the_loaded_model_passes_a_waiting_switch() -> None:
    """
    While a chat for the loaded model runs, a chat for another model waits
    for it to end; a chat for the loaded model that comes after the switch
    is served before it (Ollama since v0.11.5), and the switch comes after.
    """
    env = Env(cost(load_seconds=5.0, num_parallel=2))
    running = env.send("/api/chat", chat(M1, output=500))
    env.advance(6.0)
    switch = env.send("/api/chat", chat(M2, output=5))
    env.advance(0.1)
    passing = env.send("/api/chat", chat(M1, output=5))
    env.run()
    assert passing.chunks[-1][0] < running.chunks[-1][0] < switch.chunks[0][0]
    # It waited for the running chat, then for its own load.
    assert switch.final()["load_duration"] == ns(running.chunks[-1][0] + 5.0 - 6.0)
    assert env.sim.gpu.loads == 2


def test_a_switch_unloads_an_idle_model_first() -> None:
    """
    With two models fitting, both loaded, a third model's chat unloads the
    idle one at once (it waits only for its own load), not the busy one.
    """
    env = Env(cost(load_seconds=5.0, max_loaded=2))
    busy = env.send("/api/chat", chat(M1, output=2000))
    env.send("/api/chat", chat(M2, output=1))
    env.advance(11.0)
    third = env.send("/api/chat", chat(M3, output=1))
    env.advance(6.0)
    assert third.done and not busy.done
    assert third.final()["load_duration"] == ns(5.0)
    assert sorted(m["name"] for m in env.get("/api/ps")["models"]) == sorted([M1, M3])


def test_a_switch_whose_client_left_unloads_nothing() -> None:
    """
    A chat for another model that goes away while it waits for the loaded
    model's chat to end leaves that model loaded: no switch is owed.
    """
    env = Env(cost(load_seconds=5.0))
    env.send("/api/chat", chat(M1, output=100))
    env.advance(5.1)
    env.send("/api/chat", chat(M2))
    left = env.sent[-1]
    left.cancel()
    left.addErrback(lambda failure: failure.trap(ResponseNeverReceived))
    env.treq.flush()
    assert not env.sim.gpu.pending
    env.run()
    assert [m["name"] for m in env.get("/api/ps")["models"]] == [M1]
    later = env.send("/api/chat", chat(M1))
    env.run()
    assert later.final()["load_duration"] == 0
    assert env.sim.gpu.loads == 1


def test_a_num_ctx_change_reloads_the_model() -> None:
    """
    The same model with another num_ctx is loaded again, and /api/ps then
    shows the new context length.
    """
    env = Env(cost(load_seconds=2.0))
    env.send("/api/chat", chat(M1))
    env.run()
    again = env.send("/api/chat", chat(M1, num_ctx=8192))
    env.run()
    assert again.final()["load_duration"] == ns(2.0)
    assert env.sim.gpu.loads == 2
    assert [m["context_length"] for m in env.get("/api/ps")["models"]] == [8192]


def test_the_prompt_cache_shortens_a_repeated_conversation() -> None:
    """
    The second turn of a conversation, sent with the first turn's answer,
    evaluates only what its slot has not seen; prompt_eval_count is still
    the whole prompt, as Ollama reports it.
    """
    model = cost()
    env = Env(model)
    first = chat(words=200, output=4)
    one = env.send("/api/chat", first)
    env.run()
    answer = "".join(line["message"]["content"] for line in one.lines()[:-1])
    second = {**first, "messages": [*first["messages"],
                                     {"role": "assistant", "content": answer},
                                     {"role": "user", "content": "and then"}]}
    two = env.send("/api/chat", second)
    env.run()
    whole = 202 + 4 + 3 + 1  # t0..t3, then <user> and then <assistant>
    assert two.final()["prompt_eval_count"] == whole
    # Evaluated: <user> and then <assistant>.
    assert two.final()["prompt_eval_duration"] == ns(4 / model.prefill_tps)
    assert one.final()["prompt_eval_duration"] == ns(202 / model.prefill_tps)


def test_a_request_takes_the_free_slot_whose_cache_shares_most() -> None:
    """
    Two conversations answered at once on two slots each find, at their
    next turn, the slot that holds their history (Ollama's
    findLongestCacheSlot), even with both slots free: each evaluates only
    its new words, not its whole history again.
    """
    model = cost(num_parallel=2)
    env = Env(model)

    def turn(tag: str, history: list[dict[str, str]]) -> list[dict[str, str]]:
        return [*history, {"role": "user", "content": " ".join(f"{tag}{i}" for i in range(10))}]

    firsts = {tag: turn(tag, []) for tag in "ab"}
    bodies = {tag: env.send("/api/chat", {"model": M1, "messages": messages,
                                          "options": {"num_predict": 4}})
              for tag, messages in firsts.items()}
    env.run()
    for tag, messages in firsts.items():
        answer = "".join(line["message"]["content"] for line in bodies[tag].lines()[:-1])
        again = [*messages, {"role": "assistant", "content": answer},
                 {"role": "user", "content": "more"}]
        body = env.send("/api/chat", {"model": M1, "messages": again,
                                      "options": {"num_predict": 4}})
        env.run()
        # Evaluated: <user> more <assistant>.
        assert body.final()["prompt_eval_duration"] == ns(3 / model.prefill_tps)
    assert env.sim.gpu.prompt_tokens - env.sim.gpu.evaluated_tokens == 2 * 16


def test_api_ps_reflects_what_is_loaded() -> None:
    """
    /api/ps is empty before any request, lists the loaded model with its
    size in VRAM, context length and expiry (keep-alive after its last
    request), and is empty again once that passes.
    """
    model = cost(keep_alive=60.0)
    env = Env(model)
    assert env.get("/api/ps") == {"models": []}
    env.send("/api/chat", chat())
    env.run()
    end = env.clock.seconds()
    [loaded] = env.get("/api/ps")["models"]
    assert (loaded["name"], loaded["size_vram"], loaded["context_length"]) == \
        (M1, model.model_bytes, model.num_ctx)
    assert loaded["expires_at"] == sim._stamp(end + 60.0)
    env.advance(60.0)
    assert env.get("/api/ps") == {"models": []}


def test_a_disconnect_frees_the_slot() -> None:
    """
    A client that goes away mid-stream stops its generation: no more
    tokens, and the next waiting chat takes its slot at once.
    """
    model = cost()
    env = Env(model)
    first = env.send("/api/chat", chat(output=1000))
    second = env.send("/api/chat", chat(output=3))
    env.advance(0.5)
    assert first.chunks and not second.chunks
    # The body's transport is the response's producer: stopping it cuts
    # the connection, as a client that goes away does.
    cast(IPushProducer, first.transport).stopProducing()
    env.treq.flush()
    cut = env.clock.seconds()
    assert env.sim.gpu.runners[M1].slots[0].job is not None  # the second's
    env.run()
    assert second.done
    assert second.chunks[0][0] < cut + 0.1
    assert all(when <= cut for when, _ in first.chunks)


def test_the_queue_refuses_beyond_max_queue() -> None:
    """
    Requests that need a model load wait in Ollama's queue, up to its
    length; the next gets 503 with Ollama's message.
    """
    env = Env(cost(max_queue=1))
    env.send("/api/chat", chat(M1, output=100))
    env.send("/api/chat", chat(M2))
    refused = env.send("/api/chat", chat(M2))
    assert env.responses[-1].code == 503
    assert json.loads(refused.data) == {"error": sim.QUEUE_FULL}


def test_the_other_endpoints_speak_ollamas_formats() -> None:
    """
    /v1 streams SSE with usage and [DONE] (and answers whole without
    stream), /api/generate streams responses, /api/embed counts its input,
    and the listings answer.
    """
    env = Env(cost())
    sse = env.send("/v1/chat/completions", {
        "model": M1, "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": "hi there"}]})
    whole = env.send("/v1/chat/completions", {
        "model": M1, "messages": [{"role": "user", "content": "hi"}]})
    generated = env.send("/api/generate", {"model": M1, "prompt": "a b c",
                                           "options": {"num_predict": 2}})
    embedded = env.send("/api/embed", {"model": M1, "input": ["a b", "c"]})
    env.run()
    events = [e for e in sse.data.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    assert json.loads(events[-2][6:])["usage"] == \
        {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}
    assert json.loads(events[-3][6:])["choices"][0]["finish_reason"] == "length"
    answer = json.loads(whole.data)
    assert answer["usage"]["completion_tokens"] == sim.CostModel().default_output
    assert answer["choices"][0]["finish_reason"] == "stop"
    assert [line["response"] for line in generated.lines()] == ["t0", " t1", ""]
    assert json.loads(embedded.data)["prompt_eval_count"] == 3
    assert env.get("/api/version") == {"version": sim.VERSION}
    assert [m["name"] for m in env.get("/api/tags")["models"]] == [M1, M2, M3]
    unknown = env.send("/api/chat", chat("nope"))
    assert json.loads(unknown.data) == {"error": "model 'nope' not found"}


def test_every_figure_is_an_option() -> None:
    """
    Each field of the cost model can be set on the command line, and the
    installed models too.
    """
    defaults = sim.CostModel()
    names = list(sim.CostModel.__dataclass_fields__)
    argv = ["8080", "--model", "a:1", "--model", "b:2"]
    for name in names:
        argv += [f"--{name.replace('_', '-')}", str(getattr(defaults, name) * 2)]
    setup = sim.parse(argv)
    assert (setup.port, setup.models, setup.speed, setup.hang) == \
        (8080, ["a:1", "b:2"], 1.0, sim.Hang())
    model = setup.cost
    assert {name: getattr(model, name) for name in names} == \
        {name: getattr(defaults, name) * 2 for name in names}


def test_the_proxy_keeps_the_loaded_context_so_the_sim_does_not_reload() -> None:
    """
    Two clients of one model, one asking for 8192 tokens of context and one
    for 2048 or none: through the proxy, once it has read the runner's
    context from C{/api/ps}, the second client's requests are sent with
    8192 and the simulated GPU loads the model once, not on every switch.
    """
    env = Env(cost(load_seconds=2.0))
    agent = RequestTraversalAgent(env.sim)
    chain: Chain = Chain(agent=cast(Agent, agent), caps=Caps(
        loaded_context=lambda model: chain.router.loaded_context(model)))

    def run() -> None:
        # The simulator's time, with the proxy's bytes moved at each step.
        while env.clock.getDelayedCalls():
            env.clock.advance(min(c.getTime() for c in env.clock.getDelayedCalls())
                              - env.clock.seconds())
            chain.flush()

    def through(doc: dict[str, Any]) -> None:
        d = chain.request("POST", "/api/chat", data=json.dumps(doc).encode())
        run()
        collector = chain.stream(chain.result(d))
        run()
        chain.result(collector.done)

    through(chat(M1, num_ctx=8192))
    chain.pool.refresh(chain.backends[0])
    chain.flush()
    for options in ({"num_ctx": 2048}, {}, {"num_ctx": 8192}, {"num_ctx": 2048}, {}):
        through(chat(M1, **options))
    assert env.sim.gpu.loads == 1


def test_the_time_scale_and_the_hang_are_options() -> None:
    """
    C{--speed} sets the time scale (above 0 only), and C{--hang MODEL}
    with C{--hang-after N} and C{--hang-at S} when a model's generations
    hang.
    """
    setup = sim.parse(["0", "--speed", "10", "--hang", "m:1", "--hang-after", "5",
                       "--hang-at", "30"])
    assert (setup.speed, setup.hang) == (10.0, sim.Hang("m:1", 5, 30.0))
    with pytest.raises(SystemExit):
        sim.parse(["0", "--speed", "0"])


def test_a_hung_model_takes_generations_and_sends_nothing() -> None:
    """
    With a hang after one request, the first chat is answered; the next
    ones of that model get no head and no byte however long they wait,
    while the listings still answer and another model still generates.
    The stats tell when the hang began and what it swallowed, and when a
    swallowed request's client went away.
    """
    env = Env(cost(), hang=sim.Hang(M1, after=1))
    first = env.send("/api/chat", chat(M1))
    env.run()
    assert first.done
    env.advance(10.0 - env.clock.seconds())
    hung = env.send("/api/chat", chat(M1))
    env.advance(200.0)  # within the keep-alive: the model stays listed
    assert not hung.chunks and len(env.responses) == 1
    assert [m["name"] for m in env.get("/api/tags")["models"]] == [M1, M2, M3]
    assert [m["name"] for m in env.get("/api/ps")["models"]] == [M1]
    other = env.send("/api/chat", chat(M2))
    env.run()
    assert other.done
    stats = env.get("/sim/stats")
    assert (stats["hang_since"], stats["hung"], stats["generations"]) == \
        (pytest.approx(10.0), [[pytest.approx(10.0), 5, None]], 3)
    gone = env.sent[1]
    gone.cancel()
    gone.addErrback(lambda failure: failure.trap(ResponseNeverReceived))
    env.treq.flush()
    left = env.clock.seconds()
    assert env.get("/sim/stats")["hung"] == [[pytest.approx(10.0), 5, pytest.approx(left)]]


def test_a_hang_can_wait_for_a_time() -> None:
    """
    A hang set for a time leaves the model's generations answered before
    it, and takes every one after it.
    """
    env = Env(cost(), hang=sim.Hang(M1, at=50.0))
    before = env.send("/api/chat", chat(M1))
    env.run()
    env.advance(50.0 - env.clock.seconds())
    after = env.send("/api/chat", chat(M1))
    env.advance(100.0)
    assert before.done and not after.chunks


def test_a_runner_can_run_fewer_slots_than_it_was_given() -> None:
    """
    With four parallel slots configured and one really run, four chats run
    one at a time, and nothing in /api/ps tells (ollama#17556); the stats
    show one slot busy at most.
    """
    env = Env(cost(num_parallel=4, slots_run=1))
    bodies = [env.send("/api/chat", chat(output=10)) for _ in range(4)]
    env.advance(0)
    assert env.sim.gpu.runners[M1].busy() == 1
    env.run()
    starts = sorted(body.chunks[0][0] for body in bodies)
    ends = sorted(body.chunks[-1][0] for body in bodies)
    assert all(start >= end for start, end in zip(starts[1:], ends, strict=False))
    [loaded] = env.get("/api/ps")["models"]
    assert set(loaded) == {"name", "model", "size", "digest", "details", "expires_at",
                           "size_vram", "context_length"}
    stats = env.get("/sim/stats")
    assert (stats["most_busy"], stats["most_in_flight"]) == ({M1: 1}, {M1: 4})


def test_the_stats_count_evaluated_and_cached_prompt_tokens() -> None:
    """
    A prompt sent twice is evaluated whole once, then all but one token
    comes from the slot's cache: the stats count both prompts and what was
    evaluated.
    """
    env = Env(cost())
    for _ in range(2):
        env.send("/api/generate", {"model": M1, "prompt": "a b c d",
                                   "options": {"num_predict": 1}})
        env.run()
    stats = env.get("/sim/stats")
    assert (stats["loads"], stats["prompt_tokens"], stats["evaluated_tokens"]) == (1, 10, 6)


def test_a_scaled_clock_runs_simulated_time_faster() -> None:
    """
    At speed 10, a chat whose simulated work takes D seconds ends after
    D / 10 real seconds, and reports its figures in simulated seconds.
    """
    real = Clock()
    real.advance(1000.0)
    model = cost(load_seconds=5.0)
    env = Env(model, clock=real)
    env.sim = sim.Simulator(sim.ScaledClock(real, 10.0), model, [M1])
    env.treq = StubTreq(env.sim)
    body = env.send("/api/chat", chat(words=100, output=5))
    work = 5.0 + 102 / model.prefill_tps + 5 / model.decode_tps
    env.advance(work / 10 - 1e-6)
    assert not body.done
    env.advance(2e-6)
    assert body.done
    final = body.final()
    assert final["load_duration"] == ns(5.0)
    assert final["total_duration"] == pytest.approx(ns(work), abs=1e4)
