"""
Tests for L{ollamaproxy.redis.queue}: what the shared fair queue asks
Redis, and what it does with the answers, with a fake client whose
answers the tests give (the scripts themselves run against a real Redis
in L{tests.integration.test_redis_queue}), and a L{Clock}.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.task import Clock
from twisted.web.iweb import IAgent

from ollamaproxy.backends.gauges import RouterGauges
from ollamaproxy.backends.gpu_time import FALLBACK_OUTPUT_SECONDS, FALLBACK_PROMPT_SECONDS
from ollamaproxy.backends.pool import Backend, BackendPool
from ollamaproxy.backends.router import Lease, Router
from ollamaproxy.backends.upstream import Upstream
from ollamaproxy.errors import ProxyError
from ollamaproxy.exchange import Meter, StreamSummary
from ollamaproxy.model_names import resolve
from ollamaproxy.redis import scripts
from ollamaproxy.redis.link import RedisLink
from ollamaproxy.redis.queue import RedisQueue
from tests.fakes.redis import Call, FakeRedis

LLAMA = resolve("llama3.2")
GPU = "http://gpu:11434"


class Listening:
    """
    The subscription the queue asked for: the channel, and what hears it.
    """

    channel = ""
    heard: Callable[[str], None] | None = None
    closed = False

    def __call__(self, channel: str, heard: Callable[[str], None]) -> Listening:
        self.channel, self.heard = channel, heard
        return self

    def close(self) -> Deferred[Any]:
        self.closed = True
        return succeed(None)


class Shared:
    """
    A proxy's router and shared queue on a fake Redis that answered its
    first C{PING}.
    """

    def __init__(self, max_queue: int = 512, fair_share: str = "tokens") -> None:
        self.clock = Clock()
        self.redis = FakeRedis()
        self.link = RedisLink(lambda: self.redis, self.clock, "redis://cache:6379/0", "local",
                              interval=5.0, timeout=1.5)
        self.link.startService()
        self.redis.pings[0].callback("PONG")
        upstream = Upstream(cast(IAgent, None), GPU.encode(), self.clock, 600, 600)
        self.backend = Backend(upstream, 1, models=frozenset({LLAMA}))
        self.router = Router(BackendPool([self.backend]), self.clock, queue_timeout=60,
                             fair_share=fair_share)
        self.listening = Listening()
        self.queue = RedisQueue(self.link, self.router, self.clock, self.listening, 30.0,
                                max_queue, 60)
        self.queue.startService()

    def ask(self, key: str = "k", meter: Meter | None = None, output: int = 0) -> Deferred[Lease]:
        return self.router.acquire(key, LLAMA, runs=True, meter=meter, expected_output=output)

    def last(self, script: str) -> Call:
        """
        The last call of C{script}.
        """
        return [c for c in self.redis.calls if c.script == script][-1]

    def ticket(self) -> str:
        ticket: str = self.last(scripts.ACQUIRE).args[5]
        return ticket

    def running(self) -> list[Lease]:
        """
        Ask, and Redis answers the ACQUIRE with the slot: the lease, in a
        list.
        """
        got = results(self.ask())
        self.last(scripts.ACQUIRE).answer.callback([self.ticket(), GPU])
        return got

    def waiting(self) -> list[Lease]:
        """
        Ask, and Redis answers the ACQUIRE with no grant: the request is in
        line, its list empty until its lease comes.
        """
        got = results(self.ask())
        self.last(scripts.ACQUIRE).answer.callback([])
        return got

    def in_line(self) -> tuple[Deferred[Lease], list[Any]]:
        """
        Ask, and Redis answers the ACQUIRE with no grant: the request's
        Deferred, and the list its failure goes to.
        """
        waiting = self.ask()
        self.last(scripts.ACQUIRE).answer.callback([])
        failures: list[Any] = []
        waiting.addErrback(failures.append)
        return waiting, failures

    def go_down(self) -> None:
        """
        A call fails: the link finds Redis down.
        """
        self.link.call("return 1", [], []).addErrback(lambda _: None)
        self.redis.calls[-1].answer.errback(ConnectionError("Lost connection"))
        assert not self.link.up


def results(d: Deferred[Lease]) -> list[Lease]:
    got: list[Lease] = []
    d.addCallback(got.append)
    return got


def test_an_unqueued_request_costs_two_round_trips() -> None:
    """
    A request given a slot at once costs one ACQUIRE, whose answer grants
    it, and one DONE at release: two round trips.  The ACQUIRE says who
    asks, for what, on which backend with which parallel, at what cost.
    """
    shared = Shared()
    got = results(shared.ask("alice"))
    (acquire,) = shared.redis.calls
    assert acquire.script == scripts.ACQUIRE
    assert acquire.args[:5] == ["ollamaproxy:", 0, 30000, shared.link.instance, 60000]
    assert acquire.args[6:] == ["alice", "", "llama3.2:latest", f"{GPU}\t1\n", "1.0", "1", "",
                                512]
    acquire.answer.callback([shared.ticket(), GPU])
    assert got[0].backend is shared.backend and shared.backend.in_flight == 1
    got[0].release()
    assert shared.backend.in_flight == 0
    assert [c.script for c in shared.redis.calls] == [scripts.ACQUIRE, scripts.DONE]
    assert shared.redis.calls[1].args[5:] == [shared.ticket(), "alice", "0.0", "", "0.0"]


def test_a_queued_request_costs_two_round_trips() -> None:
    """
    A request that waits costs the same two round trips: its grant comes
    as a message on the proxy's channel, not by asking.
    """
    shared = Shared()
    assert shared.listening.channel == f"ollamaproxy:q:grants:{shared.link.instance}"
    got = shared.waiting()
    assert got == [] and shared.backend.in_flight == 0
    assert shared.listening.heard is not None
    shared.listening.heard(f"{shared.ticket()}\n{GPU}")
    assert len(got) == 1 and shared.backend.in_flight == 1
    got[0].release()
    assert [c.script for c in shared.redis.calls] == [scripts.ACQUIRE, scripts.DONE]


def test_the_true_up_goes_to_redis() -> None:
    """
    Under --fair-share tokens, the ACQUIRE charges the estimate (prompt
    plus twice the output asked for); the DONE trues it up with what the
    meter read, over the key's weight.
    """
    shared = Shared()
    meter = Meter()
    meter.expect(20, "llama3.2")
    got = results(shared.router.acquire("k", LLAMA, runs=True, meter=meter,
                                        expected_output=500, weight=2))
    assert shared.last(scripts.ACQUIRE).args[10:12] == ["1020.0", "2"]
    shared.redis.calls[0].answer.callback([shared.ticket(), GPU])
    meter.generating, meter.output = True, 7
    got[0].release()
    assert shared.last(scripts.DONE).args[7] == repr((20 + 2 * 7 - 1020) / 2)


def test_gpu_seconds_go_to_redis() -> None:
    """
    Under --fair-share gpu-time, the ACQUIRE charges the estimate in
    seconds and the DONE trues it up with the seconds Ollama reported,
    over the key's weight and for the user before it: floats, written as
    Python writes them, which Redis's Lua reads with C{tonumber}.
    """
    shared = Shared(fair_share="gpu-time")
    meter = Meter()
    meter.expect(20, "llama3.2")
    got = results(shared.router.acquire("k", LLAMA, runs=True, meter=meter,
                                        expected_output=500, weight=2, user="ann"))
    estimate = 20 * FALLBACK_PROMPT_SECONDS + 500 * FALLBACK_OUTPUT_SECONDS
    assert shared.last(scripts.ACQUIRE).args[10:12] == [repr(estimate), "2"]
    shared.redis.calls[0].answer.callback([shared.ticket(), GPU])
    meter.generating = True
    meter.final = StreamSummary("llama3.2:latest", prompt_tokens=20, completion_tokens=7,
                                prompt_seconds=0.125, eval_seconds=0.25)
    got[0].release()
    assert shared.last(scripts.DONE).args[7:] == [
        repr((0.375 - estimate) / 2), "@ann", repr(0.375 - estimate)]


def test_grants_of_other_tickets_in_an_answer() -> None:
    """
    A script's answer may grant several of this proxy's tickets at once
    (a DONE freeing a slot that one waiting here gets): each gets its slot.
    """
    shared = Shared()
    first = shared.running()
    second = shared.waiting()
    waiting_ticket = shared.ticket()
    first[0].release()
    shared.last(scripts.DONE).answer.callback([waiting_ticket, GPU])
    assert len(second) == 1


def test_leaving_the_line_tells_redis() -> None:
    """
    A waiting request cancelled (its client left) sends a DONE that gives
    its cost back should it have been granted meanwhile; a grant heard for
    it afterwards is ignored (that DONE freed the slot).
    """
    shared = Shared()
    waiting, failures = shared.in_line()
    waiting.cancel()
    assert failures[0].check(CancelledError)
    done = shared.last(scripts.DONE)
    assert done.args[5:] == [shared.ticket(), "k", "-1.0", "", "-1.0"]
    assert shared.listening.heard is not None
    shared.listening.heard(f"{shared.ticket()}\n{GPU}")
    assert shared.backend.in_flight == 0


def test_a_request_waits_no_longer_than_the_timeout() -> None:
    """
    A request still waiting after the queue's timeout gets the 503 with
    Retry-After, and leaves Redis's line.
    """
    shared = Shared()
    _, failures = shared.in_line()
    shared.clock.advance(60)
    error = failures[0].value
    assert isinstance(error, ProxyError)
    assert (error.code, error.outcome) == (503, "queue_timeout")
    assert error.headers == {b"Retry-After": b"60"}
    assert shared.last(scripts.DONE).args[5] == shared.ticket()


def test_max_queue_is_counted_in_redis() -> None:
    """
    --max-queue goes with each ACQUIRE, for Redis to count every proxy's
    waiting requests: one waiting here does not refuse the next at once
    with --max-queue 1; Redis's answer C{!MS} refuses it, with the 503
    and the Retry-After Redis reckoned, and no DONE (it is not in line).
    """
    shared = Shared(max_queue=1)
    shared.ask()
    shared.redis.calls[0].answer.callback([])
    refused = shared.ask()
    acquire = shared.last(scripts.ACQUIRE)
    assert acquire.args[-1] == 1 and len(shared.redis.calls) == 2
    failures: list[Any] = []
    refused.addErrback(failures.append)
    acquire.answer.callback([shared.ticket(), "!2400"])
    error = failures[0].value
    assert isinstance(error, ProxyError)
    assert (error.code, error.outcome) == (503, "queue_full")
    assert error.headers == {b"Retry-After": b"3"}
    assert shared.queue.waiting() == {"k": 1}
    assert len(shared.redis.calls) == 2


def test_a_displaced_request_hears_its_503() -> None:
    """
    A request waiting here whose place a newcomer on another proxy took
    hears so on this proxy's channel (C{TICKET<LF>!MS}): its client gets
    the 503 with the Retry-After Redis reckoned, and it no longer waits.
    """
    shared = Shared()
    _, failures = shared.in_line()
    assert shared.listening.heard is not None
    shared.listening.heard(f"{shared.ticket()}\n!60000")
    error = failures[0].value
    assert isinstance(error, ProxyError)
    assert (error.code, error.outcome) == (503, "queue_full")
    assert error.headers == {b"Retry-After": b"60"}
    assert shared.queue.waiting() == {}
    assert [c.script for c in shared.redis.calls] == [scripts.ACQUIRE]


def test_users_and_their_charges_go_to_redis() -> None:
    """
    A request for a user behind its key names the user in its ACQUIRE
    (C{@NAME}; C{@} for the key's anonymous user); its DONE trues up the
    user's finish by the charge before the key's weight, the key's after:
    still two round trips.
    """
    shared = Shared()
    meter = Meter()
    meter.expect(20, "llama3.2")
    got = results(shared.router.acquire("k", LLAMA, runs=True, meter=meter,
                                        expected_output=500, weight=2, user="ann"))
    assert shared.last(scripts.ACQUIRE).args[6:8] == ["k", "@ann"]
    shared.redis.calls[0].answer.callback([shared.ticket(), GPU])
    meter.generating, meter.output = True, 7
    got[0].release()
    assert shared.last(scripts.DONE).args[7:] == [
        repr((20 + 2 * 7 - 1020) / 2), "@ann", repr(20.0 + 2 * 7 - 1020)]
    assert [c.script for c in shared.redis.calls] == [scripts.ACQUIRE, scripts.DONE]
    shared.router.acquire("k", LLAMA, runs=True, user="")
    assert shared.last(scripts.ACQUIRE).args[7] == "@"


def test_a_lowered_effective_parallel_goes_to_redis() -> None:
    """
    A backend whose effective parallel for the model is lowered on this
    proxy is named with the lower limit in the ACQUIRE, for Redis to hold
    every proxy to it; one not lowered names none.
    """
    shared = Shared()
    shared.backend.parallel = 4
    shared.backend.effective[LLAMA] = 2
    shared.ask()
    assert shared.last(scripts.ACQUIRE).args[9:] == [
        f"{GPU}\t4\n", "1.0", "1", f"{GPU}\t2\n", 512]


def test_redis_down_the_queue_is_this_proxys() -> None:
    """
    With Redis known to be down, a request is given its slot by this
    process's queue, without a call; the next one waits there, and gets
    the slot when the first is released.
    """
    shared = Shared()
    shared.go_down()
    calls = len(shared.redis.calls)
    first = results(shared.ask())
    second = results(shared.ask())
    assert len(first) == 1 and second == [] and len(shared.router.queue) == 1
    first[0].release()
    assert len(second) == 1
    assert len(shared.redis.calls) == calls


def test_waiting_requests_move_here_when_redis_goes_down() -> None:
    """
    A request waiting in Redis when Redis goes down waits in this
    process's queue instead, and is served there.
    """
    shared = Shared()
    running = shared.running()
    waiting = shared.waiting()
    shared.go_down()
    assert len(shared.router.queue) == 1
    running[0].release()
    assert len(waiting) == 1 and shared.backend.in_flight == 1


def test_a_failed_acquire_waits_here() -> None:
    """
    An ACQUIRE that fails (Redis went down as it was asked) leaves the
    request to this process's queue, which gives it the free slot.
    """
    shared = Shared()
    got = results(shared.ask())
    shared.redis.calls[0].answer.errback(ConnectionError("Lost connection"))
    assert len(got) == 1 and shared.backend.in_flight == 1


def test_a_lease_granted_by_redis_released_while_it_is_down() -> None:
    """
    A request that Redis granted, released while Redis is down: the
    backend's count goes back to 0 (not below), nothing fails, and the
    slot is free for this process's queue.
    """
    shared = Shared()
    got = shared.running()
    shared.go_down()
    got[0].release()
    got[0].release()
    assert shared.backend.in_flight == 0 and not shared.backend.running
    assert len(results(shared.ask())) == 1


def test_the_round_renews_and_recovers() -> None:
    """
    Each round renews this proxy's waiting tickets and running leases; a
    waiting ticket the answer says was granted (its message was lost) gets
    its slot, and one Redis forgot is put in line again.
    """
    shared = Shared()
    running = shared.running()
    held = shared.ticket()
    lost = shared.waiting()
    lost_ticket = shared.ticket()
    forgotten = shared.waiting()
    forgotten_ticket = shared.ticket()
    shared.queue.renew()
    renew = shared.last(scripts.RENEW_QUEUE)
    assert renew.args[5:] == [2, lost_ticket, forgotten_ticket, held, f"{GPU}\nllama3.2:latest"]
    renew.answer.callback([[lost_ticket, GPU, forgotten_ticket, ""], []])
    assert len(lost) == 1 and forgotten == [] and len(running) == 1
    assert shared.ticket() == forgotten_ticket


def test_the_round_finds_a_refusal_whose_message_was_lost() -> None:
    """
    A waiting ticket the round's answer says was refused (displaced from a
    full queue: C{!MS}, its message lost) gets the 503, not a new ACQUIRE.
    """
    shared = Shared()
    _, failures = shared.in_line()
    shared.queue.renew()
    shared.last(scripts.RENEW_QUEUE).answer.callback([[shared.ticket(), "!5000"], []])
    assert failures[0].value.headers == {b"Retry-After": b"5"}
    assert [c.script for c in shared.redis.calls] == [scripts.ACQUIRE, scripts.RENEW_QUEUE]


def test_the_subscription_ends_with_the_service() -> None:
    """
    Stopping the queue closes its subscription.
    """
    shared = Shared()
    shared.queue.stopService()
    assert shared.listening.closed


def test_requests_waiting_in_redis_show_in_the_metric() -> None:
    """
    C{ollamaproxy_queue_waiting} counts this proxy's requests waiting in
    Redis, by key, and not once they have their slot.
    """
    shared = Shared()
    gauges = RouterGauges(shared.router)

    def shown() -> dict[str, float]:
        (family,) = [m for m in gauges.collect() if m.name == "ollamaproxy_queue_waiting"]
        return {s.labels["key"]: s.value for s in family.samples if s.value}

    shared.ask("alice")
    shared.redis.calls[0].answer.callback([])
    shared.ask("alice")
    shared.ask("bob")
    assert shown() == {"alice": 2.0, "bob": 1.0}
    assert shared.listening.heard is not None
    shared.listening.heard(f"{shared.redis.calls[0].args[5]}\n{GPU}")
    assert shown() == {"alice": 1.0, "bob": 1.0}
