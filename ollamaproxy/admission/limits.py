# -*- test-case-name: tests.admission.test_access -*-
"""
How much a key may ask, and how often an address may guess.

L{KeyLimits} enforces each key's requests per minute (a token bucket that
holds a minute's worth), its number of requests in flight, and, with a
L{QuotaBook}, its token quotas.  It answers in two steps: L{Limits.admit}
needs only the key, so that a key over a limit is refused before its body
is read (a key with C{max_streams: 1} cannot make the proxy read many
bodies at once); once the body has been read and the request's cost
estimated, L{Admission.reserve} reserves that cost against the quotas,
checking them again, and the L{Release} settles it with what the request
used when it ends.
L{GuessThrottle} answers wrong keys from an address that presented too many
with 429; valid keys from that address go on working.

Both answer 429 with C{Retry-After}, and both forget what they no longer
need, so their memory stays bounded.  Both keep their counts in this
process; L{Limits} and L{Throttle} are what the app asks, so that counts
kept elsewhere (shared by several proxies) can take their place.  Their
answers are L{Deferred}s for that reason; the in-process ones have fired.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime

from ollamaproxy.admission.keys import ApiKey
from ollamaproxy.errors import ProxyError

if TYPE_CHECKING:
    from ollamaproxy.admission.quotas import QuotaBook

_V = TypeVar("_V")


def too_many(message: str, retry_after: float) -> ProxyError:
    """
    A 429 that says when to try again.
    """
    seconds = max(1, math.ceil(retry_after))
    return ProxyError(429, message, {b"Retry-After": str(seconds).encode("ascii")})


def too_many_in_flight(name: str, streams: int) -> ProxyError:
    """
    The 429 for key C{name}, which has its C{streams} requests in flight.
    """
    return too_many(f"key {name!r} already has {streams} requests in flight", 1)


def too_fast(name: str, rpm: int, retry_after: float) -> ProxyError:
    """
    The 429 for key C{name}, over its C{rpm} requests a minute until
    C{retry_after} seconds from now.
    """
    return too_many(f"key {name!r} is over its limit of {rpm} requests a minute", retry_after)


class Release(Protocol):
    """
    Ends a request whose cost L{Admission.reserve} reserved.
    """

    def __call__(self, tokens: int = 0) -> None:
        """
        The request has ended, having used C{tokens} (prompt and completion
        tokens, as its meter read them; 0 if none): they replace what was
        reserved for it, and its place among the key's requests in flight
        is given back.  Called once.
        """


class Admission(Protocol):
    """
    A request that L{Limits.admit} let in, its cost not reserved yet.  It is
    ended once: by L{give_back}, or by a L{reserve} that refuses it, or by
    the L{Release} a L{reserve} gave.
    """

    def reserve(self, tokens: int) -> Deferred[Release]:
        """
        Reserve C{tokens}, the request's expected cost
        (L{ollamaproxy.admission.estimate}), against its key's quotas until
        the release settles them, so that the requests of a key running
        together see each other's cost.  The quotas are checked again, at
        once with the reservation: the requests of a key admitted together
        each passed the first check.  A key without a quota reserves
        nothing.

        @return: Fires with the L{Release} to call when the request has
            ended, or fails with a L{ProxyError} (429 with C{Retry-After})
            if what the key used and reserved has reached a quota; then the
            admission has ended.
        """

    def give_back(self) -> None:
        """
        The request ended before its cost was reserved (its body was
        refused, or its client went away): give back its place.
        """


class Limits(Protocol):
    """
    Per-key limits: how often, how many at once, how many tokens.
    """

    def admit(self, key: ApiKey) -> Deferred[Admission]:
        """
        Let a request of C{key} in, or refuse it, before its body is read:
        the key must have tokens left in its quotas, a token of its rate
        and a free place among its requests in flight.

        @return: Fires with the L{Admission}, or fails with a
            L{ProxyError} (429 with C{Retry-After}) if the key is over a
            limit.
        """


class Throttle(Protocol):
    """
    Slows down addresses that guess keys.
    """

    def failed(self, address: str) -> Deferred[None]:
        """
        A wrong key came from C{address}.

        @return: Fires when counted, or fails with a L{ProxyError} (429
            with C{Retry-After}) if the address has presented too many.
        """


@dataclass
class _Bucket:
    tokens: float
    updated: float


@dataclass
class KeyLimits:
    """
    Per-key request rate, requests in flight, and token quotas.

    @ivar clock: Tells time for the rates.
    @ivar quotas: Counts the keys' tokens against their quotas, or L{None}
        for no quotas.
    """

    clock: IReactorTime
    quotas: QuotaBook | None = None
    _buckets: dict[str, _Bucket] = field(default_factory=dict)
    _in_flight: dict[str, int] = field(default_factory=dict)

    def admit(self, key: ApiKey) -> Deferred[Admission]:
        """
        Let a request of C{key} in, or refuse it (L{Limits.admit}): 429 if
        the key is over its token quota (what it used and what its requests
        in flight reserved), its rate or its number of requests in flight
        (503 while the quotas are loaded, L{QuotaBook.check}).
        """
        try:
            return succeed(self._admit(key))
        except ProxyError as e:
            return fail(e)

    def _admit(self, key: ApiKey) -> Admission:
        quotas = self.quotas
        if quotas is not None and (
            key.tokens_per_day is not None or key.tokens_per_month is not None
        ):
            # First: over a quota, waiting for a stream or a minute is no use.
            quotas.check(key)
        if key.max_streams is not None and self._in_flight.get(key.name, 0) >= key.max_streams:
            raise too_many_in_flight(key.name, key.max_streams)
        if key.rpm is not None:
            self._take_token(key.name, key.rpm)
        self._in_flight[key.name] = self._in_flight.get(key.name, 0) + 1
        return _Admitted(key, quotas, self._in_flight)

    def _take_token(self, name: str, rpm: int) -> None:
        now = self.clock.seconds()
        bucket = self._buckets.setdefault(name, _Bucket(float(rpm), now))
        per_second = rpm / 60
        bucket.tokens = min(float(rpm), bucket.tokens + (now - bucket.updated) * per_second)
        bucket.updated = now
        if bucket.tokens < 1:
            raise too_fast(name, rpm, (1 - bucket.tokens) / per_second)
        bucket.tokens -= 1


@dataclass
class _Admitted:
    """
    A request that L{KeyLimits} let in (L{Admission}).

    @ivar in_flight: The count of requests in flight per key name that it
        is counted in.
    """

    key: ApiKey
    quotas: QuotaBook | None
    in_flight: dict[str, int]

    def reserve(self, tokens: int) -> Deferred[Release]:
        quotas = self.quotas
        key = self.key
        if quotas is None or (
            tokens <= 0 and key.tokens_per_day is None and key.tokens_per_month is None
        ):
            # Nothing to reserve, nothing to check.
            return succeed(self._released)
        try:
            settle = quotas.reserve(key, tokens)
        except ProxyError as e:
            self.give_back()
            return fail(e)

        def release(tokens: int = 0) -> None:
            self.give_back()
            settle(tokens)

        return succeed(release)

    def _released(self, tokens: int = 0) -> None:
        self.give_back()
        if tokens and self.quotas is not None:
            self.quotas.add(self.key.name, tokens)

    def give_back(self) -> None:
        name = self.key.name
        left = self.in_flight[name] - 1
        if left:
            self.in_flight[name] = left
        else:
            del self.in_flight[name]


@dataclass
class GuessThrottle:
    """
    Refuses wrong keys from addresses that presented too many.

    It never refuses a valid key: people behind one NAT or TLS terminator
    with a guesser keep working, and keys are checked before the throttle is
    asked.  Generated keys (190 bits) cannot be guessed anyway; the throttle
    makes a guesser's answers 429 and keeps the log of its attempts short.

    @ivar clock: Tells time.
    @ivar failures: Wrong keys an address may present within C{window}
        seconds before its wrong keys are answered with 429.
    @ivar window: Seconds over which wrong keys are counted.
    @ivar max_addresses: How many addresses are remembered at most.
    """

    clock: IReactorTime
    failures: int = 10
    window: float = 60.0
    max_addresses: int = 10000
    _failed: OrderedDict[str, deque[float]] = field(default_factory=OrderedDict)

    def failed(self, address: str) -> Deferred[None]:
        """
        A wrong key came from C{address} (L{Throttle.failed}): 429 if the
        address already presented C{failures} wrong keys within the window.
        """
        try:
            self._count(address)
        except ProxyError as e:
            return fail(e)
        return succeed(None)

    def _count(self, address: str) -> None:
        now = self.clock.seconds()
        failed = self._failed.get(address, deque())
        while failed and failed[0] <= now - self.window:
            failed.popleft()
        throttled = len(failed) >= self.failures
        failed.append(now)
        if len(failed) > self.failures:
            failed.popleft()
        self._failed[address] = failed
        self._failed.move_to_end(address)
        _bound(self._failed, self.max_addresses)
        if throttled:
            wait = failed[0] + self.window - now
            raise too_many("too many wrong API keys from this address", wait)


def _bound(table: OrderedDict[str, _V], size: int) -> None:
    while len(table) > size:
        table.popitem(last=False)
