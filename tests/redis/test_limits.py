"""
Tests for L{ollamaproxy.redis.limits} that need no Redis: the failure
policy, cancellation, renewal in one call and tokens kept while Redis is
down, with a fake client and a L{Clock}.  The scripts themselves run
against a real Redis in C{tests/integration/test_redis_limits.py}.
"""

from __future__ import annotations

from typing import Any, cast

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from ollamaproxy.admission.keys import ApiKey
from ollamaproxy.admission.limits import Admission, GuessThrottle, KeyLimits, Release
from ollamaproxy.admission.quotas import QuotaBook
from ollamaproxy.errors import ProxyError
from ollamaproxy.record.metrics import Metrics
from ollamaproxy.redis import scripts
from ollamaproxy.redis.limits import RedisLimits, RedisThrottle
from ollamaproxy.redis.link import RedisLink
from tests.fakes.observers import ErrorCollector
from tests.fakes.redis import FakeRedis

# 2026-12-01T12:00:00Z
NOON = 1796126400.0


def _key(**limits: Any) -> ApiKey:
    return ApiKey("alice", bytes(32), **limits)


def _setup(
    policy: str = "local", up: bool = True
) -> tuple[Clock, FakeRedis, RedisLink, RedisLimits]:
    clock = Clock()
    clock.advance(NOON)
    client = FakeRedis()
    link = RedisLink(lambda: client, clock, "redis://cache:6379/0", "", interval=5.0)
    limits = RedisLimits(link, KeyLimits(clock), clock, policy, lease=30.0)
    link.startService()
    if up:
        client.pings[0].callback("PONG")
    else:
        client.pings[0].errback(ConnectionError("refused"))
    return clock, client, link, limits


def _admitted(d: Deferred[Admission]) -> Admission:
    """
    The admission a fired admit gave.
    """
    result = d.result
    assert not isinstance(result, Failure)
    return cast(Admission, result)


def _released(d: Deferred[Release]) -> Release:
    """
    The release a fired reserve gave.
    """
    result = d.result
    assert callable(result)
    release: Release = result
    return release


def _error(d: Deferred[Any]) -> ProxyError:
    result = d.result
    assert isinstance(result, Failure)
    d.addErrback(lambda _: None)
    assert isinstance(result.value, ProxyError)
    return result.value


def test_key_without_limits_asks_nothing() -> None:
    """A key with no limit is let in without a call to Redis: no cost for it."""
    _, client, link, limits = _setup()
    release = _released(_admitted(limits.admit(_key())).reserve(100))
    release(100)
    assert client.calls == []
    link.stopService()


def test_admit_asks_one_script() -> None:
    """One ADMIT call carries the key's name (never the key), its limits and the time."""
    _, client, link, limits = _setup()
    d = limits.admit(_key(rpm=60, max_streams=2, tokens_per_day=1000))
    [call] = client.calls
    assert call.script == scripts.ADMIT
    assert call.keys == [
        "ollamaproxy:rate:alice", "ollamaproxy:streams:alice",
        "ollamaproxy:tokens:day:2026-12-01:alice", "ollamaproxy:tokens:month:2026-12:alice",
    ]
    assert call.args[:3] == [int(NOON * 1000), 60, 2]
    assert call.args[4:] == [30000, 1000, -1]
    call.answer.callback([0, 0])
    _admitted(d)
    link.stopService()


def test_down_local_keeps_limits_here() -> None:
    """
    Under the local policy, while Redis is down, the in-process limits
    answer: keys are still limited.
    """
    _, client, link, limits = _setup("local", up=False)
    key = _key(max_streams=1)
    release = _released(_admitted(limits.admit(key)).reserve(0))
    assert _error(limits.admit(key)).code == 429
    release(0)
    _admitted(limits.admit(key))
    assert client.calls == []
    link.stopService()


def test_down_closed_refuses() -> None:
    """Under the closed policy, while Redis is down, a key with limits gets 503 with Retry-After."""
    _, _, link, limits = _setup("closed", up=False)
    error = _error(limits.admit(_key(rpm=10)))
    assert (error.code, error.headers, error.outcome) == (
        503, {b"Retry-After": b"5"}, "rejected")
    assert "Redis" in error.message
    _admitted(limits.admit(_key()))
    link.stopService()


