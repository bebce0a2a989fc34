# -*- test-case-name: tests.backends.test_router -*-
"""
Giving a request a backend: the one small question the app asks.

C{router.acquire(model, key)} fires with a L{Lease} on a backend once one
may run the request; C{lease.release()} gives the slot back when the request
has ended.  A request naming model M goes only to a healthy backend that has
M and is not out for M (its generations of M hung: L{Backend.hung}); among
those, to one that has M in memory (no load time), then to the one with the
fewest requests in flight.  When every such backend already runs
C{parallel} requests for M, the request waits in the fair queue
(L{ollamaproxy.backends.queue}).  A request naming no model goes to the
healthy backend with the fewest requests in flight, at once.

A request that runs a model the proxy cannot name (a body sent in chunks,
compressed, past what the proxy reads, or one its model check could not
read) runs as L{UNREAD_MODEL}, and takes the whole of a backend: it starts
only on a backend with no request running a model, and none starts there
beside it.  It may run any model, so no smaller share of a backend is
safe: a slot of a kind of its own beside the named models' would let it
reach Ollama ahead of requests queued before it for the same model, and
taking C{parallel} slots of one model would still leave the others free.
Whole backends cost little: such a body is rare (clients send chat
requests with a C{Content-Length}), and it waits its turn in the fair
queue like any other, which holds every later request back while it is
first in line (L{FairQueue}'s C{holds}), so that a busy backend drains for
it rather than starving it.  No request that runs a model gets a lease
without a slot.

The router times the releases of each model's slots (on every backend
together) while requests wait: a moving average of the seconds between
two, from which the queue's 503s reckon their C{Retry-After}
(L{FairQueue}'s C{pace}).  Only while requests wait do slots free up at
the rate the backends serve, rather than at the rate clients come, and
only then is the answer asked for; it also keeps the timing off the path
of a request that never waits.  A gap is timed only between two releases
in one stretch of waiting, with no slot (of any model) released with
nobody waiting between them: an idle hour between two stretches is no
gap.  It counts as at most the queue timeout, and weighs L{_SMOOTHING} in
the average.

Which waiting request goes next depends on what each key has had
(L{FairQueue}).  Under C{--fair-share gpu-time}, the default, a request
that runs a model costs its key the seconds of GPU it took
(L{ollamaproxy.backends.gpu_time}): Ollama's C{prompt_eval_duration} (the
part of the prompt not in a slot's cache) plus C{eval_duration}, as its
L{Meter}'s reading says; where the reading has no duration (a C{/v1}
answer, a stream cut short, an embedding), its tokens at the seconds per
prompt and per output token measured for its model from the readings
that had them (fallback rates before the first).  Under C{--fair-share
tokens} it costs its prompt tokens plus its output tokens times
C{--output-token-weight} (at least one token).  Either cost is charged
when the request gets its slot, as the plan estimates it (the meter's
C{prompt_estimate}, and the output it asks for at most; in seconds at
the model's measured rates), and trued up when the slot is given back
with what the request's meter read: Ollama's figures, or for a stream cut
short the pieces relayed.  The meter is read twice a request, never per
streamed chunk; an estimate too high while the request runs only delays
the key's next turn until the true-up.  Under C{--fair-share requests}
every request costs one turn.  A cost is a float, divided by the key's
weight: nothing assumes whole tokens, in this process's queue or in
Redis's (L{ollamaproxy.redis.queue}).

Under C{--redis}, the slots of named models and the turns of the requests
waiting for them are kept for every proxy together: the router asks the
shared queue (L{ollamaproxy.backends.shared}) for them, with the backends
the request may use, best first, and keeps its backends' counts as usual.

A request that carries a conversation (the digest the plan makes of what
identifies it, L{ollamaproxy.admission.conversation}) is sent, among the
backends with a free slot, to the one its conversation's last turn went
to, within C{--affinity-slack} (L{ollamaproxy.backends.affinity}); the
lease says how its backend compares with that last one.

With a single backend the proxy decides nothing about models or health:
every request goes to it, and Ollama answers for a model it does not have
(or the proxy's 502 says it cannot be reached), as without the proxy; only
the fair queue for a busy model, and collation, are added.

Collation (C{--switch-hold}, L{ollamaproxy.backends.collate}): a backend
that would have to switch models for the next request in line first serves
the requests waiting for the models it holds, for at most the hold, then
drains for the switch.  A backend holds the models the proxy last gave it,
at most as many as its C{/api/ps} has been seen listing at once (at least
one); a request for another model when it holds that many is a switch.

A backend seen running fewer of a model's requests at once than
C{parallel} is given only that many (L{Backend.effective},
L{ollamaproxy.backends.effective}): the dispatcher tells each lease when
its answer begins (L{Lease.answering}), and its release tells the rest.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeAlias, cast

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.web.iweb import IResponse

from ollamaproxy.backends.affinity import Affinity
from ollamaproxy.backends.collate import Collator
from ollamaproxy.backends.effective import EffectiveParallel, Seen
from ollamaproxy.backends.gpu_time import GpuTime
from ollamaproxy.backends.pool import Backend, BackendPool
from ollamaproxy.backends.queue import FairQueue, busy
from ollamaproxy.backends.shared import Ask, SharedQueue
from ollamaproxy.config import (
    DEFAULT_AFFINITY_SLACK,
    DEFAULT_FAIR_SHARE,
    DEFAULT_MAX_QUEUE,
    DEFAULT_OUTPUT_TOKEN_WEIGHT,
    DEFAULT_QUEUE_TIMEOUT,
    DEFAULT_SWITCH_HOLD,
)
from ollamaproxy.errors import ProxyError
from ollamaproxy.exchange import Meter, TurnPlacement
from ollamaproxy.model_names import ModelName

#: The weight of the newest gap between two releases in a model's moving
#: average: about the last ten releases count.
_SMOOTHING = 0.2

_UNMEASURED = -1.0

_NO_TYPE = [b""]

#: How many models' releases are timed; beyond, the timings start afresh
#: (with a single backend, any name a client sends gets a slot).
_TIMED_MODELS = 1024

#: What a request waits for in the fair queue: a slot of its model (L{None}:
#: none), since when, and the backends it may not use.
_Wants: TypeAlias = "tuple[ModelName | None, float, frozenset[Backend]]"

#: The model of a request that runs one but whose model the proxy cannot
#: name: its slot is a whole backend (see the module's docstring).
UNREAD_MODEL = ModelName("", cloud=False)


def _unread(wants: _Wants) -> bool:
    return wants[0] == UNREAD_MODEL


def free_for(backend: Backend, slot: ModelName | None) -> bool:
    """
    Whether C{backend} may start another request taking C{slot} now: a
    named model's while it runs fewer than C{parallel} of it and no
    L{UNREAD_MODEL}; an L{UNREAD_MODEL} while it runs no model at all.
    Requests naming no model (L{None}: a listing, a version) take no slot.
    """
    if slot is None:
        return True
    running = backend.running
    # No name resolves to an empty one: only UNREAD_MODEL has it.  (Asked
    # so, not with ==, and the look-up below only while something runs:
    # a dataclass's __eq__ and __hash__ are calls, on every request.)
    if not slot.canonical:
        # Counter: reading a missing slot adds nothing.
        return backend.in_flight == running[None]
    # Its limit asked (L{Backend.limit}) only when an effective parallel is
    # lowered there (L{EffectiveParallel}): an empty dict is no call.
    limit = backend.limit(slot) if backend.effective else backend.parallel
    return running[slot] < limit and not (running and UNREAD_MODEL in running)


@dataclass(frozen=True)
class _Charge:
    """
    What a request's slot is charged in the fair queue, and to whom: what
    its lease is billed with, and trued up by at release.

    @ivar meter: Says at release what the request did cost; L{None}: no
        true-up (C{--fair-share requests}, or no meter).
    """

    key: str
    weight: float
    cost: float
    meter: Meter | None
    user: str | None


#: What a lease the fair queue did not bill is charged: nothing, to no key.
_UNCHARGED = _Charge("-", 1.0, 0.0, None, None)


@dataclass(eq=False)
class Lease:
    """
    A request's slot on a backend.

    @ivar backend: Where the request goes.
    @ivar model: The model it named, if any.
    @ivar queued: Seconds it waited for the slot.
    @ivar placement: For a request that carries a conversation, how its
        backend compares with the one its conversation's last turn went to
        (L{TurnPlacement}); else L{None}.
    """

    backend: Backend
    model: ModelName | None
    queued: float
    _router: Router = field(repr=False)
    placement: TurnPlacement | None = None
    _released: bool = False
    # Who the fair queue charged for the slot, how much, and the meter that
    # says, at release, what the request did cost (L{_Charge}).
    _charge: _Charge = field(default=_UNCHARGED, repr=False)
    # The queue kept outside this process that gave the slot, and its name
    # for it (None: this process's own).
    _shared: SharedQueue | None = field(default=None, repr=False)
    _ticket: str = ""
    # What its first byte showed, for the effective parallel (None: none
    # came yet, or the request names no model).
    _seen: Seen | None = field(default=None, repr=False)

    def answering(self, response: IResponse) -> None:
        """
        The request's answer has begun (its response head came): what the
        router's L{EffectiveParallel} counts as running, if it streams.
        """
        model = self.model
        if model is not None and model.canonical:
            kind = response.headers.getRawHeaders(b"content-type", _NO_TYPE)[0]
            # Sliced, not startswith(): no call more on every request.
            self._seen = self._router.effective.head(
                self, kind[:20] == b"application/x-ndjson" or kind[:17] == b"text/event-stream")

    def release(self) -> None:
        """
        The request has ended: its slot goes to the next in line.  Only the
        first call counts.
        """
        if not self._released:
            self._released = True
            self._router._release(self)


class Router:
    """
    Chooses a backend for each request, and queues requests fairly while
    every backend that could run them is busy.
    """

    def __init__(
        self,
        pool: BackendPool,
        clock: IReactorTime,
        max_queue: int = DEFAULT_MAX_QUEUE,
        queue_timeout: float = DEFAULT_QUEUE_TIMEOUT,
        fair_share: str = DEFAULT_FAIR_SHARE,
        output_token_weight: float = DEFAULT_OUTPUT_TOKEN_WEIGHT,
        affinity_slack: int | None = DEFAULT_AFFINITY_SLACK,
        switch_hold: float = DEFAULT_SWITCH_HOLD,
        gpu_time: GpuTime | None = None,
    ) -> None:
        """
        @param fair_share: What the fair queue shares out: C{gpu-time},
            C{tokens} or C{requests} (see the module's docstring).
        @param output_token_weight: What an output token costs against a
            prompt token, under C{tokens}.
        @param affinity_slack: How much busier than the least busy backend
            a conversation's home may be and still get its next turn
            (L{ollamaproxy.backends.affinity}); L{None} sends no turn home.
        @param switch_hold: The most seconds a backend serves the requests
            for the models it holds before it switches
            (L{ollamaproxy.backends.collate}), C{--switch-hold}'s default
            unless given; 0 turns collation off.
        @param gpu_time: What requests cost in seconds under C{gpu-time},
            each model's rates learned as they end; a new one unless given.
        """
        self.pool = pool
        self._clock = clock
        # Whether requests are charged what their meter reads (gpu-time or
        # tokens), and in seconds (gpu-time).
        self._metered = fair_share != "requests"
        #: The seconds of GPU requests cost, under C{--fair-share gpu-time}.
        self.gpu_time = (gpu_time or GpuTime()) if fair_share == "gpu-time" else None
        self._output_weight = output_token_weight
        self.queue: FairQueue[_Wants, Lease] = (
            # A request's slot depends on its model and the backends it
            # may not use, not on when it came.
            FairQueue(clock, max_queue, queue_timeout, kind=lambda wants: (wants[0], wants[2]),
                      holds=_unread, pace=self._pace_of)
        )
        self._queue_timeout = queue_timeout
        # For each model: when a slot of it was last released while
        # requests waited, the moving average of the seconds between two
        # such releases (_UNMEASURED until there have been two), and the
        # stretch of waiting the last one was in.
        self._timed: dict[ModelName, list[float]] = {}
        # Counts the slots released while nobody waited: a gap is timed
        # only between two releases of one stretch of waiting.
        self._stretch = 0
        pool.on_change = self._serve_queue
        self.effective = EffectiveParallel(clock)
        self.collator = (
            Collator(clock, switch_hold, self._waiting_on, self._serve_queue)
            if switch_hold > 0 else None
        )
        # One backend gets every request, healthy or not: Ollama (or the
        # 502 for it) answers, as without the proxy.
        self.several = len(pool.backends) > 1
        #: The queue shared with other proxies that keeps named models'
        #: slots, if there is one (L{ollamaproxy.backends.shared}).
        self.shared: SharedQueue | None = None
        #: Where conversations live, if turns go home: with one backend,
        #: every turn does anyway.
        self.affinity = (Affinity(affinity_slack, clock)
                         if self.several and affinity_slack is not None else None)

    #: Whether there is more than one backend to choose from.
    several: bool

    def redact_with(self, redact: Callable[[str], str]) -> None:
        """
        Blank credentials and the proxy's keys with C{redact} in the model
        names the router's log lines give (the collator's, the effective
        parallel's, the pool's): a client names the model, and may paste a
        key there.
        """
        self.pool.redact = redact
        self.effective.redact = redact
        if self.collator is not None:
            self.collator.redact = redact

    @property
    def backends(self) -> list[Backend]:
        return self.pool.backends

    def loaded_context(self, model: ModelName) -> int | None:
        """
        The context C{model}'s runners are loaded with, if it is loaded and
        its backends agree: what a request for it is sent with so that no
        runner reloads (L{ollamaproxy.admission.caps.keep_loaded_context}).

        The body is rewritten before the router picks a backend (once
        admitted, and once for all the backends it may be retried on), so
        the context must hold for whichever it picks.  The router gives a
        request a backend that has its model loaded while one has a free
        slot: when every healthy backend with the model loaded runs it with
        the same context, that is the one the request meets.  When they
        differ, any one context reloads some backend, so the request goes
        as it came (L{None}), as it would without the rule.

        A backend's context is the last the proxy sent the model to it with,
        while that holds (L{BackendPool.sending}), else its C{/api/ps}'s:
        a request sent right after a load meets the context it loaded, not
        the one C{/api/ps} listed before it.  A backend the model was sent
        to but that C{/api/ps} does not yet list counts as having it loaded
        here, for it is loading it; the router's "loaded first" order still
        follows C{/api/ps} alone (L{Backend.loaded}), which also says which
        models it unloaded to make room, and which collation counts.
        """
        contexts: set[int | None] = set()
        for b in self.backends:
            if self.several and not b.serves(model):
                continue
            # An empty dict is no call: most backends hold no context sent.
            kept = b.sent.get(model.canonical) if b.sent else None
            if kept is not None:
                contexts.add(kept.context)
            elif (resident := b.resident.get(model)) is not None:
                contexts.add(resident.context_length)
        if len(contexts) != 1:
            return None
        return contexts.pop()

    def acquire(
        self,
        key: str,
        model: ModelName | None = None,
        *,
        runs: bool = False,
        primary: bool = False,
        exclude: Iterable[Backend] = (),
        weight: int = 1,
        meter: Meter | None = None,
        expected_output: int = 0,
        user: str | None = None,
        conversation: bytes | None = None,
    ) -> Deferred[Lease]:
        """
        A backend for a request of key C{key} naming C{model}.

        @param runs: Whether the request runs the model: it takes a slot,
            and waits for one in the fair queue.  Running a model without
            naming one (C{model} L{None}) takes L{UNREAD_MODEL}'s.
        @param primary: Whether it goes to the first healthy backend, in the
            order configured, whatever it names.
        @param exclude: Backends not to use (one that just failed this
            request).
        @param weight: The key's share of turns in the fair queue.
        @param meter: The request's token meter: its C{prompt_estimate} is
            charged with C{expected_output} when the request gets a slot,
            and its reading replaces them when the slot is given back.
        @param expected_output: The tokens the request may generate, as its
            plan estimates them.
        @param user: Who the request is for behind its key, whose share of
            the key's it has (L{FairQueue}); L{None} for a key that names
            no users.
        @param conversation: The digest of the conversation the request
            continues, if it carries one: it goes home if it may.
        @return: Fires with a L{Lease} at once, or once the request's turn has
            come; cancelling it leaves the queue.
        @raise ProxyError: 404 if no backend has the model, 503 if none that
            has it is healthy, or the queue is full.
        """
        now = self._clock.seconds()
        if runs and model is None:
            model = UNREAD_MODEL
        if not self.several and not runs:
            return succeed(self._lease(self.backends[0], None, now))
        excluded = frozenset(exclude)
        if primary:
            for backend in self.backends:
                if backend.healthy and backend not in excluded:
                    return succeed(self._lease(backend, None, now))
            raise busy("no backend is healthy", 1)
        if self.several:
            self._check_available(model, excluded)
        if not runs:
            lease = self._grant((None, now, excluded), model)
            assert lease is not None
            return succeed(lease)
        if self._metered and meter is not None:
            gpu = self.gpu_time
            # A request that runs a model has one here (UNREAD_MODEL, if none).
            assert model is not None
            cost = self._cost(meter.prompt_estimate, expected_output) if gpu is None else \
                gpu.estimate(model.canonical, meter.prompt_estimate, expected_output)
            charge = _Charge(key, weight, cost, meter, user)
        else:
            charge = _Charge(key, weight, 1.0, None, user)
        if self.affinity is None:
            conversation = None
        wants = (model, now, excluded)
        if self.shared is not None and model is not None and model.canonical:
            return self._take_shared(charge, wants, conversation)
        return self._take_local(charge, wants, conversation)

    def _take_local(
        self, charge: _Charge, wants: _Wants, conversation: bytes | None
    ) -> Deferred[Lease]:
        """
        A slot from this process's own fair queue: at once if nobody waits
        and a backend has one free, else at the request's turn.
        """
        # Not len(): a call less, on every request that runs a model.
        if not self.queue:
            lease = self._grant(wants, conversation=conversation)
            if lease is not None:
                self.queue.served(charge.key, charge.weight, charge.cost, charge.user)
                return succeed(self._bill(lease, charge, conversation))
        waiting = self.queue.wait(charge.key, wants, charge.weight, charge.cost, charge.user)
        waiting.addCallback(self._bill, charge, conversation)
        self._serve_queue()
        return waiting

    def _take_shared(
        self, charge: _Charge, wants: _Wants, conversation: bytes | None
    ) -> Deferred[Lease]:
        """
        A slot of a named model from the queue shared with other proxies,
        which falls back to this process's own while it cannot be asked;
        its users share a key's turns there as here.  A conversation's
        home is asked first, if the affinity rule would choose it.
        """
        model, since, excluded = wants
        assert self.shared is not None and model is not None
        candidates = [
            b for b in self.backends
            if (not self.several or b.serves(model)) and b not in excluded
            and self._has(b, model)
        ]
        candidates.sort(key=lambda b: (model not in b.loaded, b.in_flight))
        if conversation is not None and self.affinity is not None and candidates:
            home = self.affinity.choose(conversation, candidates, candidates[0], model)
            candidates.remove(home)
            candidates.insert(0, home)

        def lease(backend: Backend, ticket: str) -> Lease:
            made = self._bill(self._lease(backend, model, since), charge, conversation)
            made._shared, made._ticket = self.shared, ticket
            return made

        def local() -> Deferred[Lease]:
            # Asked afresh, as a request that comes now: the backends may
            # have changed while the shared queue was tried.
            if self.several:
                self._check_available(model, excluded)
            return self._take_local(charge, (model, self._clock.seconds(), excluded),
                                    conversation)

        return self.shared.take(Ask(charge.key, model, candidates, charge.weight, charge.cost,
                                    since, lease, local, charge.user))

    def waiting(self) -> dict[str, int]:
        """
        How many of this proxy's requests each key has waiting: in its own
        queue, and in the shared one if there is one.
        """
        waiting = self.queue.waiting()
        if self.shared is not None:
            for key, count in self.shared.waiting().items():
                waiting[key] = waiting.get(key, 0) + count
        return waiting

    def _cost(self, prompt: int, output: int) -> float:
        """
        What a request of C{prompt} tokens that generates C{output} costs in
        the fair queue, under C{--fair-share tokens}: at least a token, so
        that no request is a free turn.
        """
        cost = prompt + output * self._output_weight
        return cost if cost > 1 else 1.0

    def _bill(self, lease: Lease, charge: _Charge, conversation: bytes | None) -> Lease:
        """
        Write on C{lease} what its slot was charged, and to whom, for the
        true-up at release; and move its conversation, if any, to its
        backend.
        """
        lease._charge = charge
        if conversation is not None and self.affinity is not None:
            lease.placement = self.affinity.went(conversation, lease.backend, lease.model)
        return lease

    def _check_available(self, model: ModelName | None, excluded: frozenset[Backend]) -> None:
        """
        Raise the 404 or 503 for a request no backend may take, among
        several (asked only then: a single backend is given every request,
        a call less on each).
        """
        having = [b for b in self.backends if model is None or self._has(b, model)]
        if not having:
            assert model is not None
            raise ProxyError(404, f"model '{model.canonical}' not found on any backend",
                             outcome="rejected")
        if not any(b.serves(model) and b not in excluded for b in having):
            what = "any model" if model is None else f"model '{model.canonical}'"
            raise busy(f"no healthy backend has {what}", 1)

    def _has(self, backend: Backend, model: ModelName) -> bool:
        return not self.several or model == UNREAD_MODEL or backend.has(model)

    def _grant(
        self, wants: _Wants, named: ModelName | None = None, conversation: bytes | None = None
    ) -> Lease | None:
        """
        A lease on the best backend with a free slot for C{model}, or
        L{None}.

        @param named: For a request that takes no slot, the model it names.
        @param conversation: The digest of the conversation the request
            continues, if any: its home may be chosen.
        """
        model, since, excluded = wants
        named = named or model
        free = [
            # The pool's list, not the property: a call less on each request.
            b for b in self.pool.backends
            if (not self.several or b.serves(named)) and b not in excluded
            and free_for(b, model)
            and (named is None or self._has(b, named))
        ]
        collator = self.collator
        if collator is not None and model is not None and model.canonical:
            free = collator.allowed(model, free)
        if not free:
            return None
        backend = min(free, key=lambda b: (named is None or named not in b.loaded, b.in_flight))
        if conversation is not None and self.affinity is not None:
            backend = self.affinity.choose(conversation, free, backend, named)
        if collator is not None and model is not None and model.canonical:
            collator.granted(backend, model)
        return self._lease(backend, model, since)

    def _waiting_on(self, backend: Backend) -> set[ModelName]:
        """
        The models that requests waiting in the fair queue want, of those
        that may go to C{backend}: what the collator asks before a switch.
        """
        # The queue's kinds are the router's (model, backends excluded).
        kinds = cast("Iterable[tuple[ModelName | None, frozenset[Backend]]]", self.queue.kinds())
        return {model for model, excluded in kinds
                if model is not None and backend not in excluded}

    def _lease(self, backend: Backend, slot: ModelName | None, since: float) -> Lease:
        backend.running[slot] += 1
        return Lease(backend, slot, self._clock.seconds() - since, self)

    def _release(self, lease: Lease) -> None:
        model = lease.model
        running = lease.backend.running
        left = running[model] - 1
        if left <= 0:
            del running[model]
        else:
            running[model] = left
        if lease._seen is not None:
            self.effective.released(lease, lease._seen)
        if self.collator is not None and model is not None:
            self.collator.ended(lease.backend, model)
        charged = lease._charge
        meter = charged.meter
        charge = 0.0
        if meter is not None:
            # The meter's reading, not the estimate charged, is what the
            # request cost: before the next slot is given.
            reading = meter.reading()
            gpu = self.gpu_time
            if gpu is not None:
                # A metered request runs a model: it took a slot of one.
                assert model is not None
                charge = gpu.cost(model.canonical, reading) - charged.cost
            else:
                used = (0, 0) if reading is None else (reading.prompt_tokens,
                                                       reading.completion_tokens)
                charge = self._cost(*used) - charged.cost
        if lease._shared is not None:
            lease._shared.give_back(lease._ticket, charged.key, charge / charged.weight,
                                    charged.user, charge)
        elif meter is not None:
            self.queue.charge(charged.key, charged.weight, charge, charged.user)
        self._serve_queue(model)

    def _pace_of(self, wants: _Wants) -> float | None:
        """
        The measured seconds between two releases of the slots of the model
        a request wants, or L{None} before two have been seen.
        """
        model = wants[0]
        timed = None if model is None else self._timed.get(model)
        return None if timed is None or timed[1] == _UNMEASURED else timed[1]

    def _serve_queue(self, released: ModelName | None = None) -> None:
        """
        Give freed slots to waiting requests.

        @param released: The model whose slot was just released, if any:
            timed while requests wait (see the module's docstring).
        """
        if self.queue:  # as in _take_local
            if released is not None:
                self._time_release(released)
            self.queue.serve(self._grant)
        elif released is not None:
            # A slot freed with nobody to take it: the time until the next
            # is spent idle, not serving.
            self._stretch += 1

    def _time_release(self, model: ModelName) -> None:
        """
        A slot of C{model} was released while requests wait: the gap since
        the last one, in the same stretch of waiting, moves its average.
        """
        now = self._clock.seconds()
        timed = self._timed.get(model)
        if timed is None:
            if len(self._timed) >= _TIMED_MODELS:
                self._timed.clear()
            self._timed[model] = [now, _UNMEASURED, self._stretch]
            return
        last, pace, stretch = timed
        timed[0], timed[2] = now, self._stretch
        if stretch != self._stretch:
            return  # the first release since the queue was last empty
        gap = min(now - last, self._queue_timeout)
        timed[1] = gap if pace == _UNMEASURED else pace + _SMOOTHING * (gap - pace)
