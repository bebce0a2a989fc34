"""
Tests for L{ollamaproxy.backends.collate}: a backend serves the requests
waiting for the model it holds before it switches, for at most the hold,
then drains for the switch.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs

from ollamaproxy.backends.pool import Backend, BackendPool
from ollamaproxy.backends.router import Lease, Router
from ollamaproxy.exchange import Meter, StreamSummary
from ollamaproxy.model_names import ModelName, resolve
from tests.fakes.routers import LLAMA, MISTRAL, QWEN, backend, now

HOLD = 5.0


def collating(clock: Clock, *backends: Backend) -> Router:
    """
    A router over C{backends} that collates with a hold of L{HOLD} seconds.
    """
    return Router(BackendPool(backends), clock, queue_timeout=600, switch_hold=HOLD)


def one(clock: Clock, parallel: int = 1, loaded: tuple[str, ...] = ()) -> Backend:
    """
    A backend that has llama3.2, mistral and qwen3.
    """
    return backend(clock, "a", ("llama3.2", "mistral", "qwen3"), loaded, parallel)


class Grants:
    """
    The leases a router gives, in order, with when each came.
    """

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.leases: list[tuple[float, Lease]] = []

    def watch(self, d: Deferred[Lease]) -> None:
        def note(lease: Lease) -> Lease:
            self.leases.append((self.clock.seconds(), lease))
            return lease

        d.addCallback(note)

    def models(self) -> list[ModelName | None]:
        return [lease.model for _, lease in self.leases]

    def release_running(self) -> None:
        """
        End the request that has run longest.
        """
        next(lease for _, lease in self.leases if not lease._released).release()


def switch_due(clock: Clock) -> tuple[Router, Grants, Deferred[Lease]]:
    """
    A collating router over L{one} backend that runs key C{steady}'s
    request for llama3.2, and key C{other}'s request for mistral, whose
    turn is now (at 0): a switch due.  Both are watched.
    """
    r = collating(clock, one(clock))
    grants = Grants(clock)
    grants.watch(r.acquire("steady", LLAMA, runs=True))
    switching = r.acquire("other", MISTRAL, runs=True)
    grants.watch(switching)
    return r, grants, switching


def test_the_requests_for_the_model_held_go_before_a_switch() -> None:
    """
    The next request in fair order wants another model than the one the
    backend holds and runs: the requests waiting for the model held go
    first (though their key's turn is later), then the switch, once; with
    no hold, the switch goes at its turn.
    """
    for hold, expected in [(HOLD, [LLAMA, LLAMA, MISTRAL]), (0.0, [MISTRAL, LLAMA, LLAMA])]:
        clock = Clock()
        a = one(clock)
        r = Router(BackendPool([a]), clock, queue_timeout=600, switch_hold=hold)
        grants = Grants(clock)
        grants.watch(r.acquire("a", LLAMA, runs=True))
        for key, model in [("b", MISTRAL), ("a", LLAMA), ("a", LLAMA)]:
            grants.watch(r.acquire(key, model, runs=True))
        for _ in range(3):
            clock.advance(1)
            grants.release_running()
        clock.advance(hold / 3)  # no llama3.2 comes in the gap: the switch goes
        assert grants.models()[1:] == expected
        switches = 0 if r.collator is None else r.collator.switches(a)
        assert switches == (1 if hold else 0)


def test_a_switch_waits_at_most_one_hold_then_the_backend_drains() -> None:
    """
    Requests for the model held keep coming: they are served during the
    hold only.  Once it is over, none more is sent to the backend until the
    switching request has its slot, which it gets as soon as the one
    running ends: no more than one hold, and the request running, beyond
    its turn, however steady the other key's traffic.
    """
    clock = Clock()
    r, grants, switching = switch_due(clock)
    for _ in range(20):
        grants.watch(r.acquire("steady", LLAMA, runs=True))
        clock.advance(0.75)  # each request runs 0.75 s
        grants.release_running()
        if switching.called:
            break
    models = grants.models()
    when = models.index(MISTRAL)
    assert grants.leases[when][0] <= HOLD + 0.75
    # Served meanwhile: the model held, during the hold only.
    assert models[:when] == [LLAMA] * when and when >= 5
    assert all(t <= HOLD for t, _ in grants.leases[:when])


def test_the_switch_due_first_goes_first() -> None:
    """
    A request for a third model whose key is ahead in the fair order comes
    while a switch is held: once the backend has drained, the switch that
    became due first goes, so that its request waits one hold, not two.
    """
    clock = Clock()
    r = collating(clock, one(clock, parallel=2))
    grants = Grants(clock)
    grants.watch(r.acquire("a", LLAMA, runs=True))
    costly = Meter()
    costly.expect(10, "llama3.2")  # b's turns come after c's
    costly.final = StreamSummary(model="llama3.2:latest", prompt_tokens=10)
    grants.watch(r.acquire("b", LLAMA, runs=True, meter=costly))
    for key, model in [("b", MISTRAL), ("a", LLAMA), ("c", QWEN)]:
        grants.watch(r.acquire(key, model, runs=True))
    clock.advance(1)
    grants.release_running()  # the waiting llama3.2 goes: the hold
    clock.advance(HOLD)  # the hold is over: the backend drains
    grants.release_running()
    grants.release_running()
    assert grants.models() == [LLAMA, LLAMA, LLAMA, MISTRAL]
    assert grants.leases[-1][0] == HOLD + 1


def test_one_backend_at_a_time_is_drained_for_a_switch() -> None:
    """
    Two backends run the model they hold, and a request for another comes:
    only one is held and drained for it; the other goes on serving the
    model it holds.
    """
    clock = Clock()
    a = backend(clock, "a", ("llama3.2", "mistral"), ("llama3.2",), parallel=1)
    b = backend(clock, "b", ("llama3.2", "mistral"), ("llama3.2",), parallel=1)
    r = collating(clock, a, b)
    on_a, on_b = now(r.acquire("k", LLAMA, runs=True)), now(r.acquire("k", LLAMA, runs=True))
    assert (on_a.backend, on_b.backend) == (a, b)
    switching = r.acquire("x", MISTRAL, runs=True)
    held = r.acquire("k", LLAMA, runs=True)
    clock.advance(HOLD)
    on_b.release()
    assert now(held).backend is b and not switching.called
    on_a.release()
    assert now(switching).backend is a


def test_a_switch_goes_at_once_when_nothing_wants_the_model_held() -> None:
    """
    A backend that holds a model nobody runs or waits for switches at once,
    and the switch is counted and logged.
    """
    clock = Clock()
    a = one(clock, loaded=("llama3.2",))
    r = collating(clock, a)
    with capturedLogs() as events:
        lease = now(r.acquire("k", MISTRAL, runs=True))
    assert lease.backend is a
    assert r.collator is not None and r.collator.switches(a) == 1
    [line] = [e for e in events if "switches" in e.get("log_format", "")]
    assert (line["old"], line["new"]) == ("llama3.2:latest", "mistral:latest")


def test_a_switch_s_log_line_shows_no_key() -> None:
    """
    A client may paste a key as a model name: the switch's log line blanks
    it with the proxy's redactor (L{Router.redact_with}), though the
    backend has not said which models it has.  A model it lists as not
    had is no switch at all: Ollama answers 404, and nothing is loaded.
    """
    clock = Clock()
    a = one(clock, loaded=("llama3.2",))
    r = collating(clock, a)
    now(r.acquire("k", resolve("not-there"), runs=True)).release()
    assert r.collator is not None and r.collator.switches(a) == 0
    a.models = None
    r.redact_with(lambda text: text.replace("hunter2", "[redacted]"))
    with capturedLogs() as events:
        now(r.acquire("k", resolve("hunter2"), runs=True))
    [line] = [e for e in events if "switches" in e.get("log_format", "")]
    assert line["new"] == "[redacted]:latest"


def test_a_backend_seen_holding_two_models_runs_both_without_a_switch() -> None:
    """
    A backend whose /api/ps listed two models at once takes requests for
    either while both run; a third model is a switch.
    """
    clock = Clock()
    a = one(clock, parallel=4, loaded=("llama3.2", "mistral"))
    r = collating(clock, a)
    now(r.acquire("k", LLAMA, runs=True))
    now(r.acquire("k", MISTRAL, runs=True))
    now(r.acquire("k", LLAMA, runs=True))
    assert r.collator is not None and r.collator.switches(a) == 0
    assert not r.acquire("k", QWEN, runs=True).called


def test_a_drain_ends_when_the_switching_request_leaves() -> None:
    """
    The request a backend drains for leaves the queue: the requests for
    the model held go to it again.
    """
    clock = Clock()
    a = one(clock)
    r = collating(clock, a)
    running = now(r.acquire("a", LLAMA, runs=True))
    switching = r.acquire("b", MISTRAL, runs=True)
    clock.advance(HOLD)  # the hold is over: the backend drains
    held = r.acquire("a", LLAMA, runs=True)
    running.release()
    assert switching.called and not held.called
    now(switching).release()
    clock.advance(HOLD / 3)  # no mistral comes in its gap
    assert held.called
    # And the other way round: a leaver's drain is undone.
    again = r.acquire("b", QWEN, runs=True)
    after = r.acquire("a", LLAMA, runs=True)
    clock.advance(HOLD)
    again.addErrback(lambda _: None)
    again.cancel()
    now(held).release()
    assert after.called


def test_a_client_sending_one_request_at_a_time_keeps_the_model_held() -> None:
    """
    The client of the model held sends its next request within the gap
    (a third of the hold) after each answer: though nothing of its model
    runs or waits meanwhile, the switch waits for it, until the hold from
    when the switch became due runs out; then the backend drains, and the
    switching request goes as soon as the request running ends, within
    one hold and one request of its turn.
    """
    clock = Clock()
    r, grants, switching = switch_due(clock)
    for _ in range(20):
        clock.advance(0.75)  # each request runs 0.75 s
        grants.release_running()
        if switching.called:
            break
        clock.advance(0.5)  # the client reads, then sends the next
        grants.watch(r.acquire("steady", LLAMA, runs=True))
    models = grants.models()
    when = models.index(MISTRAL)
    assert models[:when] == [LLAMA] * when and when >= 4
    assert grants.leases[when][0] <= HOLD + 0.75
    assert r.collator is not None and r.collator.switches(r.backends[0]) == 1


def test_a_gap_with_no_request_lets_the_switch_go() -> None:
    """
    The model held had a request end just now, and no other comes: the
    switch goes once the gap (a third of the hold) is over, not after the
    whole hold.  A model whose last request ended longer ago switches at
    once.
    """
    clock = Clock()
    a = one(clock)
    r = collating(clock, a)
    now(r.acquire("steady", LLAMA, runs=True)).release()
    switching = r.acquire("other", MISTRAL, runs=True)
    clock.advance(HOLD / 3 - 0.1)
    assert not switching.called
    clock.advance(0.1)
    now(switching).release()
    clock.advance(HOLD / 3)
    assert now(r.acquire("steady", LLAMA, runs=True)).backend is a
    assert r.collator is not None and r.collator.switches(a) == 2


def test_a_hold_starts_once_the_model_switched_to_has_loaded() -> None:
    """
    A switch's first request pays the load, which may outlast a hold: a
    switch that becomes due meanwhile has its hold from when that request
    ends, so that the new model's client gets its next turns in the gap
    before the backend switches again; then the switch goes within one
    hold.
    """
    clock = Clock()
    a = one(clock, loaded=("llama3.2",))
    r = collating(clock, a)
    grants = Grants(clock)
    grants.watch(r.acquire("m", MISTRAL, runs=True))  # a switch: mistral loads
    switching = r.acquire("q", QWEN, runs=True)  # due at 0, during the load
    grants.watch(switching)
    clock.advance(2 * HOLD)  # the load and the first answer
    grants.release_running()
    assert not switching.called
    for _ in range(2):
        clock.advance(0.5)
        grants.watch(r.acquire("m", MISTRAL, runs=True))
        clock.advance(1)
        grants.release_running()
    assert grants.models() == [MISTRAL] * 3 and not switching.called
    clock.pump([0.25] * 12)  # no mistral comes: its gap ends, within the hold
    assert switching.called and 2 * HOLD + 1 < grants.leases[-1][0] <= 3 * HOLD


def three_models(clock: Clock, late: float) -> tuple[Router, Grants, Deferred[Lease]]:
    """
    A collating router over L{one} backend, one slot: key C{steady} runs
    llama3.2 and sends its next request before each ends (0.75 s each);
    key C{q}'s request for qwen3 makes a switch due at 0, and key C{m}'s
    for mistral comes at C{late} (a multiple of 0.75), during the hold.  Returned once qwen3's
    switch has gone (its request watched, running), with C{m}'s request.
    """
    r = collating(clock, one(clock))
    grants = Grants(clock)
    grants.watch(r.acquire("steady", LLAMA, runs=True))
    grants.watch(r.acquire("q", QWEN, runs=True))
    third: Deferred[Lease] | None = None
    for _ in range(20):
        if QWEN in grants.models():
            break
        if third is None and clock.seconds() >= late:
            third = r.acquire("m", MISTRAL, runs=True)
            grants.watch(third)
        grants.watch(r.acquire("steady", LLAMA, runs=True))
        clock.advance(0.75)
        grants.release_running()
    assert grants.models()[-1] == QWEN and HOLD <= grants.leases[-1][0] <= HOLD + 0.75
    assert third is not None and not third.called
    return r, grants, third


def test_a_third_model_waits_one_hold_not_two() -> None:
    """
    Three models: a request for a third waits through the hold of the
    switch due before it, which spends the one hold it may be passed over
    for.  So once that switch's model has loaded, the backend holds it no
    longer: it drains at once, and the third model's switch goes as soon
    as the request that paid the load ends, though that model's client
    sends its next request within the gap.  A model served has its whole
    budget again: the hold after mistral has loaded, which passes over
    qwen3 again, lasts the whole hold.
    """
    clock = Clock()
    r, grants, third = three_models(clock, 0.0)
    clock.advance(6)  # qwen3 loads, and answers
    grants.watch(r.acquire("q", QWEN, runs=True))  # its next, in line at once
    loaded = clock.seconds()
    grants.release_running()
    assert third.called and grants.leases[-1][0] == loaded
    assert grants.models()[-1] == MISTRAL
    assert r.collator is not None and r.collator.switches(r.backends[0]) == 2
    clock.advance(6)  # mistral loads, and answers
    loaded = clock.seconds()
    for _ in range(20):
        grants.watch(r.acquire("m", MISTRAL, runs=True))  # always one in line
        grants.release_running()
        if grants.models()[-1] != MISTRAL:
            break
        clock.advance(1)
    assert grants.leases[-1][0] == loaded + HOLD and r.collator.switches(r.backends[0]) == 3


def test_a_third_model_s_hold_left_cuts_the_next_hold() -> None:
    """
    A request for a third model that came during a hold, two seconds
    before its end, has spent two seconds of its one hold: the hold of the
    switch due before it, once that model has loaded, is cut to the three
    seconds it has left (then the drain: the request running ends),
    instead of the whole hold.
    """
    clock = Clock()
    r, grants, third = three_models(clock, HOLD - 2)
    clock.advance(6)  # qwen3 loads, and answers
    loaded = clock.seconds()
    for _ in range(20):
        grants.watch(r.acquire("q", QWEN, runs=True))  # always one in line
        grants.release_running()
        if third.called:
            break
        clock.advance(1)  # each qwen3 request runs 1 s
    assert grants.models()[-1] == MISTRAL
    assert loaded + HOLD - 2 <= grants.leases[-1][0] <= loaded + HOLD - 1
