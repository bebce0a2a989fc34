"""
The shared fair queue's Lua scripts (L{ollamaproxy.redis.queue}) against a
real Redis, through the real client and the real subscriber connection:
two proxies' routers in this process, each with its own link and queue, in
front of one backend with C{parallel} 1.  The queues' time is a L{Clock}
each test moves, so that leases expire without waiting.
"""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Any, cast

import pytest
import pytest_twisted
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure

from ollamaproxy.backends.gpu_time import FALLBACK_OUTPUT_SECONDS, FALLBACK_PROMPT_SECONDS
from ollamaproxy.backends.pool import BackendPool
from ollamaproxy.backends.router import Lease, Router
from ollamaproxy.errors import ProxyError
from ollamaproxy.exchange import Meter, StreamSummary
from ollamaproxy.model_names import resolve
from ollamaproxy.redis.limits import PREFIX
from ollamaproxy.redis.link import RedisLink, TxRedisClient, subscriber
from ollamaproxy.redis.queue import RedisQueue
from ollamaproxy.redis_address import parse_redis_url
from tests.fakes.client import sleep, wait_for, wait_for_call
from tests.fakes.engines import RedisServer, redis_server
from tests.fakes.engines import redis_server_binary as redis_binary
from tests.fakes.routers import LLAMA, backend

__all__ = ["redis_server"]

LEASE = 30.0


class Proxy:
    """
    What one proxy has of the shared queue: a router in front of the one
    backend (at the same URL as every other proxy's), its link and queue.
    """

    def __init__(self, reactor: Any, url: str, start: float, max_queue: int = 512,
                 fair_share: str = "tokens") -> None:
        address = parse_redis_url(url)
        self.clock = Clock()
        self.clock.advance(start)
        self.backend = backend(self.clock, "gpu:11434", ("llama3.2",), parallel=1)
        # Under --fair-share tokens unless asked; a request without a meter
        # costs 1.
        self.router = Router(BackendPool([self.backend]), self.clock, queue_timeout=600,
                             fair_share=fair_share)
        self.link = RedisLink(lambda: TxRedisClient(address, reactor, 1.5), reactor,
                              address.shown, "local", interval=3600)
        self.queue = RedisQueue(self.link, self.router, self.clock, subscriber(address, reactor),
                                LEASE, max_queue, queue_timeout=600)

    def ask(self, key: str, user: str | None = None) -> Deferred[Lease]:
        """
        A lease of the backend for a request of C{key} (and C{user}).
        """
        return self.router.acquire(key, LLAMA, runs=True, user=user)


@pytest_twisted.async_yield_fixture
async def pair(reactor: Any, redis_server: RedisServer) -> AsyncIterator[list[Proxy]]:
    """
    Two proxies sharing one Redis, connected and listening.
    """
    async for made in proxies(reactor, redis_server, 512):
        yield made


@pytest_twisted.async_yield_fixture
async def small(reactor: Any, redis_server: RedisServer) -> AsyncIterator[list[Proxy]]:
    """
    Two proxies sharing one Redis, with --max-queue 3.
    """
    async for made in proxies(reactor, redis_server, 3):
        yield made


@pytest_twisted.async_yield_fixture
async def gpu_pair(reactor: Any, redis_server: RedisServer) -> AsyncIterator[list[Proxy]]:
    """
    Two proxies sharing one Redis, under --fair-share gpu-time.
    """
    async for made in proxies(reactor, redis_server, 512, "gpu-time"):
        yield made


async def proxies(
    reactor: Any, redis_server: RedisServer, max_queue: int, fair_share: str = "tokens"
) -> AsyncIterator[list[Proxy]]:
    start = float(int(reactor.seconds()))
    made = [Proxy(reactor, redis_server.url, start, max_queue, fair_share) for _ in range(2)]
    for proxy in made:
        proxy.link.startService()
        proxy.queue.startService()
    await wait_for(reactor, lambda: all(p.link.up for p in made))
    # The subscriber has its own connection: a PUBLISH reaches it once
    # Redis counts it.
    channels = [p.queue.channel for p in made]
    await until_answer(reactor, made[0].link, channels)
    yield made
    for proxy in made:
        await maybeDeferred(proxy.queue.stopService)
        await maybeDeferred(proxy.link.stopService)


