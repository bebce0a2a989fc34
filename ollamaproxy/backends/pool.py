# -*- test-case-name: tests.backends.test_pool -*-
"""
The Ollama servers behind the proxy: which models each has and has loaded,
how busy it is, and whether it answers.

L{BackendPool} asks every backend for C{GET /api/tags} (its models) and
C{GET /api/ps} (the models in memory, with what each holds: its residency)
every C{refresh} seconds, and at once
when told a model changed (a pull, create, copy or delete through the
proxy).  A backend whose C{/api/tags} does not answer, or that a request
could not reach, is unhealthy: it gets no requests, and is probed again after 1, 2, 4 ...
seconds (at most C{max_backoff}), so it comes back within seconds of
recovering.  Each change of health is one log line.

A backend can answer its listings while its generations hang (Ollama
#17408).  One that takes a generation and sends no response head within
the header timeout is out of rotation for that model only (L{Backend.hung}):
its listings say nothing of whether the model runs, so only a one-token
generation of that model brings it back, tried with the same backoff.  It
goes out and comes back with one log line each.
"""

from __future__ import annotations

import json
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.web.http_headers import Headers

from ollamaproxy import __version__
from ollamaproxy.backends.relay import whole_body
from ollamaproxy.backends.upstream import BytesProducer, Upstream
from ollamaproxy.config import DEFAULT_PARALLEL
from ollamaproxy.model_names import ModelName, listed_model
from ollamaproxy.record.redact import blank_credentials

log = Logger()

DEFAULT_REFRESH = 5.0
DEFAULT_MAX_BACKOFF = 8.0
_RECENT_ERRORS = 10


@dataclass
class RecentError:
    """
    One of a backend's recent errors, with its repeats folded in: a backend
    that is down fails the same way at every probe, and ten copies of one
    line would push out the error that says why it went down.

    @ivar reason: What went wrong.
    @ivar first: When it first happened (of the repeats kept), in seconds
        since the epoch.
    @ivar last: When it last happened.
    @ivar count: How many times it happened from C{first} to C{last}.
    """

    reason: str
    first: float
    last: float
    count: int = 1


@dataclass(frozen=True)
class Residency:
    """
    What a model loaded on a backend holds, as its C{/api/ps} says: the
    router prefers a backend that has the model loaded, the context rule
    (L{ollamaproxy.admission.caps.keep_loaded_context}) sends a request
    with the context its runner was loaded with, and the metrics and the
    console show the memory it takes.

    @ivar size: Bytes the model takes in memory, in all.
    @ivar size_vram: Bytes of it in the GPU's memory.
    @ivar context_length: The context its runner was loaded with, or
        L{None} when the backend does not say (Ollama before 0.6).
    @ivar expires_at: When it is unloaded if nothing uses it, as Ollama
        writes it (RFC 3339), or C{""}.
    """

    size: int = 0
    size_vram: int = 0
    context_length: int | None = None
    expires_at: str = ""


@dataclass(eq=False)
class SentContext:
    """
    A context the proxy sent a model's requests to a backend with: the one
    its runner is loaded with from then on, whatever C{/api/ps} said before
    (Ollama loads the runner with it, or reloads it).

    @ivar context: The C{num_ctx} sent.
    @ivar in_flight: Requests sent with it that have not ended.
    @ivar ended: How many C{/api/ps} reads of the backend had begun when
        the last of them ended: one begun after that sees the runner they
        loaded (L{BackendPool.sending}).
    """

    context: int
    in_flight: int = 0
    ended: int = 0


def residency(entry: Any) -> Residency:
    """
    The residency one entry of C{/api/ps} gives; a field missing or of the
    wrong type is left out, for a backend may be older or newer than this.
    """
    def whole(name: str) -> int | None:
        value = entry.get(name)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    expires = entry.get("expires_at")
    return Residency(whole("size") or 0, whole("size_vram") or 0, whole("context_length"),
                     expires if isinstance(expires, str) else "")


