# -*- test-case-name: tests.backends.test_effective -*-
"""
A backend's effective parallel: how many requests of a model it really
runs at once, when that is fewer than C{--parallel}.

Ollama silently drops to one slot when VRAM is short (Ollama #17556), and
says so in no API: the requests sent beyond the slots it runs wait inside
it with no first byte, while others could have had them elsewhere, or
waited in the fair queue, where their turn is fair and their client's
departure costs nothing.  So the proxy watches what it can see: a
streamed answer I{runs} from its first byte (its response head: Ollama
sends it with the first token) until it ends.

The evidence: a I{short} release is the end of a streamed answer of model
M on backend B while a request of M sent to B before that answer's first
byte has still had none: it waited for a slot all through the answer.  (A
request merely reading its prompt in a slot of its own has its first byte
by then, unless reading its prompt takes longer than generating the other
answer: a backend whose prompts take longer to read than its answers to
generate may look lowered.)  After L{EVIDENCE} short releases in a row,
during which no more than k < its limit of M's answers ran at once on B,
B's effective parallel for M is lowered to k (at least 1): one log line,
the gauge
C{ollamaproxy_backend_effective_parallel{backend,model}} (present only
while lowered), the console.  A release with nothing waiting for its
first byte ends the run of evidence: the backend kept up.  An answer that
is not streamed (C{"stream": false}: its head comes with its end) is no
evidence either way, but while it is in flight it looks like one waiting.

Raised again when it does run more: L{PROBE_AFTER} seconds after it was
lowered the backend may take one more (k + 1); if k + 1 answers then run
at once, its effective parallel is k + 1 (one log line; at its limit, the
lowering is gone), and it is tried again later for more; if the evidence
says k again first, it stays k and the next try waits twice as long, at
most L{MAX_PROBE_AFTER}.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from ollamaproxy.backends.pool import Backend
from ollamaproxy.model_names import ModelName
from ollamaproxy.record.redact import blank_credentials

if TYPE_CHECKING:
    from ollamaproxy.backends.router import Lease

log = Logger()

#: Short releases in a row that lower a backend's effective parallel.
EVIDENCE = 4
#: Seconds after a lowering before the backend may take one more.
PROBE_AFTER = 30.0
#: The longest wait between two tries.
MAX_PROBE_AFTER = 600.0

#: How many backends and models are watched at most: beyond, those that
#: are not lowered and have nothing answering are forgotten (a watch is
#: kept between requests, so that a request makes none anew).
_WATCHED = 4096


@dataclass(eq=False)
class Watch:
    """
    What is seen of one model's requests on one backend.

    @ivar heads: Its requests in flight that have had their first byte.
    @ivar total: First bytes it has had in all: where each lease marks the
        count, so that its release knows how many came since its own.
    @ivar answering: Those of them that stream.
    @ivar peak: The most answering at once since the evidence began.
    @ivar streak: Short releases in a row.
    @ivar lowered: Its effective parallel, if lowered.
    @ivar probe_at: When it may take one more than C{lowered}.
    @ivar wait: The wait before the next try.
    @ivar probing: Whether it may take one more now.
    """

    heads: int = 0
    total: int = 0
    answering: int = 0
    peak: int = 0
    streak: int = 0
    lowered: int | None = None
    probe_at: float = 0.0
    wait: float = PROBE_AFTER
    probing: bool = False

#: What L{EffectiveParallel.head} saw of a lease's first byte, which the
#: lease keeps for its release: the watch, whether its answer streams, how
#: many requests sent before it had no first byte yet, and the watch's
#: C{total} then.  (A tuple: made on every request, and a class's
#: constructor is a call.)
Seen = tuple[Watch, bool, int, int]


class EffectiveParallel:
    """
    Lowers and raises each backend's effective parallel per model from
    the first bytes and the releases of its requests (see the module's
    docstring): the router's limit is L{Backend.effective}.

    @ivar redact: Blanks credentials in the model names its log lines give.
    """

    redact: Callable[[str], str] = staticmethod(blank_credentials)

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        # By the model's canonical name: a str hashes without a call, a
        # ModelName with one, and this is on the way of every request.
        self._watches: dict[tuple[Backend, str], Watch] = {}

    def head(self, lease: Lease, streamed: bool) -> Seen:
        """
        C{lease}'s request has had its first byte, streamed or whole: what
        was seen, which the lease keeps for its release (L{released}).
        """
        assert lease.model is not None
        where = (lease.backend, lease.model.canonical)
        if where in self._watches:
            watch = self._watches[where]
        else:
            if len(self._watches) >= _WATCHED:
                self._watches = {w: kept for w, kept in self._watches.items()
                                 if kept.lowered is not None or kept.heads}
            watch = self._watches[where] = Watch()
        watch.heads += 1
        watch.total += 1
        # Sent before it and still with no first byte: those that, if they
        # have none when it ends, waited for a slot all through its answer.
        seen = (watch, streamed, lease.backend.running[lease.model] - watch.heads, watch.total)
        if not streamed:
            return seen
        watch.answering += 1
        if watch.answering > watch.peak:
            watch.peak = watch.answering
        if watch.probing and watch.lowered is not None and watch.peak > watch.lowered:
            self._raise(lease.backend, lease.model, watch)
        return seen

    def released(self, lease: Lease, seen: Seen) -> None:
        """
        C{lease}'s request, which had its first byte (L{head} saw C{seen}),
        has ended.  Its release is short when a request sent before its
        first byte still has none: the first bytes come in the order the
        requests were sent (Ollama gives its slots first come, first
        served), so those that came since its own went first to the
        requests it had behind it.
        """
        backend, model = lease.backend, lease.model
        assert model is not None
        watch, streamed, behind, mark = seen
        watch.heads -= 1
        if not streamed:
            return
        if behind <= watch.total - mark or watch.peak >= backend.limit(model):
            watch.streak, watch.peak = 0, watch.answering
        else:
            watch.streak += 1
            if watch.streak >= EVIDENCE:
                self._lower(backend, model, watch)
        watch.answering -= 1
        if watch.lowered is not None and not watch.probing \
                and self._clock.seconds() >= watch.probe_at:
            watch.probing = True
            backend.effective[model] = watch.lowered + 1

    def lowered(self) -> list[tuple[Backend, str, int]]:
        """
        Each backend and model (its canonical name) whose effective
        parallel is lowered, with it: what the gauge and the console show.
        """
        return [(backend, model, watch.lowered)
                for (backend, model), watch in self._watches.items()
                if watch.lowered is not None]

    def _lower(self, backend: Backend, model: ModelName, watch: Watch) -> None:
        """
        The evidence is in: the backend runs no more than C{peak} of the
        model's requests at once.
        """
        seen = max(watch.peak, 1)
        now = self._clock.seconds()
        if watch.probing and watch.lowered is not None:
            # A try of one more found no more: wait longer for the next.
            watch.wait = min(watch.wait * 2, MAX_PROBE_AFTER)
        else:
            log.warn("Backend {backend} runs at most {seen} requests of model {model} at "
                     "once (its --parallel is {parallel}): the others sent wait inside it "
                     "with no first byte, so it gets at most {seen}",
                     backend=backend.name, model=self.redact(model.canonical), seen=seen,
                     parallel=backend.parallel)
        watch.lowered, watch.probing = seen, False
        watch.probe_at = now + watch.wait
        watch.streak, watch.peak = 0, watch.answering
        backend.effective[model] = seen

    def _raise(self, backend: Backend, model: ModelName, watch: Watch) -> None:
        """
        A try of one more ran them all at once: raise the effective
        parallel by one, and try again later for more.
        """
        assert watch.lowered is not None
        watch.lowered += 1
        watch.probing, watch.wait = False, PROBE_AFTER
        watch.probe_at = self._clock.seconds() + watch.wait
        watch.streak = 0
        log.info("Backend {backend} runs {seen} requests of model {model} at once again",
                 backend=backend.name, model=self.redact(model.canonical), seen=watch.lowered)
        if watch.lowered >= backend.parallel:
            watch.lowered = None
            del backend.effective[model]
        else:
            backend.effective[model] = watch.lowered