async def until_answer(reactor: Any, link: RedisLink, channels: list[str]) -> None:
    """
    Wait until each of C{channels} has its one subscriber.
    """
    async def subscribed() -> bool:
        counts = await link.call(
            "return redis.call('PUBSUB', 'NUMSUB', unpack(KEYS))", channels, [])
        return all(int(n) == 1 for n in counts[1::2])

    await wait_for_call(reactor, subscribed, "the subscribers to subscribe")


async def redis_count(link: RedisLink, name: str) -> int:
    """
    How many members the sorted set C{q:NAME} has.
    """
    n = await link.call("return redis.call('ZCARD', KEYS[1])", [f"{PREFIX}q:{name}"], [])
    return int(n)


def results(d: Deferred[Lease]) -> list[Lease]:
    """
    The lease C{d} gives, once it has.
    """
    got: list[Lease] = []
    d.addCallback(got.append)
    return got


@pytest_twisted.ensureDeferred
async def test_one_slot_for_both_proxies(reactor: Any, pair: list[Proxy]) -> None:
    """
    With parallel 1, a request on proxy A runs; one on proxy B waits,
    though B's own backend count is 0; A's release gives B the slot at
    once, by the message Redis publishes, with no call of B's.
    """
    a, b = pair
    first = await a.ask("k1")
    waiting = results(b.ask("k2"))
    await wait_for(reactor, lambda: b.link.up)
    await sleep(reactor, 0.1)
    assert waiting == [] and b.backend.in_flight == 0
    assert await redis_count(a.link, "waiters") == 1
    first.release()
    await wait_for(reactor, lambda: waiting != [])
    assert waiting[0].backend is b.backend and b.backend.in_flight == 1
    assert await redis_count(a.link, "waiters") == 0
    waiting[0].release()


@pytest_twisted.ensureDeferred
async def test_order_is_global(reactor: Any, pair: list[Proxy]) -> None:
    """
    A key flooding proxy A with five requests, and a key sending one to
    proxy B after them: B's request gets the next slot freed, not the
    flood's second.
    """
    a, b = pair
    running = await a.ask("flood")
    flood = [results(a.ask("flood")) for _ in range(4)]
    await sleep(reactor, 0.1)
    solo = results(b.ask("solo"))
    await sleep(reactor, 0.1)
    running.release()
    await wait_for(reactor, lambda: solo != [])
    assert [len(f) for f in flood] == [0, 0, 0, 0]
    solo[0].release()
    await wait_for(reactor, lambda: flood[0] != [])
    assert [len(f) for f in flood] == [1, 0, 0, 0]
    flood[0][0].release()
    await wait_for(reactor, lambda: flood[1] != [])
    for d in flood[1:]:
        await wait_for(reactor, lambda d=d: d != [])  # type: ignore[misc]
        d[0].release()


@pytest_twisted.ensureDeferred
async def test_dead_proxy_frees_its_slot(reactor: Any, pair: list[Proxy]) -> None:
    """
    A proxy that stops renewing (it died) holding the slot: B's request
    waits until the lease has passed, when B's next round sweeps it and
    gives B the slot.
    """
    a, b = pair
    await a.ask("k1")  # never released: A dies
    waiting = results(b.ask("k2"))
    await sleep(reactor, 0.1)
    b.clock.advance(LEASE - 1)
    await b.queue.renew()
    assert waiting == []
    b.clock.advance(2)
    await b.queue.renew()
    assert len(waiting) == 1
    waiting[0].release()


