# -*- test-case-name: tests.backends.test_queue -*-
"""
Waiting fairly for a busy model.

When every backend that has a model is running as many requests for it as
it may, a new request waits here.  Waiting requests of different keys are
served in turn, and a key's own requests in the order they came.  One key's
burst of a hundred does not delay another key's one request by a hundred
turns: that request is served next.

Turns are weighted by what they cost (start-time fair queueing): each key
has a virtual finish time, which every slot it gets (waiting or not) moves
on by the request's cost divided by the key's weight; the next slot goes
to the waiting key whose next request would start first, C{max(now,
finish)} in virtual time.  What a request costs is the caller's to say:
the router charges the seconds of GPU it took, or its tokens (an estimate
when the slot is given, trued up with the meter's reading when it is
given back, L{charge}), so that keys of equal weight get equal GPU work,
not equal turns; with every cost 1
(C{--fair-share requests}) a key of weight 3 is served three times for
every once of a key of weight 1, and with every weight 1 too this is plain
round-robin: the key served least recently goes next.  A key that was idle
starts at the present virtual time: waiting earns no credit, and being
served earlier leaves no debt once the others have caught up.

Some requests hold the line: one that needs a whole backend (a request
whose model the proxy cannot name, L{ollamaproxy.backends.router}) may find
no slot free for long after a request for a model with a free slot would.
Served past, it would wait for as long as others keep coming; so when its
turn comes and it cannot be served, no request after it is served either,
until it is: the backends drain for it, in turn order.

A wait is a L{Deferred}: cancelling it (the client left) takes the request
out of the queue, and a request that waits longer than the timeout fails
with a 503 that says when to try again.  Neither ever reaches Ollama.

A key's share is divided among the people behind it the same way, when
its front-end says who each request is for (a key's user header,
L{ollamaproxy.admission.users}): two levels, keys first, then users within
a key.  Which key goes next is decided as above, the key as a whole;
which of that key's requests then goes is decided among its users by the
same rule, each user with a finish of its own in the key's own virtual
time (the start of the last slot the key's users got), moved on by each
of its slots' cost and trued up alike, all users of a key of equal weight.
A user that was idle starts at the key's present, as a key does at the
queue's.  A request of such a key that names no user is the key's
anonymous user, one more user.  So one person's batch of twenty behind a
shared key holds back that person's next turn, not the other people's: the
next slot the key gets goes to the person whose turn is first.  A key with
no user header has one user, and no second level: its requests cost
nothing more.

The waiting room is shared fairly too.  When C{limit} requests wait, a
newcomer whose key, counting the newcomer, would still hold fewer places
than the key holding the most takes the place of that key's newest waiting
request, which fails with the 503 instead (among keys holding as many, the
one whose newest came last gives it up).  The same holds among the users
behind a key: a newcomer whose key holds the most takes the place of the
newest request of its key's user holding the most, if its own user would
still hold fewer; and the place a key gives up is its busiest user's.  So
nobody with nothing waiting is refused while another key (or another user
of its own key) holds more than one place, and places do not
swap back and forth between two keys a place apart; when every key holds
one, the newcomer is refused, as it would be with a single pool.  Places
are counted per key, whatever the keys' weights: a weight shares turns,
not room.

The 503's C{Retry-After} is how long until the request would be served if
it came back: the requests ahead of it (those waiting for the same kind of
slot) and itself, times the measured seconds between two of that kind's
slots freeing (C{pace}, a moving average the router keeps), at least one
second and at most the timeout.  Before anything is measured, the timeout.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Hashable, Iterable, KeysView
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Generic, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from ollamaproxy.errors import ProxyError
from ollamaproxy.exchange import ANONYMOUS, Outcome

# How many keys' last turns are remembered.
_REMEMBERED = 4096

W = TypeVar("W")  # what a waiter wants (a model name)
G = TypeVar("G")  # what it is granted (a lease on a backend)


def busy(message: str, retry_after: float, outcome: Outcome = "rejected") -> ProxyError:
    """
    A 503 that says when to try again.
    """
    seconds = str(max(1, math.ceil(retry_after))).encode("ascii")
    return ProxyError(503, message, {b"Retry-After": seconds}, outcome=outcome)


@dataclass(eq=False)
class _Waiter(Generic[W, G]):
    key: str
    wants: W
    kind: Hashable
    # Arrival order, across all keys.
    number: int
    granted: Deferred[G]
    # What its slot moves its key's finish by, before the key's weight.
    cost: float = 1.0
    timer: IDelayedCall | None = None
    # Who it is for behind its key (None: the key has no users); and the
    # line it waits in among its key's: its kind, or its user's kind.
    user: str | None = None
    lane: Hashable = None


@dataclass
class _Turns:
    """
    Turns in one virtual time (see the module's docstring): L{FairQueue}
    keeps one for its keys, and one for the users behind each key that
    names any, in that key's own time.

    @ivar virtual: The virtual time now: the start of the last slot given.
    @ivar finish: Each one's virtual finish time.
    """

    virtual: float = 0.0
    finish: dict[str, float] = field(default_factory=dict)

    def start(self, name: str) -> float:
        """
        When, in virtual time, C{name}'s next request would start.
        """
        finish = self.finish.get(name, 0.0)
        return finish if finish > self.virtual else self.virtual

    def served(self, name: str, cost: float) -> None:
        """
        A request of C{name} got a slot: its turn was now, and it moves
        C{name}'s finish on by C{cost}.
        """
        # start(), inlined: this runs for every request that runs a model.
        finish = self.finish.get(name, 0.0)
        start = finish if finish > self.virtual else self.virtual
        self.virtual = start
        self.finish[name] = start + cost
        if len(self.finish) > _REMEMBERED:
            # One whose finish has passed is as good as one never seen.
            self.finish = {n: f for n, f in self.finish.items() if f > self.virtual}

    def charge(self, name: str, cost: float) -> None:
        """
        Move C{name}'s finish on by C{cost} more, or back for a negative
        C{cost}.  (One forgotten since was at or before the present.)
        """
        self.finish[name] = self.finish.get(name, self.virtual) + cost


def _newest(lines: Iterable[Iterable[deque[_Waiter[W, G]]]]) -> _Waiter[W, G]:
    """
    The request that came last of those in C{lines} (groups of lines).
    """
    return max((waiters[-1] for group in lines for waiters in group), key=_by_arrival)


def _newest_of_most(users: dict[str | None, list[deque[_Waiter[W, G]]]]) -> _Waiter[W, G]:
    """
    The newest waiting request of the user holding the most places (among
    users holding as many, the one whose newest came last).
    """
    most = max(sum(map(len, lines)) for lines in users.values())
    return _newest(lines for lines in users.values() if sum(map(len, lines)) == most)


def _same(wants: Hashable) -> Hashable:
    return wants


def _unmeasured(wants: object) -> float | None:
    return None


def _never(wants: object) -> bool:
    return False


_by_arrival = attrgetter("number")


@dataclass
class FairQueue(Generic[W, G]):
    """
    Requests waiting for a slot, served in weighted turns across keys.

    A key's waiters are kept apart by kind (what they want, as far as a slot
    is concerned: a model, and the backends not to use), so that finding a
    key's first request that can be served asks once per kind, not once per
    request: a key with hundreds waiting for one busy model costs one
    question, not hundreds, each time a slot frees.

    @ivar clock: Tells time for the timeout.
    @ivar limit: The most requests that may wait in all; beyond it a new one
        is refused with 503 at once.
    @ivar timeout: Seconds a request may wait before it is refused with 503.
    @ivar kind: What kind of slot a request wanting C{W} needs: two with
        the same kind are served, or not, alike.  By default, C{W} itself.
    @ivar holds: Whether a request wanting C{W} holds the line: when its
        turn comes and nothing is free for it, no later request is served
        (see the module's docstring).  By default, none does.
    @ivar pace: The measured seconds between two slots of the kind a
        request wanting C{W} needs freeing, or L{None} before any
        measurement: what C{Retry-After} is reckoned from (see the module's
        docstring).  By default, never measured.
    """

    clock: IReactorTime
    limit: int
    timeout: float
    kind: Callable[[W], Hashable] = _same
    holds: Callable[[W], bool] = _never
    pace: Callable[[W], float | None] = _unmeasured
    # Keys with waiting requests, in the order they came; each key's
    # waiters by kind, each kind's in the order they came.
    _keys: OrderedDict[str, dict[Hashable, deque[_Waiter[W, G]]]] = field(
        default_factory=OrderedDict
    )
    _arrivals: itertools.count[int] = field(default_factory=itertools.count)
    # How many wait for each kind, all keys together.
    _kinds: Counter[Hashable] = field(default_factory=Counter)
    _size: int = 0
    # The keys' turns: each key's virtual finish time, and the virtual time.
    _turns: _Turns = field(default_factory=_Turns)
    _weights: dict[str, float] = field(default_factory=dict)
    # The turns of the users of each key that has named any (see the
    # module's docstring).
    _users: dict[str, _Turns] = field(default_factory=dict)

    def __len__(self) -> int:
        return self._size

    def kinds(self) -> KeysView[Hashable]:
        """
        The kinds of slot that waiting requests want.
        """
        return self._kinds.keys()

    def waiting(self) -> dict[str, int]:
        """
        How many requests each key has waiting.
        """
        return {key: sum(map(len, kinds.values())) for key, kinds in self._keys.items()}

    def wait(self, key: str, wants: W, weight: float = 1.0, cost: float = 1.0,
             user: str | None = None) -> Deferred[G]:
        """
        Wait in line for C{wants}.

        @param weight: The key's share of turns against other keys'.
        @param cost: What the request's slot is charged (see L{served}).
        @param user: Who the request is for behind its key, or L{None} for
            a key that names no users (see the module's docstring).
        @return: Fires with what L{serve} grants; fails with a 503
            L{ProxyError} after C{timeout} seconds; cancelling it leaves the
            queue.
        @raise ProxyError: 503 at once if C{limit} requests already wait and
            no other key holds enough of the places for this one to take one
            (see the module's docstring).
        """
        displaced = None
        if self._size >= self.limit:
            displaced = self._displaced(key, user)
            if displaced is None:
                raise self._full(wants)
            self._remove(displaced)

        def leave(_: Deferred[G]) -> None:
            self._remove(waiter)

        kind = self.kind(wants)
        waiter: _Waiter[W, G] = _Waiter(key, wants, kind, next(self._arrivals), Deferred(leave),
                                        cost, None, user, kind if user is None else (user, kind))
        waiter.timer = self.clock.callLater(self.timeout, self._expire, waiter)
        self._keys.setdefault(key, {}).setdefault(waiter.lane, deque()).append(waiter)
        self._kinds[kind] += 1
        self._weights[key] = weight
        self._size += 1
        if displaced is not None:
            # Told last, when the queue is whole again: its client's answer
            # may run anything.
            displaced.granted.errback(self._full(displaced.wants))
        return waiter.granted

    def _full(self, wants: W) -> ProxyError:
        return busy(f"too many requests waiting ({self.limit}); try again shortly",
                    self.retry_after(wants), "queue_full")

    def _displaced(self, key: str, user: str | None) -> _Waiter[W, G] | None:
        """
        The waiting request a newcomer of C{key} (and C{user}) takes the
        place of in a full queue, or L{None} if it takes none: of the key
        holding the most places, if C{key} would hold fewer with the
        newcomer, else of C{key} itself, if C{user} would hold fewer than
        the key's user holding the most; in either key, the newest of its
        user holding the most.  Asked only when the queue is full, so the
        count may cost a pass over the keys.
        """
        if not self._keys:
            return None
        counts = self.waiting()
        most = max(counts.values())
        if counts.get(key, 0) + 1 < most:
            holders = [self._by_user(holder) for holder, n in counts.items() if n == most]
            # Among keys holding as many, the one whose newest came last.
            return _newest_of_most(max(holders, key=lambda users: _newest(users.values()).number))
        kinds = self._keys.get(key)
        if user is None or kinds is None:
            return None
        users = self._by_user(key)
        mine = sum(map(len, users.get(user, ())))
        if mine + 1 >= max(sum(map(len, lines)) for lines in users.values()):
            return None
        return _newest_of_most(users)

    def _by_user(self, key: str) -> dict[str | None, list[deque[_Waiter[W, G]]]]:
        """
        C{key}'s lines of waiting requests, by the user they are for.
        """
        users: dict[str | None, list[deque[_Waiter[W, G]]]] = {}
        for waiters in self._keys[key].values():
            users.setdefault(waiters[0].user, []).append(waiters)
        return users

    def retry_after(self, wants: W) -> float:
        """
        Seconds until a request wanting C{wants} would be served if it came
        back: the requests waiting for its kind of slot and itself, times
        the C{pace} of that kind, between 1 and C{timeout}; C{timeout}
        before any measurement.
        """
        pace = self.pace(wants)
        if pace is None:
            return self.timeout
        ahead = self._kinds.get(self.kind(wants), 0)
        return min(self.timeout, max(1.0, (ahead + 1) * pace))

    def served(self, key: str, weight: float = 1.0, cost: float = 1.0,
               user: str | None = None) -> None:
        """
        A request of C{key} got a slot: its turn was now, and it moves the
        key's finish on by C{cost / weight}, and its C{user}'s, if it
        names one, by C{cost} in the key's own time.

        @param cost: What the request is expected to cost: 1 for a turn, or
            its tokens (trued up later with L{charge}).
        """
        if user is not None:
            self._users_of(key).served(user, cost)
        self._turns.served(key, cost / weight)

    def charge(self, key: str, weight: float, cost: float, user: str | None = None) -> None:
        """
        Move C{key}'s finish on by C{cost / weight} more, or back for a
        negative C{cost}: a served request turned out to cost more, or less,
        than L{served} was told.  The turn it had stays had: only the key's
        next start moves, and never to before the present
        (L{_Turns.start}), so an overestimate given back earns no credit.
        Its C{user}'s, if it names one, moves alike.
        """
        if user is not None:
            self._users_of(key).charge(user, cost)
        self._turns.charge(key, cost / weight)

    def finish(self, key: str) -> float:
        """
        Where C{key}'s turns have taken it in virtual time: its next request
        starts there, or at the present if that is later.  (What the
        tests check the charges by.)
        """
        return self._turns.finish.get(key, 0.0)

    def _users_of(self, key: str) -> _Turns:
        """
        The turns of C{key}'s users, made when it first names one.  Keys
        whose users all have their finish behind them are forgotten beyond
        L{_REMEMBERED} keys, as keys are: they would start at the present.
        """
        users = self._users.get(key)
        if users is None:
            if len(self._users) >= _REMEMBERED:
                self._users = {
                    k: u for k, u in self._users.items()
                    if k in self._keys or any(f > u.virtual for f in u.finish.values())
                }
            users = self._users[key] = _Turns()
        return users

    def user_finish(self, key: str, user: str) -> float:
        """
        Where C{user}'s turns have taken it in C{key}'s virtual time (what
        the tests check the charges by).
        """
        users = self._users.get(key)
        return 0.0 if users is None else users.finish.get(user, 0.0)

    def serve(self, grant: Callable[[W], G | None]) -> None:
        """
        Give slots to waiting requests for as long as C{grant} finds one:
        each time to the waiting key whose turn is first (in the order the
        keys came, among equals), its first request that C{grant} accepts.

        @param grant: Returns what a request wanting C{W} gets now, or
            L{None} if nothing is free for it.
        """
        # Kinds found with no free slot: giving slots away frees none, so
        # they stay so for the rest of this call.
        full: set[Hashable] = set()
        while self._size:
            for key in sorted(self._keys, key=self._turns.start):
                waiter, granted = self._first_granted(key, grant, full)
                if waiter is not None and granted is not None:
                    weight = self._weights[key]
                    self._remove(waiter)
                    self.served(key, weight, waiter.cost, waiter.user)
                    waiter.granted.callback(granted)
                    break
                if waiter is not None:
                    return  # it holds the line: no one after it goes first
                if self._kinds.keys() <= full:
                    return  # no other key's request could be served either
            else:
                return

    def _first_granted(
        self,
        key: str,
        grant: Callable[[W], G | None],
        full: set[Hashable],
    ) -> tuple[_Waiter[W, G] | None, G | None]:
        """
        A key's first request, by its users' turns (if it names users),
        then in the order they came, that C{grant} gives a slot: asked once
        for each line not yet found C{full}.  A request that holds the
        line and is given none comes back without a slot, and no later one
        is asked.
        """
        heads = [waiters[0] for waiters in self._keys[key].values()
                 if waiters[0].kind not in full]
        users = self._users.get(key)
        if users is not None:
            start = users.start
            heads.sort(key=lambda w: (start(w.user or ANONYMOUS), w.number))
        else:
            heads.sort(key=_by_arrival)
        for waiter in heads:
            if waiter.kind in full:
                continue  # another user's request of this kind found none
            granted = grant(waiter.wants)
            if granted is not None:
                return waiter, granted
            if self.holds(waiter.wants):
                return waiter, None
            full.add(waiter.kind)
        return None, None

    def _expire(self, waiter: _Waiter[W, G]) -> None:
        waiter.timer = None
        self._remove(waiter)
        waiter.granted.errback(busy(
            f"no backend was free for {self.timeout:g} seconds; try again shortly",
            self.retry_after(waiter.wants),
            "queue_timeout",
        ))

    def _remove(self, waiter: _Waiter[W, G]) -> None:
        kinds = self._keys.get(waiter.key)
        waiters = None if kinds is None else kinds.get(waiter.lane)
        if kinds is None or waiters is None or waiter not in waiters:
            return
        waiters.remove(waiter)
        self._size -= 1
        self._kinds[waiter.kind] -= 1
        if not self._kinds[waiter.kind]:
            del self._kinds[waiter.kind]
        if not waiters:
            del kinds[waiter.lane]
            if not kinds:
                del self._keys[waiter.key]
                del self._weights[waiter.key]
        if waiter.timer is not None:
            waiter.timer.cancel()
            waiter.timer = None
