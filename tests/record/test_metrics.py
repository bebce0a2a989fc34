"""
Tests for L{ollamaproxy.record.metrics}: what the proxy counts, read back the way
Prometheus reads it.
"""

from __future__ import annotations

from typing import cast

import pytest
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock
from twisted.web.iweb import IAgent

from ollamaproxy.backends.effective import EVIDENCE
from ollamaproxy.backends.gauges import MAX_WAITING_KEYS, RouterGauges, waiting_by_label
from ollamaproxy.backends.pool import Backend, BackendPool, Residency
from ollamaproxy.backends.router import Lease, Router
from ollamaproxy.backends.upstream import Upstream
from ollamaproxy.exchange import Exchange, Outcome, StreamSummary
from ollamaproxy.model_names import resolve
from ollamaproxy.record.metrics import MAX_MODELS, Metrics
from ollamaproxy.routes import Catalogue
from tests.fakes.routers import backend as fake_backend
from tests.fakes.routers import first_byte

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(metrics: Metrics) -> Samples:
    """
    Render C{metrics} as a scrape would, and parse the text back into
    samples keyed by sample name and labels.
    """
    content_type, body = metrics.render(None)
    assert content_type.startswith(b"text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(body.decode("utf-8")):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    """
    The value of one sample, or C{None} if the scrape has no such sample.
    """
    return samples.get((name, frozenset(labels.items())))


def exchange(
    path: str = "/api/chat",
    method: str = "POST",
    key: str = "alice",
    status: int | None = 200,
    first_byte: float | None = 0.2,
    outcome: Outcome = "completed",
    summary: StreamSummary | None = None,
) -> Exchange:
    """
    A finished request that started at t=1000, labelled with its route as
    the proxy labels it.
    """
    route = Catalogue().find(path.encode())
    return Exchange(
        method=method,
        path=path,
        route="other" if route is None else route.pattern,
        client="127.0.0.1",
        started=1000.0,
        key=key,
        status=status,
        first_byte=first_byte,
        outcome=outcome,
        summary=summary,
    )


def test_requests_counted_by_labels() -> None:
    """
    Each ended request adds one to the counter for its route family,
    method, status, key name and outcome.
    """
    metrics = Metrics()
    metrics.observe(exchange(), 1001.0)
    metrics.observe(exchange(), 1002.0)
    metrics.observe(exchange(path="/api/tags", method="GET", key="-"), 1000.1)
    metrics.observe(exchange(status=401, first_byte=None, outcome="rejected", key="-"), 1000.001)
    samples = scrape(metrics)
    name = "ollamaproxy_requests_total"
    assert (
        value(
            samples,
            name,
            route="/api/chat",
            method="POST",
            status="200",
            key="alice",
            outcome="completed",
        )
        == 2.0
    )
    assert (
        value(
            samples,
            name,
            route="/api/tags",
            method="GET",
            status="200",
            key="-",
            outcome="completed",
        )
        == 1.0
    )
    assert (
        value(
            samples,
            name,
            route="/api/chat",
            method="POST",
            status="401",
            key="-",
            outcome="rejected",
        )
        == 1.0
    )
    assert sum(v for (n, _), v in samples.items() if n == name) == 4.0


def test_unbounded_request_labels_folded() -> None:
    """
    A method outside the usual ones, a request that ended before any status
    and an unknown path get fixed label values.
    """
    metrics = Metrics()
    metrics.observe(
        exchange(
            path="/etc/passwd",
            method="BREW",
            status=None,
            first_byte=None,
            outcome="client_disconnected",
        ),
        1000.5,
    )
    samples = scrape(metrics)
    assert (
        value(
            samples,
            "ollamaproxy_requests_total",
            route="other",
            method="other",
            status="none",
            key="alice",
            outcome="client_disconnected",
        )
        == 1.0
    )


def test_duration_histogram() -> None:
    """
    The request duration (end minus start) lands in the right buckets of
    its route family's histogram.
    """
    metrics = Metrics()
    metrics.observe(exchange(), 1000.3)
    metrics.observe(exchange(), 1090.0)
    samples = scrape(metrics)
    name = "ollamaproxy_request_duration_seconds"
    assert value(samples, f"{name}_bucket", route="/api/chat", le="0.25") == 0.0
    assert value(samples, f"{name}_bucket", route="/api/chat", le="0.5") == 1.0
    assert value(samples, f"{name}_bucket", route="/api/chat", le="60.0") == 1.0
    assert value(samples, f"{name}_bucket", route="/api/chat", le="120.0") == 2.0
    assert value(samples, f"{name}_bucket", route="/api/chat", le="3600.0") == 2.0
    assert value(samples, f"{name}_bucket", route="/api/chat", le="+Inf") == 2.0
    assert value(samples, f"{name}_count", route="/api/chat") == 2.0
    assert value(samples, f"{name}_sum", route="/api/chat") == pytest.approx(90.3)


def test_first_byte_only_when_known() -> None:
    """
    The time to first byte is observed only for requests whose response
    head came from Ollama.
    """
    metrics = Metrics()
    metrics.observe(exchange(first_byte=0.004), 1001.0)
    metrics.observe(exchange(first_byte=None, status=502, outcome="upstream_error"), 1001.0)
    samples = scrape(metrics)
    name = "ollamaproxy_time_to_first_byte_seconds"
    assert value(samples, f"{name}_bucket", route="/api/chat", le="0.005") == 1.0
    assert value(samples, f"{name}_count", route="/api/chat") == 1.0
    assert value(samples, f"{name}_sum", route="/api/chat") == pytest.approx(0.004)
    assert value(samples, "ollamaproxy_request_duration_seconds_count", route="/api/chat") == 2.0


def test_tokens_by_key_model_kind() -> None:
    """
    Prompt and completion tokens from a stream's summary are added up by
    key name, model and kind.
    """
    metrics = Metrics()
    metrics.observe(exchange(summary=StreamSummary("llama3.2", "stop", 10, 100)), 1005.0)
    metrics.observe(exchange(summary=StreamSummary("llama3.2", "stop", 5, 50)), 1005.0)
    metrics.observe(exchange(key="bob", summary=StreamSummary("qwen3", "length", 7, 3)), 1005.0)
    metrics.observe(exchange(key="bob"), 1005.0)
    samples = scrape(metrics)
    name = "ollamaproxy_tokens_total"
    assert value(samples, name, key="alice", model="llama3.2", kind="prompt") == 15.0
    assert value(samples, name, key="alice", model="llama3.2", kind="completion") == 150.0
    assert value(samples, name, key="bob", model="qwen3", kind="prompt") == 7.0
    assert value(samples, name, key="bob", model="qwen3", kind="completion") == 3.0
    assert len([n for (n, _) in samples if n == name]) == 4


def test_upstream_errors() -> None:
    """
    Requests that ended in C{upstream_error} or C{timeout} are counted by
    kind; others are not.
    """
    metrics = Metrics()
    assert value(scrape(metrics), "ollamaproxy_upstream_errors_total", kind="timeout") == 0.0
    metrics.observe(exchange(status=502, first_byte=None, outcome="upstream_error"), 1001.0)
    metrics.observe(exchange(status=200, outcome="upstream_error"), 1001.0)
    metrics.observe(exchange(status=504, first_byte=None, outcome="timeout"), 1001.0)
    metrics.observe(exchange(outcome="client_disconnected"), 1001.0)
    metrics.observe(exchange(status=500, outcome="internal_error"), 1001.0)
    samples = scrape(metrics)
    name = "ollamaproxy_upstream_errors_total"
    assert value(samples, name, kind="upstream_error") == 2.0
    assert value(samples, name, kind="timeout") == 1.0
    assert len([n for (n, _) in samples if n == name]) == 2


def test_auth_failures() -> None:
    """
    Rejections with 401, 403 or 429 are counted by status; other
    rejections (a 413) and other outcomes are not.
    """
    metrics = Metrics()
    samples = scrape(metrics)
    name = "ollamaproxy_auth_failures_total"
    for label in ("401", "403", "429"):
        assert value(samples, name, status=label) == 0.0
    for status in (401, 401, 403, 429, 413):
        metrics.observe(exchange(status=status, first_byte=None, outcome="rejected"), 1000.0)
    metrics.observe(exchange(status=403), 1000.0)  # Ollama's own 403
    samples = scrape(metrics)
    assert value(samples, name, status="401") == 2.0
    assert value(samples, name, status="403") == 1.0
    assert value(samples, name, status="429") == 1.0
    assert len([n for (n, _) in samples if n == name]) == 3


def test_active_streams() -> None:
    """
    The gauge goes up when a stream starts and down when it ends.
    """
    metrics = Metrics()
    assert value(scrape(metrics), "ollamaproxy_active_streams") == 0.0
    metrics.stream_started()
    metrics.stream_started()
    assert value(scrape(metrics), "ollamaproxy_active_streams") == 2.0
    metrics.stream_ended()
    assert value(scrape(metrics), "ollamaproxy_active_streams") == 1.0
    metrics.stream_ended()
    assert value(scrape(metrics), "ollamaproxy_active_streams") == 0.0


def test_model_label_cap() -> None:
    """
    Only the first L{MAX_MODELS} distinct models get their own label
    value; tokens for later ones are counted under C{other}, while models
    already seen keep theirs.
    """
    metrics = Metrics()
    for i in range(MAX_MODELS + 5):
        metrics.observe(exchange(summary=StreamSummary(f"model-{i}", None, 1, 2)), 1001.0)
    metrics.observe(exchange(summary=StreamSummary("model-0", None, 1, 2)), 1001.0)
    samples = scrape(metrics)
    name = "ollamaproxy_tokens_total"
    models = {dict(labels)["model"] for (n, labels) in samples if n == name}
    assert len(models) == MAX_MODELS + 1
    assert "other" in models
    assert f"model-{MAX_MODELS}" not in models
    assert value(samples, name, key="alice", model="model-0", kind="prompt") == 2.0
    assert value(samples, name, key="alice", model="other", kind="prompt") == 5.0
    assert value(samples, name, key="alice", model="other", kind="completion") == 10.0


def test_instances_do_not_share_state() -> None:
    """
    Two L{Metrics} have separate registries and counts, and neither
    registers anything in C{prometheus_client}'s global registry.
    """
    first = Metrics()
    second = Metrics()
    first.observe(exchange(), 1001.0)
    first.stream_started()
    assert first.registry is not second.registry
    assert value(scrape(second), "ollamaproxy_active_streams") == 0.0
    assert not [n for (n, _) in scrape(second) if n == "ollamaproxy_requests_total"]
    assert value(scrape(first), "ollamaproxy_active_streams") == 1.0
    assert REGISTRY.get_sample_value("ollamaproxy_active_streams") is None


def test_injected_registry() -> None:
    """
    A registry given to the constructor is the one the metrics go in.
    """
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.stream_started()
    assert metrics.registry is registry
    assert registry.get_sample_value("ollamaproxy_active_streams") == 1.0


def test_render_openmetrics() -> None:
    """
    A scraper that asks for OpenMetrics gets it; any other gets the
    Prometheus text format.
    """
    metrics = Metrics()
    metrics.observe(exchange(), 1001.0)
    content_type, body = metrics.render(
        b"application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
    )
    assert content_type.startswith(b"application/openmetrics-text")
    assert body.endswith(b"# EOF\n")
    families = {f.name: f for f in openmetrics_families(body.decode("utf-8"))}
    assert families["ollamaproxy_requests"].type == "counter"
    for accept in (None, b"", b"*/*", b"text/plain"):
        content_type, body = metrics.render(accept)
        assert content_type == b"text/plain; version=0.0.4; charset=utf-8"
        assert b"# EOF" not in body


def test_backends_and_queue_are_shown_at_each_scrape() -> None:
    """
    Each backend's health and requests in flight, and the queue's depth,
    are read from the router when scraped.
    """
    clock = Clock()
    backends = [
        Backend(Upstream(cast(IAgent, None), f"http://{name}:11434".encode(), clock, 1, 1), 1)
        for name in ("a", "b")
    ]
    router = Router(BackendPool(backends), clock)
    metrics = Metrics()
    metrics.registry.register(RouterGauges(router))
    backends[1].healthy = False
    router.acquire("k", resolve("m"), runs=True)
    router.acquire("k", resolve("m"), runs=True)
    samples = scrape(metrics)
    assert value(samples, "ollamaproxy_backend_up", backend="http://a:11434") == 1.0
    assert value(samples, "ollamaproxy_backend_up", backend="http://b:11434") == 0.0
    assert value(samples, "ollamaproxy_backend_in_flight", backend="http://a:11434") == 1.0
    assert value(samples, "ollamaproxy_queue_waiting", key="k") == 1.0
    assert value(samples, "ollamaproxy_queue_waiting", key="other") == 0.0


def test_queue_waiting_by_key_is_bounded() -> None:
    """
    C{ollamaproxy_queue_waiting} is by key; beyond L{MAX_WAITING_KEYS} keys,
    those with the fewest waiting are summed under C{other}, so no client
    makes the label's values grow past the bound.
    """
    waiting = {f"k{i}": 2 for i in range(MAX_WAITING_KEYS)} | {"big": 5, "x": 1, "y": 1}
    labels = waiting_by_label(waiting)
    assert len(labels) == MAX_WAITING_KEYS + 1
    assert (labels["big"], labels["k0"], labels["other"]) == (5, 2, 4)
    assert "x" not in labels and "y" not in labels
    assert sum(labels.values()) == sum(waiting.values())
    assert waiting_by_label({}) == {"other": 0}


def test_queue_waits_and_rejections_are_counted() -> None:
    """
    A request that waited is observed in the queue-wait histogram; a queue
    rejection is its own outcome.
    """
    metrics = Metrics()
    waited = exchange()
    waited.queued = 2.0
    metrics.observe(waited, 1003.0)
    metrics.observe(exchange(status=503, outcome="queue_full"), 1000.1)
    samples = scrape(metrics)
    assert value(samples, "ollamaproxy_queue_wait_seconds_count") == 1.0
    assert value(samples, "ollamaproxy_queue_wait_seconds_sum") == 2.0
    assert value(samples, "ollamaproxy_requests_total", route="/api/chat", method="POST",
                 status="503", key="alice", outcome="queue_full") == 1.0


def test_model_loads_are_counted_once_however_seen() -> None:
    """
    A load seen in an answer's C{load_duration} and again as a model that
    appears in C{/api/ps}, in either order, counts once; one seen only one
    way counts too; a C{load_duration} of a model already loaded (a few
    milliseconds) is no load.
    """
    metrics = Metrics()
    a, b = "http://a:11434", "http://b:11434"

    def answered(backend: str, load_seconds: float) -> None:
        ended = exchange(summary=StreamSummary("llama3.2", "stop", 1, 1,
                                               load_seconds=load_seconds))
        ended.backend = backend
        metrics.observe(ended, 1005.0)

    answered(a, 6.5)
    metrics.model_loaded(a, "llama3.2:latest")
    metrics.model_loaded(b, "llama3.2:latest")
    answered(b, 7.0)
    answered(a, 0.02)
    metrics.model_loaded(a, "mistral:latest")
    samples = scrape(metrics)
    name = "ollamaproxy_model_loads_total"
    assert value(samples, name, backend=a, model="llama3.2:latest") == 1.0
    assert value(samples, name, backend=b, model="llama3.2:latest") == 1.0
    assert value(samples, name, backend=a, model="mistral:latest") == 1.0
    answered(a, 6.5)
    assert value(scrape(metrics), name, backend=a, model="llama3.2:latest") == 2.0


def test_each_loaded_model_s_vram_is_shown() -> None:
    """
    C{ollamaproxy_backend_model_vram_bytes} gives each backend's loaded
    models' VRAM, as its last C{/api/ps} said, at each scrape; beyond
    L{MAX_MODELS} models on a backend the rest are summed under C{other}.
    """
    clock = Clock()
    backend = Backend(Upstream(cast(IAgent, None), b"http://a:11434", clock, 1, 1), 1)
    metrics = Metrics()
    metrics.registry.register(RouterGauges(Router(BackendPool([backend]), clock)))
    name = "ollamaproxy_backend_model_vram_bytes"
    backend.resident = {resolve("llama3.2"): Residency(3 << 30, 2 << 30, 8192)}
    samples = scrape(metrics)
    assert value(samples, name, backend="http://a:11434", model="llama3.2:latest") == 2 << 30
    backend.resident = {resolve(f"m{i}"): Residency(10, 1) for i in range(MAX_MODELS + 3)}
    samples = scrape(metrics)
    shown = [labels for (n, labels) in samples if n == name]
    assert len(shown) == MAX_MODELS + 1
    assert value(samples, name, backend="http://a:11434", model="other") == 3.0


def test_prompt_cache_reuse_is_estimated_from_cold_turns_rates() -> None:
    """
    A backend's prefill rate is learned from turns that found no cache of
    their conversation there (new, moved); a turn that went home and took a
    tenth of the time its prompt would at that rate counts nine tenths of
    its prompt as cached.  Before a rate is known, and for requests that
    are no turns, nothing is counted; the turns are counted by placement.
    """
    metrics = Metrics()
    backend = "http://127.0.0.1:11434"

    def turn(placement: str, tokens: int, seconds: float, model: str = "llama3.2") -> None:
        observed = exchange(summary=StreamSummary(model, "stop", tokens, 10,
                                                  prompt_seconds=seconds))
        observed.backend, observed.placement = backend, placement
        metrics.observe(observed, 1005.0)

    turn("home", 1000, 0.1)  # no rate yet: not counted
    metrics.observe(exchange(summary=StreamSummary("llama3.2", "stop", 500, 10,
                                                   prompt_seconds=0.5)), 1005.0)
    assert value(scrape(metrics), "ollamaproxy_prompt_tokens_total", backend=backend) is None
    for tokens in (1000, 2000, 3000):
        turn("new", tokens, tokens / 1000)  # 1000 tokens a second, all evaluated
    turn("home", 4000, 0.4)  # 400 evaluated, 3600 from the cache
    turn("home", 1000, 0.1, model="mistral")  # mistral's rate is not known
    samples = scrape(metrics)
    assert value(samples, "ollamaproxy_prompt_tokens_total", backend=backend) == 10_000.0
    assert value(samples, "ollamaproxy_prompt_tokens_cached_estimate_total",
                 backend=backend) == pytest.approx(3600.0)
    name = "ollamaproxy_conversation_turns_total"
    assert value(samples, name, backend=backend, placement="home") == 3.0
    assert value(samples, name, backend=backend, placement="new") == 3.0


def test_each_backend_s_model_switches_are_counted() -> None:
    """
    C{ollamaproxy_model_switches_total} gives each backend's switches, as
    the router's collator counted them.
    """
    clock = Clock()
    backend = Backend(Upstream(cast(IAgent, None), b"http://a:11434", clock, 1, 1), 1,
                      loaded=frozenset([resolve("llama3.2")]))
    router = Router(BackendPool([backend]), clock, switch_hold=3)
    metrics = Metrics()
    metrics.registry.register(RouterGauges(router))
    name = "ollamaproxy_model_switches_total"
    assert value(scrape(metrics), name, backend="http://a:11434") == 0
    router.acquire("k", resolve("mistral"), runs=True)
    assert value(scrape(metrics), name, backend="http://a:11434") == 1


def test_a_lowered_effective_parallel_is_a_gauge() -> None:
    """
    C{ollamaproxy_backend_effective_parallel} gives a backend's effective
    parallel for a model while it is lowered, and nothing before.
    """
    clock = Clock()
    a = fake_backend(clock, "a:11434", ("llama3.2",), parallel=3)
    router = Router(BackendPool([a]), clock)
    metrics = Metrics()
    metrics.registry.register(RouterGauges(router))
    name = "ollamaproxy_backend_effective_parallel"
    assert not [n for n, _ in scrape(metrics) if n == name]
    leases: list[Lease] = []
    for _ in range(2 * EVIDENCE):
        router.acquire("k", resolve("llama3.2"), runs=True).addCallback(leases.append)
    while leases:
        first_byte(leases.pop(0)).release()
    assert value(scrape(metrics), name, backend="http://a:11434", model="llama3.2:latest") == 1