@pytest_twisted.ensureDeferred
async def test_leaving_the_line(reactor: Any, pair: list[Proxy]) -> None:
    """
    A waiting request cancelled (its client left) is no longer waiting in
    Redis, and the next freed slot goes to the one after it.
    """
    a, b = pair
    first = await a.ask("k1")
    left = b.ask("k2")
    left.addErrback(lambda f: f.trap(CancelledError))
    after = results(b.ask("k3"))
    await sleep(reactor, 0.1)
    assert await redis_count(a.link, "waiters") == 2
    left.cancel()
    await sleep(reactor, 0.1)
    assert await redis_count(a.link, "waiters") == 1
    first.release()
    await wait_for(reactor, lambda: after != [])
    after[0].release()
    await sleep(reactor, 0.1)
    held = await a.link.call("return redis.call('HLEN', KEYS[1])", [f"{PREFIX}q:granted"], [])
    assert held == 0


@pytest_twisted.ensureDeferred
async def test_a_refused_subscription_is_logged(
    reactor: Any, redis_server: RedisServer
) -> None:
    """
    A Redis user not allowed the queue's channel: the subscriber logs one
    warning that grants will wait for the rounds, rather than nothing.
    """
    cli = str(redis_binary().with_name("redis-cli"))
    subprocess.run([cli, "-p", str(redis_server.port), "ACL", "SETUSER", "shut", "on", ">pw",
                    "~*", "resetchannels", "+@all"], check=True, capture_output=True)
    address = parse_redis_url(f"redis://shut:pw@127.0.0.1:{redis_server.port}/0")
    with capturedLogs() as events:
        subscription = subscriber(address, reactor)("ollamaproxy:q:grants:x", lambda _: None)
        try:
            await wait_for(reactor, lambda: any("refused" in formatEvent(e) for e in events))
        finally:
            await subscription.close()
    (said,) = [formatEvent(e) for e in events if "refused" in formatEvent(e)]
    assert "ollamaproxy:q:grants:x" in said and "NOPERM" in said


async def until_moved(
    reactor: Any, read: Callable[[], Awaitable[float]], before: object
) -> None:
    """
    Wait (bounded) until what C{read} gives is no longer C{before}: the
    true-up written, once the slot is given back.
    """
    async def moved() -> bool:
        return await read() != before

    await wait_for_call(reactor, moved, "the true-up")


async def finish_of(link: RedisLink, key: str) -> float:
    """
    C{key}'s virtual finish, as Redis keeps it.
    """
    value = await link.call("return redis.call('HGET', KEYS[1], ARGV[1])",
                            [f"{PREFIX}q:finish"], [key])
    return float(value)


@pytest_twisted.ensureDeferred
async def test_tokens_charged_and_trued_up_in_redis(reactor: Any, pair: list[Proxy]) -> None:
    """
    Under --fair-share tokens, a key's finish in Redis moves on by the
    estimate over its weight when its request gets the slot, and by the
    difference from what the meter read when the slot is given back.
    """
    a, _ = pair
    meter = Meter()
    meter.expect(20, "llama3.2")
    lease = await a.router.acquire("tok", LLAMA, runs=True, meter=meter, expected_output=500,
                                   weight=2)
    assert await finish_of(a.link, "tok") == (20 + 2 * 500) / 2
    meter.generating, meter.output = True, 7
    lease.release()
    await until_moved(reactor, partial(finish_of, a.link, "tok"), (20 + 2 * 500) / 2)
    assert await finish_of(a.link, "tok") == (20 + 2 * 7) / 2


@pytest_twisted.ensureDeferred
async def test_gpu_seconds_charged_and_trued_up_in_redis(
    reactor: Any, gpu_pair: list[Proxy]
) -> None:
    """
    Under --fair-share gpu-time, a key's finish in Redis moves on by the
    estimate in seconds over its weight, and is trued up with the seconds
    Ollama reported: fractions of a second, kept as Redis's Lua writes
    numbers, with no rounding to whole tokens.
    """
    a, _ = gpu_pair
    meter = Meter()
    meter.expect(20, "llama3.2")
    lease = await a.router.acquire("gpu", LLAMA, runs=True, meter=meter, expected_output=5,
                                   weight=2)
    estimate = 20 * FALLBACK_PROMPT_SECONDS + 5 * FALLBACK_OUTPUT_SECONDS
    assert await finish_of(a.link, "gpu") == pytest.approx(estimate / 2)
    meter.generating = True
    meter.final = StreamSummary("llama3.2:latest", prompt_tokens=20, completion_tokens=5,
                                prompt_seconds=0.0123, eval_seconds=0.0456)
    lease.release()
    await until_moved(reactor, partial(finish_of, a.link, "gpu"), pytest.approx(estimate / 2))
    assert await finish_of(a.link, "gpu") == pytest.approx((0.0123 + 0.0456) / 2)


