# -*- test-case-name: tests.admission.test_quotas -*-
"""
Token quotas per key, kept in this process.

A key with C{tokens_per_day} or C{tokens_per_month} may use that many
prompt and completion tokens in a UTC day or month
(L{ollamaproxy.admission.quota_periods}).  A request is admitted while its
key has tokens left (checked before its body is read), and once it is
planned its expected cost (L{ollamaproxy.admission.estimate}) is reserved,
if the key still has tokens left: it counts as used until the request
ends, when the tokens it did use (as its meter read them,
L{ollamaproxy.exchange.Meter}) replace it.  So requests running together
see each other's cost, and a key overshoots its quota by no more than one
request's error in that estimate; the request that crosses a quota
completes (a stream is never cut for it), and the key's next request is
refused with 429 until the period ends.  A request's reservation counts in
the day and month it started in; if one of those has ended when the request
does, the tokens it used count in the new one instead.

L{QuotaBook} keeps the tokens each key used in the current day and month,
and forgets a period when the next begins, so its memory holds at most one
count per key and period.  At start it is seeded, by L{QuotaSeed}, with what
the usage store recorded earlier in the day and month, so that a restart
does not give every key its quota afresh; until then it answers the requests
of keys with a quota with 503, lest they slip past.

The counts are this process's: several proxies (or several processes on one
port) each count their own, unless the quota is kept in Redis.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Final

from twisted.application.service import Service
from twisted.internet.defer import Deferred, FirstError, gatherResults
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from ollamaproxy.admission.keys import ApiKey
from ollamaproxy.admission.limits import too_many
from ollamaproxy.admission.quota_periods import Period, Window, over_quota_message, window
from ollamaproxy.errors import ProxyError

log = Logger()

# How long a key with a quota is asked to wait while the book is seeded.
LOADING_RETRY: Final = 1


def over_quota(key: ApiKey, quota: int, span: Window, now: float) -> ProxyError:
    """
    The 429 for a key over its quota in C{span}: C{Retry-After} says when
    the quota resets.
    """
    return too_many(over_quota_message(key.name, quota, span), span.end - now)


class QuotaBook:
    """
    The tokens each key used this UTC day and this UTC month.

    It counts every key's tokens, with a quota or not, so that a quota
    given to a key while the proxy runs (C{keys update}) counts what the
    key has already used.

    @ivar loaded: Whether it holds what was used before this process
        started (L{seed}); until then, keys with a quota get 503.
    """

    def __init__(
        self,
        clock: IReactorTime,
        refused: Callable[[str, Period], None] | None = None,
        *,
        loaded: bool = False,
    ) -> None:
        """
        @param clock: Tells time, for the periods.
        @param refused: Told the key name and period of every request
            refused for its quota (for a metric).
        @param loaded: Whether to count from nothing at once, without
            L{seed}.
        """
        self._clock = clock
        self._refused = refused
        self.loaded = loaded
        now = clock.seconds()
        self._day = window("day", now)
        self._month = window("month", now)
        # Counted into on every request that used tokens: cheap to add to.
        self._day_used: defaultdict[str, int] = defaultdict(int)
        self._month_used: defaultdict[str, int] = defaultdict(int)

    def _turn(self, now: float) -> None:
        """
        Start afresh the periods that have ended by C{now}.  (A month
        cannot end but with a day: callers look at the day alone.)
        """
        if not self._day.start <= now < self._day.end:
            self._day = window("day", now)
            self._day_used = defaultdict(int)
        if not self._month.start <= now < self._month.end:
            self._month = window("month", now)
            self._month_used = defaultdict(int)

    def check(self, key: ApiKey) -> None:
        """
        See that C{key} may make a request.  A key without a quota always
        may.

        @raise ProxyError: 429 with C{Retry-After} (when the quota resets)
            if the key has used its tokens for this month or this day (the
            month first: the day's end would not help); 503 with
            C{Retry-After: 1} for a key with a quota before L{seed}.
        """
        day_quota = key.tokens_per_day
        month_quota = key.tokens_per_month
        if day_quota is None and month_quota is None:
            return
        now = self._clock.seconds()
        if not self.loaded:
            raise ProxyError(
                503,
                "token quotas are being loaded from the usage store; try again in a second",
                {b"Retry-After": b"%d" % LOADING_RETRY},
                outcome="rejected",
            )
        if not self._day.start <= now < self._day.end:
            self._turn(now)
        if month_quota is not None and self._month_used.get(key.name, 0) >= month_quota:
            self.refused(key.name, "month")
            raise over_quota(key, month_quota, self._month, now)
        if day_quota is not None and self._day_used.get(key.name, 0) >= day_quota:
            self.refused(key.name, "day")
            raise over_quota(key, day_quota, self._day, now)

    def refused(self, name: str, period: Period) -> None:
        """
        A request of key C{name} was refused for its quota of C{period}:
        tell the C{refused} hook.  L{check} calls it; so does whatever
        checks the quotas elsewhere (L{ollamaproxy.redis.limits}).
        """
        if self._refused is not None:
            self._refused(name, period)

    def add(self, name: str, tokens: int) -> None:
        """
        A request of key C{name} has ended, having used C{tokens}; they
        count in the day and month it ended in.
        """
        if tokens <= 0:
            return
        now = self._clock.seconds()
        if not self._day.start <= now < self._day.end:
            self._turn(now)
        self._day_used[name] += tokens
        self._month_used[name] += tokens

    def reserve(self, key: ApiKey, tokens: int) -> Callable[[int], None]:
        """
        A request of C{key} was admitted and planned, expected to cost
        C{tokens}: if the key may still make it (L{check}, again: requests
        admitted together each passed the first check), they count as used
        now, so that the key's next request sees them.

        @return: Settles the request, called once when it has ended with the
            tokens it used: they replace the reservation in the day and
            month it was made in, or count in the new ones if those ended.
        @raise ProxyError: As L{check}; then nothing is reserved.
        """
        self.check(key)
        name = key.name
        now = self._clock.seconds()
        if not self._day.start <= now < self._day.end:
            self._turn(now)
        day, month = self._day, self._month
        if tokens > 0:
            self._day_used[name] += tokens
            self._month_used[name] += tokens

        def settle(used: int) -> None:
            now = self._clock.seconds()
            if not self._day.start <= now < self._day.end:
                self._turn(now)
            reserved = tokens if tokens > 0 else 0
            # In the period it was made in, the reservation is replaced; in
            # a new one, the tokens used count.
            for span, current, counts in ((day, self._day, self._day_used),
                                          (month, self._month, self._month_used)):
                charge = used - reserved if span is current else used
                if charge:
                    counts[name] += charge

        return settle

    def used(self, name: str, period: Period) -> int:
        """
        The tokens key C{name} used in the current day or month.
        """
        self._turn(self._clock.seconds())
        return (self._day_used if period == "day" else self._month_used).get(name, 0)

    def seed(self, day: Window, day_used: dict[str, int], month: Window,
             month_used: dict[str, int]) -> None:
        """
        Add what the keys used before this process started, and start
        answering for keys with a quota.  A period that has ended since it
        was read is left out.

        @param day: The day C{day_used} was read for.
        @param day_used: Tokens per key name in that day, as recorded.
        @param month: The month C{month_used} was read for.
        @param month_used: The same in that month.
        """
        self._turn(self._clock.seconds())
        for span, used, current, counts in ((day, day_used, self._day, self._day_used),
                                            (month, month_used, self._month, self._month_used)):
            if span.label == current.label:
                for name, tokens in used.items():
                    counts[name] += tokens
        self.loaded = True


class QuotaSeed(Service):
    """
    Seeds a L{QuotaBook} at start with the tokens each key used this UTC
    day and month, as the usage store recorded them.

    Start it right after the usage store, on the store's worker: the read
    must come before this process's own usage is written (the book counts
    that itself).  A read that fails is logged and the book opens without
    it: quotas then count from this start.
    """

    def __init__(
        self,
        book: QuotaBook,
        clock: IReactorTime,
        tokens_since: Callable[[float], Deferred[dict[str, int]]],
    ) -> None:
        """
        @param book: The book to seed.
        @param clock: Tells time, for the periods to read.
        @param tokens_since: Reads, off the reactor thread, the tokens per
            key name recorded since a time (seconds since the epoch).
        """
        self._book = book
        self._clock = clock
        self._tokens_since = tokens_since

    def startService(self) -> None:
        super().startService()
        now = self._clock.seconds()
        day, month = window("day", now), window("month", now)
        read_month = self._tokens_since(month.start)
        read_day = self._tokens_since(day.start)

        async def seed() -> None:
            try:
                month_used, day_used = await gatherResults([read_month, read_day],
                                                           consumeErrors=True)
            except FirstError as e:
                log.failure(
                    "Cannot read this month's usage for the token quotas; they count "
                    "from now on",
                    e.subFailure,
                )
                self._book.seed(day, {}, month, {})
                return
            self._book.seed(day, day_used, month, month_used)
            log.info(
                "Token quotas loaded: {keys} key(s) used tokens this month",
                keys=len(month_used),
            )

        Deferred.fromCoroutine(seed()).addErrback(
            lambda reason: log.failure("Seeding the token quotas failed", reason)
        )
