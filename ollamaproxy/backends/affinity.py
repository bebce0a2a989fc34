# -*- test-case-name: tests.backends.test_affinity -*-
"""
Conversations go home: the next turn of a conversation goes to the backend
that served the one before, where Ollama still holds its prompt in a slot's
cache, unless that costs more than it saves.

Ollama keeps one prompt cache per parallel slot, and gives a request the
slot whose cache shares the longest prefix with its prompt
(C{runner/ollamarunner/cache.go}): only the rest is evaluated.  Sent
anywhere else, a turn has its whole history evaluated again, which for a
long conversation is seconds of the GPU's time.  The router asks
L{Affinity.choose} for a request that carries a conversation (its digest,
L{ollamaproxy.admission.conversation}) once it has found the backends with
a free slot for it and the one it would pick without affinity:

  - the conversation's home (the backend its last turn went to) is chosen
    when it is among those backends (so healthy, having the model, not out
    for it, with a free slot), holds the model or no other candidate does
    (a runner that was unloaded took its caches with it), and runs no more
    than C{slack} requests more than the least busy of them.  Past the
    slack, it moves only to a candidate with a slot that no living
    conversation holds (see below): moved where every slot holds one, the
    turn would miss and evict one of them, two histories evaluated again to
    spare one turn some company on its home's GPU.  A backend
    holds a model when its listing shows it loaded, or when it runs
    requests of it that the listing has not caught up with (it is loading
    it): a home loading the model for the conversation's last turn keeps
    the next;
  - else (or past the slack, where there is room) the conversation goes,
    as a new one does, where it crowds the fewest others (below), and
    lives there from then on
    (L{Affinity.went});
  - a conversation seen for the first time, or moved, goes, among the
    backends that run at most C{slack} requests more than the router's
    choice, and if that choice holds its model, only those where the model
    is warm (held, or run there for a living conversation's turn: its
    runner is there though the listing, read every few seconds, may not
    say so yet; no load where none was needed), to the one whose runner
    of the model has the fewest living conversations for its slots (then
    the least busy, then the router's choice); a new conversation goes
    past the slack to a backend whose runner has a slot no living
    conversation holds when none within it has one, since starting where
    every slot holds another's cache would go on evicting them; so that
    conversations spread evenly over the backends' slots rather than all
    starting on the first one listed, or on the first to have loaded the
    model at a cold start.  A move that lands where every slot's cache
    holds another live conversation evicts one of them: it costs two
    misses, not one.

A request that had to wait in the fair queue takes the first slot that
frees, wherever it is: keeping it waiting longer for its home would cost
its client more than the cache saves.  It moves its conversation there.

Slots: a backend with C{parallel} slots keeps at most C{parallel}
conversations' caches (fewer when it runs fewer at once: its effective
parallel, L{Backend.effective}); a further conversation evicts one, and
the evicted one's next turn, finding no cache of its own, takes another's
slot: on a backend with more conversations than slots, misses go on.  So
a turn whose home holds more conversations than slots moves (within the
slack) to the least crowded candidate if that one has a slot no
conversation holds: one miss, after which both backends' conversations
keep their caches.  Where no candidate has room, it stays home: moving
would make a miss certain and evict another conversation's cache, staying
keeps the chance that its slot was not reused.  New and moved
conversations go where the fewest conversations live for each slot
(above).  More live conversations than slots in all make misses whatever
the routing: the cache-reuse metric shows it.

The conversations counted on a backend are its living ones, per model
(each runner has its own slots): those whose last turn went there less
than L{LIVE} seconds ago (Ollama's default C{keep_alive}).  One idle for
longer is still remembered, and its next turn still goes home, but it no
longer counts as holding a slot: its user has most likely left, and the
slot been reused.

Memory is bounded: the digests of the last L{CONVERSATIONS} conversations
seen, each with its backend, least recently used forgotten first.  Nothing
of a conversation's content is kept, only its digest.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Sequence
from typing import Final

from twisted.internet.interfaces import IReactorTime

from ollamaproxy.backends.pool import Backend
from ollamaproxy.exchange import TurnPlacement
from ollamaproxy.model_names import ModelName

#: How many conversations are remembered: at 16 bytes of digest and a
#: reference each, a couple of MiB at most.
CONVERSATIONS: Final = 10_000

#: Seconds after its last turn that a conversation stops counting as one
#: that lives on its backend (and holds a slot's cache there): Ollama's
#: default C{keep_alive}, after which an idle runner, and its caches, go.
#: A person reading an answer and typing the next question takes less.
LIVE: Final = 300.0

#: A model's runner on a backend, where conversations live: each has its
#: own slots, and caches.
_Runner = tuple[Backend, ModelName | None]


class Affinity:
    """
    The conversations' homes, and the rule that sends a turn home.

    @ivar slack: How many more requests in flight than the least busy
        candidate a home may run and still get its conversation's turn.
    """

    def __init__(self, slack: int, clock: IReactorTime, size: int = CONVERSATIONS,
                 live: float = LIVE) -> None:
        """
        @param clock: Tells when a turn went, for L{LIVE}.
        @param size: How many conversations are remembered.
        @param live: Seconds a conversation counts as living after a turn.
        """
        self.slack = slack
        self._clock = clock
        self._size = size
        self._live_for = live
        self._homes: OrderedDict[bytes, Backend] = OrderedDict()
        # The conversations that had a turn in the last `live` seconds,
        # each with its backend's runner (the backend and the model: each
        # runner has its own slots) and when, the least recent first; and
        # how many of them live on each runner.
        self._live: OrderedDict[bytes, tuple[_Runner, float]] = OrderedDict()
        self._living: Counter[_Runner] = Counter()

    def __len__(self) -> int:
        return len(self._homes)

    def home(self, conversation: bytes) -> Backend | None:
        """
        The backend C{conversation}'s last turn went to, if remembered.
        """
        return self._homes.get(conversation)

    def choose(
        self,
        conversation: bytes,
        free: Sequence[Backend],
        chosen: Backend,
        model: ModelName | None,
    ) -> Backend:
        """
        The backend for a turn of C{conversation} (see the module's
        docstring for the rule).

        @param free: The backends that may take the request now.
        @param chosen: The one the router would pick without affinity.
        @param model: The model the request names, if any.
        """
        home = self._homes.get(conversation)
        if home is chosen:
            return chosen
        self._expire(self._clock.seconds())
        if (home is not None and home in free
                # A runner that was unloaded took its caches with it.
                and (model is None or _holds(home, model) or not _holds(chosen, model))):
            if home.in_flight - min(b.in_flight for b in free) > self.slack:
                return self._past_slack(home, free, chosen, model)
            # Asked in the order of their cost: a home with room is most.
            if self._living[home, model] <= home.parallel and not home.effective:
                return home
            return self._rebalance(home, free, chosen, model)
        return self._least_lived(free, chosen, model, room=True)

    def _past_slack(
        self, home: Backend, free: Sequence[Backend], chosen: Backend, model: ModelName | None
    ) -> Backend:
        """
        The backend for a turn whose home, with a free slot, runs more than
        C{slack} requests more than the least busy candidate: the least
        crowded candidate within the slack, if it has a slot that no living
        conversation holds; else its home.  Moved where every slot holds
        a living conversation, the turn would miss and evict one of them,
        which would miss in its turn: two whole histories evaluated again
        to spare one turn some company on its home's GPU.
        """
        roomy = self._least_lived(free, chosen, model)
        return roomy if self._living[roomy, model] < self._slots(roomy, model) else home

    def _rebalance(
        self, home: Backend, free: Sequence[Backend], chosen: Backend, model: ModelName | None
    ) -> Backend:
        """
        The backend for a turn whose home holds more conversations than it
        has slots, so that its turns evict each other's caches (each miss
        takes another's slot: they go on missing): the least crowded
        candidate, if it has a slot that no conversation holds, where the
        conversation misses once and then stays; else its home.
        """
        slots = self._slots(home, model)
        if self._living[home, model] <= slots:
            return home
        roomy = self._least_lived(free, chosen, model)
        if roomy is home or self._living[roomy, model] >= self._slots(roomy, model):
            return home
        return roomy

    def _least_lived(
        self, free: Sequence[Backend], chosen: Backend, model: ModelName | None,
        room: bool = False,
    ) -> Backend:
        """
        Among the backends within the slack of C{chosen} (at most C{slack}
        requests more than it), and if C{chosen} holds the model, only those
        where it is warm (L{_warm}), the one whose slots hold the fewest
        living conversations for their number, the least busy of those,
        C{chosen} on a tie.

        @param room: Whether, if none of those has a slot that no living
            conversation holds, one past the slack that has such a slot
            is chosen instead (the least crowded, the least busy): for a
            new conversation, which would otherwise start where every
            slot's cache is another's, and go on evicting them.  Past the
            slack it still has a free slot: it runs in more company.
        """
        # Only to a backend that holds the model if the router's choice
        # does: no load where none was needed.
        held = model if model is not None and _holds(chosen, model) else None
        most = chosen.in_flight + self.slack
        crowding = self._crowding(chosen, model)
        best, rank = chosen, (crowding >= 1, False, crowding, chosen.in_flight)
        for backend in free:
            busy = backend.in_flight
            past = busy > most
            if (past and not room) or (held is not None and not self._warm(backend, held)):
                continue
            crowding = self._crowding(backend, model)
            mine = (crowding >= 1, past, crowding, busy)
            if mine < rank:
                best, rank = backend, mine
        return best

    def _crowding(self, backend: Backend, model: ModelName | None) -> float:
        """
        How many living conversations C{backend}'s runner of C{model} has
        for each of its slots: Ollama keeps a prompt cache per slot of each
        runner, and a backend that runs fewer than C{parallel} at once
        (L{Backend.effective}) has fewer.
        """
        return self._living[backend, model] / self._slots(backend, model)

    def _warm(self, backend: Backend, model: ModelName) -> bool:
        """
        Whether C{backend} holds C{model} (L{_holds}), or a living
        conversation's last turn ran it there: within C{keep_alive}, so
        its runner is there still though the listing (read every few
        seconds) may not say so yet.  Only new and moved conversations
        are placed by it; a home is judged by what is sure, since a turn
        sent to a home that did unload the model would load it again.
        """
        return _holds(backend, model) or (backend, model) in self._living

    def _expire(self, now: float) -> None:
        """
        Count no more the conversations whose last turn is older than
        C{live} seconds: they are remembered still, but hold no cache.
        """
        live, since = self._live, now - self._live_for
        while live:
            conversation, (runner, when) = next(iter(live.items()))
            if when > since:
                return
            del live[conversation]
            self._forget(runner)

    @staticmethod
    def _slots(backend: Backend, model: ModelName | None) -> int:
        """
        How many prompt caches C{backend} keeps for C{model}: one per slot,
        its effective parallel if lowered (L{Backend.limit}).
        """
        return max(backend.parallel if model is None else backend.limit(model), 1)

    def went(self, conversation: bytes, backend: Backend, model: ModelName | None) -> TurnPlacement:
        """
        A turn of C{conversation} that runs C{model} went to C{backend}, its
        home from now on; and how that compares with where its last turn
        went.
        """
        homes, live = self._homes, self._live
        last = homes.pop(conversation, None)
        if last is None and len(homes) >= self._size:
            self._unlive(homes.popitem(last=False)[0])
        homes[conversation] = backend
        self._unlive(conversation)
        live[conversation] = ((backend, model), self._clock.seconds())
        self._living[backend, model] += 1
        if last is None:
            return "new"
        return "home" if last is backend else "moved"

    def _unlive(self, conversation: bytes) -> None:
        """
        C{conversation} lives nowhere now (it is forgotten, or about to
        live where its new turn went).
        """
        entry = self._live.pop(conversation, None)
        if entry is not None:
            self._forget(entry[0])

    def _forget(self, runner: _Runner) -> None:
        living = self._living
        # Each look-up hashes the model's name (a call): two, not three.
        left = living[runner] - 1
        if left > 0:
            living[runner] = left
        else:
            del living[runner]


def _holds(backend: Backend, model: ModelName) -> bool:
    """
    Whether C{backend} has C{model}'s runner: loaded, as its C{/api/ps} last
    said, or loading, since it runs requests of it that the listing has
    not seen yet.  (Read in this order: the running count only when the
    listing does not have it.)
    """
    return model in backend.loaded or backend.running[model] > 0