@pytest_twisted.ensureDeferred
async def test_dead_proxys_waiter_is_swept(reactor: Any, pair: list[Proxy]) -> None:
    """
    A proxy that dies with a request waiting leaves it in Redis only until
    its lease has passed: the slot freed after that goes to a live
    proxy's request that came later.
    """
    a, b = pair
    running = await b.ask("k1")
    dead = a.ask("k2")  # A dies: it renews nothing from now on
    dead.addErrback(lambda _: None)
    await sleep(reactor, 0.1)
    live = results(b.ask("k3"))
    await sleep(reactor, 0.1)
    assert await redis_count(b.link, "waiters") == 2
    b.clock.advance(LEASE / 2)
    await b.queue.renew()
    b.clock.advance(LEASE / 2 + 1)
    await b.queue.renew()
    assert await redis_count(b.link, "waiters") == 1
    running.release()
    await wait_for(reactor, lambda: live != [])
    assert a.backend.in_flight == 0
    live[0].release()


@pytest_twisted.ensureDeferred
async def test_a_free_model_is_not_held_up_by_a_busy_one(
    reactor: Any, pair: list[Proxy]
) -> None:
    """
    Requests waiting for a busy model do not hold up a request for a model
    with a free slot: it runs at once, whatever its turn; and the busy
    model's next slot goes to its first waiter.
    """
    a, b = pair
    mistral = resolve("mistral")
    a.backend.models = b.backend.models = frozenset({LLAMA, mistral})
    running = await a.ask("k1")
    busy = results(b.ask("k2"))
    await sleep(reactor, 0.1)
    other = await b.router.acquire("k2", mistral, runs=True)
    assert other.model == mistral and busy == []
    running.release()
    await wait_for(reactor, lambda: busy != [])
    other.release()
    busy[0].release()


async def until_waiting(reactor: Any, link: RedisLink, n: int) -> None:
    """
    Wait (bounded) until C{n} requests wait in Redis.
    """
    async def waiting() -> bool:
        return await redis_count(link, "waiters") == n

    await wait_for_call(reactor, waiting, f"{n} waiting")


def refusals(d: Deferred[Lease]) -> list[ProxyError]:
    """
    The 503s C{d} fails with, as they come.
    """
    got: list[ProxyError] = []

    def refused(failure: Failure) -> None:
        failure.trap(ProxyError)
        got.append(cast(ProxyError, failure.value))

    d.addErrback(refused)
    return got


@pytest_twisted.ensureDeferred
async def test_users_behind_a_key_share_its_turns(reactor: Any, pair: list[Proxy]) -> None:
    """
    One user of a key floods proxy A; another user of the same key sends
    one request to proxy B after them: B's user gets the key's next slot
    (its start in the key's own time is first), not the flood's second.
    """
    a, b = pair
    running = await a.ask("team", "ann")
    flood = [results(a.ask("team", "ann")) for _ in range(3)]
    await until_waiting(reactor, a.link, 3)
    solo = results(b.ask("team", "bob"))
    await until_waiting(reactor, a.link, 4)
    running.release()
    await wait_for(reactor, lambda: solo != [])
    assert [len(f) for f in flood] == [0, 0, 0]
    solo[0].release()
    for d in flood:
        await wait_for(reactor, lambda d=d: d != [])  # type: ignore[misc]
        d[0].release()


