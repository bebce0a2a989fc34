# -*- test-case-name: tests.record.test_metrics -*-
"""
The backends' health and load and the fair queue's depth, as Prometheus
gauges read at each scrape.

The queue's depth is by key, so that one key filling the waiting room
shows.  Its C{key} label is bounded: when more than L{MAX_WAITING_KEYS}
keys wait, the L{MAX_WAITING_KEYS} with the most waiting (the first come
among equals) have their own value and the rest are summed under C{other}.
C{other} is always there, 0 when nothing is beyond the bound, so that a sum
over the keys is 0, not empty, while nobody waits.

Each backend's loaded models' VRAM (C{ollamaproxy_backend_model_vram_bytes},
from its last C{/api/ps}: L{ollamaproxy.backends.pool.Residency}) is by
backend and model; the model label is bounded as the request metrics bound
it, L{MAX_MODELS} models a backend (the largest), the rest summed under
C{other}.  A model unloaded is gone from the next scrape.

The model switches each backend made (C{ollamaproxy_model_switches_total},
L{ollamaproxy.backends.collate}) are counted by the router's collator and
read here, 0 for every backend while C{--switch-hold} is 0.  A backend's
effective parallel for a model (C{ollamaproxy_backend_effective_parallel},
L{ollamaproxy.backends.effective}) is there only while it is lowered: at
most one value for each model a backend ran, each lowered on evidence.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ollamaproxy.backends.router import Router
from ollamaproxy.record.metrics import MAX_MODELS

#: How many keys get a value of their own in C{ollamaproxy_queue_waiting}.
MAX_WAITING_KEYS = 200

OTHER = "other"


def waiting_by_label(waiting: dict[str, int]) -> Counter[str]:
    """
    How many wait under each value of the C{key} label, from how many wait
    for each key: see the module's docstring.
    """
    ranked = sorted(waiting.items(), key=lambda item: -item[1])
    labels: Counter[str] = Counter({OTHER: 0})
    for key, count in ranked[:MAX_WAITING_KEYS]:
        labels[key] += count
    for _, count in ranked[MAX_WAITING_KEYS:]:
        labels[OTHER] += count
    return labels


class RouterGauges(Collector):
    """
    The backends and the fair queue, as they are at a scrape.
    """

    def __init__(self, router: Router) -> None:
        self._router = router

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily(
            "ollamaproxy_backend_up", "Whether a backend is healthy (1) or not (0).",
            labels=["backend"],
        )
        in_flight = GaugeMetricFamily(
            "ollamaproxy_backend_in_flight", "Requests in flight to a backend.",
            labels=["backend"],
        )
        vram = GaugeMetricFamily(
            "ollamaproxy_backend_model_vram_bytes",
            "Bytes of GPU memory a model loaded on a backend takes, as its /api/ps says.",
            labels=["backend", "model"],
        )
        for backend in self._router.backends:
            up.add_metric([backend.name], 1.0 if backend.healthy else 0.0)
            in_flight.add_metric([backend.name], float(backend.in_flight))
            ranked = sorted(((r.size_vram, m.canonical) for m, r in backend.resident.items()),
                            reverse=True)
            for size, model in ranked[:MAX_MODELS]:
                vram.add_metric([backend.name, model], float(size))
            if len(ranked) > MAX_MODELS:
                vram.add_metric([backend.name, OTHER],
                                float(sum(size for size, _ in ranked[MAX_MODELS:])))
        switches = CounterMetricFamily(
            "ollamaproxy_model_switches",
            "Times a backend holding as many models as it can was given a request for "
            "another (--switch-hold collates them).",
            labels=["backend"],
        )
        collator = self._router.collator
        for backend in self._router.backends:
            count = 0 if collator is None else collator.switches(backend)
            switches.add_metric([backend.name], float(count))
        effective = GaugeMetricFamily(
            "ollamaproxy_backend_effective_parallel",
            "Requests of a model a backend is sent at once, where it was seen running fewer "
            "than --parallel (present only while lowered).",
            labels=["backend", "model"],
        )
        for backend, model, lowered in self._router.effective.lowered():
            effective.add_metric([backend.name, model], float(lowered))
        waiting = GaugeMetricFamily(
            "ollamaproxy_queue_waiting",
            "Requests waiting in the fair queue for a busy model, by key.",
            labels=["key"],
        )
        for key, count in waiting_by_label(self._router.waiting()).items():
            waiting.add_metric([key], float(count))
        return [up, in_flight, vram, switches, effective, waiting]
