"""
Tests for L{ollamaproxy.backends.router}: which backend a request gets, and
when.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from ollamaproxy.backends.gpu_time import FALLBACK_OUTPUT_SECONDS, FALLBACK_PROMPT_SECONDS
from ollamaproxy.backends.pool import Backend, BackendPool, Residency
from ollamaproxy.backends.router import UNREAD_MODEL, Lease, Router
from ollamaproxy.backends.shared import Ask
from ollamaproxy.errors import ProxyError
from ollamaproxy.exchange import Meter, StreamSummary
from ollamaproxy.model_names import resolve
from tests.fakes.agents import Silent
from tests.fakes.chain import HEADER_TIMEOUT, Chain, chat
from tests.fakes.routers import LLAMA, MISTRAL, QWEN, backend, now


def router(*backends: Backend, clock: Clock | None = None, max_queue: int = 512,
           fair_share: str = "gpu-time") -> Router:
    """
    A router over C{backends} that does not collate models (collation has
    its own tests, L{tests.backends.test_collate}).
    """
    return Router(BackendPool(backends), clock or Clock(), max_queue=max_queue, queue_timeout=60,
                  fair_share=fair_share, switch_hold=0)


def test_a_model_goes_only_to_a_backend_that_has_it() -> None:
    """
    A request naming M goes to a backend that has M.
    """
    clock = Clock()
    a, b = backend(clock, "a", ("llama3.2",)), backend(clock, "b", ("mistral",))
    r = router(a, b)
    assert now(r.acquire("k", MISTRAL, runs=True)).backend is b
    assert now(r.acquire("k", LLAMA, runs=True)).backend is a


def test_a_model_no_backend_has_is_404() -> None:
    """
    M on no backend: 404 in Ollama's shape, nothing sent.
    """
    clock = Clock()
    r = router(backend(clock, "a", ("llama3.2",)), backend(clock, "b", ("mistral",)))
    with pytest.raises(ProxyError) as raised:
        r.acquire("k", QWEN, runs=True)
    assert raised.value.code == 404
    assert "qwen3:latest" in raised.value.message


def test_one_backend_decides_nothing_about_models() -> None:
    """
    With one backend every request goes to it, and Ollama answers for a
    model it does not have, as without the proxy.
    """
    clock = Clock()
    a = backend(clock, "a", ("llama3.2",))
    assert now(router(a).acquire("k", QWEN, runs=True)).backend is a


def test_loaded_backend_is_preferred_then_the_least_busy() -> None:
    """
    Among backends that have M, one with M in memory wins; then the one with
    fewest requests in flight.
    """
    clock = Clock()
    a = backend(clock, "a", ("llama3.2", "mistral"), parallel=4)
    b = backend(clock, "b", ("llama3.2", "mistral"), loaded=("mistral",), parallel=4)
    r = router(a, b)
    assert now(r.acquire("k", LLAMA, runs=True)).backend is a
    assert now(r.acquire("k", LLAMA, runs=True)).backend is b
    assert now(r.acquire("k", LLAMA, runs=True)).backend is a
    # b has mistral in memory: it wins while it has a slot, busy or not.
    assert now(r.acquire("k", MISTRAL, runs=True)).backend is b
    assert now(r.acquire("k", MISTRAL, runs=True)).backend is b


def test_unhealthy_backends_are_skipped() -> None:
    """
    An unhealthy backend gets no requests; if every backend with M is
    unhealthy, 503 at once.
    """
    clock = Clock()
    a, b = backend(clock, "a", ("llama3.2",)), backend(clock, "b", ("llama3.2",))
    a.healthy = False
    r = router(a, b)
    assert now(r.acquire("k", LLAMA, runs=True)).backend is b
    b.healthy = False
    with pytest.raises(ProxyError) as raised:
        r.acquire("k", LLAMA, runs=True)
    assert raised.value.code == 503


def test_requests_wait_for_a_slot_and_are_served_fairly() -> None:
    """
    At --parallel for M, requests wait; a key that fired a burst does not
    hold up another key's request sent after it, which is served next.
    """
    clock = Clock()
    a = backend(clock, "a", ("llama3.2",), parallel=1)
    r = router(a, clock=clock)
    first = now(r.acquire("burst", LLAMA, runs=True))
    burst = [r.acquire("burst", LLAMA, runs=True) for _ in range(5)]
    clock.advance(2)
    other = r.acquire("other", LLAMA, runs=True)
    first.release()
    assert other.called
    assert [d.called for d in burst] == [False] * 5
    now(other).release()
    assert [d.called for d in burst] == [True, False, False, False, False]


def test_queued_seconds_are_reported() -> None:
    """
    A lease says how long its request waited.
    """
    clock = Clock()
    r = router(backend(clock, "a", ("llama3.2",), parallel=1), clock=clock)
    first = now(r.acquire("k", LLAMA, runs=True))
    second = r.acquire("k", LLAMA, runs=True)
    clock.advance(7)
    first.release()
    assert now(second).queued == 7


def test_a_client_that_leaves_while_waiting_never_gets_a_backend() -> None:
    """
    Cancelling a queued request takes it out: the slot goes to the next.
    """
    clock = Clock()
    r = router(backend(clock, "a", ("llama3.2",), parallel=1), clock=clock)
    first = now(r.acquire("a", LLAMA, runs=True))
    gone = r.acquire("b", LLAMA, runs=True)
    after = r.acquire("c", LLAMA, runs=True)
    gone.addErrback(lambda _: None)
    gone.cancel()
    first.release()
    assert now(after).backend.running[LLAMA] == 1
    assert len(r.queue) == 0


def test_release_counts_once() -> None:
    """
    Releasing a lease twice frees one slot, not two.
    """
    clock = Clock()
    a = backend(clock, "a", ("llama3.2",), parallel=1)
    r = router(a)
    lease = now(r.acquire("k", LLAMA, runs=True))
    lease.release()
    lease.release()
    assert a.running == {}


def test_failed_backend_is_marked_and_excluded() -> None:
    """
    A request that could not reach its backend marks it unhealthy; asking
    again excluding it gives another backend that has M.  Exclusion works
    on its own too: with both healthy and b the less busy, excluding b
    gives a.
    """
    clock = Clock()
    a, b = backend(clock, "a", ("llama3.2",)), backend(clock, "b", ("llama3.2",))
    r = router(a, b)
    busier = now(r.acquire("k", LLAMA, runs=True))
    assert busier.backend is a
    excluding = now(r.acquire("k", LLAMA, runs=True, exclude=[b]))
    assert excluding.backend is a
    busier.release()
    excluding.release()
    lease = now(r.acquire("k", LLAMA, runs=True))
    r.pool.failed(lease.backend, "connection refused")
    lease.release()
    assert not lease.backend.healthy
    other = now(r.acquire("k", LLAMA, runs=True, exclude=[lease.backend]))
    assert other.backend is not lease.backend


def test_requests_naming_no_model_take_no_slot() -> None:
    """
    A request naming no model goes to the least busy healthy backend at
    once, whatever the model slots say.
    """
    clock = Clock()
    a = backend(clock, "a", ("llama3.2",), parallel=1)
    b = backend(clock, "b", ("mistral",), parallel=1)
    r = router(a, b)
    now(r.acquire("k", LLAMA, runs=True))
    assert now(r.acquire("k")).backend is b
    assert now(r.acquire("k")).backend is a


def test_a_request_that_runs_nothing_takes_no_slot() -> None:
    """
    A request naming M that does not run it (show, delete) goes to a
    backend that has M, even when M's slots are all taken, and never waits.
    """
    clock = Clock()
    a = backend(clock, "a", ("llama3.2",), parallel=1)
    b = backend(clock, "b", ("mistral",), parallel=1)
    r = router(a, b)
    now(r.acquire("k", LLAMA, runs=True))
    lease = now(r.acquire("k", LLAMA))
    assert lease.backend is a
    lease.release()
    assert a.running == {LLAMA: 1}


def test_primary_placement_takes_the_first_healthy_backend() -> None:
    """
    Pulls, creates and blob uploads go to the first healthy backend in the
    order configured, so that a blob and the create using it meet.
    """
    clock = Clock()
    a, b = backend(clock, "a", ("llama3.2",)), backend(clock, "b", ("mistral",))
    r = router(a, b)
    assert now(r.acquire("k", QWEN, primary=True)).backend is a
    a.healthy = False
    assert now(r.acquire("k", QWEN, primary=True)).backend is b
    b.healthy = False
    with pytest.raises(ProxyError) as raised:
        r.acquire("k", QWEN, primary=True)
    assert raised.value.code == 503


@pytest.mark.parametrize("count", [1, 2])
def test_a_request_whose_model_was_not_read_takes_a_whole_backend(count: int) -> None:
    """
    A request that runs a model the proxy did not read the name of starts
    only on a backend that runs no model, and while it runs nothing else
    that runs a model starts there: the next one waits in the fair queue,
    with one backend or several.
    """
    clock = Clock()
    backends = [backend(clock, name, ("llama3.2",), parallel=2) for name in "ab"[:count]]
    r = router(*backends)
    leases = [now(r.acquire("k", UNREAD_MODEL, runs=True)) for _ in backends]
    assert {lease.backend.name for lease in leases} == {b.name for b in backends}
    waiting = r.acquire("other", LLAMA, runs=True)
    assert r.queue.waiting() == {"other": 1}
    leases[0].release()
    llama = now(waiting)
    assert llama.backend is leases[0].backend
    unread = r.acquire("k", UNREAD_MODEL, runs=True)
    assert r.queue.waiting() == {"k": 1}
    llama.release()
    assert now(unread).backend is llama.backend


def test_a_request_that_runs_a_model_it_does_not_name_takes_a_slot() -> None:
    """
    A request that runs a model but names none (its body could not be
    read) takes the whole backend's slot, never a lease without one: a
    second one waits for the first to end.
    """
    r = router(backend(Clock(), "a", ("llama3.2",), parallel=2))
    first = now(r.acquire("k", None, runs=True))
    assert first.model == UNREAD_MODEL
    second = r.acquire("k", None, runs=True)
    assert r.queue.waiting() == {"k": 1}
    first.release()
    assert now(second).model == UNREAD_MODEL


def test_a_request_whose_model_was_not_read_keeps_its_turn() -> None:
    """
    A request whose model was not read waits behind one queued before it
    for a busy model, and holds back one queued after it, even for a model
    with slots free: it starts when the backend has drained, and the later
    one after it has ended.
    """
    r = router(backend(Clock(), "a", ("llama3.2", "mistral"), parallel=1))
    running = now(r.acquire("a", LLAMA, runs=True))
    before = r.acquire("b", LLAMA, runs=True)
    unread = r.acquire("c", UNREAD_MODEL, runs=True)
    after = r.acquire("d", MISTRAL, runs=True)
    assert r.queue.waiting() == {"b": 1, "c": 1, "d": 1}
    running.release()
    first = now(before)
    assert r.queue.waiting() == {"c": 1, "d": 1}
    first.release()
    whole = now(unread)
    assert r.queue.waiting() == {"d": 1}
    whole.release()
    assert now(after).model == MISTRAL


def test_retry_after_follows_the_measured_release_rate() -> None:
    """
    A full queue's 503 says to come back when the requests ahead and the
    refused one would have been served at the rate the model's slots have
    been freeing (a moving average of the gaps between releases), not the
    queue timeout; before two releases, the timeout.
    """
    clock = Clock()
    r = router(backend(clock, "a", ("llama3.2",), parallel=1), clock=clock, max_queue=2)
    lease = now(r.acquire("a", LLAMA, runs=True))
    waiting = [r.acquire(key, LLAMA, runs=True) for key in "bc"]
    with pytest.raises(ProxyError) as raised:
        r.acquire("z", LLAMA, runs=True)
    assert raised.value.headers == {b"Retry-After": b"60"}

    def next_after(gap: float, key: str) -> None:
        nonlocal lease
        clock.advance(gap)
        lease.release()
        lease = now(waiting.pop(0))
        waiting.append(r.acquire(key, LLAMA, runs=True))

    next_after(4, "d")
    next_after(4, "e")
    with pytest.raises(ProxyError) as raised:
        r.acquire("z", LLAMA, runs=True)
    assert raised.value.headers == {b"Retry-After": b"12"}  # two ahead and itself, 4 s apart
    next_after(1, "f")
    with pytest.raises(ProxyError) as raised:
        r.acquire("z", LLAMA, runs=True)
    # The gaps 4, 1: 4 + 0.2 * (1 - 4) = 3.4 s; two ahead and itself.
    assert raised.value.headers == {b"Retry-After": b"11"}


def test_only_gaps_while_requests_wait_are_timed() -> None:
    """
    Releases are timed only while requests wait, and only between two in
    one stretch of waiting: slots freeing while nobody waits, and the idle
    time between two stretches, leave the measured pace as it was.
    """
    clock = Clock()
    r = router(backend(clock, "a", ("llama3.2",), parallel=1), clock=clock, max_queue=1)
    lease = now(r.acquire("a", LLAMA, runs=True))
    waiting = r.acquire("b", LLAMA, runs=True)
    for gap in (2, 2):
        clock.advance(gap)
        lease.release()
        lease = now(waiting)
        waiting = r.acquire("b", LLAMA, runs=True)
    clock.advance(2)
    lease.release()
    lease = now(waiting)  # nobody waits now
    for _ in range(3):
        clock.advance(50)
        lease.release()
        lease = now(r.acquire("a", LLAMA, runs=True))
    clock.advance(500)
    waiting = r.acquire("b", LLAMA, runs=True)
    clock.advance(30)
    lease.release()  # the first of a new stretch: no gap
    lease = now(waiting)
    r.acquire("b", LLAMA, runs=True)
    with pytest.raises(ProxyError) as raised:
        r.acquire("z", LLAMA, runs=True)
    assert raised.value.headers == {b"Retry-After": b"4"}  # one ahead and itself, 2 s apart


class Backlog:
    """
    Keys that each keep requests waiting at --parallel 1 on one backend,
    served one at a time: each granted request's meter reads what Ollama
    would say it used, and its slot is given back at once.
    """

    def __init__(self, **options: Any) -> None:
        self.router = Router(BackendPool([backend(Clock(), "a", ("llama3.2",), parallel=1)]),
                             Clock(), max_queue=2000, queue_timeout=60, **options)
        self._granted: list[tuple[str, Lease, Meter, StreamSummary]] = []

    def add(self, key: str, prompt: int, output: int, count: int, weight: int = 1,
            user: str | None = None, seconds: tuple[float, float] | None = None) -> None:
        """
        C{count} requests of C{key} (for C{user} behind it, if given), each
        of C{prompt} tokens that generates C{output}, as its plan estimates
        them and as Ollama counts them.  They are served as C{key}, or
        C{key/user}.

        @param seconds: The GPU seconds per prompt token and per output
            token that Ollama reports them to take, if it reports any.
        """
        label = key if user is None else f"{key}/{user}"
        final = StreamSummary("llama3.2:latest", prompt_tokens=prompt, completion_tokens=output)
        if seconds is not None:
            final = replace(final, prompt_seconds=prompt * seconds[0],
                            eval_seconds=output * seconds[1])
        for _ in range(count):
            meter = Meter()
            meter.expect(prompt, "llama3.2")
            acquiring = self.router.acquire(key, LLAMA, runs=True, weight=weight, meter=meter,
                                            expected_output=output, user=user)
            acquiring.addCallback(self._grant, label, meter, final)

    def _grant(self, lease: Lease, key: str, meter: Meter, final: StreamSummary) -> None:
        self._granted.append((key, lease, meter, final))

    def serve(self, count: int) -> list[str]:
        """
        Let C{count} requests run to their end, in turn: the keys served.
        """
        served: list[str] = []
        for _ in range(count):
            key, lease, meter, final = self._granted.pop(0)
            meter.generating = True
            meter.final = final
            served.append(key)
            lease.release()
        return served


def tokens(served: list[str], key: str, cost: int) -> int:
    """
    The tokens C{key} was served, its requests costing C{cost} each.
    """
    return served.count(key) * cost


def test_keys_share_tokens_not_turns() -> None:
    """
    Under --fair-share tokens, a key whose requests generate 600 tokens
    and one whose requests generate 30, both backlogged: the short key
    gets 20 turns for each of the long key's, and the tokens each was
    served (output counted twice) stay within 10 % of each other.
    """
    backlog = Backlog(fair_share="tokens")
    backlog.add("long", 0, 600, 100)
    backlog.add("short", 0, 30, 400)
    served = backlog.serve(210)
    assert served.count("short") == 20 * served.count("long")
    long, short = tokens(served, "long", 1200), tokens(served, "short", 60)
    assert abs(long - short) <= 0.1 * max(long, short)


def test_weights_share_tokens() -> None:
    """
    Under --fair-share tokens, weights 3:1 give 3:1 in tokens, not in
    turns: the heavy key's requests cost ten times the light key's, so it
    gets fewer turns than the light key, and three times its tokens.
    """
    backlog = Backlog(fair_share="tokens")
    backlog.add("heavy", 0, 300, 100, weight=3)
    backlog.add("light", 0, 30, 400)
    served = backlog.serve(130)
    heavy, light = tokens(served, "heavy", 600), tokens(served, "light", 60)
    assert served.count("heavy") < served.count("light")
    assert abs(heavy - 3 * light) <= 0.1 * heavy


def test_fair_share_requests_gives_turns() -> None:
    """
    Under --fair-share requests a request costs one turn, whatever its
    tokens: the long and the short key alternate, as in round 2.
    """
    backlog = Backlog(fair_share="requests")
    backlog.add("long", 0, 600, 10)
    backlog.add("short", 0, 30, 10)
    assert backlog.serve(8) == ["long", "short"] * 4


def test_output_token_weight_sets_what_output_costs() -> None:
    """
    --output-token-weight weighs output against prompt tokens: at weight
    1, a request of 90 prompt tokens and 10 output costs what one of 10
    and 90 does, and the keys alternate; at the default 2 they do not.
    """
    for weight, expected in ((1.0, ["a", "b"] * 3), (2.0, ["a", "b", "a", "b", "a", "a"])):
        backlog = Backlog(fair_share="tokens", output_token_weight=weight)
        backlog.add("a", 90, 10, 10)
        backlog.add("b", 10, 90, 10)
        assert backlog.serve(6) == expected, weight


def test_an_idle_key_rejoins_at_the_present() -> None:
    """
    A key that comes after others have been served for a while takes its
    share from then on, at the present virtual time: it does not catch up
    on the turns it missed while idle, and the long key keeps its share.
    """
    backlog = Backlog(fair_share="tokens")
    backlog.add("long", 0, 600, 100)
    backlog.add("short", 0, 30, 400)
    backlog.serve(105)
    backlog.add("newcomer", 0, 30, 400)
    served = backlog.serve(82)
    assert served.count("long") == 2
    assert abs(served.count("newcomer") - served.count("short")) <= 1


def test_users_share_their_keys_tokens() -> None:
    """
    Under --fair-share tokens, two users behind one key, one generating
    600 tokens a request and one 30, against another key generating 30,
    all backlogged: the two keys get as many tokens as each other, and
    within the first key its two users as many as each other, each within
    10 %; the estimate charged at the slot is trued up with what was used,
    per user too.
    """
    backlog = Backlog(fair_share="tokens")
    backlog.add("webui", 0, 600, 100, user="flood")
    backlog.add("webui", 0, 30, 400, user="chat")
    backlog.add("other", 0, 30, 800)
    served = backlog.serve(840)
    flood, chat = tokens(served, "webui/flood", 1200), tokens(served, "webui/chat", 60)
    other = tokens(served, "other", 60)
    assert abs((flood + chat) - other) <= 0.1 * other
    assert abs(flood - chat) <= 0.1 * max(flood, chat)


#: What Ollama reports a prompt token and an output token take, in the
#: GPU-time tests: a prefill of 4000 tokens a second, a decode of 50.
SECONDS = (1 / 4000, 1 / 50)


def test_keys_share_gpu_seconds_not_tokens() -> None:
    """
    Under --fair-share gpu-time, the default: a key whose requests read
    3000 prompt tokens and generate 10 and one whose requests read 10 and
    generate 300, both backlogged, are served equal GPU seconds as Ollama
    reports them (within 10 %), though the tokens they are served (prompt
    plus twice the output) are far apart.
    """
    backlog = Backlog()
    backlog.add("reader", 3000, 10, 400, seconds=SECONDS)
    backlog.add("writer", 10, 300, 100, seconds=SECONDS)
    served = backlog.serve(300)
    reader = served.count("reader") * (3000 * SECONDS[0] + 10 * SECONDS[1])
    writer = served.count("writer") * (10 * SECONDS[0] + 300 * SECONDS[1])
    assert abs(reader - writer) <= 0.1 * max(reader, writer)
    assert tokens(served, "writer", 610) < tokens(served, "reader", 3020) / 2


def test_users_share_their_keys_gpu_seconds() -> None:
    """
    Under --fair-share gpu-time, two users behind one key, one whose
    requests generate 300 tokens and one whose requests read 3000, against
    another key, all backlogged: the keys get as many GPU seconds as each
    other, and the key's two users as many as each other, within 10 %.
    """
    backlog = Backlog()
    backlog.add("webui", 10, 300, 100, user="writer", seconds=SECONDS)
    backlog.add("webui", 3000, 10, 400, user="reader", seconds=SECONDS)
    backlog.add("other", 3000, 10, 800, seconds=SECONDS)
    served = backlog.serve(500)
    writer = served.count("webui/writer") * (10 * SECONDS[0] + 300 * SECONDS[1])
    reader = served.count("webui/reader") * (3000 * SECONDS[0] + 10 * SECONDS[1])
    other = served.count("other") * (3000 * SECONDS[0] + 10 * SECONDS[1])
    assert abs((writer + reader) - other) <= 0.1 * other
    assert abs(writer - reader) <= 0.1 * max(writer, reader)


def test_the_estimate_is_in_measured_seconds_once_known() -> None:
    """
    Under --fair-share gpu-time, a request of a model not yet measured is
    charged at its slot its tokens at the fallback rates; its release
    charges the seconds Ollama reported instead, and the next request's
    estimate is at the rates those seconds measured.  Another model is
    still estimated at the fallback rates.
    """
    r = router(backend(Clock(), "a", ("llama3.2",), parallel=3))
    meter = Meter()
    meter.expect(100, "llama3.2")
    lease = now(r.acquire("k", LLAMA, runs=True, meter=meter, expected_output=50))
    assert r.queue.finish("k") == pytest.approx(
        100 * FALLBACK_PROMPT_SECONDS + 50 * FALLBACK_OUTPUT_SECONDS)
    meter.generating = True
    meter.final = StreamSummary("llama3.2:latest", prompt_tokens=100, completion_tokens=50,
                                prompt_seconds=0.5, eval_seconds=2.5)
    lease.release()
    assert r.queue.finish("k") == pytest.approx(3.0)
    second = Meter()
    second.expect(200, "llama3.2")
    now(r.acquire("k", LLAMA, runs=True, meter=second, expected_output=10))
    assert r.queue.finish("k") == pytest.approx(3.0 + 200 * 0.005 + 10 * 0.05)
    other = Meter()
    other.expect(200, "mistral")
    now(r.acquire("j", MISTRAL, runs=True, meter=other, expected_output=10))
    assert r.queue.finish("j") - r.queue._turns.virtual == pytest.approx(
        200 * FALLBACK_PROMPT_SECONDS + 10 * FALLBACK_OUTPUT_SECONDS)


def test_a_cut_stream_costs_what_the_meter_counted() -> None:
    """
    Under --fair-share tokens, a request is charged its estimate when it
    gets its slot (its prompt estimated, and the output it asks for at
    most, counted twice), and when its stream is cut, what the meter
    counted: the prompt estimated and the pieces relayed.
    """
    r = router(backend(Clock(), "a", ("llama3.2",), parallel=1), fair_share="tokens")
    meter = Meter()
    meter.expect(20, "llama3.2")
    lease = now(r.acquire("k", LLAMA, runs=True, meter=meter, expected_output=500))
    assert r.queue.finish("k") == 20 + 2 * 500
    meter.generating, meter.output = True, 7
    lease.release()
    assert r.queue.finish("k") == 20 + 2 * 7


def test_a_users_turns_are_trued_up_with_what_it_used() -> None:
    """
    Under --fair-share tokens, the estimate a user's request is charged at
    its slot is trued up, for the user as for its key, with what the meter
    read when the slot is given back; a key with no users has no user's
    turns to keep.
    """
    r = router(backend(Clock(), "a", ("llama3.2",), parallel=2), fair_share="tokens")
    meters = [Meter(), Meter()]
    for meter in meters:
        meter.expect(20, "llama3.2")
    lease = now(r.acquire("webui", LLAMA, runs=True, meter=meters[0], expected_output=500,
                          user="alice"))
    other = now(r.acquire("plain", LLAMA, runs=True, meter=meters[1], expected_output=500))
    assert r.queue.user_finish("webui", "alice") == 20 + 2 * 500
    meters[0].generating, meters[0].output = True, 7
    lease.release()
    other.release()
    assert r.queue.user_finish("webui", "alice") == r.queue.finish("webui") == 20 + 2 * 7
    assert "plain" not in r.queue._users


def test_the_loaded_context_is_the_one_the_loaded_backends_agree_on() -> None:
    """
    A model's loaded context is known when every healthy backend that has
    it loaded runs it with the same one: the router sends a request to one
    of those.  When they differ, none is given (any one would reload some
    backend), and an unhealthy backend's does not count.
    """
    clock = Clock()
    a = backend(clock, "a", ("llama3.2",))
    b = backend(clock, "b", ("llama3.2",))
    r = router(a, b, clock=clock)
    model = resolve("llama3.2")
    assert r.loaded_context(model) is None
    a.resident = {model: Residency(context_length=8192)}
    assert r.loaded_context(model) == 8192
    b.resident = {model: Residency(context_length=8192)}
    assert r.loaded_context(model) == 8192
    b.resident = {model: Residency(context_length=4096)}
    assert r.loaded_context(model) is None
    b.healthy = False
    assert r.loaded_context(model) == 8192


def test_a_context_sent_counts_over_api_ps_s() -> None:
    """
    A backend's loaded context is the last the proxy sent the model with,
    while the pool holds it, over what C{/api/ps} listed; a backend the
    model was sent to that C{/api/ps} does not list yet counts as loading
    it with that context, and backends must still agree.
    """
    clock = Clock()
    a = backend(clock, "a", ("llama3.2",))
    b = backend(clock, "b", ("llama3.2",))
    r = router(a, b, clock=clock)
    model = resolve("llama3.2")
    a.resident = {model: Residency(context_length=2048)}
    r.pool.sending(a, model, 8192)
    assert r.loaded_context(model) == 8192
    r.pool.sending(b, model, 4096)
    assert r.loaded_context(model) is None
    r.pool.sending(b, model, 8192)
    assert r.loaded_context(model) == 8192
    assert r.loaded_context(resolve("mistral")) is None


def test_a_backend_out_for_a_model_gets_none_of_its_requests() -> None:
    """
    Through the proxy: a backend whose generation of a model hung is
    skipped for that model (the request that found it is sent again to
    the other), though its listings keep answering (the pool runs), and
    still gets other models' requests; once its check generates, it gets
    the model's requests again.
    """
    chain = Chain(backends=[["slowhead:latest", "llama3.2:latest"]] * 2)
    chain.pool.startService()
    chain.flush()
    hung = chain.request("POST", "/api/chat", data=chat("slowhead"))
    assert len(chain.fakes[0].received) == 1
    chain.clock.advance(HEADER_TIMEOUT)
    chain.flush()
    chain.fakes[1].held[0].release()
    chain.flush()
    assert chain.result(hung).code == 200
    chain.clock.advance(10)  # the listings answer: backend 0 stays healthy
    chain.flush()
    chain.request("POST", "/api/chat", data=chat("slowhead"))
    chain.request("POST", "/api/chat", data=chat("slowhead"))
    assert [r.uri for r in chain.fakes[0].received] == [b"/api/chat"]
    assert len(chain.fakes[1].received) == 3
    chain.request("POST", "/api/chat", data=chat("llama3.2"))
    assert len(chain.fakes[0].received) == 2
    assert [c.uri for c in chain.fakes[0].checks].count(b"/api/generate") == 1
    chain.fakes[0].held[-1].release()
    chain.flush()
    assert chain.backends[0].serves(resolve("slowhead"))
    # Another conversation: the one that says "hi" was sent again to
    # backend 1, its home now, so its next turn would go there.
    other = [{"role": "user", "content": "another"}]
    chain.request("POST", "/api/chat", data=chat("slowhead", messages=other))
    assert len(chain.fakes[0].received) == 3
    chain.pool.stopService()


def test_an_embedding_that_times_out_marks_the_backend_failed() -> None:
    """
    Only a generation that timed out takes a backend out for its model: a
    one-token generation cannot check an embedding model, so an embedding
    that times out marks the backend failed, for its listing probe to
    bring back.  (It runs a model, so it is sent again to the other.)
    """
    chain = Chain(backends=[["llama3.2:latest"]] * 2, agent=Silent())
    d = chain.request("POST", "/api/embed", data=b'{"model": "llama3.2", "input": "hi"}')
    chain.clock.advance(HEADER_TIMEOUT)
    chain.flush()
    assert chain.result(d).code == 200
    assert [r.uri for r in chain.fakes[1].received] == [b"/api/embed"]
    assert not chain.backends[0].healthy
    assert chain.backends[0].hung == set()


class _Shared:
    """
    A shared queue (L{ollamaproxy.backends.shared.SharedQueue}) that grants
    every ask on its first backend, and notes what it was asked and given.
    """

    def __init__(self) -> None:
        self.asks: list[Ask] = []
        self.given: list[tuple[str, str, float, str | None, float]] = []

    def take(self, ask: Ask) -> Deferred[Lease]:
        self.asks.append(ask)
        return succeed(ask.lease(ask.backends[0], f"ticket {len(self.asks)}"))

    def waiting(self) -> dict[str, int]:
        return {"k": 2, "j": 1}

    def give_back(
        self, ticket: str, key: str, charge: float, user: str | None, user_charge: float
    ) -> None:
        self.given.append((ticket, key, charge, user, user_charge))


def test_a_shared_queue_keeps_named_models_slots() -> None:
    """
    With a shared queue, a request running a named model asks it, with
    the backends it may use best first (the model loaded, then fewer in
    flight; not one excluded), and gives the lease back to it, trued up
    over the key's weight; the backend's count is kept here all the same.
    Requests that take no slot, and those whose model the proxy cannot
    name, stay in this process's queue.
    """
    clock = Clock()
    a = backend(clock, "a", ("llama3.2",))
    b = backend(clock, "b", ("llama3.2",), loaded=("llama3.2",))
    c = backend(clock, "c", ("llama3.2",))
    r = router(a, b, c, fair_share="tokens")
    shared = _Shared()
    r.shared = shared
    a.running[MISTRAL] = 1
    meter = Meter()
    meter.expect(20, "llama3.2")
    lease = now(r.acquire("k", LLAMA, runs=True, exclude=[c], weight=2, meter=meter,
                          expected_output=5))
    (ask,) = shared.asks
    assert (ask.key, ask.model, ask.backends, ask.weight, ask.cost) == ("k", LLAMA, [b, a], 2, 30)
    assert lease.backend is b and b.running[LLAMA] == 1
    meter.generating, meter.output = True, 1
    lease.release()
    assert shared.given == [("ticket 1", "k", (22 - 30) / 2, None, 22 - 30)] and not b.running
    now(r.acquire("k", LLAMA)).release()
    now(r.acquire("k", None, runs=True)).release()
    assert len(shared.asks) == 1 and len(shared.given) == 1


def test_a_shared_queue_is_charged_gpu_seconds() -> None:
    """
    Under --fair-share gpu-time, the shared queue is asked with the
    request's estimate in seconds and given back, over the key's weight,
    the seconds Ollama reported less that estimate: floats, not tokens.
    """
    clock = Clock()
    r = router(backend(clock, "a", ("llama3.2",)), backend(clock, "b", ("llama3.2",)))
    shared = _Shared()
    r.shared = shared
    meter = Meter()
    meter.expect(20, "llama3.2")
    lease = now(r.acquire("k", LLAMA, runs=True, weight=2, meter=meter, expected_output=5))
    (ask,) = shared.asks
    estimate = 20 * FALLBACK_PROMPT_SECONDS + 5 * FALLBACK_OUTPUT_SECONDS
    assert ask.cost == pytest.approx(estimate)
    meter.generating = True
    meter.final = StreamSummary("llama3.2:latest", prompt_tokens=20, completion_tokens=5,
                                prompt_seconds=0.25, eval_seconds=0.5)
    lease.release()
    ((ticket, key, charge, user, user_charge),) = shared.given
    assert (ticket, key, user) == ("ticket 1", "k", None)
    assert charge == pytest.approx((0.75 - estimate) / 2)
    assert user_charge == pytest.approx(0.75 - estimate)


class _SharedDown(_Shared):
    """
    A shared queue that cannot be asked: every ask falls back to this
    process's queue (L{Ask.local}).
    """

    def take(self, ask: Ask) -> Deferred[Lease]:
        self.asks.append(ask)
        return ask.local()


def test_a_shared_queue_that_falls_back_charges_as_this_proxys_own() -> None:
    """
    A request that the shared queue hands back to this process's queue is
    charged there what it would have been charged in the shared one, to
    its key (over its weight) and its user, and trued up at release with
    its meter's reading; the lease is this process's, not the shared
    queue's.
    """
    clock = Clock()
    a = backend(clock, "a", ("llama3.2",))
    r = router(a, backend(clock, "b", ("llama3.2",)), fair_share="tokens")
    shared = _SharedDown()
    r.shared = shared
    meter = Meter()
    meter.expect(20, "llama3.2")
    lease = now(r.acquire("k", LLAMA, runs=True, weight=2, meter=meter, expected_output=5,
                          user="alice"))
    (ask,) = shared.asks
    assert ask.cost == 30
    assert lease.backend is a and a.running[LLAMA] == 1
    assert r.queue.finish("k") == 30 / 2 and r.queue.user_finish("k", "alice") == 30
    meter.generating, meter.output = True, 1
    lease.release()
    assert r.queue.finish("k") == 22 / 2 and r.queue.user_finish("k", "alice") == 22
    assert shared.given == [] and not a.running


def test_a_shared_queue_that_falls_back_checks_the_backends_again() -> None:
    """
    The fallback asks afresh whether a backend may take the request: a
    model no healthy backend serves by then is the 503 of a request that
    came then.
    """
    clock = Clock()
    a, b = backend(clock, "a", ("llama3.2",)), backend(clock, "b", ("llama3.2",))
    r = router(a, b)

    class GoneMeanwhile(_Shared):
        def take(self, ask: Ask) -> Deferred[Lease]:
            a.healthy = b.healthy = False
            return ask.local()

    r.shared = GoneMeanwhile()
    with pytest.raises(ProxyError) as raised:
        r.acquire("k", LLAMA, runs=True)
    assert raised.value.code == 503


def test_waiting_counts_the_shared_queue_too() -> None:
    """
    What the metric and the console show waiting is this proxy's requests
    in its own queue and in the shared one, by key.
    """
    clock = Clock()
    r = router(backend(clock, "a", ("llama3.2",), parallel=1))
    now(r.acquire("k", LLAMA, runs=True))
    r.acquire("k", LLAMA, runs=True)
    assert r.waiting() == {"k": 1}
    r.shared = _Shared()
    assert r.waiting() == {"k": 3, "j": 1}