@pytest_twisted.ensureDeferred
async def test_the_waiting_room_is_fair_across_proxies(
    reactor: Any, small: list[Proxy]
) -> None:
    """
    With --max-queue 3 full of one key's requests on proxy A, a request of
    another key on proxy B takes the place of the flood's newest, whose
    client gets the 503 (told on A's channel; Retry-After the timeout, no
    pace being measured yet); a third key's takes the next; when every key
    holds one place, a fourth key's newcomer is refused.
    """
    a, b = small
    running = await a.ask("flood")
    flood = [a.ask("flood") for _ in range(3)]
    refused = [refusals(d) for d in flood]
    await until_waiting(reactor, a.link, 3)
    solo = results(b.ask("solo"))
    await wait_for(reactor, lambda: refused[2] != [])
    assert (refused[2][0].code, refused[2][0].outcome) == (503, "queue_full")
    assert refused[2][0].headers == {b"Retry-After": b"600"}
    third = results(b.ask("third"))
    await wait_for(reactor, lambda: refused[1] != [])
    fourth = refusals(b.ask("fourth"))
    await wait_for(reactor, lambda: fourth != [])
    assert fourth[0].outcome == "queue_full" and refused[0] == []
    assert await redis_count(a.link, "waiters") == 3
    assert a.queue.waiting() == {"flood": 1} and b.queue.waiting() == {"solo": 1, "third": 1}
    running.release()
    await wait_for(reactor, lambda: solo != [])
    assert third == []
    solo[0].release()
    await wait_for(reactor, lambda: third != [])
    third[0].release()


@pytest_twisted.ensureDeferred
async def test_the_waiting_room_among_a_keys_users(reactor: Any, small: list[Proxy]) -> None:
    """
    A full queue held by one key's users (two of Ann's, one of Bob's): a
    new user of that key takes the place of Ann's newest; then Bob, who
    would hold two places against everyone's one, is refused.
    """
    a, b = small
    running = await a.ask("team", "ann")
    ann = [refusals(a.ask("team", "ann")) for _ in range(2)]
    bob = results(b.ask("team", "bob"))
    await until_waiting(reactor, a.link, 3)
    carol = results(b.ask("team", "carol"))
    await wait_for(reactor, lambda: ann[1] != [])
    assert ann[1][0].outcome == "queue_full" and ann[0] == []
    again = refusals(a.ask("team", "bob"))
    await wait_for(reactor, lambda: again != [])
    assert again[0].outcome == "queue_full"
    assert await redis_count(a.link, "waiters") == 3
    running.release()
    await wait_for(reactor, lambda: bob != [])
    bob[0].release()
    await wait_for(reactor, lambda: carol != [])
    carol[0].release()


@pytest_twisted.ensureDeferred
async def test_retry_after_from_the_pace_in_redis(reactor: Any, small: list[Proxy]) -> None:
    """
    Slots of the model freed 4 s apart while requests wait make its pace
    4 s, kept in Redis: a request displaced from a full queue then gets a
    Retry-After of the requests waiting for its kind of slot and itself
    (3) times 4 s, though the release and the refusal were on different
    proxies.
    """
    a, b = small
    running = await a.ask("k1")
    served = [results(a.ask(key)) for key in ("k2", "k3", "k4")]
    await until_waiting(reactor, a.link, 3)
    for i in range(2):
        a.clock.advance(4)
        (running if i == 0 else served[0][0]).release()
        await wait_for(reactor, lambda i=i: served[i] != [])  # type: ignore[misc]
    crowd = [refusals(b.ask("k5")) for _ in range(2)]
    await until_waiting(reactor, a.link, 3)
    b.ask("k6").addErrback(lambda _: None)
    await wait_for(reactor, lambda: crowd[1] != [])
    assert crowd[1][0].headers == {b"Retry-After": b"12"}
    served[1][0].release()


@pytest_twisted.ensureDeferred
async def test_a_lowered_effective_parallel_holds_for_every_proxy(
    reactor: Any, pair: list[Proxy]
) -> None:
    """
    A backend of parallel 2 whose effective parallel for the model proxy A
    lowered to 1: a request on proxy B, which sees 2, waits while A's
    runs, and gets A's slot when it ends.  A's lowering expires with its
    lease: after it, B's next request runs beside its first.
    """
    a, b = pair
    a.backend.parallel = b.backend.parallel = 2
    a.backend.effective[LLAMA] = 1
    first = await a.ask("k1")
    second = results(b.ask("k2"))
    await until_waiting(reactor, a.link, 1)
    assert second == []
    first.release()
    await wait_for(reactor, lambda: second != [])
    b.clock.advance(LEASE + 1)
    await b.queue.renew()
    third = results(b.ask("k3"))
    await wait_for(reactor, lambda: third != [])
    assert b.backend.in_flight == 2
    second[0].release()
    third[0].release()


