# -*- test-case-name: tests.redis.test_limits -*-
"""
Per-key limits and the guess throttle, kept in Redis so that every proxy
using it obeys one set of rules.

L{RedisLimits} keeps what L{ollamaproxy.admission.limits.KeyLimits} keeps, with the
same meaning: a key's requests a minute (a bucket holding a minute's
worth), its requests in flight, and its tokens per UTC day and month.  Each
check is one Lua script (L{ollamaproxy.redis.scripts}), so racing proxies
cannot let a key in beyond its limits.  ADMIT checks the rate, the streams
and the quotas before the request's body is read; once it is read, RESERVE
checks the quotas again and adds the request's expected cost to the key's
counters at once (one more call, for keys with a quota only), and the
release replaces it with the tokens used (in the counters of the day and
month it was reserved in, or the current ones if those ended).  A proxy
that dies mid-request leaves its reservation counted.

Requests in flight are leases that expire (C{--redis-lease}, 30 s): one
round every few seconds renews all of this proxy's leases at once, so a
proxy that dies (C{SIGKILL}, a lost machine) holds its keys' streams for
no longer than that.

Times come from this proxy's clock (its reactor), not from Redis's C{TIME}:
the UTC day and month are computed here (L{ollamaproxy.admission.quota_periods}), so
a counter's name, the Retry-After and the script's checks all agree on one
time; and the tests can state the time.  Proxies keep their clocks in step
by NTP; a few seconds of skew only moves when a bucket refills or a dead
proxy's lease expires by as much.

While Redis is down, the failure policy decides: C{local} asks the
in-process limits instead (keys are still checked, each proxy keeps its
own counts), C{closed} answers keys that have limits with 503.  Tokens used
meanwhile are added to Redis's counters once it is back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ollamaproxy.admission.keys import ApiKey
from ollamaproxy.admission.limits import (
    Admission,
    GuessThrottle,
    Limits,
    Release,
    too_fast,
    too_many,
    too_many_in_flight,
)
from ollamaproxy.admission.quota_periods import Window, window
from ollamaproxy.admission.quotas import QuotaBook, over_quota
from ollamaproxy.config import DEFAULT_REDIS_LEASE
from ollamaproxy.errors import ProxyError
from ollamaproxy.redis import scripts
from ollamaproxy.redis.link import RedisDown, RedisLink

log = Logger()

_T = TypeVar("_T")

PREFIX = "ollamaproxy:"
# A day's or a month's counter is kept this long past its end.
_COUNTER_KEPT = 86400.0
# What a client is told to wait under the closed policy.
_CLOSED_RETRY = 5.0


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


def _nothing(tokens: int = 0) -> None:
    """
    The release of a request that nothing counted.
    """


def _closed() -> ProxyError:
    """
    The refusal of a key with limits while Redis is down, under the
    C{closed} policy.
    """
    return ProxyError(
        503,
        "the limits of this key are kept in Redis, which cannot be reached now",
        {b"Retry-After": str(int(_CLOSED_RETRY)).encode("ascii")},
        # Refused by the proxy: Ollama was not asked.
        outcome="rejected",
    )


class _Unlimited:
    """
    The admission of a key without limits: nothing to reserve, nothing to
    give back (L{Admission}).
    """

    def reserve(self, tokens: int) -> Deferred[Release]:
        return succeed(_nothing)

    def give_back(self) -> None:
        pass


@dataclass
class _RedisAdmission:
    """
    A request that Redis admitted (L{Admission}), holding C{lease} (C{""}
    for a key without C{max_streams}).
    """

    limits: RedisLimits
    key: ApiKey
    lease: str

    def reserve(self, tokens: int) -> Deferred[Release]:
        return self.limits.reserve(self.key, self.lease, tokens)

    def give_back(self) -> None:
        self.limits.give_back(self.key, self.lease)


@dataclass
class _Unsent:
    """
    A request of a key with a quota that the in-process limits admitted
    while Redis was down (L{Admission}): the tokens it used are kept for
    Redis's counters.
    """

    limits: RedisLimits
    key: ApiKey
    local: Admission

    def reserve(self, tokens: int) -> Deferred[Release]:
        def counting(local_release: Release) -> Release:
            def release(tokens: int = 0) -> None:
                local_release(tokens)
                self.limits.keep_unsent(self.key, tokens)

            return release

        return self.local.reserve(tokens).addCallback(counting)

    def give_back(self) -> None:
        self.local.give_back()


class RedisLimits:
    """
    Per-key limits kept in Redis (L{Limits}).

    @param link: The connection to Redis.
    @param local: The in-process limits asked while Redis is down, under
        the C{local} policy.
    @param clock: Tells time for the limits.
    @param policy: C{local} or C{closed} (see the module).
    @param lease: Seconds a request stays counted unless renewed.
    @param quotas: The book of C{local}'s token quotas, told of every
        request's tokens while Redis is up too, so that it knows this
        proxy's use when it stands in; and of every request Redis refuses
        for a quota (L{QuotaBook.refused}, for the metric).
    """

    def __init__(
        self,
        link: RedisLink,
        local: Limits,
        clock: IReactorTime,
        policy: str = "local",
        lease: float = DEFAULT_REDIS_LEASE,
        prefix: str = PREFIX,
        quotas: QuotaBook | None = None,
    ) -> None:
        self._link = link
        self._quotas = quotas
        self._local = local
        self._clock = clock
        self._policy = policy
        self._lease = lease
        self._prefix = prefix
        # Lease id -> streams set, for this proxy's requests in flight.
        self._leases: dict[str, str] = {}
        # Counter -> [tokens, when it expires (ms)]: tokens that could not
        # be added while Redis was down.  One entry per key and period.
        self._unsent: dict[str, list[int]] = {}
        link.each_round(self.renew)
        link.each_round(self.send_unsent)

    def admit(self, key: ApiKey) -> Deferred[Admission]:
        """
        Let a request of C{key} in, or refuse it (L{Limits.admit}).  A key
        without limits is let in without asking Redis.
        """
        if (
            key.rpm is None and key.max_streams is None
            and key.tokens_per_day is None and key.tokens_per_month is None
        ):
            return succeed(_Unlimited())
        if not self._link.up:
            return self._without_redis(key)
        now = self._clock.seconds()
        day, month = window("day", now), window("month", now)
        lease = "" if key.max_streams is None else self._link.unique()
        asked = self._link.call(
            scripts.ADMIT,
            [self._key("rate", key.name), self._key("streams", key.name),
             self._counter(day, key.name), self._counter(month, key.name)],
            [_ms(now), _limit(key.rpm), _limit(key.max_streams), lease, _ms(self._lease),
             _limit(key.tokens_per_day), _limit(key.tokens_per_month)],
        )
        answer: Deferred[Admission] = Deferred(lambda _: None)

        def answered(reply: Any) -> None:
            code, n = int(reply[0]), int(reply[1])
            if code != scripts.ADMITTED:
                _give(answer, self._refusal(key, code, n, now, day, month))
                return
            if lease:
                self._leases[lease] = self._key("streams", key.name)
            admission = _RedisAdmission(self, key, lease)
            if answer.called:
                # The client went away while Redis answered.
                admission.give_back()
            else:
                answer.callback(admission)

        def failed(failure: Failure) -> None:
            if not failure.check(RedisDown):
                log.failure("Asking Redis for key {name}'s limits failed", failure,
                            name=key.name)
            _fall_back(answer, self._without_redis(key), lambda admission: admission.give_back())

        # A mistake in reading the answer falls back too, never leaves the
        # request waiting.
        asked.addCallback(answered).addErrback(failed)
        return answer

    def reserve(self, key: ApiKey, lease: str, tokens: int) -> Deferred[Release]:
        """
        Reserve C{tokens} for a request of C{key} that Redis admitted
        (L{Admission.reserve}), holding C{lease} (C{""} for none): one call
        to Redis for a key with a quota, none for others.  A refusal gives
        the lease back.
        """
        counters = self._counters(key.name)
        if key.tokens_per_day is None and key.tokens_per_month is None:
            return succeed(self._release(key, lease, 0, counters))
        if not self._link.up:
            return self._reserve_without_redis(key, lease, tokens)
        now = self._clock.seconds()
        reserved = max(tokens, 0)
        asked = self._link.call(
            scripts.RESERVE,
            [name for name, _ in counters],
            [_limit(key.tokens_per_day), _limit(key.tokens_per_month), reserved,
             *(_ms(span.end + _COUNTER_KEPT) for _, span in counters)],
        )
        answer: Deferred[Release] = Deferred(lambda _: None)

        def answered(reply: Any) -> None:
            code, n = int(reply[0]), int(reply[1])
            if code != scripts.ADMITTED:
                self.give_back(key, lease)
                _give(answer, self._refusal(key, code, n, now, counters[0][1], counters[1][1]))
                return
            release = self._release(key, lease, reserved, counters)
            if answer.called:
                release(0)
            else:
                answer.callback(release)

        def failed(failure: Failure) -> None:
            if not failure.check(RedisDown):
                log.failure("Asking Redis to reserve key {name}'s tokens failed", failure,
                            name=key.name)
            _fall_back(answer, self._reserve_without_redis(key, lease, tokens),
                       lambda release: release(0))

        asked.addCallback(answered).addErrback(failed)
        return answer

    def _refusal(
        self, key: ApiKey, code: int, n: int, now: float, day: Window, month: Window
    ) -> ProxyError:
        if code == scripts.OVER_DAY_QUOTA:
            assert key.tokens_per_day is not None
            if self._quotas is not None:
                self._quotas.refused(key.name, "day")
            return over_quota(key, key.tokens_per_day, day, now)
        if code == scripts.OVER_MONTH_QUOTA:
            assert key.tokens_per_month is not None
            if self._quotas is not None:
                self._quotas.refused(key.name, "month")
            return over_quota(key, key.tokens_per_month, month, now)
        if code == scripts.TOO_MANY_STREAMS:
            assert key.max_streams is not None
            return too_many_in_flight(key.name, key.max_streams)
        assert key.rpm is not None
        return too_fast(key.name, key.rpm, n / 1000)

    def _release(
        self, key: ApiKey, lease: str, reserved: int, admitted: list[tuple[str, Window]],
        local: Callable[[int], None] | None = None,
    ) -> Release:
        """
        The release of a request Redis admitted: it gives back the lease,
        and replaces the C{reserved} tokens in the counters it was
        C{admitted} with by the tokens used (a period that has ended since
        keeps the reservation; the tokens count in the new one).

        @param local: Settles the tokens used in the in-process book, if it
            reserved them; else they are added to it.
        """
        counted = key.tokens_per_day is not None or key.tokens_per_month is not None

        def release(tokens: int = 0) -> None:
            if lease:
                self._leases.pop(lease, None)
            if local is not None:
                local(tokens)
            elif tokens and self._quotas is not None:
                self._quotas.add(key.name, tokens)
            tokens = tokens if counted else 0
            counters = self._counters(key.name)
            charges = [tokens - reserved if now == then else tokens
                       for (now, _), (then, _) in zip(counters, admitted, strict=True)]
            if not lease and not any(charges):
                return
            sent = self._link.call(
                scripts.RELEASE,
                [self._key("streams", key.name), counters[0][0], counters[1][0]],
                [lease, *charges, *(_ms(span.end + _COUNTER_KEPT) for _, span in counters)],
            )

            def unsent(failure: Failure) -> None:
                # The lease expires by itself; the tokens are added later.
                for counter, charge in zip(counters, charges, strict=True):
                    self._keep_unsent([counter], charge)

            sent.addErrback(unsent)

        return release

    def _without_redis(self, key: ApiKey) -> Deferred[Admission]:
        """
        The answer while Redis is down, by the failure policy: under
        C{local}, the in-process limits admit the request and reserve and
        settle its cost, and the tokens it used are added to Redis's
        counters later.
        """
        if self._policy == "closed":
            return fail(_closed())
        if key.tokens_per_day is None and key.tokens_per_month is None:
            return self._local.admit(key)
        return self._local.admit(key).addCallback(
            lambda admission: _Unsent(self, key, admission))

    def _reserve_without_redis(self, key: ApiKey, lease: str, tokens: int) -> Deferred[Release]:
        """
        The reservation of a request that Redis admitted, while Redis is
        down: by the failure policy, refused (its lease given back), or
        made in the in-process book, the tokens used added to Redis's
        counters later.
        """
        if self._policy == "closed":
            self.give_back(key, lease)
            return fail(_closed())
        settle = None
        if self._quotas is not None:
            try:
                settle = self._quotas.reserve(key, tokens)
            except ProxyError as e:
                self.give_back(key, lease)
                return fail(e)
        return succeed(self._release(key, lease, 0, self._counters(key.name), settle))

    def give_back(self, key: ApiKey, lease: str) -> None:
        """
        A request of C{key} that Redis admitted, holding C{lease}, ended
        before its cost was reserved: give the lease back.
        """
        self._release(key, lease, 0, self._counters(key.name))(0)

    def keep_unsent(self, key: ApiKey, tokens: int) -> None:
        """
        Keep the C{tokens} a request of C{key} used while Redis was down,
        to add to its counters once Redis is back.
        """
        self._keep_unsent(self._counters(key.name), tokens)

    def _keep_unsent(self, counters: list[tuple[str, Window]], tokens: int) -> None:
        """
        Keep C{tokens} to add to C{counters} once Redis is back (less than
        0 for a reservation that was larger than the tokens used).
        """
        if not tokens:
            return
        for name, span in counters:
            entry = self._unsent.setdefault(name, [0, _ms(span.end + _COUNTER_KEPT)])
            entry[0] += tokens

    def renew(self) -> Deferred[Any]:
        """
        Renew the leases of this proxy's requests in flight, all in one
        call; run every round of the link.
        """
        if not self._leases:
            return succeed(None)
        ids = list(self._leases)
        now = self._clock.seconds()
        return self._link.call(
            scripts.RENEW,
            [self._leases[lease] for lease in ids],
            [_ms(now + self._lease), _ms(2 * self._lease), *ids],
        )

    def send_unsent(self) -> Deferred[Any]:
        """
        Add the tokens counted while Redis was down to its counters.
        """
        if not self._unsent:
            return succeed(None)
        unsent, self._unsent = self._unsent, {}
        sent = self._link.call(
            scripts.ADD_TOKENS,
            list(unsent),
            [value for entry in unsent.values() for value in entry],
        )

        def keep(failure: Failure) -> Failure:
            for name, (tokens, expires) in unsent.items():
                entry = self._unsent.setdefault(name, [0, expires])
                entry[0] += tokens
            return failure

        return sent.addErrback(keep)

    def _key(self, kind: str, name: str) -> str:
        return f"{self._prefix}{kind}:{name}"

    def _counters(self, name: str) -> list[tuple[str, Window]]:
        """
        The key's token counters now, and their periods.
        """
        now = self._clock.seconds()
        return [(self._counter(span, name), span)
                for span in (window("day", now), window("month", now))]

    def _counter(self, span: Window, name: str) -> str:
        return f"{self._prefix}tokens:{span.period}:{span.label}:{name}"


class RedisThrottle:
    """
    The guess throttle kept in Redis (L{Throttle}): wrong keys from an
    address count across every proxy, with the numbers of the in-process
    one.  While Redis is down, that one counts (under either policy: the
    throttle never lets a request in, it only answers a guesser with 429
    rather than 401).

    @param local: The in-process throttle, whose numbers are used.
    """

    def __init__(
        self, link: RedisLink, local: GuessThrottle, clock: IReactorTime, prefix: str = PREFIX
    ) -> None:
        self._link = link
        self._local = local
        self._clock = clock
        self._prefix = prefix

    def failed(self, address: str) -> Deferred[None]:
        """
        A wrong key came from C{address} (L{Throttle.failed}).
        """
        if not self._link.up:
            return self._local.failed(address)
        asked = self._link.call(
            scripts.GUESS,
            [f"{self._prefix}guesses:{address}"],
            [_ms(self._clock.seconds()), _ms(self._local.window), self._local.failures,
             self._link.unique()],
        )
        answer: Deferred[None] = Deferred(lambda _: None)

        def answered(wait: Any) -> None:
            if int(wait) >= 0:
                _give(answer, too_many("too many wrong API keys from this address",
                                       int(wait) / 1000))
            elif not answer.called:
                answer.callback(None)

        def failed(failure: Failure) -> None:
            if not answer.called:
                self._local.failed(address).chainDeferred(answer)

        asked.addCallback(answered).addErrback(failed)
        return answer


def _fall_back(answer: Deferred[_T], local: Deferred[_T], undo: Callable[[_T], object]) -> None:
    """
    Answer with what the in-process limits answered while Redis could not,
    or, if the client went away meanwhile (C{answer} cancelled), C{undo} it.
    """
    if answer.called:
        local.addCallback(undo).addErrback(lambda _: None)
    else:
        local.chainDeferred(answer)


def _give(answer: Deferred[Any], error: Exception) -> None:
    if not answer.called:
        answer.errback(error)


def _limit(value: int | None) -> int:
    return -1 if value is None else value


