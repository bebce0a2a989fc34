# -*- test-case-name: tests.record.test_metrics -*-
"""
Prometheus metrics: what the proxy counts, and how it shows them.

L{Metrics} keeps its own L{CollectorRegistry}, never
C{prometheus_client}'s global one, so two proxies (or two tests) in one
process never share a count.  The proxy calls L{Metrics.observe} once per
request, when the request ends (with the same L{Exchange} the access log
gets), and L{Metrics.stream_started} / L{Metrics.stream_ended} around each
request in flight to Ollama.  L{Metrics.render} answers a scrape.

Every label has a bounded set of values, whatever clients send:

  - C{route} is the pattern of one of Ollama's routes in the catalogue
    (L{ollamaproxy.routes}), such as C{/v1/models/{model}}, or C{other};
  - C{method}, C{status} and C{outcome} are folded into fixed sets;
  - C{key} is a key's name, from the operator's configuration (or C{-}
    for a request without a key);
  - C{period} (of a token quota) is C{day} or C{month};
  - C{model} comes from Ollama's answers and is free text, so only the
    first L{MAX_MODELS} distinct models get their own label value; later
    ones are counted as C{other};
  - C{backend} is a backend's base URL, from the operator's configuration.

Model loads (C{ollamaproxy_model_loads_total}) are seen two ways: an answer
whose C{load_duration} is at least L{LOAD_SECONDS} (Ollama reports a few
milliseconds for a model already loaded), and a model that a backend's
C{/api/ps} names and its previous one did not
(L{ollamaproxy.backends.pool.BackendPool}'s C{on_load}).  A load through
the proxy is seen both ways, in either order (the C{/api/ps} read may come
while the answer streams): each sighting of one kind waits for its twin of
the other, and the pair counts once.  A load by a client beside the proxy,
or one whose answer never came, is seen once and counted once.

Prompt-cache reuse is estimated, since Ollama does not report it: its
C{prompt_eval_count} is the whole prompt, cached or not, and its
C{prompt_eval_duration} the time spent on the part that was not cached.
The proxy learns each backend's prefill rate for each model (tokens a
second) from turns it knows found no cache of their own conversation there
(a conversation's first turn, or one that moved: L{Exchange}'s
C{placement}), as the median of the last L{PREFILL_SAMPLES} such rates;
a turn's evaluated tokens are then its C{prompt_eval_duration} times that
rate, and the rest of its prompt is counted as cached
(C{ollamaproxy_prompt_tokens_cached_estimate_total}, beside
C{ollamaproxy_prompt_tokens_total}).  Rough by design: a first turn that
shares a system prompt cached by another conversation looks faster than
the GPU is, which makes the estimate err low; answers without durations
(C{/v1}) and backends whose rate is not yet known count in neither.
"""

from __future__ import annotations

from collections import deque
from statistics import median
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics import MetricWrapperBase
from twisted.web.resource import Resource
from twisted.web.server import Request

from ollamaproxy.exchange import COLD_TURNS, HTTP_METHODS, OUTCOMES, Exchange
from ollamaproxy.model_names import resolve
from ollamaproxy.readiness import READY_PATH, Readiness

__all__ = ["DURATION_BUCKETS", "MAX_MODELS", "Metrics"]

# From a cached /api/tags (milliseconds) to a long generation on a slow
# machine or a model pull (an hour).
DURATION_BUCKETS = (
    *(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5),
    *(1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0),
)

# How many distinct models get their own label value.
MAX_MODELS = 100
#: The least C{load_duration} (seconds) that counts as a model load: for a
#: model already in memory Ollama reports the few milliseconds it took to
#: find its runner.
LOAD_SECONDS = 0.5
#: How many cold turns' prefill rates, per backend and model, the rate that
#: estimates cache reuse is the median of.
PREFILL_SAMPLES = 15

OTHER = "other"

_UPSTREAM_ERRORS = ("upstream_error", "timeout")
_AUTH_FAILURES = (401, 403, 429)


#: The label of each status a response can have; any other is C{other}.
_STATUS_LABELS: dict[int | None, str] = {
    None: "none", **{status: str(status) for status in range(100, 600)}
}

_Metric = TypeVar("_Metric", bound=MetricWrapperBase)


class _Children(dict[tuple[str, ...], _Metric], Generic[_Metric]):
    """
    A labelled metric's children, by their label values, each looked up in
    the metric once: C{labels()} checks and converts every value and takes
    a lock on each call, most of the cost of counting a request, for a
    child that is the same every time.  Bounded as the label values are
    (the module's docstring); the metric keeps every child anyway.
    """

    def __init__(self, metric: _Metric) -> None:
        super().__init__()
        self._metric = metric

    def __missing__(self, values: tuple[str, ...]) -> _Metric:
        child = self[values] = self._metric.labels(*values)
        return child