def test_redis_stops_answering_mid_admit() -> None:
    """
    A request whose admit Redis does not answer is answered within the
    timeout, by the policy (here local), never left waiting.
    """
    clock, _, link, limits = _setup("local")
    d = limits.admit(_key(rpm=10))
    assert not d.called
    clock.advance(1.5)
    _admitted(d)
    assert not link.up
    link.stopService()


def test_cancelled_admit_is_released() -> None:
    """A client gone while Redis answers: the lease taken for it is given back at once."""
    _, client, link, limits = _setup()
    d = limits.admit(_key(max_streams=1))
    d.cancel()
    d.addErrback(lambda _: None)
    [admit] = client.calls
    admit.answer.callback([0, 0])
    release_call = client.calls[1]
    assert release_call.script == scripts.RELEASE
    assert release_call.args[0] == admit.args[3]
    assert limits.renew().result is None  # no lease left to renew
    link.stopService()


def test_a_cancelled_admit_that_falls_back_is_given_back() -> None:
    """
    A client gone while Redis fails to answer: the in-process limits that
    stand in admit the request and give its place back at once, so the
    key's one stream is free for the next request.
    """
    _, client, link, limits = _setup()
    key = _key(max_streams=1)
    d = limits.admit(key)
    d.cancel()
    d.addErrback(lambda _: None)
    client.calls[0].answer.errback(ConnectionError("Lost connection"))
    assert not link.up
    _admitted(limits.admit(key))
    link.stopService()


def test_one_renewal_for_all_leases() -> None:
    """Every round renews all of this proxy's leases in one call; released ones drop out."""
    clock, client, link, limits = _setup()
    releases = []
    for name in ("alice", "bob", "carol"):
        d = limits.admit(ApiKey(name, bytes(32), max_streams=5))
        client.calls[-1].answer.callback([0, 0])
        releases.append(_released(_admitted(d).reserve(0)))
    releases[1](0)
    client.calls[-1].answer.callback(0)
    before = len(client.calls)
    clock.advance(5)
    client.pings[-1].callback("PONG")
    [renew] = client.calls[before:]
    assert renew.script == scripts.RENEW
    assert renew.keys == ["ollamaproxy:streams:alice", "ollamaproxy:streams:carol"]
    assert renew.args[0] == int((NOON + 5 + 30) * 1000)
    renew.answer.callback(2)
    link.stopService()


def test_tokens_while_down_are_added_later() -> None:
    """Tokens used while Redis was down are added to its counters once it is back."""
    clock, client, link, limits = _setup("local", up=False)
    key = _key(tokens_per_day=1000)
    _released(_admitted(limits.admit(key)).reserve(100))(120)
    _released(_admitted(limits.admit(key)).reserve(100))(30)
    clock.advance(5)
    client.pings[-1].callback("PONG")
    [added] = client.calls
    assert added.script == scripts.ADD_TOKENS
    assert added.keys == ["ollamaproxy:tokens:day:2026-12-01:alice",
                          "ollamaproxy:tokens:month:2026-12:alice"]
    assert added.args[0::2] == [150, 150]
    added.answer.callback(2)
    link.stopService()


@pytest.mark.parametrize(("reserved", "used", "settled"), [(0, 70, 70), (100, 40, -60)])
def test_tokens_kept_when_release_fails(reserved: int, used: int, settled: int) -> None:
    """
    A release that Redis does not take keeps its settlement (the tokens
    used less those reserved), a negative one too, and adds it once Redis
    is back; nothing is lost.
    """
    clock, client, link, limits = _setup()
    d = limits.admit(_key(tokens_per_month=1000))
    client.calls[0].answer.callback([0, 0])
    reservation = _admitted(d).reserve(reserved)
    client.calls[1].answer.callback([0, 0])
    _released(reservation)(used)
    client.calls[2].answer.errback(ConnectionError("Lost connection"))
    clock.advance(5)
    client.pings[-1].callback("PONG")
    assert client.calls[-1].script == scripts.ADD_TOKENS
    assert client.calls[-1].args[0::2] == [settled, settled]
    client.calls[-1].answer.callback(2)
    link.stopService()