@pytest_twisted.ensureDeferred
async def test_a_users_charge_and_true_up_in_redis(reactor: Any, pair: list[Proxy]) -> None:
    """
    A request of a user behind a key moves the user's finish in the key's
    own time by its estimate before the key's weight when it gets the
    slot, and by the difference from what the meter read at release.
    """
    a, _ = pair
    meter = Meter()
    meter.expect(20, "llama3.2")
    lease = await a.router.acquire("team", LLAMA, runs=True, meter=meter, expected_output=500,
                                   weight=2, user="ann")

    async def ann() -> float:
        value = await a.link.call("return redis.call('HGET', KEYS[1], ARGV[1])",
                                  [f"{PREFIX}q:u:team"], ["@ann"])
        return float(value)

    assert await ann() == 20 + 2 * 500
    meter.generating, meter.output = True, 7
    lease.release()
    await until_moved(reactor, ann, 20 + 2 * 500)
    assert await ann() == 20 + 2 * 7


@pytest_twisted.ensureDeferred
async def test_a_raised_effective_parallel_clears_the_lowering(
    reactor: Any, pair: list[Proxy]
) -> None:
    """
    Proxy A's lowering to 1 of a backend of parallel 2 is gone from Redis
    with A's next request once A no longer has it lowered: B's request
    then runs beside A's, before any lease has passed.
    """
    a, b = pair
    a.backend.parallel = b.backend.parallel = 2
    a.backend.effective[LLAMA] = 1
    first = await a.ask("k1")
    first.release()
    del a.backend.effective[LLAMA]
    second = await a.ask("k2")
    third = results(b.ask("k3"))
    await wait_for(reactor, lambda: third != [])
    second.release()
    third[0].release()


@pytest_twisted.ensureDeferred
async def test_a_ticket_with_no_request_is_passed_over(reactor: Any, pair: list[Proxy]) -> None:
    """
    A ticket left in a user's line whose request is gone (a proxy of the
    version before users took it out of line, leaving the line as it
    was) does not stop the pass: it is dropped, and the request after it
    gets the slot.
    """
    a, b = pair
    running = await a.ask("k1")
    waiting = results(b.ask("k2"))
    await until_waiting(reactor, a.link, 1)
    await a.link.call("redis.call('ZADD', KEYS[1], 0, 'gone'); return 0",
                      [f"{PREFIX}q:kwu:k2\n"], [])
    running.release()
    await wait_for(reactor, lambda: waiting != [])
    assert await redis_count(a.link, "kwu:k2\n") == 0
    waiting[0].release()


@pytest_twisted.ensureDeferred
async def test_a_refused_acquire_still_gives_out_what_it_swept(
    reactor: Any, small: list[Proxy]
) -> None:
    """
    A newcomer refused by a full queue whose ACQUIRE swept away the slot
    of a proxy that died: the first waiting request gets that slot at
    once, not at the next round.
    """
    a, b = small
    await a.ask("k0")  # never released: A dies
    waiting = [results(b.ask(key)) for key in ("k1", "k2", "k3")]
    await until_waiting(reactor, b.link, 3)
    b.clock.advance(LEASE / 2)
    await b.queue.renew()
    b.clock.advance(LEASE / 2 + 1)
    refused = refusals(b.ask("k4"))
    await wait_for(reactor, lambda: refused != [] and waiting[0] != [])
    assert [len(w) for w in waiting] == [1, 0, 0]
    waiting[0][0].release()
    for w in waiting[1:]:
        await wait_for(reactor, lambda w=w: w != [])  # type: ignore[misc]
        w[0].release()
