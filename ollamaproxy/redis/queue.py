# -*- test-case-name: tests.redis.test_queue -*-
"""
One fair queue for every proxy, kept in Redis (L{SharedQueue}).

Under C{--redis}, each backend's C{--parallel} slots for each named model
are counted in Redis for every proxy together, so that the requests in
flight at an Ollama for a model never add up to more than its parallel;
and the requests waiting for them, on any proxy, are ordered as the
in-process queue orders them (L{ollamaproxy.backends.queue}): the next
slot freed goes to the waiting key whose next request starts first in
virtual time, C{max(now, its finish)}, each slot moving its key's finish
on by the request's cost over the key's weight, charged at the grant and
trued up at release with what the meter read (the router's rule,
L{ollamaproxy.backends.router}).  The virtual time and each key's finish
are Redis's.  So are a key's users' turns (a key with a user header,
L{ollamaproxy.admission.users}): the slot a key gets goes to its request
whose user starts first in the key's own virtual time, each user's finish
moved on by its requests' cost (before the key's weight) and trued up
alike, as the in-process queue's two levels do.

The waiting room is one too: C{--max-queue} counts the requests waiting
on every proxy, and when it is full a newcomer takes the place of the
newest request of the key (then of its own key's user) holding the most
places, by the in-process queue's rule; that request's proxy answers its
client the 503, told on its channel like a grant.  A refusal's
C{Retry-After} is reckoned in Redis from the pace at which the model's
slots have freed while requests waited (on every proxy, as the router
times its own), else the queue timeout.

A backend's limit for a model is the lowest of its C{parallel} and the
effective parallels the proxies have seen lowered there
(L{ollamaproxy.backends.effective}): each C{ACQUIRE} names this proxy's
lowered ones, and clears its own that are lowered no longer; a proxy's
lowering lapses C{--redis-lease} after its last C{ACQUIRE} for the
model, as the proxy may have died.

Each step is one Lua script (L{ollamaproxy.redis.scripts}), run whole
before any other command, which also gives out whatever is free:

  - C{ACQUIRE} puts the request in line and serves the line: the answer
    says whether it got a slot at once;
  - C{DONE} frees the slot of a request that ended (with the true-up) or
    takes a waiting one out of line (its client left, its time ran out),
    and serves the line: a slot freed goes to the next request at once,
    in the same script;
  - C{RENEW_QUEUE}, in each round of the link, renews this proxy's
    waiting requests and leases.

A grant for a request of another proxy is C{PUBLISH}ed to that proxy's
channel, which it listens to on a connection of its own; a message lost
(that connection was away) is made good by the next round, whose answer
names this proxy's waiting tickets that were granted.  An unqueued
request so costs two round trips to Redis (C{ACQUIRE}, C{DONE}); a queued
one the same two, and one message to its proxy; a client that leaves the
line one more (C{DONE}); one refused, or displaced from a full queue, its
C{ACQUIRE} alone; and each proxy one C{RENEW_QUEUE} a round.

A proxy that dies leaves its waiting requests and its slots behind for
no longer than C{--redis-lease}: each carries an expiry that the live
proxy's rounds move on, and every script first sweeps away those past
it (and gives out what that frees).

While Redis cannot be asked, each proxy queues in its own process (the
router's queue, L{Ask.local}): a request that was waiting in Redis moves
there when the link finds Redis down, one whose C{ACQUIRE} fails goes
there at once.  A request granted by Redis and running when it goes down
gives its backend's count back in this process as usual; its slot in
Redis is freed by its C{DONE} if Redis answers, else when its lease
expires.  The link logs the outage and the return, and sets
C{ollamaproxy_redis_up}.  C{--redis-failure} does not change the queue:
under C{closed}, the limits refuse keys that have any.

Left to this process's queue: requests that take no slot, and those whose
model the proxy cannot name (L{ollamaproxy.backends.router.UNREAD_MODEL},
a whole backend).  Collation (C{--switch-hold}) is not applied to the
requests waiting in Redis (L{ollamaproxy.backends.collate} holds a
backend on one proxy's timer and its view of what the backend holds).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from ollamaproxy.backends.queue import busy
from ollamaproxy.backends.router import Lease, Router
from ollamaproxy.backends.shared import Ask
from ollamaproxy.config import DEFAULT_MAX_QUEUE, DEFAULT_QUEUE_TIMEOUT, DEFAULT_REDIS_LEASE
from ollamaproxy.redis import scripts
from ollamaproxy.redis.limits import PREFIX
from ollamaproxy.redis.link import RedisLink, Subscribe, Subscription


def _ignore(_: object) -> None:
    return None


def _user(user: str | None) -> str:
    """
    How Redis knows C{user}: C{@} and the name (C{@} alone for a key's
    anonymous user), or C{''} for a key that names no users.
    """
    return "" if user is None else "@" + user


@dataclass(eq=False)
class _Waiting:
    """
    A request in line in Redis, or moved to this process's queue (C{local}).
    """

    ticket: str
    ask: Ask
    granted: Deferred[Lease]
    timer: IDelayedCall | None = None
    local: Deferred[Lease] | None = None


class RedisQueue(Service):
    """
    The fair queue shared through Redis (L{SharedQueue}).

    @param link: The connection to Redis.
    @param router: The router whose named models' slots it keeps.
    @param clock: Tells time, for the leases and the queue's timeout.
    @param subscribe: Listens to this proxy's channel of grants.
    @param lease: Seconds a waiting request or a slot of a proxy that died
        stays counted.
    """

    def __init__(
        self,
        link: RedisLink,
        router: Router,
        clock: IReactorTime,
        subscribe: Subscribe,
        lease: float = DEFAULT_REDIS_LEASE,
        max_queue: int = DEFAULT_MAX_QUEUE,
        queue_timeout: float = DEFAULT_QUEUE_TIMEOUT,
        prefix: str = PREFIX,
    ) -> None:
        self._link = link
        self._clock = clock
        self._subscribe = subscribe
        self._lease = lease
        self._max_queue = max_queue
        self._timeout = queue_timeout
        self._prefix = prefix
        self._waiting: dict[str, _Waiting] = {}
        # Ticket -> (lease, "URL\nMODEL") of each request running on a slot
        # that Redis gave.
        self._held: dict[str, tuple[Lease, str]] = {}
        self._subscription: Subscription | None = None
        router.shared = self
        link.each_round(self.renew)
        link.on_down(self._went_down)

    @property
    def channel(self) -> str:
        """
        Where Redis tells this proxy of grants it did not ask for.
        """
        return f"{self._prefix}q:grants:{self._link.instance}"

    def startService(self) -> None:
        super().startService()
        self._subscription = self._subscribe(self.channel, self.heard)

    def stopService(self) -> Deferred[Any] | None:
        super().stopService()
        subscription, self._subscription = self._subscription, None
        if subscription is None:
            return None
        return subscription.close().addErrback(_ignore)

    def _call(self, script: str, *args: Any) -> Deferred[Any]:
        now = int(self._clock.seconds() * 1000)
        head = [self._prefix, now, int(self._lease * 1000), self._link.instance,
                int(self._timeout * 1000)]
        return self._link.call(script, [], [*head, *args])

    def take(self, ask: Ask) -> Deferred[Lease]:
        """
        Put C{ask} in line in Redis (L{SharedQueue.take}), or in this
        process's queue while Redis is down.
        """
        if not self._link.up:
            return ask.local()
        ticket = self._link.unique()

        def leave(_: Deferred[Lease]) -> None:
            self._leave(waiting)

        waiting = _Waiting(ticket, ask, Deferred(leave))
        waiting.timer = self._clock.callLater(self._timeout, self._expire, waiting)
        self._waiting[ticket] = waiting
        self._ask(waiting)
        return waiting.granted

    def _ask(self, waiting: _Waiting) -> None:
        """
        Send C{waiting}'s C{ACQUIRE}: its answer gives out what is free.
        """
        ask, model = waiting.ask, waiting.ask.model
        backends = "".join(f"{b.name}\t{b.parallel}\n" for b in ask.backends)
        # An empty dict is no look-up: a lowering is rare.
        lowered = "".join(f"{b.name}\t{b.effective[model]}\n" for b in ask.backends
                          if b.effective and model in b.effective)
        asked = self._call(scripts.ACQUIRE, waiting.ticket, ask.key, _user(ask.user),
                           model.canonical, backends, repr(ask.cost), repr(ask.weight), lowered,
                           self._max_queue)
        asked.addCallbacks(self._grants, self._not_asked, errbackArgs=(waiting,))

    def _grants(self, answer: list[Any]) -> None:
        """
        Deliver the grants of this proxy in a script's answer: a flat list
        of tickets and the URLs of their backends.
        """
        for ticket, url in zip(answer[::2], answer[1::2], strict=True):
            self._deliver(str(ticket), str(url))

    def heard(self, message: str) -> None:
        """
        A grant published to this proxy's channel: C{TICKET\\nURL}, or a
        refusal, C{TICKET\\n!MS}.
        """
        ticket, _, url = message.partition("\n")
        self._deliver(ticket, url)

    def _deliver(self, ticket: str, url: str) -> None:
        """
        Give the request of C{ticket} its slot on the backend at C{url}, or
        for a C{url} of C{!MS}, the 503 of a full queue, whose
        C{Retry-After} is MS milliseconds: the queue was full when it came,
        or a newcomer took its place.  A ticket no longer waiting has left
        the line, and its C{DONE}, sent after the grant in Redis's order,
        freed the slot.
        """
        waiting = self._waiting.pop(ticket, None)
        if waiting is None:
            return
        self._stop_timer(waiting)
        if url[:1] == "!":
            waiting.granted.errback(busy(
                f"too many requests waiting ({self._max_queue}); try again shortly",
                int(url[1:]) / 1000, "queue_full",
            ))
            return
        ask = waiting.ask
        backend = next(b for b in ask.backends if b.name == url)
        lease = ask.lease(backend, ticket)
        self._held[ticket] = (lease, f"{url}\n{ask.model.canonical}")
        waiting.granted.callback(lease)

    def _not_asked(self, failure: Failure, waiting: _Waiting) -> None:
        """
        C{waiting}'s C{ACQUIRE} failed (Redis is down): it waits in this
        process's queue instead.
        """
        if self._waiting.get(waiting.ticket) is waiting:
            self._go_local(waiting)

    def _go_local(self, waiting: _Waiting) -> None:
        """
        Move C{waiting} from Redis's line to this process's queue.  Its
        ticket leaves Redis's line (if Redis can be told; else it expires
        there).
        """
        self._out_of_line(waiting)
        waiting.local = maybeDeferred(waiting.ask.local)
        waiting.local.chainDeferred(waiting.granted)

    def _went_down(self) -> None:
        """
        Redis went down: nobody waits for it any longer.
        """
        for waiting in list(self._waiting.values()):
            self._go_local(waiting)

    def _leave(self, waiting: _Waiting) -> None:
        """
        C{waiting}'s client left: it leaves the line it is in.
        """
        if waiting.local is not None:
            waiting.local.cancel()
            return
        self._out_of_line(waiting)

    def _expire(self, waiting: _Waiting) -> None:
        # Fired: nothing to cancel.
        waiting.timer = None
        if not self._out_of_line(waiting):
            return
        waiting.granted.errback(busy(
            f"no backend was free for {self._timeout:g} seconds; try again shortly",
            self._timeout, "queue_timeout",
        ))

    def _out_of_line(self, waiting: _Waiting) -> bool:
        """
        Take C{waiting} out of Redis's line, if it is still in it: its
        timer stopped, its ticket given up in Redis (L{_give_up}).

        @return: Whether it was in line.
        """
        if self._waiting.pop(waiting.ticket, None) is None:
            return False
        self._stop_timer(waiting)
        self._give_up(waiting)
        return True

    @staticmethod
    def _stop_timer(waiting: _Waiting) -> None:
        if waiting.timer is not None:
            waiting.timer.cancel()
            waiting.timer = None

    def _give_up(self, waiting: _Waiting) -> None:
        """
        C{waiting} leaves Redis's line: given back in full if it was
        granted meanwhile, as it never ran.
        """
        ask = waiting.ask
        self._done(waiting.ticket, ask.key, -ask.cost / ask.weight, ask.user, -ask.cost)

    def _done(self, ticket: str, key: str, charge: float, user: str | None,
              user_charge: float) -> None:
        """
        Tell Redis that C{ticket} has left the line or freed its slot, with
        its key's C{charge} and its user's; what that frees is given out
        in the same script.  A failure only leaves it to expire.
        """
        self._call(scripts.DONE, ticket, key, repr(charge), _user(user),
                   repr(user_charge)).addCallbacks(self._grants, _ignore)

    def waiting(self) -> dict[str, int]:
        """
        How many of this proxy's requests each key has waiting in Redis
        (L{SharedQueue.waiting}): for the metric and the console.
        """
        return dict(Counter(w.ask.key for w in self._waiting.values()))

    def give_back(
        self, ticket: str, key: str, charge: float, user: str | None, user_charge: float
    ) -> None:
        """
        C{ticket}'s request ended (L{SharedQueue.give_back}): its slot in
        Redis is freed, and its key's finish trued up by C{charge}, its
        user's by C{user_charge}.
        """
        self._held.pop(ticket, None)
        self._done(ticket, key, charge, user, user_charge)

    def renew(self) -> Deferred[None]:
        """
        One round's renewal of this proxy's waiting requests and slots; a
        waiting request found granted gets its slot (its message was lost),
        one found forgotten (Redis restarted empty) is put in line again.
        """
        waiting = list(self._waiting)
        held = [part for ticket, (_, slot) in self._held.items() for part in (ticket, slot)]
        renewed = self._call(scripts.RENEW_QUEUE, len(waiting), *waiting, *held)

        def answered(answer: list[Any]) -> None:
            lost, grants = answer
            for ticket, url in zip(lost[::2], lost[1::2], strict=True):
                if url:
                    self._deliver(str(ticket), str(url))
                elif (again := self._waiting.get(str(ticket))) is not None:
                    self._ask(again)
            self._grants(grants)

        return renewed.addCallback(answered)