def test_throttle_down_uses_local() -> None:
    """While Redis is down, wrong keys are counted by the in-process throttle."""
    clock = Clock()
    client = FakeRedis()
    link = RedisLink(lambda: client, clock, "redis://cache:6379/0", "")
    link.startService()
    client.pings[0].errback(ConnectionError("refused"))
    throttle = RedisThrottle(link, GuessThrottle(clock, failures=2), clock)
    throttle.failed("10.0.0.1")
    throttle.failed("10.0.0.1")
    assert _error(throttle.failed("10.0.0.1")).code == 429
    link.stopService()


def test_throttle_asks_redis() -> None:
    """Up, a wrong key is one GUESS call with the local throttle's numbers; a wait is 429."""
    clock = Clock()
    client = FakeRedis()
    link = RedisLink(lambda: client, clock, "redis://cache:6379/0", "")
    link.startService()
    client.pings[0].callback("PONG")
    throttle = RedisThrottle(link, GuessThrottle(clock, failures=3, window=20), clock)
    d = throttle.failed("10.0.0.1")
    [call] = client.calls
    assert (call.keys, call.args[1:3]) == (["ollamaproxy:guesses:10.0.0.1"], [20000, 3])
    call.answer.callback(12500)
    error = _error(d)
    assert (error.code, error.headers) == (429, {b"Retry-After": b"13"})
    link.stopService()


def test_unreadable_answer_falls_back(observe_errors: ErrorCollector) -> None:
    """An answer the proxy cannot read is logged and the request answered by the policy."""
    _, client, link, limits = _setup("local")
    d = limits.admit(_key(rpm=10))
    client.calls[0].answer.callback("not a list")
    _admitted(d)
    [logged] = observe_errors.errors
    assert logged["log_failure"].check(ValueError)
    observe_errors.errors.clear()
    link.stopService()


def test_the_local_stand_in_knows_this_proxy_s_tokens() -> None:
    """
    Tokens used while Redis is up are told to the in-process quota book
    too, so that when Redis goes down and the local limits stand in, a key
    that used its quota through this proxy is still refused.
    """
    clock = Clock()
    clock.advance(NOON)
    client = FakeRedis()
    link = RedisLink(lambda: client, clock, "redis://cache:6379/0", "", interval=5.0)
    book = QuotaBook(clock, loaded=True)
    limits = RedisLimits(link, KeyLimits(clock, book), clock, "local", lease=30.0, quotas=book)
    link.startService()
    client.pings[0].callback("PONG")
    key = _key(tokens_per_day=100)
    d = limits.admit(key)
    client.calls[0].answer.callback([0, 0])
    reserved = _admitted(d).reserve(0)
    client.calls[1].answer.callback([0, 0])
    _released(reserved)(150)
    client.calls[2].answer.callback(1)
    assert book.used("alice", "day") == 150
    clock.advance(5)
    client.pings[-1].errback(ConnectionError("refused"))
    assert _error(limits.admit(key)).code == 429
    link.stopService()


def test_a_quota_refusal_by_redis_is_counted() -> None:
    """
    A request Redis refuses for a day's or a month's token quota is told to
    the quota book's C{refused} hook, and so counted in
    C{ollamaproxy_quota_refusals_total} by key name and period; a refusal
    for the rate is not.  The 429 is the in-process one.
    """
    clock = Clock()
    clock.advance(NOON)
    client = FakeRedis()
    link = RedisLink(lambda: client, clock, "redis://cache:6379/0", "", interval=5.0)
    metrics = Metrics()
    book = QuotaBook(clock, metrics.quota_refused, loaded=True)
    limits = RedisLimits(link, KeyLimits(clock, book), clock, "local", lease=30.0, quotas=book)
    link.startService()
    client.pings[0].callback("PONG")
    key = _key(rpm=60, tokens_per_day=100, tokens_per_month=1000)
    answers = []
    for code in (scripts.OVER_DAY_QUOTA, scripts.OVER_MONTH_QUOTA, scripts.OVER_RATE):
        d = limits.admit(key)
        client.calls[-1].answer.callback([code, 1000])
        answers.append(_error(d))
    _, text = metrics.render(None)
    assert b'ollamaproxy_quota_refusals_total{key="alice",period="day"} 1.0' in text
    assert b'ollamaproxy_quota_refusals_total{key="alice",period="month"} 1.0' in text
    assert [error.code for error in answers] == [429, 429, 429]
    assert answers[0].message.startswith("key 'alice' has used its 100 tokens for today (UTC)")
    assert answers[0].headers == {b"Retry-After": b"43200"}
    link.stopService()