@dataclass(eq=False)
class Backend:
    """
    One Ollama server.

    @ivar upstream: How to reach it.
    @ivar parallel: Requests it may run at once for each model.
    @ivar healthy: Whether it gets requests.
    @ivar models: The models it has, or L{None} until it has said.
    @ivar loaded: The models it has in memory.
    @ivar resident: What each of the models in memory holds (L{Residency}).
    @ivar running: Requests in flight, per model (L{None}: naming none).
    @ivar errors: Its most recent distinct errors, the last to happen
        last (see L{note_error}).
    @ivar hung: The models it is out of rotation for: a generation of each
        hung, and no check has generated since.
    @ivar effective: Requests it may run at once for a model whose
        effective parallel is lowered below C{parallel}
        (L{ollamaproxy.backends.effective}); a model not in it, C{parallel}.
    @ivar sent: The contexts the proxy sent each model's requests with, by
        the model's canonical name (a string hashes without a call, a
        L{ModelName} with two), held over what C{/api/ps} said until a read
        of it begun after they ended (L{BackendPool.sending}).
    @ivar ps_reads: How many reads of its C{/api/ps} have begun.
    """

    upstream: Upstream
    parallel: int = DEFAULT_PARALLEL
    healthy: bool = True
    models: frozenset[ModelName] | None = None
    loaded: frozenset[ModelName] = frozenset()
    resident: dict[ModelName, Residency] = field(default_factory=dict)
    running: Counter[ModelName | None] = field(default_factory=Counter)
    errors: deque[RecentError] = field(default_factory=lambda: deque(maxlen=_RECENT_ERRORS))
    hung: set[ModelName] = field(default_factory=set)
    effective: dict[ModelName, int] = field(default_factory=dict)
    sent: dict[str, SentContext] = field(default_factory=dict)
    ps_reads: int = 0
    #: The backend's base URL, as logs and metrics name it.
    name: str = field(init=False)

    def __post_init__(self) -> None:
        self.name = self.upstream.base.decode("ascii", "replace")

    @property
    def in_flight(self) -> int:
        return sum(self.running.values())

    def note_error(self, reason: str, now: float) -> None:
        """
        Keep an error: one already kept with the same text is counted again
        and moved to the end, so that the errors kept are the last few
        distinct ones (at most C{_RECENT_ERRORS}, so memory stays bounded).

        @param now: When it happened, in seconds since the epoch.
        """
        for kept in self.errors:
            if kept.reason == reason:
                self.errors.remove(kept)
                kept.count += 1
                kept.last = now
                self.errors.append(kept)
                return
        self.errors.append(RecentError(reason, now, now))

    def serves(self, model: ModelName | None) -> bool:
        """
        Whether the backend gets requests for C{model} (L{None}: naming
        none): it is healthy, and the model's generations do not hang on it.
        """
        return self.healthy and (model is None or model not in self.hung)

    def has(self, model: ModelName) -> bool:
        """
        Whether the backend has a model, as far as it has said.
        """
        return self.models is None or model in self.models

    def limit(self, model: ModelName) -> int:
        """
        How many of C{model}'s requests the backend may run at once: its
        effective parallel, if lowered (L{effective}), else C{parallel}.
        """
        effective = self.effective
        return effective[model] if effective and model in effective else self.parallel


def own_request_headers(upstream: Upstream) -> Headers:
    """
    The headers of the proxy's own requests to a backend (health and model
    checks): its name, and its C{Via} mark, so a backend that is the proxy
    itself is found out.
    """
    headers = Headers({b"user-agent": [b"ollamaproxy/" + __version__.encode("ascii")]})
    if upstream.via:
        headers.setRawHeaders(b"via", [upstream.via])
    return headers


def model_names(body: bytes, field_name: str = "models") -> frozenset[ModelName]:
    """
    The models a listing (C{/api/tags}, C{/api/ps}) names.
    """
    entries = json.loads(body).get(field_name) or []
    return frozenset(listed_model(entry, field_name) for entry in entries)


def residencies(body: bytes) -> dict[ModelName, Residency]:
    """
    The models an C{/api/ps} answer names, with what each holds.
    """
    entries = json.loads(body).get("models") or []
    return {listed_model(entry): residency(entry) for entry in entries
            if isinstance(entry, dict)}


def _reason(e: Exception) -> str:
    """
    An error as a backend's recent errors and the log name it.
    """
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


#: A backend and a model whose generations hung on it.
_Hung = tuple[Backend, ModelName]