class Metrics:
    """
    The proxy's Prometheus metrics, in a registry of their own.

    @param registry: Where the metrics are registered; a new, empty
        registry by default.  It must not already hold metrics of the same
        names.
    @ivar registry: The registry L{render} exposes.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = CollectorRegistry() if registry is None else registry
        self._requests = _Children(Counter(
            "ollamaproxy_requests",
            "Requests answered, by route family, method, status, key name and outcome.",
            ["route", "method", "status", "key", "outcome"],
            registry=self.registry,
        ))
        self._duration = _Children(Histogram(
            "ollamaproxy_request_duration_seconds",
            "Seconds from a request's arrival to its end, by route family.",
            ["route"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        ))
        self._first_byte = _Children(Histogram(
            "ollamaproxy_time_to_first_byte_seconds",
            "Seconds from a request's arrival to Ollama's response head, by route family.",
            ["route"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        ))
        # Read when scraped, not set twice a request (a check and a lock each).
        self._streams = 0
        Gauge("ollamaproxy_active_streams", "Requests in flight to Ollama.",
              registry=self.registry).set_function(lambda: self._streams)
        self._tokens = _Children(Counter(
            "ollamaproxy_tokens",
            "Tokens Ollama reported, by key name, model and kind (prompt or completion).",
            ["key", "model", "kind"],
            registry=self.registry,
        ))
        self._upstream_errors = Counter(
            "ollamaproxy_upstream_errors",
            "Requests that failed on Ollama's side, by kind (upstream_error or timeout).",
            ["kind"],
            registry=self.registry,
        )
        self._auth_failures = Counter(
            "ollamaproxy_auth_failures",
            "Requests refused with 401, 403 or 429, by status.",
            ["status"],
            registry=self.registry,
        )
        self._shed = Counter(
            "ollamaproxy_connections_shed",
            "Idle client connections closed to make room for new ones.", registry=self.registry,
        )
        self._quota_refusals = Counter(
            "ollamaproxy_quota_refusals",
            "Requests refused with 429 because their key had used its token quota, by key "
            "name and period (day or month, UTC).",
            ["key", "period"],
            registry=self.registry,
        )
        self._loads = Counter(
            "ollamaproxy_model_loads",
            "Models loaded into a backend's memory, as its answers' load_duration and its "
            "/api/ps show them, by backend and model.",
            ["backend", "model"],
            registry=self.registry,
        )
        self._queued = Histogram(
            "ollamaproxy_queue_wait_seconds",
            "Seconds requests that waited for a busy model spent in the fair queue.",
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self._conversations()
        # Present from the start, so that rate() sees the first one.
        for kind in _UPSTREAM_ERRORS:
            self._upstream_errors.labels(kind=kind)
        for status in _AUTH_FAILURES:
            self._auth_failures.labels(status=str(status))
        self._models: set[str] = set()
        # Loads seen one way, waiting for their twin seen the other way
        # (see the module's docstring): bounded by backends times models.
        self._answered_loads: set[tuple[str, str]] = set()
        self._listed_loads: set[tuple[str, str]] = set()

    def _conversations(self) -> None:
        """
        The metrics of conversations' turns and of the prompt cache's use
        (see the module's docstring).
        """
        self._turns = _Children(Counter(
            "ollamaproxy_conversation_turns",
            "Turns of conversations, by backend and where they went against their "
            "conversation's last turn (home, moved, new).",
            ["backend", "placement"], registry=self.registry))
        self._prompt = _Children(Counter(
            "ollamaproxy_prompt_tokens",
            "Prompt tokens of turns whose answer said how long the prompt took, on backends "
            "whose prefill rate is known, by backend.",
            ["backend"], registry=self.registry))
        self._cached = _Children(Counter(
            "ollamaproxy_prompt_tokens_cached_estimate",
            "Of those, the tokens estimated to have come from Ollama's prompt cache "
            "(prompt_eval_duration against the backend's measured prefill rate), by backend.",
            ["backend"], registry=self.registry))
        # Cold turns' prefill rates, per backend and model label: bounded by
        # backends times MAX_MODELS + 1.
        self._prefill: dict[tuple[str, str], deque[float]] = {}

    def _model_label(self, model: str) -> str:
        """
        The label value for a model: itself while fewer than L{MAX_MODELS}
        models have been seen, C{other} for models beyond.
        """
        model = model or "unknown"
        if model in self._models:
            return model
        if len(self._models) < MAX_MODELS:
            self._models.add(model)
            return model
        return OTHER

    def observe(self, exchange: Exchange, now: float) -> None:
        """
        Count a request that has ended.

        @param exchange: What happened to it.
        @param now: When it ended, on the clock that set C{exchange.started}.
        """
        route, method, outcome = exchange.route, exchange.method, exchange.outcome
        status = _STATUS_LABELS.get(exchange.status, OTHER)
        self._requests[(
            route,
            method if method in HTTP_METHODS else OTHER,
            status,
            exchange.key,
            outcome if outcome in OUTCOMES else OTHER,
        )].inc()
        duration = now - exchange.started
        self._duration[(route,)].observe(duration if duration > 0 else 0.0)
        first_byte = exchange.first_byte
        if first_byte is not None:
            self._first_byte[(route,)].observe(first_byte if first_byte > 0 else 0.0)
        if exchange.queued:
            self._queued.observe(exchange.queued)
        if exchange.outcome in _UPSTREAM_ERRORS:
            self._upstream_errors.labels(kind=exchange.outcome).inc()
        if exchange.outcome == "rejected" and exchange.status in _AUTH_FAILURES:
            self._auth_failures.labels(status=status).inc()
        # A turn of a conversation: only those say whether a cache of
        # theirs could be there (see the module's docstring).
        turn = exchange.placement and exchange.backend
        if turn:
            self._turns[(exchange.backend, exchange.placement)].inc()
        summary = exchange.summary
        if summary is None:
            return
        model = self._model_label(summary.model)
        for kind, count in (
            ("prompt", summary.prompt_tokens),
            ("completion", summary.completion_tokens),
        ):
            self._tokens[(exchange.key, model, kind)].inc(max(0, count))
        if (summary.load_seconds or 0) >= LOAD_SECONDS and exchange.backend:
            self._load_seen(exchange.backend, resolve(summary.model).canonical,
                            self._answered_loads, self._listed_loads)
        if turn and summary.prompt_seconds and summary.prompt_tokens > 0:
            self._prompt_seen(exchange.backend, model, summary.prompt_tokens,
                              summary.prompt_seconds, exchange.placement)

    def _prompt_seen(self, backend: str, model: str, tokens: int, seconds: float,
                     placement: str) -> None:
        """
        Count a prompt of C{tokens} that took C{seconds} to evaluate, and
        the part of it estimated cached; learn the prefill rate from a cold
        turn (see the module's docstring).
        """
        rates = self._prefill.get((backend, model))
        if placement in COLD_TURNS:
            if rates is None:
                rates = self._prefill[backend, model] = deque(maxlen=PREFILL_SAMPLES)
            rates.append(tokens / seconds)
        if rates is None:
            return
        evaluated = seconds * median(rates)
        self._prompt[(backend,)].inc(tokens)
        self._cached[(backend,)].inc(max(0.0, tokens - evaluated))

    def model_loaded(self, backend: str, model: str) -> None:
        """
        A backend's C{/api/ps} names a model its previous one did not.

        @param model: The model's canonical name.
        """
        self._load_seen(backend, model, self._listed_loads, self._answered_loads)

    def _load_seen(self, backend: str, model: str, mine: set[tuple[str, str]],
                   twins: set[tuple[str, str]]) -> None:
        """
        Count a load seen one way, unless its twin seen the other way
        already was (see the module's docstring).
        """
        label = self._model_label(model)
        seen = (backend, label)
        if seen in twins:
            twins.discard(seen)
            return
        mine.add(seen)
        self._loads.labels(backend=backend, model=label).inc()

    def quota_refused(self, key: str, period: str) -> None:
        """
        A request of key C{key} was refused: the key had used its token
        quota for the C{period} (C{day} or C{month}).
        """
        self._quota_refusals.labels(key=key, period=period).inc()

    def connection_shed(self) -> None:
        """
        An idle client connection was closed to make room.
        """
        self._shed.inc()

    def stream_started(self) -> None:
        """
        A request is now in flight to Ollama.
        """
        self._streams += 1

    def stream_ended(self) -> None:
        """
        A request in flight to Ollama has ended, however it ended.
        """
        self._streams -= 1

    def render(self, accept: bytes | None) -> tuple[bytes, bytes]:
        """
        The metrics, for a scrape.

        @param accept: The scrape's C{Accept} header, if any: OpenMetrics
            if it asks for it, the Prometheus text format otherwise.
        @return: The C{Content-Type} and the body of the answer.
        """
        encoder, content_type = choose_encoder((accept or b"").decode("latin-1"))
        return content_type.encode("latin-1"), encoder(self.registry)


class MetricsResource(Resource):
    """
    Serves the metrics, and readiness at C{/-/ready}, without a key: for the
    separate C{--metrics-listen} endpoint, which is meant for a private
    address.
    """

    isLeaf = True

    def __init__(self, metrics: Metrics, readiness: Readiness | None = None) -> None:
        super().__init__()
        self._metrics = metrics
        self._readiness = readiness

    def render_GET(self, request: Request) -> bytes:
        if self._readiness is not None and request.path == READY_PATH:
            code, body = self._readiness.answer()
            request.setResponseCode(code)
            request.setHeader(b"content-type", b"application/json; charset=utf-8")
            request.setHeader(b"cache-control", b"no-store")
            return body
        content_type, body = self._metrics.render(request.getHeader(b"accept"))
        request.setHeader(b"content-type", content_type)
        return body
