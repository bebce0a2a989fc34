# -*- test-case-name: tests.record.test_metrics -*-
"""
The backends' health and load and the fair queue's depth, as Prometheus
gauges read at each scrape.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ollamaproxy.backends.router import Router


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
        for backend in self._router.backends:
            up.add_metric([backend.name], 1.0 if backend.healthy else 0.0)
            in_flight.add_metric([backend.name], float(backend.in_flight))
        waiting = GaugeMetricFamily(
            "ollamaproxy_queue_waiting", "Requests waiting in the fair queue for a busy model.",
            value=float(len(self._router.queue)),
        )
        return [up, in_flight, waiting]
