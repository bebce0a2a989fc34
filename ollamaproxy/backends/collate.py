# -*- test-case-name: tests.backends.test_collate -*-
"""
Collating requests by model: a backend serves the requests waiting for the
model it holds before it switches to another (C{--switch-hold}).

A switch costs a load, seconds of GPU doing nothing for anyone, and a
server that holds one model thrashes when keys ask for different ones in
turn: C{A B A C} costs three loads where C{A A B C} costs two.  So when the
next request in the fair queue's order would make a backend switch, the
backend first serves the requests waiting for what it holds, for at most
C{hold} seconds from when the switch became due, or, if the backend is
still loading the model it switched to last (the first request given it
since has not ended), from when it has loaded: a hold that the load ate
would give that model's clients nothing; then it I{drains}: no more
requests for the model it gives up are sent to it until the switching
request has its slot, which it gets as soon as that model has no request
running there.  Without the drain, the switch could wait for ever: since
v0.11.5 Ollama lets a request for a loaded model pass a waiting switch.
Of several backends that would each have to switch, one is held and
drained (the one the switch is due on, else the least busy): the others
go on serving the models they hold.

A hold may pass over more than the request it keeps waiting: with three
models, a request for the third waits through the hold of the switch due
before it, and would then wait through that model's hold too, once it
has loaded.  So each model whose requests wait has a I{budget} of one
hold: a hold spends it from when the fair queue's order first reaches one
of them (its turn came, and the backend held another model instead) until
the hold ends, and a hold ends no later than the budget of any model it
passes over.  Once a model's budget is spent, no hold passes it over: the
switch it waits for goes next, after the drain, and a switch due before
it has no hold (its model is loaded, its first request answered, and the
backend drains at once).  The budget is spent by holds only, not by
loads or drains, and is whole again once a request for the model is
served.  A key's request thus waits at most one hold in all, and the
loads and the requests already running that it would wait for without
collation, beyond its fair turn: against Ollama alone, at most one hold
and one request more.  The price: with three models taking turns, each
request waiting passes two holds between two of its own, so they average
half a hold (one whole, the next cut), and a backend switches more often
than with two (C{bench/scenarios.py}, "models").

What a backend holds, and when a request is a switch, is told by this
simple rule: a backend holds the models the proxy last gave it, at most as
many as it has been seen holding at once (the most models its C{/api/ps}
has listed together, at least one); until the proxy has given it any, the
models its C{/api/ps} lists.  A request for a model it holds is never a
switch; nor is one while it holds fewer than it can.  A request for
another is a switch: it goes at once if one of the models held has no
request running there and none waiting, and has had none end in the last
C{hold / 3} seconds (Ollama unloads that one, an idle one first), else
after the hold and the drain, of the model held longest.

That I{gap} anticipates clients that send one request at a time: while one
reads its answer and writes the next, nothing of its model runs or waits,
and a switch that went then would be undone by its next request, a load
each way.  So a model whose last request ended less than C{hold / 3}
seconds ago counts as in use: the switch waits for its next request, which
goes if it comes within the gap, and so on, until the hold runs out (then
the drain, as above) or a gap passes with none (then the switch goes).
The hold (and the budgets) still bound the wait from when the switch
became due, so no key waits more than one hold beyond its turn; what
anticipation costs a switch that nothing follows is the rest of the gap,
at most C{hold / 3} (3.3 s at the default hold of ten).  A third of the
hold lets a client think for a few seconds at the default, and leaves the
held clients at least two more turns once a gap has begun.
A backend that can hold several models shows it in its C{/api/ps} as soon
as it loads a second beside the first, and from then on the proxy lets it.
The rule counts models, not their sizes: a backend seen holding two small
ones is let hold two large ones, and Ollama then switches as it would
without the proxy.  A model Ollama unloaded on its own (its C{keep_alive}
ran out) is held until the switch that replaces it, which goes at once.

Each switch (a backend that held as many models as it could given a
request for another) is counted by backend and logged in one line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from ollamaproxy.backends.pool import Backend
from ollamaproxy.model_names import ModelName
from ollamaproxy.record.redact import blank_credentials

log = Logger()


@dataclass(eq=False)
class _Seat:
    """
    What the collator knows of one backend.

    @ivar held: The models it holds, the one given a request longest ago
        first.
    @ivar capacity: The most models it has been seen holding at once.
    @ivar to: The model a switch due is for, if one is.
    @ivar draining: The model it gives up once the hold is over: none of
        its requests go there until the switch has gone.
    @ivar switches: How many switches it has made.
    @ivar loading: The model the last switch loaded, until its first
        request there ends: a hold starts no earlier.
    @ivar ended: When the last request for each model held ended there.
    @ivar gap: Serves the queue again when the gap of a model held that
        keeps a switch waiting is over.
    @ivar until: When the running hold ends (it may be cut sooner), once
        it has begun: the model it would switch to has loaded.
    @ivar passing: The models whose requests the running hold has passed
        over: each spends its budget while the hold lasts.
    """

    held: list[ModelName]
    capacity: int = 1
    to: ModelName | None = None
    draining: ModelName | None = None
    timer: IDelayedCall | None = field(default=None, repr=False)
    switches: int = 0
    loading: ModelName | None = None
    ended: dict[ModelName, float] = field(default_factory=dict)
    gap: IDelayedCall | None = field(default=None, repr=False)
    until: float | None = None
    passing: set[ModelName] = field(default_factory=set)


@dataclass
class _Budget:
    """
    The seconds of holds that requests for one model, waiting, may still be
    passed over for.

    @ivar left: Seconds left, as of C{since} if a hold passes the model
        over now, else now.
    @ivar since: When the hold that passes the model over now began to, if
        one does.
    """

    left: float
    since: float | None = None


class Collator:
    """
    Says which backends may take a request now, so that each serves the
    requests for the models it holds before it switches (see the module's
    docstring).

    @ivar redact: Blanks credentials in the model names its log lines give
        (a client names the model, and may paste a key there).
    """

    redact: Callable[[str], str] = staticmethod(blank_credentials)

    def __init__(
        self,
        clock: IReactorTime,
        hold: float,
        waiting: Callable[[Backend], set[ModelName]],
        serve: Callable[[], None],
    ) -> None:
        """
        @param hold: The most seconds a switch waits for the requests of
            the models held.
        @param waiting: The models that requests waiting in the fair queue
            want, of those that may go to a backend.
        @param serve: Called when a hold is over, so that the queue is
            served again: the backend may now drain for the switch.
        """
        self._clock = clock
        self._hold = hold
        self._waiting = waiting
        self._serve = serve
        self._seats: dict[Backend, _Seat] = {}
        # The budget of each model whose requests a hold has passed over,
        # until one of them is served.
        self._budgets: dict[ModelName, _Budget] = {}

    def switches(self, backend: Backend) -> int:
        """
        How many switches C{backend} has made.
        """
        seat = self._seats.get(backend)
        return 0 if seat is None else seat.switches

    def _seat(self, backend: Backend) -> _Seat:
        seat = self._seats.get(backend)
        if seat is None:
            seat = self._seats[backend] = _Seat(sorted(backend.loaded, key=str))
        # The most models its /api/ps listed at once: read here, on the
        # way of a request, rather than at each listing.
        if len(backend.loaded) > seat.capacity:
            seat.capacity = len(backend.loaded)
        return seat

    def allowed(self, model: ModelName, free: list[Backend]) -> list[Backend]:
        """
        Those of the backends C{free} (each has a slot for C{model}) that
        may take a request for C{model} now: those that need no switch for
        it (they hold it and are not draining it, or hold fewer models than
        they can); else one whose switch to it may go.  Only one backend is
        held and drained for a switch at a time: the one whose switch is
        due for the model, else the least busy.
        """
        plain = [backend for backend in free if self._takes(backend, model)]
        if plain or not free:
            return plain
        open_: list[Backend] = []
        for backend in free:
            seat, waiting = self._seats[backend], self._waiting(backend)
            if self._due_for_another(seat, model, waiting):
                self._pass_over(seat, model)
                continue
            if self._idle(backend, seat, waiting, model):
                return [backend]  # a switch that keeps nobody waiting
            open_.append(backend)
        if not open_:
            return []
        due = [b for b in open_ if self._seats[b].to == model]
        backend = due[0] if due else min(open_, key=lambda b: b.in_flight)
        return [backend] if self._may_switch(backend, self._seats[backend], model) else []

    def _takes(self, backend: Backend, model: ModelName) -> bool:
        """
        Whether C{backend} may take a request for C{model} with no switch.
        """
        seat = self._seat(backend)
        if not backend.has(model):
            # One it does not list (a single backend is sent every
            # request): Ollama answers 404, nothing is loaded.
            return True
        if model in seat.held:
            if seat.draining != model:
                return True
            if seat.to in self._waiting(backend):
                return False
            # The request the backend drains for left: no switch is due.
            self._no_switch(seat)
            return True
        return len(seat.held) < seat.capacity

    def _due_for_another(self, seat: _Seat, model: ModelName, waiting: set[ModelName]) -> bool:
        """
        Whether a switch is due on the backend for another model than
        C{model}, whose request still waits: it goes first, whatever
        requests for other models came since; the hold passes C{model}'s
        request over (L{_pass_over}).  A switch due for a request that no
        longer waits is forgotten.
        """
        if seat.to is None or seat.to == model:
            return False
        if seat.to in waiting:
            return True
        self._no_switch(seat)
        return False

    def _idle(self, backend: Backend, seat: _Seat, waiting: set[ModelName],
              model: ModelName) -> bool:
        """
        Whether a model C{backend} holds has nothing running there nor
        waiting, and had no request end in the last gap: a switch to
        C{model} may unload it at once.  One in its gap keeps the switch
        waiting, within the hold, and the queue is served again when the
        gap is over.
        """
        running, now, gap = backend.running, self._clock.seconds(), self._hold / 3
        left = 0.0
        for held in seat.held:
            if running[held] or held in waiting:
                continue
            since = now - seat.ended.get(held, -gap)
            if since >= gap or (seat.to == model and seat.until is not None
                                and now >= seat.until):
                return True
            left = max(left, gap - since)
        if left and (seat.gap is None or not seat.gap.active()):
            seat.gap = self._clock.callLater(left, self._gap_over, seat)
        return False

    def ended(self, backend: Backend, model: ModelName) -> None:
        """
        A request for C{model} ended on C{backend}: its gap begins, if the
        backend holds it.
        """
        seat = self._seats.get(backend)
        if seat is None or model not in seat.held:
            return
        now = seat.ended[model] = self._clock.seconds()
        if model == seat.loading:
            # The load is paid: a switch due meanwhile has its hold now.
            seat.loading = None
            if seat.to is not None:
                self._start_hold(seat, now)

    def _may_switch(self, backend: Backend, seat: _Seat, model: ModelName) -> bool:
        """
        Whether C{backend}, which holds as many models as it can, all in
        use, may switch to C{model} now: once the hold is over (it starts
        now, if no switch is due yet and nothing is loading; it ends when
        the hold, or the budget of a model it passes over, runs out) and
        the model held longest has nothing running there.
        """
        now = self._clock.seconds()
        if seat.to is None:
            seat.to = model
            if seat.loading is None:
                self._start_hold(seat, now)
        if seat.until is None:
            return False  # the hold begins once the model loading has loaded
        self._pass_over(seat, model)
        if now < seat.until:
            return False
        if seat.draining is None:
            self._settle(seat)
            seat.draining = seat.held[0]
        return not backend.running[seat.draining]

    def _start_hold(self, seat: _Seat, now: float) -> None:
        """
        The hold of the switch due on C{seat}'s backend begins: for at
        most the hold, and less if a model it passes over has less budget
        left, which the requests it passes over tell (L{_pass_over}).
        Budgets of models nobody waits for any more, on any backend, are
        forgotten: they are kept no longer than their requests.
        """
        waiting: set[ModelName] = set().union(*map(self._waiting, self._seats))
        for model in [m for m, budget in self._budgets.items()
                      if budget.since is None and m not in waiting]:
            del self._budgets[model]
        seat.until = now + self._hold
        self._hold_until(seat, seat.until, now)

    def _hold_until(self, seat: _Seat, until: float, now: float) -> None:
        """
        The running hold on C{seat}'s backend ends at C{until}: the queue
        is served again then.
        """
        seat.until = until
        if seat.timer is not None and seat.timer.active():
            seat.timer.cancel()
        seat.timer = self._clock.callLater(max(until - now, 0.0), self._held, seat)

    def _pass_over(self, seat: _Seat, model: ModelName) -> None:
        """
        The hold running on C{seat}'s backend, if one is, passed over a
        request for C{model}: the model's budget (the hold, the first time)
        is spent from now while the hold lasts, and the hold ends no later
        than the budget does.
        """
        until, now = seat.until, self._clock.seconds()
        if until is None or seat.draining is not None or now >= until:
            return
        seat.passing.add(model)
        budget = self._budgets.get(model)
        if budget is None:
            budget = self._budgets[model] = _Budget(self._hold)
        if budget.since is None:
            budget.since = now
        spent = budget.since + budget.left
        if spent < until:
            self._hold_until(seat, spent, now)

    def _settle(self, seat: _Seat) -> None:
        """
        The hold on C{seat}'s backend is over, or no switch is due there
        any more: the models it passed over have spent their budgets until
        it ended, unless another backend's hold passes them over still.
        """
        until, now = seat.until, self._clock.seconds()
        if until is None or not seat.passing:
            return
        end = min(now, until)
        others = [other.passing for other in self._seats.values()
                  if other is not seat and other.draining is None
                  and other.until is not None and now < other.until]
        for model in seat.passing:
            budget = self._budgets.get(model)
            if budget is None or budget.since is None or any(model in p for p in others):
                continue
            budget.left = max(budget.left - (end - budget.since), 0.0)
            budget.since = None
        seat.passing.clear()

    def _held(self, seat: _Seat) -> None:
        seat.timer = None
        self._serve()

    def _gap_over(self, seat: _Seat) -> None:
        seat.gap = None
        self._serve()

    def granted(self, backend: Backend, model: ModelName) -> None:
        """
        C{backend} was given a request for C{model}: it holds it now, and
        a switch to it is counted.
        """
        seat = self._seat(backend)
        held = seat.held
        if self._budgets:
            # Served: its requests' wait is over, and its budget with it.
            self._budgets.pop(model, None)
        if (held and held[-1] == model) or not backend.has(model):
            # A model it does not list loads nothing, and its name, which
            # a client chose, is no model to hold or to log.
            return
        if model in held:
            held.remove(model)
        elif len(held) >= seat.capacity:
            # Ollama unloads an idle model first; else the one held longest.
            running = backend.running
            given_up = next((m for m in held if not running[m]), held[0])
            held.remove(given_up)
            seat.ended.pop(given_up, None)
            seat.switches += 1
            log.info("Backend {backend} switches from model {old} to {new}",
                     backend=backend.name, old=self.redact(given_up.canonical),
                     new=self.redact(model.canonical))
            self._no_switch(seat)
            seat.loading = model
        held.append(model)

    def _no_switch(self, seat: _Seat) -> None:
        """
        No switch is due on C{seat}'s backend any more (it was made, or the
        request it was for left): its hold is over, its timers stop, and
        nothing drains.
        """
        self._settle(seat)
        for timer in (seat.timer, seat.gap):
            if timer is not None and timer.active():
                timer.cancel()
        seat.timer = seat.gap = None
        seat.to = seat.draining = seat.until = None