def test_rate_and_streams_refusals_are_the_in_process_ones() -> None:
    """
    Redis's refusals for the requests in flight and the rate say, word for
    word, what the in-process limits say.
    """
    clock, client, link, limits = _setup()
    key = _key(rpm=1, max_streams=1)
    streams_here, rate_here = KeyLimits(clock), KeyLimits(clock)
    _admitted(streams_here.admit(_key(max_streams=1)))
    in_flight = _error(streams_here.admit(_key(max_streams=1)))
    _admitted(rate_here.admit(_key(rpm=1)))
    too_fast = _error(rate_here.admit(_key(rpm=1)))
    for code, n, expected in ((scripts.TOO_MANY_STREAMS, 0, in_flight),
                              (scripts.OVER_RATE, 60000, too_fast)):
        d = limits.admit(key)
        client.calls[-1].answer.callback([code, n])
        error = _error(d)
        assert (error.code, error.message, error.headers) == (
            expected.code, expected.message, expected.headers)
    assert in_flight.message == "key 'alice' already has 1 requests in flight"
    assert too_fast.message == "key 'alice' is over its limit of 1 requests a minute"
    assert too_fast.headers == {b"Retry-After": b"60"}
    link.stopService()


def test_reserve_reserves_and_release_settles_the_difference() -> None:
    """
    Once admitted, a request of a key with a quota has its expected cost
    reserved by one RESERVE call (so that racing proxies see it), and its
    release adds only the difference between what it used and what was
    reserved: less than 0 when it used less.  A key without a quota
    reserves nothing and makes no call.
    """
    _, client, link, limits = _setup()
    admitted = limits.admit(_key(tokens_per_day=1000))
    client.calls[0].answer.callback([0, 0])
    reserved = _admitted(admitted).reserve(600)
    [_, reserve] = client.calls
    assert reserve.script == scripts.RESERVE
    assert reserve.keys == ["ollamaproxy:tokens:day:2026-12-01:alice",
                            "ollamaproxy:tokens:month:2026-12:alice"]
    assert reserve.args == [1000, -1, 600, int((NOON + 12 * 3600 + 86400) * 1000),
                            int((NOON + 30 * 86400 + 12 * 3600 + 86400) * 1000)]
    reserve.answer.callback([0, 0])
    _released(reserved)(150)
    release = client.calls[-1]
    assert release.script == scripts.RELEASE
    assert release.keys[1:] == ["ollamaproxy:tokens:day:2026-12-01:alice",
                                "ollamaproxy:tokens:month:2026-12:alice"]
    assert release.args[:3] == ["", -450, -450]
    release.answer.callback(0)
    limited = limits.admit(_key(rpm=10))
    client.calls[-1].answer.callback([0, 0])
    before = len(client.calls)
    _released(_admitted(limited).reserve(600))(150)
    assert len(client.calls) == before
    link.stopService()


def test_a_reservation_over_the_quota_is_refused_and_gives_back_the_stream() -> None:
    """
    Requests of a key admitted together each passed ADMIT's check of the
    quota; RESERVE checks it again with the reservation, and one that
    finds it used up (by what was used and reserved) is refused with the
    quota's 429, its stream's lease given back at once.
    """
    _, client, link, limits = _setup()
    d = limits.admit(_key(max_streams=2, tokens_per_day=100))
    client.calls[0].answer.callback([0, 0])
    lease = client.calls[0].args[3]
    reserved = _admitted(d).reserve(67)
    client.calls[1].answer.callback([scripts.OVER_DAY_QUOTA, 134])
    error = _error(reserved)
    assert error.code == 429
    assert error.message.startswith("key 'alice' has used its 100 tokens for today (UTC)")
    [give_back] = client.calls[2:]
    assert (give_back.script, give_back.args[:3]) == (scripts.RELEASE, [lease, 0, 0])
    assert limits.renew().result is None  # no lease left to renew
    link.stopService()