class BackendPool(Service):
    """
    Keeps every backend's health and models current.

    @ivar backends: The backends, in the order they were configured.
    @param on_change: Called when a backend becomes healthy or learns its
        models, so that requests waiting for it can go on.
    @param on_load: Called with a backend's name and a model that its
        C{/api/ps} names and its previous one (there was one) did not: a
        load seen, for the metrics.
    """

    def __init__(
        self,
        backends: Sequence[Backend],
        on_change: Callable[[], None] = lambda: None,
        refresh: float = DEFAULT_REFRESH,
        max_backoff: float = DEFAULT_MAX_BACKOFF,
        on_load: Callable[[str, str], None] = lambda backend, model: None,
    ) -> None:
        self.backends = list(backends)
        self.on_change = on_change
        self._on_load = on_load
        self._read_ps: set[Backend] = set()
        self._refresh = refresh
        self._max_backoff = max_backoff
        self._timers: dict[Backend | _Hung, IDelayedCall] = {}
        self._backoff: dict[Backend | _Hung, float] = {}
        self._probing: dict[Backend | _Hung, Deferred[None]] = {}
        #: Blanks credentials and the proxy's keys in the model names the
        #: log lines give: with one backend, a client names any model, and
        #: may paste a key there (L{ollamaproxy.backends.router.Router.redact_with}).
        self.redact: Callable[[str], str] = blank_credentials

    def startService(self) -> None:
        super().startService()
        for backend in self.backends:
            self.refresh(backend)

    def stopService(self) -> None:
        super().stopService()
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()
        for probe in list(self._probing.values()):
            probe.cancel()

    def refresh(self, backend: Backend) -> Deferred[None]:
        """
        Ask a backend now for its models and loaded models.

        @return: Fires when it has answered or failed (never fails).
        """
        running = self._probing.get(backend)
        if running is not None:
            return running
        timer = self._timers.pop(backend, None)
        if timer is not None and timer.active():
            timer.cancel()
        probe = Deferred.fromCoroutine(self._probe(backend))
        self._probing[backend] = probe

        def done(_: object) -> None:
            self._probing.pop(backend, None)
            self._schedule(backend)

        probe.addBoth(done)
        return probe

    def refresh_all(self) -> None:
        """
        Ask every backend again, as after a model changed.
        """
        for backend in self.backends:
            self.refresh(backend)

    def failed(self, backend: Backend, reason: str) -> None:
        """
        A request could not reach C{backend}: it gets no more until a probe
        finds it answering.
        """
        backend.note_error(reason, backend.upstream.clock.seconds())
        self._set_health(backend, False, reason)
        self._schedule(backend)

    def sending(self, backend: Backend, model: ModelName, context: int) -> SentContext:
        """
        A request of C{model} that names C{context} (after the context rule
        and the caps) is being sent to C{backend}: from now on its runner
        is known to be loaded with that context, for the next requests'
        context rule (L{ollamaproxy.backends.router.Router.loaded_context}).

        C{/api/ps}, read every few seconds, would say so only after its
        next read; meanwhile a request for less would be sent with the old
        context and reload the runner again.  So the context sent is held
        over what C{/api/ps} says while any request sent with it runs, and
        until a read of C{/api/ps} begun after the last of them ended: one
        begun earlier may list the runner before it was reloaded.  Then
        C{/api/ps} is believed again (the runner may have been unloaded, or
        reloaded by a client that does not come through the proxy).  A
        request that names no context tells nothing: Ollama's default is
        its own.

        @return: What to hand to L{ended} when the request has ended.
        """
        kept = backend.sent.get(model.canonical)
        if kept is None or kept.context != context:
            kept = backend.sent[model.canonical] = SentContext(context)
        kept.in_flight += 1
        return kept

    def ended(self, backend: Backend, kept: SentContext) -> None:
        """
        A request that L{sending} was told of has ended, however it ended.
        """
        kept.in_flight -= 1
        kept.ended = backend.ps_reads

    def hung(self, backend: Backend, model: ModelName, reason: str) -> None:
        """
        A generation of C{model} sent no response head in time: C{backend}
        gets no more requests for it until a one-token generation answers
        (checked after 1, 2, 4 ... seconds).  Its listings may well go on
        answering, and keep it in rotation for its other models.
        """
        backend.note_error(reason, backend.upstream.clock.seconds())
        if model in backend.hung:
            return
        backend.hung.add(model)
        log.warn("Backend {backend} is out for model {model}: {reason}",
                 backend=backend.name, model=self.redact(model.canonical), reason=reason)
        self._schedule_check((backend, model))

    def _schedule_check(self, hung: _Hung) -> None:
        if self.running:
            self._timers[hung] = hung[0].upstream.clock.callLater(
                self._next_backoff(hung), self._check, hung)

    def _check(self, hung: _Hung) -> None:
        check = Deferred.fromCoroutine(self._generate(*hung))
        self._probing[hung] = check

        def done(_: object) -> None:
            self._probing.pop(hung, None)
            if hung[1] in hung[0].hung:
                self._schedule_check(hung)

        check.addBoth(done)

    async def _generate(self, backend: Backend, model: ModelName) -> None:
        """
        Ask C{backend} for one token of C{model}, with no C{keep_alive}, so
        the model's residency is left as it was.  The prompt is not empty:
        an empty one only loads the model (Ollama answers C{"done_reason":
        "load"}) and a loaded model's hung runner would pass.
        """
        body = json.dumps({"model": model.canonical, "prompt": "Hi", "stream": False,
                           "options": {"num_predict": 1}}).encode()
        headers = own_request_headers(backend.upstream)
        headers.setRawHeaders(b"content-type", [b"application/json"])
        try:
            response = await backend.upstream.request(b"POST", b"/api/generate", headers,
                                                      BytesProducer(body))
            await whole_body(response)
            if response.code != 200:
                raise ValueError(f"/api/generate answered {response.code}")
        except CancelledError:
            return
        except Exception as e:
            reason = _reason(e)
            backend.note_error(reason, backend.upstream.clock.seconds())
            return
        backend.hung.discard(model)
        self._backoff.pop((backend, model), None)
        log.info("Backend {backend} generates model {model} again",
                 backend=backend.name, model=self.redact(model.canonical))
        self.on_change()

    async def _probe(self, backend: Backend) -> None:
        try:
            models = model_names(await self._get(backend, b"/api/tags"))
        except CancelledError:
            return
        except Exception as e:
            reason = _reason(e)
            backend.note_error(reason, backend.upstream.clock.seconds())
            self._set_health(backend, False, reason)
            return
        backend.ps_reads += 1
        begun = backend.ps_reads
        try:
            resident = residencies(await self._get(backend, b"/api/ps"))
        except CancelledError:
            return
        except Exception:
            # Which models are in memory only orders the choice.
            resident = {}
        else:
            if backend in self._read_ps:
                for model in resident.keys() - backend.resident.keys():
                    self._on_load(backend.name, model.canonical)
            self._read_ps.add(backend)
        if backend.sent:
            # The contexts sent that this read can see the result of: it
            # speaks for them now (a failed read, which leaves no model
            # loaded, too).
            for name, kept in list(backend.sent.items()):
                if not kept.in_flight and kept.ended < begun:
                    del backend.sent[name]
        loaded = frozenset(resident)
        learned = backend.models != models or backend.loaded != loaded
        backend.models, backend.loaded, backend.resident = models, loaded, resident
        self._backoff.pop(backend, None)
        if not self._set_health(backend, True, "") and learned:
            self.on_change()

    async def _get(self, backend: Backend, path: bytes) -> bytes:
        headers = own_request_headers(backend.upstream)
        response = await backend.upstream.request(b"GET", path, headers, None)
        body = await whole_body(response)
        if response.code != 200:
            raise ValueError(f"{path.decode()} answered {response.code}")
        return body

    def _set_health(self, backend: Backend, healthy: bool, reason: str) -> bool:
        """
        @return: Whether the health changed.
        """
        if backend.healthy == healthy:
            return False
        backend.healthy = healthy
        if healthy:
            log.info("Backend {backend} is healthy again", backend=backend.name)
            self.on_change()
        else:
            log.warn("Backend {backend} is unhealthy: {reason}", backend=backend.name,
                     reason=reason)
        return True

    def _schedule(self, backend: Backend) -> None:
        if not self.running:
            return
        timer = self._timers.get(backend)
        if timer is not None and timer.active():
            timer.cancel()
        delay = self._refresh if backend.healthy else self._next_backoff(backend)
        clock = backend.upstream.clock
        self._timers[backend] = clock.callLater(delay, self.refresh, backend)


    def _next_backoff(self, key: Backend | _Hung) -> float:
        """
        The wait before probing C{key} again: 1 s, then twice the last, at
        most C{max_backoff}, until a probe succeeds (which forgets it).
        """
        delay = min(self._backoff.get(key, 0.5) * 2, self._max_backoff)
        self._backoff[key] = delay
        return delay