def test_a_request_that_ends_in_a_new_day_counts_there() -> None:
    """
    A request admitted before UTC midnight and ended after it leaves its
    reservation in the day it started in, and its tokens count in the new
    day; the month, the same, settles the difference.
    """
    clock, client, link, limits = _setup()
    d = limits.admit(_key(tokens_per_day=1000))
    client.calls[-1].answer.callback([0, 0])
    reserved = _admitted(d).reserve(600)
    client.calls[-1].answer.callback([0, 0])
    clock.advance(12 * 3600 + 1)
    client.pings[-1].callback("PONG")
    _released(reserved)(150)
    release = client.calls[-1]
    assert release.keys[1] == "ollamaproxy:tokens:day:2026-12-02:alice"
    assert release.args[1:3] == [150, -450]
    release.answer.callback(0)
    link.stopService()


def _with_book(policy: str) -> tuple[Clock, FakeRedis, RedisLink, RedisLimits, QuotaBook]:
    """
    Limits kept in Redis (up) under C{policy}, whose in-process stand-in
    has a quota book.
    """
    clock = Clock()
    clock.advance(NOON)
    client = FakeRedis()
    link = RedisLink(lambda: client, clock, "redis://cache:6379/0", "", interval=5.0)
    book = QuotaBook(clock, loaded=True)
    limits = RedisLimits(link, KeyLimits(clock, book), clock, policy, lease=30.0, quotas=book)
    link.startService()
    client.pings[0].callback("PONG")
    return clock, client, link, limits, book


def _reserve_fails(client: FakeRedis, limits: RedisLimits, key: ApiKey) -> Deferred[Release]:
    """
    Admit a request of C{key} through Redis, and have Redis fail its
    reservation of 60 tokens (it goes down).
    """
    d = limits.admit(key)
    client.calls[-1].answer.callback([0, 0])
    reserved = _admitted(d).reserve(60)
    client.calls[-1].answer.errback(ConnectionError("Lost connection"))
    return reserved


def test_a_reservation_redis_cannot_take_is_made_here() -> None:
    """
    A request Redis admitted whose RESERVE fails is reserved, under the
    local policy, in the in-process book: its release settles it there,
    its lease is dropped (it expires in Redis), and the tokens it used are
    added to Redis's counters once it is back.
    """
    clock, client, link, limits, book = _with_book("local")
    reserved = _reserve_fails(client, limits, _key(max_streams=2, tokens_per_day=100))
    assert book.used("alice", "day") == 60
    _released(reserved)(30)
    assert book.used("alice", "day") == 30
    assert limits.renew().result is None
    clock.advance(5)
    client.pings[-1].callback("PONG")
    assert client.calls[-1].script == scripts.ADD_TOKENS
    assert client.calls[-1].args[0::2] == [30, 30]
    client.calls[-1].answer.callback(2)
    link.stopService()


def test_a_reservation_made_here_checks_the_quota() -> None:
    """
    The in-process book that stands in for a RESERVE that failed checks
    the quota as Redis would: a key it finds over its quota is refused with
    429, and the request's lease is dropped.
    """
    _, client, link, limits, book = _with_book("local")
    book.add("alice", 100)
    refused = _reserve_fails(client, limits, _key(max_streams=2, tokens_per_day=100))
    assert _error(refused).code == 429
    assert limits.renew().result is None
    assert book.used("alice", "day") == 100
    link.stopService()


def test_a_reservation_redis_cannot_take_is_refused_when_closed() -> None:
    """
    Under the closed policy, a request Redis admitted whose RESERVE fails
    gets the 503 of a Redis that cannot be reached, and its lease is
    dropped.
    """
    _, client, link, limits, book = _with_book("closed")
    refused = _reserve_fails(client, limits, _key(max_streams=2, tokens_per_day=100))
    assert _error(refused).code == 503
    assert limits.renew().result is None
    assert book.used("alice", "day") == 0
    link.stopService()


def test_a_reservation_cancelled_while_redis_answers_is_given_back() -> None:
    """
    A client gone while Redis reserves for it: the reservation Redis made
    is given back at once, with the stream.
    """
    _, client, link, limits = _setup()
    d = limits.admit(_key(max_streams=1, tokens_per_day=1000))
    client.calls[0].answer.callback([0, 0])
    reserved = _admitted(d).reserve(600)
    reserved.cancel()
    reserved.addErrback(lambda _: None)
    client.calls[1].answer.callback([0, 0])
    [release] = client.calls[2:]
    assert release.args[:3] == [client.calls[0].args[3], -600, -600]
    assert limits.renew().result is None
    link.stopService()
